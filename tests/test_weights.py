"""build_vit and weights loading: files (.npz/.safetensors/.pth), hub, builtin, and clear errors."""

from __future__ import annotations

import argparse
import json
import socket
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import _load_weights

import pgpcl.models.weights as W
from pgpcl.config import BackboneConfig
from pgpcl.errors import CheckpointError, ConfigError
from pgpcl.io import sha256_file
from pgpcl.models import build_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
ARCH = "vit_base_patch16_224"


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def cfg(**kw) -> BackboneConfig:
    return BackboneConfig(arch=ARCH, **{**TINY, **kw})


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(ARCH, pretrained=False, **{**TINY, "num_classes": 0, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def google_arrays(model) -> dict[str, np.ndarray]:
    """A timm ViT in the original Google ViT .npz naming (Transformer/encoderblock_i/...)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D = sd["cls_token"].shape[-1]
    H = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": np.zeros((D, 5), np.float32),  # classifier: must be ignored
        "head/bias": np.zeros(5, np.float32),
        "pre_logits/kernel": np.zeros((D, D), np.float32),
    }
    for i in range(len(model.blocks)):
        b, bp = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = bp + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w[f"{att}{name}/kernel"] = qkv_w[j * D : (j + 1) * D].T.reshape(D, H, D // H)
            w[f"{att}{name}/bias"] = qkv_b[j * D : (j + 1) * D].reshape(H, D // H)
        w[att + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(H, D // H, D)
        w[att + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, t in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{bp}{ln}/scale"], w[f"{bp}{ln}/bias"] = sd[b + t + ".weight"], sd[b + t + ".bias"]
        for r in range(2):
            w[f"{bp}MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[f"{bp}MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in w.items()}


def to_google_npz(model, path, prefix: str = "", extra: dict | None = None) -> None:
    w = {prefix + k: v for k, v in google_arrays(model).items()}
    np.savez(path, **w, **(extra or {}))


def to_big_vision_stacked_npz(model, path) -> None:
    """big_vision naming (params/, pos_embedding, *_0 sub-modules) with blocks stacked on axis 0."""
    w, blocks = {}, {}
    for k, v in google_arrays(model).items():
        k = k.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
        k = k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
        k = k.replace("MlpBlock_3", "MlpBlock_0").replace("LayerNorm_2", "LayerNorm_1")
        if k.startswith("Transformer/encoderblock_"):
            i, rest = k[len("Transformer/encoderblock_") :].split("/", 1)
            blocks.setdefault(rest, {})[int(i)] = v
        else:
            w[k] = v
    for rest, per in blocks.items():
        w[f"Transformer/encoderblock/{rest}"] = np.stack([per[i] for i in sorted(per)])
    np.savez(path, **{f"params/{k}": v for k, v in w.items()})


# ----------------------------------------------------------------------------------------------------
# Random init and local files


def test_random_init():
    model, info = build_vit(cfg())
    assert info == W.WeightsInfo("random", None)
    assert not model.training and model.embed_dim == 32 and len(model.blocks) == 2
    assert model.patch_embed.num_patches == 16


def test_safetensors_roundtrip(tmp_path):
    src = tiny_model()
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    model, info = build_vit(cfg(weights=str(path)))
    assert same_weights(model, src)
    assert info.source == f"file:{path}" and info.sha256 == sha256_file(path)


def test_pth_wrapped_ddp_and_head_ignored(tmp_path):
    src = tiny_model(num_classes=7)  # has head.weight/bias
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    model, _ = build_vit(cfg(weights=str(path)))
    ref = tiny_model(num_classes=7)
    ref.reset_classifier(0)
    assert same_weights(model, ref)


def test_a_training_checkpoint_with_its_argparse_namespace_loads(tmp_path):
    """timm's CheckpointSaver (and many training scripts) store the run's argparse.Namespace beside the state
    dict: that is no code, and refusing it called a good file corrupt."""
    src = tiny_model()
    path = tmp_path / "checkpoint-9.pth.tar.pth"
    torch.save({"epoch": 9, "arch": ARCH, "state_dict": src.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    model, _ = build_vit(cfg(weights=str(path)))
    assert same_weights(model, src)


@pytest.mark.parametrize("wrap", [lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
                                  lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
                                  lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()}])
def test_other_common_wrappers_and_prefixes_are_peeled(tmp_path, wrap):
    src = tiny_model()
    path = tmp_path / "w.pth"
    torch.save(wrap(src.state_dict()), path)
    model, _ = build_vit(cfg(weights=str(path)))
    assert same_weights(model, src)


def test_a_file_of_another_naming_says_so_not_to_change_sizes(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({f"encoder.{k}": v for k, v in tiny_model().state_dict().items()}, path)
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path)))
    msg = one_line_error(e)
    assert "hold none of the backbone's keys (the file's first keys: 'encoder." in msg
    assert "save the backbone's state_dict() itself" in msg and "size overrides" not in msg


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_google_npz_matches_original_and_timm_loader(tmp_path, prefix):
    src = tiny_model()
    path = tmp_path / "ViT-tiny.npz"
    to_google_npz(src, path, prefix)
    model, info = build_vit(cfg(weights=str(path)))
    assert same_weights(model, src)
    assert info.sha256 == sha256_file(path)
    # Cross-check the conversion against timm's own .npz loader.
    ref = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY)
    _load_weights(ref, str(path))
    assert same_weights(model, ref)


def test_big_vision_stacked_npz(tmp_path):
    src = tiny_model()
    path = tmp_path / "bv.npz"
    to_big_vision_stacked_npz(src, path)
    model, _ = build_vit(cfg(weights=str(path)))
    assert same_weights(model, src)
    ref = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY)
    _load_weights(ref, str(path))
    assert same_weights(model, ref)


@pytest.mark.parametrize("to_npz", [to_google_npz, to_big_vision_stacked_npz])
def test_npz_of_another_head_count_is_refused_not_reshaped(tmp_path, to_npz):
    """(D, H, hd) kernels flatten to the same (H*hd, D) rows for any H: the shapes pass, the attention would not."""
    path = tmp_path / "w.npz"
    heads = 4 if TINY["num_heads"] != 4 else 2
    to_npz(tiny_model(num_heads=heads), path)
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path)))
    assert (f"were trained with {heads} attention heads but the backbone has {TINY['num_heads']}; set "
            f"backbone.num_heads={heads}") in one_line_error(e)
    model, _ = build_vit(cfg(weights=str(path), num_heads=heads))
    assert model.blocks[0].attn.num_heads == heads


def test_npz_unknown_array_is_rejected(tmp_path):
    path = tmp_path / "x.npz"
    to_google_npz(
        tiny_model(), path, extra={"Transformer/encoderblock_0/Extra/scale": np.ones(3, np.float32)}
    )
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path)))
    assert "Transformer/encoderblock_0/Extra/scale" in one_line_error(e)


def test_pos_embed_resampled_to_new_grid(tmp_path):
    src = tiny_model()  # 4x4 grid
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    with pytest.warns(UserWarning, match=r"were made for another patch or image size: resampled \(position "
                                         r"embeddings 17 -> 37 tokens\)"):
        model, _ = build_vit(cfg(weights=str(path), img_size=48))  # 6x6 grid
    want = resample_abs_pos_embed(src.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 37, 32)
    assert torch.allclose(model.pos_embed, want, atol=1e-6)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(tiny_model(embed_dim=64, num_heads=2).state_dict(), str(path))
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path)))
    msg = one_line_error(e)
    assert "'cls_token'" in msg and "(1, 1, 32)" in msg and "(1, 1, 64)" in msg and "backbone" in msg


@pytest.mark.parametrize(
    ("file_depth", "model_depth", "word"), [(3, 2, "blocks.2."), (2, 3, "blocks.2.norm1.weight")]
)
def test_depth_mismatch_names_first_bad_key(tmp_path, file_depth, model_depth, word):
    path = tmp_path / "w.safetensors"
    save_file(tiny_model(depth=file_depth).state_dict(), str(path))
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path), depth=model_depth))
    assert word in one_line_error(e)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "w.npz", "w.bin"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 37)
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path)))
    assert "corrupt" in one_line_error(e)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny_model().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError):
        build_vit(cfg(weights=str(path)))


def test_pickled_objects_refused(tmp_path):
    import fractions

    path = tmp_path / "released.pth"
    torch.save({"model": tiny_model().state_dict(), "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(path)))
    msg = one_line_error(e)
    # the cause, not torch's advice to re-run with weights_only=False
    assert "refused pickled code or objects: fractions.Fraction" in msg and "weights_only" not in msg


def test_non_finite_weights_are_named(tmp_path):
    sd = tiny_model().state_dict()
    sd["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(tmp_path / "w.safetensors")))
    assert "'blocks.1.mlp.fc2.weight' holds NaN or infinite values" in one_line_error(e)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # making the TorchScript file is the point
def test_torchscript_and_pickled_npz_are_refused_with_their_fix(tmp_path):
    script = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's TorchScript warning must not reach the user either
        with pytest.raises(CheckpointError) as e:
            build_vit(cfg(weights=str(script)))
    assert "is a TorchScript archive" in one_line_error(e) and ".safetensors" in str(e.value)
    pickled = tmp_path / "w.npz"
    np.save(pickled.open("wb"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights=str(pickled)))
    msg = one_line_error(e)
    assert "holds pickled data" in msg and "allow_pickle" not in msg and "unsafely" not in msg


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_vit(cfg(weights=str(tmp_path / "nope.safetensors")))
    bad = tmp_path / "w.h5"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown extension"):
        build_vit(cfg(weights=str(bad)))


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean"):
        build_vit(BackboneConfig(arch="vit_base_patch16_244"))
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        build_vit(BackboneConfig(arch="resnet18"))
    with pytest.raises(ConfigError, match="cannot be built"):
        build_vit(cfg(embed_dim=30, num_heads=4))
    with pytest.raises(ConfigError, match="cannot be built"):
        build_vit(cfg(embed_dim=30, num_heads=4, weights="/nonexistent.safetensors"))
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        build_vit(BackboneConfig(arch="resnet18", weights="/nonexistent.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Hub


def test_hub_offline_raises_with_recipe(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo, filename, revision=None):
        calls.append(filename)
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(W, "hf_hub_download", offline)
    with pytest.raises(CheckpointError) as e:
        build_vit(cfg(weights="hub", pretrained_tag="augreg_in21k"))
    assert one_line_error(e) == (
        "could not fetch pretrained weights 'vit_base_patch16_224.augreg_in21k' (offline?): download "
        "model.safetensors from https://huggingface.co/timm/vit_base_patch16_224.augreg_in21k where you have "
        "internet and set backbone.weights=/path/to/that/file (.npz, .safetensors or .pth)"
    )
    assert calls == ["model.safetensors"]  # offline: no second attempt
    # The tag may also ride on the arch name.
    with pytest.raises(CheckpointError, match="'vit_base_patch16_224.augreg_in21k'"):
        build_vit(BackboneConfig(arch=f"{ARCH}.augreg_in21k", weights="hub", **TINY))


def test_hub_download_then_checked_load(monkeypatch, tmp_path):
    from huggingface_hub.errors import EntryNotFoundError

    src = tiny_model(num_classes=21843 % 50)
    path = tmp_path / "pytorch_model.bin"
    torch.save(src.state_dict(), path)
    calls = []

    def fake(repo, filename, revision=None):
        calls.append((repo, filename))
        if filename == "model.safetensors":
            raise EntryNotFoundError("no safetensors in this repo")
        return str(path)

    monkeypatch.setattr(W, "hf_hub_download", fake)
    model, info = build_vit(cfg(weights="hub", pretrained_tag="augreg_in21k"))
    assert calls == [
        ("timm/vit_base_patch16_224.augreg_in21k", "model.safetensors"),
        ("timm/vit_base_patch16_224.augreg_in21k", "pytorch_model.bin"),
    ]
    assert info.source == "hub:vit_base_patch16_224.augreg_in21k" and info.sha256 == sha256_file(path)
    ref = tiny_model(num_classes=21843 % 50)
    ref.reset_classifier(0)
    assert same_weights(model, ref)


def test_hub_unreachable_reads_the_cache_only_and_fails_at_once(monkeypatch, capfd, caplog):
    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert constants.HF_HUB_OFFLINE is False
    with pytest.raises(CheckpointError) as e:  # the real hf_hub_download: it must not retry the lookup
        build_vit(cfg(weights="hub", pretrained_tag="augreg_in21k"))
    assert "could not fetch pretrained weights" in one_line_error(e)
    assert constants.HF_HUB_OFFLINE is False
    assert "Retrying" not in capfd.readouterr().err + caplog.text
    with W.hub_cache_only_if_unreachable():
        assert constants.HF_HUB_OFFLINE is True
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    with W.hub_cache_only_if_unreachable():
        assert constants.HF_HUB_OFFLINE is False


def test_hub_unknown_tag():
    with pytest.raises(ConfigError, match="augreg_in21k"):
        build_vit(cfg(weights="hub", pretrained_tag="in22k_typo"))


# ----------------------------------------------------------------------------------------------------
# Builtin


def test_builtin_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(W, "assets_dir", lambda: tmp_path)
    with pytest.raises(CheckpointError) as e:
        build_vit(BackboneConfig(weights="builtin:tiny_vit"))
    assert "builtin weights 'tiny_vit' not found" in one_line_error(e)


def test_builtin_lookup(monkeypatch, tmp_path):
    src = tiny_model()
    save_file(src.state_dict(), str(tmp_path / "tiny.safetensors"))
    meta = {"arch": ARCH, "kwargs": TINY, "sha256": sha256_file(tmp_path / "tiny.safetensors")}
    (tmp_path / "tiny.json").write_text(json.dumps(meta))
    monkeypatch.setattr(W, "assets_dir", lambda: tmp_path)
    model, info = build_vit(BackboneConfig(arch="ignored_by_builtin", weights="builtin:tiny"))
    assert same_weights(model, src) and info.source == "builtin:tiny" and info.sha256 == meta["sha256"]
    (tmp_path / "tiny.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256"):
        build_vit(BackboneConfig(weights="builtin:tiny"))


# ----------------------------------------------------------------------------------------------------
# Full-size ViT-B/16 state (real key names and shapes)


@pytest.fixture(scope="module")
def vitb_files(tmp_path_factory):
    torch.manual_seed(0)
    src = timm.create_model(ARCH, pretrained=False, num_classes=0)
    folder = tmp_path_factory.mktemp("vitb")
    sd = src.state_dict()
    save_file(sd, str(folder / "vitb.safetensors"))
    torch.save(sd, folder / "vitb.pth")
    return src, folder


@pytest.mark.parametrize("name", ["vitb.safetensors", "vitb.pth"])
def test_vit_b16_state_rebuilds_identically(vitb_files, name):
    src, folder = vitb_files
    model, info = build_vit(BackboneConfig(arch=ARCH, weights=str(folder / name)))
    assert same_weights(model, src)
    assert info.sha256 == sha256_file(folder / name)
