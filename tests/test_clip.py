"""CLIP prompt learner and CLIP-PGP on a small random open_clip model with the real BPE tokenizer.

- the prompted forward drives open_clip's modules (no prompt: identical to open_clip's own encoders)
  and inserts the image prompt right after CLS, after the positional embedding, before ln_pre;
- CoOp text prompts: 16 learned context tokens then the class name, one context per task, only the
  current one trainable;
- the frozen CLIP weights are bit-identical after training;
- CIL predictions do not depend on the order or the composition of the test batch (no label use);
- 2-task runs with and without PGP through the CLI write results that the report reads;
- PGP's property: after task 2 with the projection, X_old P^T is unchanged (X_old = task-1 embedded
  image tokens, P = the image prompt); without it, it moves by orders of magnitude more;
- weights: state-dict files load checked, TorchScript archives are refused, the hub gives a one-line
  recipe offline.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pgpcl.models.clip as C
from pgpcl.config import BackboneConfig, load_config
from pgpcl.errors import CheckpointError, ConfigError
from pgpcl.io import sha256_file

SMALL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 8, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True, scope="module")
def _threads(module_one_thread):
    yield


def small_clip(seed: int = 0, **cfg):
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(seed)
    model = C.create_clip({**SMALL, **cfg})
    return model, SimpleTokenizer(context_length=SMALL["text_cfg"]["context_length"])


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------------
# The prompted forward


def test_prompted_forward_matches_open_clip_and_inserts_after_cls():
    model, tok = small_clip()
    bb = C.PromptedCLIP(model, tok)
    x = torch.rand(3, 3, 8, 8)
    assert bb.embed(x).shape == (3, 1 + 4, 32) and bb.num_patches == 4 and bb.embed_dim == 32
    # Without a prompt the wrapper is open_clip's own image and text encoders.
    torch.testing.assert_close(bb.encode_image(x), model.encode_image(x), rtol=0, atol=1e-6)
    ids = bb.tokenize(["a photo of a cat.", "x"])
    assert ids.shape == (2, 24)
    torch.testing.assert_close(bb.encode_text(ids), model.encode_text(ids), rtol=0, atol=1e-6)

    prompts = torch.randn(5, 32)
    seen = {}
    hook = model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    out = bb.encode_image(x, prompts)
    hook.remove()
    assert out.shape == (3, 16)
    h, v = seen["h"], model.visual
    assert h.shape == (3, 1 + 5 + 4, 32)  # [CLS, P prompts, N patches]
    emb = bb.embed(x)  # CLS + patches + positional embedding
    torch.testing.assert_close(h[:, :1], v.ln_pre(emb[:, :1]))
    torch.testing.assert_close(h[:, 1:6], v.ln_pre(prompts).expand(3, -1, -1))  # no position of their own
    torch.testing.assert_close(h[:, 6:], v.ln_pre(emb[:, 1:]))
    # A (B, P, D) prompt works too, and a prompt changes the features.
    assert torch.allclose(bb.encode_image(x, prompts.expand(3, -1, -1)), out)
    assert not torch.allclose(out, bb.encode_image(x))
    with pytest.raises(ValueError, match="prompts must be"):
        bb.encode_image(x, torch.randn(5, 31))


def test_plain_attention_blocks_equal_open_clip_and_run_in_bf16_on_the_cpu(monkeypatch):
    model, tok = small_clip()
    bb = C.PromptedCLIP(model, tok)
    x, prompts = torch.rand(3, 3, 8, 8), torch.randn(5, 32)
    ids = bb.tokenize(["a photo of a cat.", "x"])
    with torch.no_grad():
        want_img, want_txt = bb.encode_image(x, prompts), bb.encode_text(ids)
        # The written-out blocks, forced in fp32, are open_clip's (the text tower with its causal mask).
        monkeypatch.setattr(C, "plain_product_preferred", lambda t: True)
        torch.testing.assert_close(bb.encode_image(x, prompts), want_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(bb.encode_text(ids), want_txt, rtol=0, atol=1e-5)
        monkeypatch.undo()
        towers = [model.visual.transformer, model.transformer]
        calls = []
        hooks = [t.register_forward_pre_hook(lambda m, a: calls.append(m)) for t in towers]
        bb.encode_image(x, prompts), bb.encode_text(ids)
        assert len(calls) == 2  # fp32: open_clip's own transformer forward
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_img, low_txt = bb.encode_image(x, prompts), bb.encode_text(ids)
        for h in hooks:
            h.remove()
    assert calls == []  # bf16 on the CPU: the blocks run here, with the plain product
    torch.testing.assert_close(low_img.float(), want_img, rtol=0, atol=0.05)
    torch.testing.assert_close(low_txt.float(), want_txt, rtol=0, atol=0.05)


def test_backbone_frozen_and_stays_in_eval():
    model, tok = small_clip()
    bb = C.PromptedCLIP(model, tok)
    bb.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # The model is registered once: checkpoints of the method hold no copy of the frozen weights.
    assert set(bb.state_dict()) == {f"clip.{k}" for k in model.state_dict()}


# ----------------------------------------------------------------------------------------------------
# The method


@pytest.fixture(scope="module")
def tiny_method():
    from pgpcl.data import build_scenario
    from pgpcl.methods import METHODS

    cfg = load_config("tiny_clip")
    scenario = build_scenario(cfg.data, cfg.seed)
    torch.manual_seed(0)
    method = METHODS.get("clip_prompt").build(cfg, scenario)
    return method, scenario


def test_text_prompts_context_then_class_name(tiny_method):
    method, scenario = tiny_method
    tok = method.backbone.tokenizer
    x_id = tok.encode("X")[0]
    assert method.ctx_start == 1 and len(method.text_ctx) == 2
    for t, classes in enumerate(scenario.task_classes):
        ids = method._text_ids(t)
        assert ids.shape == (len(classes), method.backbone.context_length)
        assert (ids[:, 0] == tok.sot_token_id).all() and (ids[:, 1:17] == x_id).all()
        for row, c in zip(ids, classes):  # then the class name, '.', end of text
            name = tok.encode(f"{scenario.class_names[c]}.")
            assert row[17 : 17 + len(name)].tolist() == name and row[17 + len(name)] == tok.eot_token_id
    assert method.text_ctx[0].shape == (16, method.backbone.text_width)
    assert method.image_prompt.shape == (5, method.backbone.embed_dim)


def test_training_step_grads_only_prompt_and_current_context(tiny_method):
    method, scenario = tiny_method
    method.begin_task(1)
    method.train()
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["image_prompt", "text_ctx.1"]
    assert method.trainable_parameters() == [method.image_prompt, method.text_ctx[1]]
    x, y, t = next(iter(scenario.train_loader(1, 8, generator_seed=0)))
    out = method(x, t)
    assert out.logits.shape == (8, scenario.num_classes)
    loss = method.loss(out, y, scenario.class_mask(1))
    loss.backward()
    assert method.image_prompt.grad is not None and method.text_ctx[1].grad.abs().sum() > 0
    assert method.text_ctx[0].grad is None  # the past task's context takes no gradient
    method.image_prompt.grad = method.text_ctx[1].grad = None
    # Task 0 uses the first-task schedule, later tasks train.lr / train.weight_decay (released CLIP).
    assert method.task_optimizer_settings(0, 0.01, 2e-4) == (0.001, 5e-4)
    assert method.task_optimizer_settings(3, 0.01, 2e-4) == (0.01, 2e-4)
    state = method.trainable_state_dict()
    assert sorted(state) == ["image_prompt", "text_ctx.0", "text_ctx.1"]  # every context is saved
    # Nothing but parameters in the state dict (token ids are rebuilt): no extra checkpoint payload.
    assert set(method.state_dict()) == {n for n, _ in method.named_parameters()}


def test_cil_predictions_do_not_depend_on_the_batch(tiny_method):
    """Per-image logits are the same whatever the order, split or task mix of the batch: no labels used."""
    method, scenario = tiny_method
    saved = method.trainable_state_dict()
    with torch.no_grad():  # non-trivial prompts and contexts
        for p in [method.image_prompt, *method.text_ctx]:
            p.add_(torch.randn_like(p))
    method.begin_task(1)
    method.eval()
    x0, _, _ = next(iter(scenario.test_loader(0, 10)))
    x1, _, _ = next(iter(scenario.test_loader(1, 10)))
    x = torch.cat([x0, x1])  # images of both tasks in one batch
    logits = method.predict(x)
    assert logits.shape == (20, scenario.num_classes)
    close = dict(rtol=0, atol=1e-5)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(method.predict(x[perm]), logits[perm], **close)
    torch.testing.assert_close(torch.cat([method.predict(x[:7]), method.predict(x[7:])]), logits, **close)
    torch.testing.assert_close(method.predict(x0), logits[:10], **close)
    torch.testing.assert_close(method.predict(x1[3:4]), logits[13:14], **close)
    # Every class is scored against its own task's context: cosine x logit scale.
    img = torch.nn.functional.normalize(method.backbone.encode_image(x, method.image_prompt), dim=-1)
    txt = torch.cat([method._encode_task_text(t) for t in range(2)])
    torch.testing.assert_close(logits, method.backbone.logit_scale() * img @ txt.T, rtol=1e-5, atol=1e-5)
    # Loading a checkpoint refreshes the cached text features.
    method.load_trainable_state_dict(saved)
    assert not torch.allclose(method.predict(x), logits)
    with pytest.raises(CheckpointError, match="missing parameter 'text_ctx.1'"):
        method.load_trainable_state_dict({k: v for k, v in saved.items() if k != "text_ctx.1"})


# ----------------------------------------------------------------------------------------------------
# End to end: CLI runs, frozen weights, and the PGP property


def test_cli_two_tasks_with_and_without_pgp(tmp_path, capsys):
    from pgpcl.cli import main
    from pgpcl.report import report_runs

    common = [
        f"output_dir={tmp_path}",
        "train.progress=false",
        "data.train_per_class=8",
        "data.test_per_class=5",
        "pgp.num_samples=32",
    ]
    for preset in ("tiny_clip", "tiny_clip_pgp"):
        assert main(["train", preset, *common]) == 0
    capsys.readouterr()
    runs = [tmp_path / "tiny_clip" / "seed0", tmp_path / "tiny_clip_pgp" / "seed0"]
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        assert res["config"]["method"]["name"] == "clip_prompt"
        assert all(v is not None for v in (res["acc"]["cil"][0][1], res["acc"]["til"][1][1]))
    pgp = json.loads((runs[1] / "results.json").read_text())
    assert pgp["config"]["pgp"]["enabled"] is True
    text = report_runs(runs, plots=False)
    assert "2 group(s)" in text and "clip_prompt-PGP" in text
    assert any(line.startswith("clip_prompt ") for line in text.splitlines())


D = 64  # vision width of pgpcl-tiny-clip
VARIANTS = {"sgd-gradient": ("sgd", "gradient", 10.0), "adam-update": ("adam", "update", 0.05)}


def _pgp_run(tmp_path_factory, pgp: bool, variant: str, amp: str = "none"):
    """Train task 1, record X_old P^T, train task 2; returns (relative change, prompt change, backbone same)."""
    from pgpcl.engine.trainer import Trainer

    opt, target, lr = VARIANTS[variant]
    overrides = [
        "train.progress=false",
        f"pgp.enabled={str(pgp).lower()}",
        "pgp.eps={prompt: 1.0}",
        f"train.optimizer={opt}",
        f"pgp.target={target}",
        f"train.lr={lr}",
        "method.first_task_lr=0.01",
        # Weight decay acts inside the optimizer, after a gradient projection: off for the exact property.
        "train.weight_decay=0.0",
        "method.first_task_weight_decay=0.0",
        "data.train_per_class=16",
        "data.test_per_class=5",
        f"train.amp={amp}",
    ]
    tr = Trainer(load_config("tiny_clip", overrides), tmp_path_factory.mktemp(f"clip-{pgp}-{variant}-{amp}"))
    frozen = {k: v.clone() for k, v in tr.method.backbone.state_dict().items()}
    tr.run_task(0)
    x, _, _ = next(iter(tr.scenario.sample_loader(0, 64, 64, seed=1, augment=False)))
    tokens = tr.method.representations(x, None)["prompt"].reshape(-1, D)  # (64 * 17, D)
    before = tr.method.image_prompt.detach().clone()
    tr.run_task(1)
    after = tr.method.image_prompt.detach()
    rel = float((tokens @ after.T - tokens @ before.T).norm() / (tokens @ before.T).norm())
    now = tr.method.backbone.state_dict()
    same = now.keys() == frozen.keys() and all(torch.equal(frozen[k], now[k]) for k in frozen)
    return rel, float((after - before).norm() / before.norm()), same


@pytest.fixture(scope="module")
def pgp_runs(tmp_path_factory):
    return {
        (pgp, variant): _pgp_run(tmp_path_factory, pgp, variant)
        for pgp, variant in [(False, "sgd-gradient"), (True, "sgd-gradient"), (True, "adam-update")]
    }


def test_pgp_keeps_old_image_tokens_times_prompt_under_bf16_autocast(tmp_path_factory):
    """train.amp=bf16 (the plain-product blocks of run_transformer on the CPU): the property still holds."""
    rel_on, change_on, same = _pgp_run(tmp_path_factory, True, "adam-update", "bf16")
    rel_off, _, _ = _pgp_run(tmp_path_factory, False, "adam-update", "bf16")
    assert same and change_on > 1e-2
    assert rel_on < 1e-3 and rel_off > 100 * max(rel_on, 1e-6)


def test_frozen_clip_weights_bit_identical_after_training(pgp_runs):
    assert all(same for _, _, same in pgp_runs.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pgp_keeps_old_image_tokens_times_prompt(pgp_runs, variant):
    rel_on, change_on, _ = pgp_runs[(True, variant)]
    rel_off, _, _ = pgp_runs[(False, "sgd-gradient")]
    assert change_on > 1e-2  # the prompt did learn on task 2, in the free directions
    assert rel_on < 1e-3
    assert rel_off > 100 * max(rel_on, 1e-6)


# ----------------------------------------------------------------------------------------------------
# Weights and configuration errors


def test_state_dict_files_load_checked(tmp_path):
    src, _ = small_clip(seed=1)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst, _ = small_clip(seed=2)
    assert C.load_clip_weights(dst, path) == sha256_file(path)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    pth = tmp_path / "clip.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, pth)
    dst2, _ = small_clip(seed=3)
    C.load_clip_weights(dst2, pth)
    assert all(torch.equal(v, dst2.state_dict()[k]) for k, v in src.state_dict().items())
    bad, _ = small_clip(text_cfg={**SMALL["text_cfg"], "width": 48})
    with pytest.raises(CheckpointError) as e:
        C.load_clip_weights(bad, path)
    assert "should have shape" in one_line(e) or "cannot be adapted" in one_line(e)


def test_torchscript_archive_refused(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    model, _ = small_clip()
    with pytest.raises(CheckpointError) as e:
        C.load_clip_weights(model, path)
    assert "TorchScript" in one_line(e) and "safetensors" in one_line(e)


def _fake_tag(monkeypatch, quick_gelu: bool):
    pcfg = {"hf_hub": "timm/vit_tiny_clip.fake/", "quick_gelu": quick_gelu}
    monkeypatch.setattr(C, "_pretrained_cfg", lambda arch, tag: pcfg)
    monkeypatch.setitem(C.CLIP_CONFIGS, "small-test", SMALL)


def test_hub_offline_one_line_recipe(monkeypatch):
    _fake_tag(monkeypatch, False)

    def offline(pcfg):
        raise FileNotFoundError("Name or service not known")

    monkeypatch.setattr(C, "_download", offline)
    with pytest.raises(CheckpointError) as e:
        C.build_clip(BackboneConfig(arch="small-test", weights="hub", pretrained_tag="fake"))
    msg = one_line(e)
    assert "open_clip_model.safetensors from https://huggingface.co/timm/vit_tiny_clip.fake" in msg
    assert "backbone.weights=" in msg
    with pytest.raises(ConfigError, match="needs backbone.pretrained_tag"):
        C.build_clip(BackboneConfig(arch="small-test", weights="hub"))


def test_the_offline_recipe_file_with_its_tag_gets_the_tags_activation(monkeypatch, tmp_path):
    """The offline message says: download the hub's file, set backbone.weights to it. With the tag kept, the
    model must be the one those weights were trained as (QuickGELU for OpenAI's), as with weights=hub."""
    from open_clip.transformer import QuickGELU

    _fake_tag(monkeypatch, True)
    src, _ = small_clip(seed=4, quick_gelu=True)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, _, info = C.build_clip(BackboneConfig(arch="small-test", weights=str(path), pretrained_tag="fake"))
    assert info.source.startswith("file:") and isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    model, _, _ = C.build_clip(BackboneConfig(arch="small-test", weights=str(path)))  # no tag: the arch's own
    assert not isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_hub_download_then_checked_load_and_quick_gelu_follows_tag(monkeypatch, tmp_path):
    from open_clip.transformer import QuickGELU

    _fake_tag(monkeypatch, True)
    src, _ = small_clip(seed=4, quick_gelu=True)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    monkeypatch.setattr(C, "_download", lambda pcfg: str(path))
    model, tok, info = C.build_clip(BackboneConfig(arch="small-test", weights="hub", pretrained_tag="fake"))
    assert info.source == "hub:small-test.fake" and info.sha256 == sha256_file(path)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())
    assert tok.context_length == 24


def test_real_open_clip_names_and_tags_resolve_offline():
    cfg = C.clip_model_config("ViT-B/16")
    assert cfg["vision_cfg"]["patch_size"] == 16 and cfg["text_cfg"]["context_length"] == 77
    assert C._pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-16'"):
        C.clip_model_config("ViT-B-61")
    with pytest.raises(ConfigError, match="available tags: openai"):
        C._pretrained_cfg("ViT-B-16", "opnai")


def test_config_errors(tmp_path, data_write_idx):
    from pgpcl.data import build_scenario
    from pgpcl.methods import METHODS

    labels = np.tile(np.arange(10), 4)
    mnist = data_write_idx(tmp_path / "mnist", labels, labels)
    for overrides, match in [
        (["data.channels=1"], "data.channels=3"),
        (["data.img_size=24"], "backbone.img_size=24"),
        (["backbone.in_chans=1"], "in_chans"),
        (["backbone.weights=builtin:x"], "builtin"),
        (["data.setting=dil", f"data.domains=[mnist5k, mnist={mnist}]"], "disjoint classes"),
    ]:
        with pytest.raises(ConfigError, match=match):  # from the config's checks or from the CLIP builder's
            cfg = load_config("tiny_clip", overrides)
            METHODS.get("clip_prompt").build(cfg, build_scenario(cfg.data, cfg.seed))


def test_presets_resolve():
    cfg = load_config("cifar100_10_clip_pgp")
    t, m = cfg.train, cfg.method.params
    assert cfg.method.name == "clip_prompt" and cfg.pgp.enabled and cfg.data.num_tasks == 10
    assert (t.optimizer, t.scheduler, t.batch_size, t.epochs, t.lr_scale_by_batch) == (
        "sgd",
        "cosine",
        32,
        5,
        False,
    )
    assert (t.lr, t.weight_decay, m.first_task_lr, m.first_task_weight_decay) == (0.01, 2e-4, 0.001, 5e-4)
    assert (m.length, m.text_length, cfg.data.normalize, cfg.data.channels) == (10, 16, "cifar100", 3)
    assert cfg.backbone.weights == "hub" and cfg.backbone.pretrained_tag == "openai"
    assert not load_config("cifar100_10_clip").pgp.enabled
    assert math.isclose(load_config("tiny_clip_pgp").pgp.num_samples, 64)
