"""Reading backbone weights from files, the hub, or pgpcl's shipped assets into a timm ViT.

Every source ends in one place, :func:`load_weights_file`, which turns the file into a timm-style
state dict, lets timm's own ``checkpoint_filter_fn`` adapt it (positional-embedding grid, patch
kernel, OpenAI-CLIP / DINOv2 layouts), and then checks it key by key against the model. A missing,
unexpected or wrong-shaped key raises :class:`~pgpcl.errors.CheckpointError` naming the first bad
key, so a backbone is never silently half random. Classifier-head keys are ignored (pgpcl builds
its own heads).

Formats:

* ``.npz``: the original Google/JAX ViT layout (``Transformer/encoderblock_{i}/...``, also with the
  ``opt/target/`` or big_vision ``params/`` prefixes and the stacked ``encoderblock`` layout),
  converted by :func:`npz_to_state_dict` with the same rules as timm's ``_load_weights``.
* ``.safetensors``: read with ``safetensors.torch.load_file``.
* ``.pth`` / ``.pt`` / ``.bin``: ``torch.load(weights_only=True)``; ``model`` / ``state_dict``
  wrappers and a DistributedDataParallel ``module.`` prefix are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from pgpcl.errors import CheckpointError, ConfigError, describe
from pgpcl.io import is_torchscript, safe_torch_load, sha256_file, torch_load_reason

try:  # huggingface_hub ships with timm; kept optional so offline installs still import.
    from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover
    hf_hub_download = None

NPZ_EXT = (".npz",)
SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".pth", ".pt", ".bin", ".ckpt")
SUPPORTED = ".npz, .safetensors or .pth"
HEAD_PREFIXES = ("head.", "pre_logits.")


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from.

    ``source``: ``random``, ``hub:ARCH.TAG``, ``file:/abs/path`` or ``builtin:NAME``.
    ``sha256``: hash of the file that was loaded (None for random init).
    """

    source: str
    sha256: str | None


# ----------------------------------------------------------------------------------------------------
# Reading files into plain state dicts


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``path`` into a flat state dict; ``.npz`` files are converted to timm key names.

    Raises CheckpointError if the file is missing, of an unknown kind, or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' not found; give an existing {SUPPORTED} file")
    suffix = path.suffix.lower()
    if suffix not in NPZ_EXT + SAFETENSORS_EXT + TORCH_EXT:
        raise CheckpointError(
            f"weights file '{path}' has unknown extension '{suffix}'; use a {SUPPORTED} file"
        )
    try:
        if suffix in NPZ_EXT:
            with np.load(path, allow_pickle=False) as npz:
                return npz_to_state_dict(npz)
        if suffix in SAFETENSORS_EXT:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if is_torchscript(path):
            raise CheckpointError(
                f"weights file '{path}' is a TorchScript archive, which holds code that pgpcl never runs; "
                "save the model's state_dict() to a .safetensors file and give that"
            )
        # timm's and many training scripts' checkpoints keep their argparse.Namespace beside the weights: a
        # plain attribute holder, allowed; what it holds is still restricted to tensors and containers
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _unwrap(safe_torch_load(path))
    except CheckpointError:
        raise
    except Exception as e:  # each reader raises its own types on corrupt input
        reason = _read_reason(e, suffix)
        raise CheckpointError(
            f"could not read weights file '{path}' ({reason}); "
            f"the file is corrupt or not a plain {suffix} state dict: download or export it again"
        ) from e


def _read_reason(e: Exception, suffix: str) -> str:
    """A reader's complaint in a few words, without any advice to load the file unsafely."""
    if suffix in TORCH_EXT:
        return torch_load_reason(e, 120)
    if suffix in NPZ_EXT and "pickle" in str(e):  # numpy suggests allow_pickle=True, which runs code
        return "it holds pickled data, not plain arrays; pgpcl loads arrays only"
    return describe(e, 120, with_type=True)


def _unwrap(obj: Any) -> dict[str, Any]:
    """Peel ``{'model': ...}`` / ``{'state_dict': ...}`` / ``{'model_state_dict': ...}`` wrappers and the
    ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes."""
    for key in ("model", "state_dict", "model_state_dict"):
        while isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"weights file holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
        )
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod.", "module."):  # DDP around a compiled model, or the other way
        if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------------------------------
# Original Google / big_vision .npz layout


_NPZ_PREFIXES = ("opt/target/", "params/img/", "params/", "")


def _npz_layout(w: Mapping[str, np.ndarray]) -> tuple[str, bool]:
    """Return (key prefix, big_vision naming?) of a JAX ViT archive."""
    for prefix in _NPZ_PREFIXES:
        if f"{prefix}embedding/kernel" in w:
            big = (
                prefix.startswith("params/")
                or f"{prefix}pos_embedding" in w
                or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
            )
            return prefix, big
    raise CheckpointError(
        "the .npz file has no 'embedding/kernel' array, so it is not a JAX/Google ViT checkpoint; "
        "use an original ViT .npz or a .safetensors/.pth state dict"
    )


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _dense(a: np.ndarray) -> torch.Tensor:
    """Flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
    return _t(a.T)


def _qkv_in(a: np.ndarray) -> torch.Tensor:
    """Attention q/k/v kernel (D, H, hd) -> Linear weight rows (H*hd, D)."""
    return _t(a.reshape(a.shape[0], -1).T)


def _npz_block(get: Callable[[str], np.ndarray], bp: str, big: bool) -> dict[str, torch.Tensor]:
    """One encoder block's tensors, timm-named (without the ``blocks.{i}.`` prefix)."""
    mha, mlp, ln2 = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if big
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    )
    att = f"{bp}{mha}/"
    out = get(f"{att}out/kernel")  # (H, hd, D)
    return {
        "norm1.weight": _t(get(f"{bp}LayerNorm_0/scale")),
        "norm1.bias": _t(get(f"{bp}LayerNorm_0/bias")),
        "attn.qkv.weight": torch.cat([_qkv_in(get(f"{att}{n}/kernel")) for n in ("query", "key", "value")]),
        "attn.qkv.bias": torch.cat(
            [_t(get(f"{att}{n}/bias").reshape(-1)) for n in ("query", "key", "value")]
        ),
        "attn.proj.weight": _t(out.reshape(-1, out.shape[-1]).T),
        "attn.proj.bias": _t(get(f"{att}out/bias")),
        "norm2.weight": _t(get(f"{bp}{ln2}/scale")),
        "norm2.bias": _t(get(f"{bp}{ln2}/bias")),
        "mlp.fc1.weight": _dense(get(f"{bp}{mlp}/Dense_0/kernel")),
        "mlp.fc1.bias": _t(get(f"{bp}{mlp}/Dense_0/bias")),
        "mlp.fc2.weight": _dense(get(f"{bp}{mlp}/Dense_1/kernel")),
        "mlp.fc2.bias": _t(get(f"{bp}{mlp}/Dense_1/bias")),
    }


def npz_to_state_dict(w: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Convert a JAX ViT archive (Google ``ViT-B_16.npz``, AugReg, big_vision) to timm key names.

    Arrays the conversion does not use are kept under their npz names, so that the key check
    reports them as unexpected instead of dropping them silently. Head arrays are dropped.
    """
    prefix, big = _npz_layout(w)
    used: set[str] = set()

    def get(name: str, idx: int | None = None) -> np.ndarray:
        key = prefix + name
        if key not in w:
            raise CheckpointError(
                f"the .npz file lacks '{key}', which a ViT encoder needs; the file is incomplete or "
                "not a ViT checkpoint: download it again"
            )
        used.add(key)
        a = np.asarray(w[key])
        return a if idx is None else a[idx]

    kernel = get("embedding/kernel")
    if kernel.ndim != 4:
        raise CheckpointError(
            f"the .npz patch embedding has shape {tuple(kernel.shape)}, not (kh, kw, in, out); "
            "this layout (e.g. NaFlex) is not supported: use a standard ViT checkpoint"
        )
    sd = {
        "patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _t(get("embedding/bias")),
    }
    if prefix + "cls" in w:
        sd["cls_token"] = _t(get("cls"))
    pos = "pos_embedding" if big else "Transformer/posembed_input/pos_embedding"
    if prefix + pos in w:
        sd["pos_embed"] = _t(get(pos)).reshape(1, -1, kernel.shape[-1])
    if prefix + "Transformer/encoder_norm/scale" in w:
        sd["norm.weight"] = _t(get("Transformer/encoder_norm/scale"))
        sd["norm.bias"] = _t(get("Transformer/encoder_norm/bias"))
    sd.update(_npz_blocks(w, prefix, big, get))
    for key in w:  # everything else under the prefix is unexpected, except the classifier
        rest = key[len(prefix) :]
        if key.startswith(prefix) and key not in used and not rest.startswith(("head/", "pre_logits/")):
            sd[key] = _t(np.asarray(w[key]))
    return sd


def _npz_blocks(
    w: Mapping[str, np.ndarray], prefix: str, big: bool, get: Callable
) -> dict[str, torch.Tensor]:
    """All encoder blocks; handles one-array-per-block and stacked (scan) layouts."""
    sd: dict[str, torch.Tensor] = {}
    if f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w:
        depth = np.asarray(w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"]).shape[0]
        cache: dict[str, np.ndarray] = {}

        def layer(name: str, i: int) -> np.ndarray:  # arrays carry all layers on axis 0
            if name not in cache:
                cache[name] = get(name)
            return cache[name][i]

        for i in range(depth):
            for k, v in _npz_block(
                lambda name, i=i: layer(name, i), "Transformer/encoderblock/", big
            ).items():
                sd[f"blocks.{i}.{k}"] = v
        return sd
    i = 0
    while f"{prefix}Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        for k, v in _npz_block(get, f"Transformer/encoderblock_{i}/", big).items():
            sd[f"blocks.{i}.{k}"] = v
        i += 1
    return sd


# ----------------------------------------------------------------------------------------------------
# Fitting a state dict to a model


def _is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def _adapt(sd: dict[str, Any], model: nn.Module, where: str) -> dict[str, Any]:
    """Apply timm's checkpoint filter (pos-embed grid resample, layout conversions) and in-chans adapt."""
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    _say_resampling(sd, model, where)
    try:
        sd = checkpoint_filter_fn(sd, model)
        w = sd.get("patch_embed.proj.weight")
        target = model.patch_embed.proj.weight
        if isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[1] != target.shape[1] and w.shape[1] == 3:
            sd["patch_embed.proj.weight"] = adapt_input_conv(target.shape[1], w)
    except CheckpointError:
        raise
    except Exception as e:  # timm raises assorted errors on layouts it cannot adapt
        raise CheckpointError(
            f"weights {where} cannot be adapted to this backbone ({describe(e, 120, with_type=True)}); "
            "use weights made for backbone.arch with matching sizes"
        ) from e
    return sd


def _say_resampling(sd: Mapping[str, Any], model: nn.Module, where: str) -> None:
    """Warn when timm's filter will resample the file to this backbone (another patch or image size): the
    run then starts from interpolated weights, which its results.json records only as the file's sha256."""
    import warnings

    changes = []
    kernel, target = sd.get("patch_embed.proj.weight"), getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(kernel, torch.Tensor) and kernel.ndim == 4 and target is not None:
        if tuple(kernel.shape[-2:]) != tuple(target.weight.shape[-2:]):
            changes.append(f"patch kernel {tuple(kernel.shape[-2:])} -> {tuple(target.weight.shape[-2:])}")
    pos, want = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if isinstance(pos, torch.Tensor) and isinstance(want, torch.Tensor) and pos.shape[1] != want.shape[1]:
        changes.append(f"position embeddings {pos.shape[1]} -> {want.shape[1]} tokens")
    if changes:
        warnings.warn(f"weights {where} were made for another patch or image size: resampled ({'; '.join(changes)})",
                      UserWarning, stacklevel=2)


def check_state_dict(sd: Mapping[str, Any], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Return ``sd`` minus head keys after checking every key and shape against ``model``.

    Raises CheckpointError naming the first missing, wrong-shaped, non-finite or unexpected key.
    """
    expected = {k: v for k, v in model.state_dict().items() if not _is_head(k)}
    given = {k: v for k, v in sd.items() if not _is_head(k)}
    fix = "set backbone.arch and the size overrides to match the file, or use weights made for this backbone"
    if given and not set(given) & set(expected):  # not a size mismatch: another naming, or a wrapper
        shown = ", ".join(repr(k) for k in list(given)[:3])
        raise CheckpointError(f"weights {where} hold none of the backbone's keys (the file's first keys: {shown}; "
                              f"the backbone's: {next(iter(expected))!r}); save the backbone's state_dict() itself")
    for k, v in expected.items():
        if k not in given:
            n = sum(1 for x in expected if x not in given)
            raise CheckpointError(f"weights {where} are missing '{k}' ({n} keys missing); {fix}")
        found = getattr(given[k], "shape", None)
        if not isinstance(given[k], torch.Tensor) or found != v.shape:
            found_txt = tuple(found) if found is not None else type(given[k]).__name__
            raise CheckpointError(
                f"weights {where}: '{k}' should have shape {tuple(v.shape)} but has {found_txt}; {fix}"
            )
        if given[k].is_floating_point() and not torch.isfinite(given[k]).all():
            raise CheckpointError(
                f"weights {where}: '{k}' holds NaN or infinite values; the file is corrupt, "
                "download or export it again"
            )
    extra = [k for k in given if k not in expected]
    if extra:
        raise CheckpointError(
            f"weights {where} hold '{extra[0]}' unknown to the backbone ({len(extra)} unexpected keys); {fix}"
        )
    return given


def npz_num_heads(path: str | os.PathLike) -> int | None:
    """The attention head count a JAX ViT archive's first query kernel, (D, H, hd), was trained with; None
    where it has none. Flattened to timm's (H*hd, D) the shapes no longer tell, so it is read here."""
    with np.load(path, allow_pickle=False) as w:
        for key in w.files:
            if "encoderblock" in key and key.endswith("/query/kernel"):
                return int(w[key].shape[-2])
    return None


def _check_heads(model: nn.Module, path: str | os.PathLike, where: str) -> None:
    blocks = getattr(model, "blocks", None)
    if Path(path).suffix.lower() not in NPZ_EXT or not blocks:
        return
    heads, want = npz_num_heads(path), getattr(getattr(blocks[0], "attn", None), "num_heads", None)
    if heads is not None and want is not None and heads != want:
        raise CheckpointError(f"weights {where} were trained with {heads} attention heads but the backbone has "
                              f"{want}; set backbone.num_heads={heads} (or the arch that has them)")


def load_weights_file(model: nn.Module, path: str | os.PathLike, where: str | None = None) -> str:
    """Load ``path`` into ``model`` (checked, head ignored) and return the file's sha256."""
    where = where or f"file '{path}'"
    sd = read_state_dict(path)
    _check_heads(model, path, where)  # after reading it: a file that is no npz gets its own message first
    sd = check_state_dict(_adapt(sd, model, where), model, where)
    with torch.no_grad():
        # strict=False only because head keys were removed; everything else was checked above.
        model.load_state_dict(sd, strict=False)
    return sha256_file(path)


# ----------------------------------------------------------------------------------------------------
# Hub and builtin sources


def hub_name(arch: str, tag: str | None) -> str:
    """Resolve ``arch`` + ``tag`` to a timm pretrained name, e.g. ``vit_base_patch16_224.augreg_in21k``.

    Raises ConfigError when timm knows no such pretrained weights (no network needed to check).
    """
    import timm
    from timm.models import get_pretrained_cfg

    name = f"{arch}.{tag}" if tag else arch
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm raises on a tag unknown for a known arch
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        hint = (
            f"; available tags: {', '.join(tags)}"
            if tags
            else "; this arch has no pretrained weights in timm"
        )
        raise ConfigError(f"timm has no pretrained weights '{name}'{hint}")
    return f"{cfg.architecture}.{cfg.tag}" if cfg.tag else name


@contextlib.contextmanager
def hub_cache_only_if_unreachable() -> Any:
    """Inside, huggingface_hub reads its local cache only when the hub's host name does not resolve.

    Without this an offline machine waits ~25 s while huggingface_hub retries the lookup five times,
    printing a line each time, before pgpcl can say what to do.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        yield
        return
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        reachable = True
    except OSError:
        reachable = False
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_download(cfg: Any) -> str:
    """Download (or find in the local cache) the weights file of a timm pretrained config."""
    if cfg.hf_hub_id:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for i, filename in enumerate(names):
            try:
                return hf_hub_download(repo, filename, revision=revision or None)
            except EntryNotFoundError as e:
                # Offline also raises a subclass of EntryNotFoundError: only a file truly absent
                # from the repo justifies trying the next name.
                if isinstance(e, LocalEntryNotFoundError) or i == len(names) - 1:
                    raise
    from timm.models._hub import download_cached_file

    return download_cached_file(cfg.url)


def fetch_hub_weights(arch: str, tag: str | None) -> tuple[str, str]:
    """Return (timm pretrained name, local path of its weights file), downloading if needed.

    Raises CheckpointError with the offline recipe when the download fails.
    """
    from timm.models import get_pretrained_cfg

    name = hub_name(arch, tag)
    cfg = None
    try:
        cfg = get_pretrained_cfg(name)
        with hub_cache_only_if_unreachable():
            return name, _hub_download(cfg)
    except Exception as e:
        raise CheckpointError(
            f"could not fetch pretrained weights '{name}' (offline?): download {_where_from(cfg)} where you "
            f"have internet and set backbone.weights=/path/to/that/file ({SUPPORTED})"
        ) from e


def _where_from(cfg: Any) -> str:
    """Where a timm pretrained config's weights file is, for a person to fetch by hand."""
    if getattr(cfg, "hf_hub_id", None):
        repo = cfg.hf_hub_id.partition("@")[0]
        return f"{cfg.hf_hub_filename or 'model.safetensors'} from https://huggingface.co/{repo}"
    return getattr(cfg, "url", None) or "them"


def assets_dir() -> Path:
    """Folder of the weights shipped with pgpcl (``src/pgpcl/assets``)."""
    return Path(str(resources.files("pgpcl"))) / "assets"


def resolve_builtin(name: str) -> tuple[str, dict[str, Any], Path]:
    """Look up ``builtin:NAME``: return (timm arch, model kwargs, weights path).

    ``NAME.json`` beside ``NAME.safetensors`` holds ``{"arch": ..., "kwargs": {...}}`` and optionally
    ``"sha256"``, checked against the file.
    """
    folder = assets_dir()
    weights, sidecar = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not weights.is_file() or not sidecar.is_file():
        have = sorted(p.stem for p in folder.glob("*.safetensors") if p.with_suffix(".json").is_file())
        listed = ", ".join(have) if have else "none installed"
        raise CheckpointError(
            f"builtin weights '{name}' not found in {folder} (available: {listed}); "
            "use an available name or set backbone.weights to a file path"
        )
    try:
        meta = json.loads(sidecar.read_text())
        arch, kwargs = meta["arch"], dict(meta.get("kwargs", {}))
    except Exception as e:
        raise CheckpointError(
            f"builtin weights '{name}': {sidecar} is unreadable or lacks 'arch' ({type(e).__name__}); reinstall pgpcl"
        ) from e
    want = meta.get("sha256")
    if want and sha256_file(weights) != want:
        raise CheckpointError(
            f"builtin weights '{name}': {weights.name} does not match its recorded sha256 (corrupt); reinstall pgpcl"
        )
    return arch, kwargs, weights
