"""Typed run configuration.

A run is described by one :class:`Config`: data scenario, backbone, method, training and PGP settings.
Configs come from YAML presets (``pgpcl configs`` lists them) plus ``section.key=value`` overrides.
Every key is checked against the dataclasses below; an unknown key is rejected with the nearest valid
name, and a value of the wrong type is rejected with the expected type.

A preset may start with ``_base_: other_preset`` to inherit another preset and override parts of it.
Method hyper-parameters live under ``method:``; their schema is the dataclass the method registered
(``pgpcl.methods``), chosen by ``method.name``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pgpcl.errors import ConfigError

Setting = Literal["cil", "til", "online", "dil"]


@dataclass
class DataConfig:
    """Dataset, task split and transforms."""

    dataset: str = "mnist5k"
    """Dataset name (see ``pgpcl.data.DATASETS``)."""
    root: str | None = None
    """Local directory holding the dataset; None = the reader's default location."""
    download: bool = False
    """Allow a public download (torchvision) when the files are missing."""
    setting: Setting = "cil"
    """cil: class-incremental; til: task id known at test; online: one pass; dil: domain-incremental."""
    num_tasks: int = 5
    first_task_classes: int | None = None
    """Classes in the first task; the rest are split equally. None = all tasks equal."""
    class_order: Literal["label", "random"] = "label"
    order_seed: int | None = None
    """Seed of the random class order; None = the run seed."""
    domains: list[str] = field(default_factory=list)
    """DIL: one dataset name per task, when the dataset has no domain labels of its own."""
    datasets: list[str] = field(default_factory=list)
    """cil/til/online: one dataset per task, their classes side by side (e.g. [cifar10, mnist, svhn]); each
    entry ``name`` (read from ``root``) or ``name=/path``. Replaces ``dataset``."""
    img_size: int = 224
    channels: int = 3
    """Channels fed to the model: gray images are repeated to 3, RGB converted to 1 if set to 1."""
    train_transform: Literal["vit", "plain", "clip"] = "vit"
    """vit: RandomResizedCrop(scale 0.05-1)+flip as released; plain: resize only; clip: CLIP's."""
    test_transform: Literal["vit", "plain", "clip"] = "vit"
    normalize: Literal["none", "imagenet", "cifar100", "clip"] = "none"
    train_per_class: int | None = None
    """Keep at most this many training images per class (seeded); None = all."""
    test_per_class: int | None = None
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class BackboneConfig:
    """The frozen pretrained transformer."""

    arch: str = "vit_base_patch16_224"
    """timm model name (or open_clip model name for CLIP methods)."""
    weights: str | None = None
    """None: random init; 'hub': the timm/open_clip pretrained tag (online); a path to .npz/.safetensors/
    .pth; 'builtin:NAME' for weights shipped with pgpcl."""
    pretrained_tag: str | None = None
    """Hub tag used with weights=hub, e.g. 'augreg_in21k' (timm) or 'openai' (open_clip). With a CLIP weights
    file it names what the file holds, and the model takes that tag's activation (QuickGELU for 'openai')."""
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    fused_attention: bool = True
    """Use F.scaled_dot_product_attention in every block (timm's and the prompted ones); in bf16 / fp16
    on the CPU the plain product is used either way (faster there: BENCHMARKS.md, section 6)."""
    compile: bool = False
    """torch.compile every transformer block (ViT methods). No gain measured on a CPU (BENCHMARKS.md,
    section 6) and a cold first step of ~20 s; meant for GPUs."""
    compile_backend: str = "inductor"
    """torch.compile backend when ``compile`` is on ('inductor'; 'eager' checks the plumbing only)."""


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 16
    eval_batch_size: int = 128
    lr: float = 0.03
    lr_scale_by_batch: bool = True
    """Effective lr = lr * batch_size / 256, as released (a task of fewer images than batch_size: lr *
    its image count / 256, the batch its steps really take)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: Literal["constant", "cosine"] = "constant"
    scheduler_every: Literal["step", "epoch"] = "step"
    """How often the cosine schedule moves: every training step (over the task's steps) or once per epoch
    (over its epochs, constant within one: the released CLIP code)."""
    clip_grad: float | None = 1.0
    micro_batches: int = 1
    """Split each training batch into this many pieces, run forward and backward on one piece at a time
    and take one optimizer step on their summed gradient (gradient accumulation): the same step as the
    whole batch, up to float rounding, with about 1/N of its activation memory (BENCHMARKS.md, section
    2b). It may change on ``--resume``, e.g. after running out of memory. Under torchrun each process
    splits its share. What a method decides for the batch as a whole (L2P's batch-wise prompt vote) is
    decided once, on the whole batch, at the cost of one more query pass per step."""
    max_steps_per_task: int | None = None
    """Stop a task after this many steps (smoke tests); None = full epochs."""
    checkpoint_every: int = 500
    """Also write a resumable checkpoint every this many optimizer steps within a task (0 = only at the
    end of each task's training and after each task). ``pgpcl train --resume RUN_DIR`` continues from it."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    num_threads: int | None = None
    """CPU threads torch uses in this process (torch.set_num_threads); null = torch's default (the
    cores, or OMP_NUM_THREADS). Under torchrun, per process. On a machine shared with other jobs fewer
    threads than cores can be faster (BENCHMARKS.md, "Machine and method")."""
    deterministic: bool = True
    amp: Literal["none", "bf16"] = "none"
    """'bf16': the training steps' forward passes under torch.autocast(bfloat16); parameters, gradients,
    optimizer and projection stay fp32, and evaluation and the PGP basis pass run in fp32 (so accuracies
    and bases do not depend on it). About 2x faster training steps on a CPU
    with AVX512-BF16 or AMX (BENCHMARKS.md, section 1), and on GPUs; emulated, so ~19x slower, on other
    CPUs (a warning says so). 'none': fp32, the default."""
    log_every: int = 20
    tensorboard: bool = False
    """RUN_DIR/tensorboard: training loss and accuracy every log_every steps, mean CIL / TIL accuracy per
    task, and with PGP each protected group's basis rank and task leak (pip install "pgpcl[tensorboard]")."""
    progress: bool = True
    """Progress bars (stderr) for each task's training, PGP basis pass and evaluation, and a line per
    finished task (stdout: mean accuracy over the seen tasks, time per phase); main process only."""


@dataclass
class PGPConfig:
    """Prompt Gradient Projection (see docs/pgp.md)."""

    enabled: bool = False
    mode: Literal["feature", "reference"] = "feature"
    """feature: basis in R^D from token/query/prompt rows; reference: the released arithmetic."""
    target: Literal["gradient", "update"] = "gradient"
    """gradient: project grads before the step (released); update: project the optimizer's change."""
    eps: dict[str, float] = field(default_factory=dict)
    """Energy threshold per protected-group kind (e.g. {prompt: 0.5, key: 0.97}); unset kinds use the
    method's default."""
    num_samples: int = 768
    """Training images drawn (seeded) to build each task's representation matrix."""
    sample_batch_size: int = 64
    sample_augment: bool = True
    """Draw the sample with the training transform, as released."""
    protect_head: bool = False
    """Also protect the linear classifier head (``method.head``; not released PGP): its weight is projected
    with the span of its inputs on earlier tasks' samples (kind ``head``, eps 0.97 unless
    ``pgp.eps.head``) and its bias is held from the second task on. Meant for ``data.setting=dil``, where
    every task trains the same head rows (docs/pgp.md, section 16)."""


@dataclass
class MethodConfig:
    """``name`` picks the method; ``params`` is that method's own dataclass."""

    name: str = "l2p"
    params: Any = None


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    imports: list[str] = field(default_factory=list)
    """Python modules imported before ``method.name`` is looked up, e.g. ``[my_lab.shared_prompt]``: your
    own methods, registered with ``@METHODS.register`` (docs/adding-a-method.md). The run's config.yaml
    keeps the list, so ``--resume`` and ``pgpcl eval`` import them too. Importing runs the module's
    code: list only modules you trust."""
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pgp: PGPConfig = field(default_factory=PGPConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        method = d.pop("method")
        d["method"] = {"name": method["name"], **(method["params"] or {})}
        return d


RESULT_NEUTRAL_KEYS = frozenset(
    {
        "output_dir",
        "data.root",
        "data.num_workers",
        "data.pin_memory",
        "train.device",
        "train.num_threads",
        "train.progress",
        "train.log_every",
        "train.tensorboard",
        "train.checkpoint_every",
        "train.micro_batches",
    }
)
"""Config keys that say where and how fast a run goes, never what it computes: they may change on
``--resume``, and ``pgpcl report`` groups runs that differ only in them."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    # pgp.eps stays one value: a kind set in one config and left to the method's default in the other
    # is one difference, shown as the two mappings
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "eps":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def inert_keys(flat: dict[str, Any]) -> set[str]:
    """Keys a flattened config (``Config.to_dict()`` flattened, plain values) sets but does not use, so that
    two configs differing only there train the same run: train.epochs online (one pass whatever it says),
    data.order_seed with the label class order (no order is drawn)."""
    inert = set()
    if flat.get("data.setting") == "online":
        inert.add("train.epochs")
    if flat.get("data.class_order", "label") == "label":
        inert.add("data.order_seed")
    return inert


def config_difference(
    a: dict, b: dict, ignore=RESULT_NEUTRAL_KEYS, shared_only: bool = False
) -> tuple[str, Any, Any] | None:
    """First (key, a's value, b's value) where two ``Config.to_dict()`` differ, outside ``ignore``; with
    ``shared_only``, among the keys both have."""
    fa, fb = (_flatten(json.loads(json.dumps(x))) for x in (a, b))
    keys = set(fa) & set(fb) if shared_only else set(fa) | set(fb)
    ignore = set(ignore) | (inert_keys(fa) & inert_keys(fb))
    # another method differs in most of its keys: name the method, not the first key alphabetically
    for key in sorted(keys, key=lambda k: (k != "method.name", k)):
        if key not in ignore and fa.get(key) != fb.get(key):
            return key, fa.get(key), fb.get(key)
    return None


LEGACY_METHOD_VALUES: dict[str, dict[str, Any]] = {"l2p": {"pgp_basis": "v0.1"}}
"""Method keys whose default changed what the code computes, with the value that reproduces what a run
written before the key existed computed. A stored config without such a key reads as that value."""


def with_legacy_values(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config (a run's config.yaml or results.json) with :data:`LEGACY_METHOD_VALUES` filled
    in where the key is missing, so an old run resumes, evaluates and reports as it ran."""
    method = config.get("method")
    legacy = LEGACY_METHOD_VALUES.get(method.get("name")) if isinstance(method, dict) else None
    if not legacy or all(k in method for k in legacy):
        return config
    return {**config, "method": {**legacy, **method}}


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A stored ``Config.to_dict()`` laid over today's defaults, the method's own too when it is
    registered: a key added to pgpcl after a results file was written reads as its default, which by
    this project's rule reproduces the earlier behaviour (or as its legacy value, where the default
    changed the behaviour: :func:`with_legacy_values`)."""
    from pgpcl.methods import METHODS

    config = with_legacy_values(config)
    defaults = Config().to_dict()
    name = (config.get("method") or {}).get("name", defaults["method"]["name"])
    defaults["method"] = {"name": name}
    if isinstance(name, str) and name in METHODS:
        defaults["method"].update(dataclasses.asdict(METHODS.get(name).Params()))
    return _deep_merge(defaults, config)


# ----------------------------------------------------------------------------------------------------
# Building typed configs from plain dicts


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float. Raise ConfigError if wrong."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _coerce(value, alt, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' must be null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}{hint}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}' must be a mapping, got {value!r}; set one entry as {key}.NAME=VALUE"
                f" or all as \"{key}={{NAME: VALUE}}\""
            )
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)):  # YAML read on / yes / 2024 / 0123 as a bool or number
            raise ConfigError(
                f"config key '{key}' must be a string, got {value!r} (YAML reads on, yes, no and bare numbers "
                f"as booleans and numbers); quote the text: {key}=\"'...'\" on the command line, '...' in YAML"
            )
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for '{key}'")


def build_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from mapping ``raw``, rejecting unknown keys with the nearest valid one."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix or 'root'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else _key_list(prefix, names)
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def _key_list(prefix: str, names: list[str]) -> str:
    """The hint for a key that resembles none: the keys that would be valid in its place."""
    where = f"'{prefix}' has" if prefix else "the top level has"
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"; {where} {shown} (pgpcl configs PRESET prints every key)"


def _build_method(raw: Any) -> MethodConfig:
    from pgpcl.methods import METHODS  # late import: methods import this module

    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config section 'method' must be a mapping, got {raw!r}; to pick a method set method.name=...")
    raw = dict(raw or {})
    name = raw.pop("name", MethodConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"config key 'method.name' must be a string, got {name!r}")
    params_cls = METHODS.get(name).Params
    return MethodConfig(name=name, params=build_dataclass(params_cls, raw, "method"))


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    method_raw = raw.pop("method", None)
    cfg = build_dataclass(Config, {k: v for k, v in raw.items()}, "")
    import_modules(cfg.imports)  # before the method lookup: they may register methods
    cfg.method = _build_method(method_raw)
    validate(cfg)
    return cfg


def checked_config(cfg: Config) -> Config:
    """``cfg`` checked as if it had been read from YAML: a Config built or changed in Python gets the same
    type, range and unknown-key checks (an attribute set on a section that is not one of its keys is
    refused); returns the checked copy. ``method.params=None`` means the method's defaults."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a pgpcl Config, got {type(cfg).__name__}; build one with load_config(...)")
    raw = _as_raw(cfg)
    method = raw["method"]
    params = cfg.method.params if isinstance(cfg.method, MethodConfig) else None
    if params is not None and isinstance(method.get("name"), str):
        import_modules(cfg.imports if isinstance(cfg.imports, list) else [])
        from pgpcl.methods import METHODS

        expected = METHODS.get(method["name"]).Params if method["name"] in METHODS else None
        if expected is not None and type(params) is not expected:
            raise ConfigError(
                f"method.params is a {type(params).__qualname__} but method.name is '{method['name']}'; set "
                f"method.params to METHODS.get('{method['name']}').Params(...), or to None for its defaults"
            )
    return config_from_dict(raw)


def _as_raw(obj: Any) -> Any:
    """A config object as the plain data YAML would give, extra attributes included (so they can be
    refused by name), numpy scalars and paths as the plain values they hold; the method section is
    flattened as in config.yaml."""
    if isinstance(obj, MethodConfig):
        return {"name": obj.name, **(_as_raw(obj.params) if obj.params is not None else {})}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _as_raw(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _as_raw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_raw(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # np.int64(1), np.float32(0.01)
        return obj.item()
    return obj


def import_modules(names: list[str]) -> None:
    """Import every module of ``imports`` (already imported ones are not run again)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing = getattr(e, "name", None)
            if missing and name != missing and not name.startswith(missing + "."):  # found, but it needs more
                raise ConfigError(f"imports: '{name}' was found but importing it failed ({e}); install what it "
                                  "needs") from None
            raise ConfigError(
                f"imports: cannot import '{name}' ({e}); install it or put its folder on PYTHONPATH"
            ) from None


SEED_MAX = 2**32 - 1  # numpy's legacy seeding, and the order seed, take 32-bit seeds
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _validate_names(cfg: Config) -> None:
    """``name`` becomes one folder of the run path: one plain, non-empty folder name."""
    if not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise ConfigError(f"name must be a plain folder name (no '/', not '.' or '..'), got {cfg.name!r}")
    if not cfg.output_dir:
        raise ConfigError("output_dir is empty; give a folder (default: runs)")
    for key, seed in (("seed", cfg.seed), ("data.order_seed", cfg.data.order_seed)):
        if seed is not None and not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"{key} must be in 0..{SEED_MAX}, got {seed}")


def _validate_optimizer_and_device(t: TrainConfig) -> None:
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {t.betas}")
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"train.momentum must be in [0, 1), got {t.momentum}")
    if not 0.0 <= t.weight_decay < float("inf"):
        raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    if not _DEVICE.match(t.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")


def _validate_loading(d: DataConfig) -> None:
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0 = load in the main process), got {d.num_workers}")
    for key in ("train_per_class", "test_per_class"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be >= 1 or null (all images), got {value}")


def _validate_compile_backend(backend: str) -> None:
    """Checked here, not at the first step: torch names a bad backend only inside a long traceback."""
    import torch._dynamo  # only when compile is on: importing dynamo costs seconds

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        common = [b for b in ("inductor", "eager", "aot_eager", "cudagraphs") if b in known]
        raise ConfigError(f"backbone.compile_backend={backend!r} is not a torch.compile backend; use one of "
                          f"{', '.join(common)} (all: torch._dynamo.list_backends(exclude_tags=()))")


def _validate_shapes(d: DataConfig, b: BackboneConfig) -> None:
    """Sizes the backbone is built with must be positive and agree with what the data feeds it."""
    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        value = getattr(b, key)
        if value is not None and value < 1:
            raise ConfigError(f"backbone.{key} must be >= 1 or null (the arch's own), got {value}")
    if d.img_size < 1:
        raise ConfigError(f"data.img_size must be >= 1, got {d.img_size}")
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {d.channels}")
    if b.in_chans is not None and b.in_chans != d.channels:
        raise ConfigError(
            f"data.channels={d.channels} but backbone.in_chans={b.in_chans}: the model takes {b.in_chans}-channel "
            "images; set both to the same value"
        )
    if b.img_size is not None and b.img_size != d.img_size:
        raise ConfigError(
            f"data.img_size={d.img_size} but backbone.img_size={b.img_size}: the model takes {b.img_size}-pixel "
            "images; set both to the same value"
        )


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    d, t, p = cfg.data, cfg.train, cfg.pgp
    _validate_names(cfg)
    _validate_optimizer_and_device(t)
    _validate_shapes(d, cfg.backbone)
    if d.num_tasks < 1:
        raise ConfigError(f"data.num_tasks must be >= 1, got {d.num_tasks}")
    _validate_loading(d)
    if cfg.backbone.compile:
        _validate_compile_backend(cfg.backbone.compile_backend)
    for kind, eps in p.eps.items():
        if not 0.0 < eps <= 1.0:
            raise ConfigError(f"pgp.eps.{kind} must be in (0, 1], got {eps}")
    if t.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {t.epochs}")
    for key in ("batch_size", "eval_batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be >= 1 (steps between TensorBoard points), got {t.log_every}")
    if not t.lr > 0 or t.lr == float("inf"):
        raise ConfigError(f"train.lr must be a finite number > 0, got {t.lr}")
    if t.lr_scale_by_batch and t.lr * t.batch_size / 256 == float("inf"):
        raise ConfigError(f"train.lr={t.lr} times train.batch_size / 256 is infinite; lower train.lr or "
                          "train.batch_size, or set train.lr_scale_by_batch=false")
    if not 1 <= t.micro_batches <= t.batch_size:
        raise ConfigError(f"train.micro_batches must be in 1..train.batch_size ({t.batch_size}), got {t.micro_batches}")
    if t.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every must be >= 0 (0 = only at task ends), got {t.checkpoint_every}")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"train.num_threads must be >= 1 or null (torch's default), got {t.num_threads}")
    if t.max_steps_per_task is not None and t.max_steps_per_task < 1:
        raise ConfigError(f"train.max_steps_per_task must be >= 1 or null, got {t.max_steps_per_task}")
    if p.num_samples < 1:
        raise ConfigError(f"pgp.num_samples must be >= 1, got {p.num_samples}")
    if p.sample_batch_size < 1:
        raise ConfigError(f"pgp.sample_batch_size must be >= 1, got {p.sample_batch_size}")
    if t.clip_grad is not None and t.clip_grad <= 0:
        raise ConfigError(f"train.clip_grad must be > 0 or null (no clipping), got {t.clip_grad}")
    check = getattr(cfg.method.params, "validate", None)
    if check is not None:
        check()
    if p.enabled and p.mode == "reference" and getattr(cfg.method.params, "key_basis", None) == "head":
        raise ConfigError("pgp.mode=reference reproduces the released one-basis-per-layer arithmetic; "
                          "set method.key_basis=layer, or keep per-head bases with pgp.mode=feature")


# ----------------------------------------------------------------------------------------------------
# Presets, files and overrides


def preset_dir() -> Path:
    return Path(str(resources.files("pgpcl") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml") if not p.stem.startswith("_"))


def _resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = preset_dir() / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file '{name_or_path}' not found; give an existing .yaml path or a preset name")
    names = list_presets() + [p.stem for p in preset_dir().glob("_*.yaml")]
    local = next((f for f in (Path(f"{name_or_path}.yaml"), Path(f"{name_or_path}.yml")) if f.is_file()), None)
    close = difflib.get_close_matches(name_or_path, names, n=1)
    if local is not None:  # a file of one's own is given by its path: a bare name is a shipped preset
        hint = f"; to use the file {local}, give its path: {local}"
    else:
        hint = f"; did you mean '{close[0]}'?" if close else "; run 'pgpcl configs' to list presets"
    raise ConfigError(f"unknown preset '{name_or_path}'{hint}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "eps":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML keeps the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a YAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml(path: Path) -> Any:
    """The data of one YAML file; ConfigError naming the file, the line and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or type(e).__name__)
        raise ConfigError(f"config '{path}' cannot be read ({reason}); give a UTF-8 YAML file") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config '{path}' is not valid YAML ({_yaml_problem(e)}); fix that line") from None


def load_raw(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset or YAML file, following ``_base_`` inheritance."""
    path = _resolve_preset(name_or_path)
    if str(path) in _seen:
        raise ConfigError(f"config '{path}' inherits itself through _base_")
    raw = read_yaml(path)
    if raw is None:  # it would train every default: a ViT-B/16 run nobody asked for
        raise ConfigError(f"config '{path}' is empty; give its settings, or start from a preset with _base_: NAME "
                          "(pgpcl configs lists them)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config '{path}' must be a YAML mapping")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    base_path = Path(base)
    if not base_path.suffix:
        base_ref = base
    else:
        base_ref = str(base_path if base_path.is_absolute() else path.parent / base_path)
    return _deep_merge(load_raw(base_ref, _seen + (str(path),)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() != "" else None
    except yaml.YAMLError as e:
        if value.lstrip()[:1] in ("{", "["):  # a mapping or list meant, not text: say what is wrong with it
            where = _yaml_problem(e).removeprefix("line 1, ")  # one line: its column says where
            raise ConfigError(f"override '{text}': the value is not valid YAML ({where}); close its "
                              "brackets, or quote it to give it as text") from None
        parsed = value  # e.g. a path holding ': ', which YAML cannot read unquoted
    return key.split("."), parsed


_SECTIONS = ("data", "backbone", "method", "train", "pgp")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in _SECTIONS:
            # A whole section given on the command line adds to the preset's, never silently resets it.
            if not isinstance(value, dict):
                raise ConfigError(
                    f"override '{text}' would replace the whole '{path[0]}' section; set its keys instead, "
                    f"e.g. {path[0]}.{'name' if path[0] == 'method' else '<key>'}=<value>"
                )
            raw[path[0]] = _deep_merge(raw.get(path[0]) or {}, value)
            continue
        node = raw
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            else:
                nxt = dict(nxt)
            node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return raw


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply ``key=value`` overrides, and validate."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, got the string {overrides!r}; "
                          f"write [{overrides!r}]")
    return config_from_dict(apply_overrides(load_raw(name_or_path), list(overrides or [])))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
