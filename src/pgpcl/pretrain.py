"""``pgpcl pretrain``: pretrain the small ViT that the offline presets and ``pgpcl demo`` use.

No pretrained ViT can be downloaded offline, so pgpcl ships its own: a timm VisionTransformer trained
as a 10-way classifier on the full Fashion-MNIST training set (Debian's ``dataset-fashion-mnist``).
The demo's continual stream is MNIST digits, which the backbone never saw. The result is written as
``NAME.safetensors`` (backbone without the classifier head) plus ``NAME.json`` (timm arch and kwargs,
data, seed, hyper-parameters, accuracy, time, sha256), loadable as ``backbone.weights=builtin:NAME``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pgpcl.io import atomic_write_bytes, atomic_write_text, sha256_file


@dataclass
class PretrainConfig:
    name: str = "vit_fmnist_d96"
    arch: str = "vit_tiny_patch16_224"
    vit_kwargs: dict = field(
        default_factory=lambda: {
            "img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 96, "depth": 6, "num_heads": 4,
        }
    )
    dataset: str = "fashion_mnist"
    root: str | None = None
    epochs: int = 6  # what the shipped vit_fmnist_d96 used (its .json records every setting)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    max_shift: int = 2
    """Random translation in pixels (the only augmentation; digits and garments have no mirror symmetry)."""
    seed: int = 0
    threads: int | None = None


def _images_to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1], the demo's input convention (no normalisation)."""
    return torch.from_numpy(images).float().div_(255.0).unsqueeze(1)


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 1, h, w)
    return out.gather(3, cols)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def check_pretrain_args(cfg: PretrainConfig, out_dir: Path) -> None:
    """Everything that could only fail once training is over, checked before it starts (minutes of work
    would otherwise be lost): the numbers, the file name, and a folder the files can be written to."""
    import os

    from pgpcl.config import SEED_MAX
    from pgpcl.errors import PgpclError

    if cfg.epochs < 1:
        raise PgpclError(f"--epochs must be >= 1, got {cfg.epochs}")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise PgpclError(f"--seed must be in 0..{SEED_MAX}, got {cfg.seed}")
    if cfg.threads is not None and cfg.threads < 1:
        raise PgpclError(f"threads must be >= 1 or None (torch's default), got {cfg.threads}")
    name = cfg.name
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise PgpclError(f"--name must be a plain file name (no '/', not '.' or '..'), got {name!r}; the files are "
                         "written as --out/NAME.safetensors and --out/NAME.json")
    if out_dir.exists() and not out_dir.is_dir():
        raise PgpclError(f"--out {out_dir} is a file, not a folder; choose another --out")
    nearest = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise PgpclError(f"cannot write to --out {out_dir} ({nearest} is not a writable folder); choose a writable "
                         "--out")


def pretrain(cfg: PretrainConfig, out_dir: Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Train, save ``out_dir/NAME.{safetensors,json}``, return the record written to the json.

    Existing weights of the same name are kept (PgpclError before any training) unless ``overwrite``.
    """
    import timm
    from safetensors.torch import save

    from pgpcl.config import DataConfig
    from pgpcl.data import load_dataset
    from pgpcl.errors import DataError, PgpclError
    from pgpcl.progress import progress as phase_progress

    out_dir = Path(out_dir)
    check_pretrain_args(cfg, out_dir)
    existing = [p for p in (out_dir / f"{cfg.name}.safetensors", out_dir / f"{cfg.name}.json") if p.exists()]
    if existing and not overwrite:
        raise PgpclError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose --out / --name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        splits = load_dataset(DataConfig(dataset=cfg.dataset, root=cfg.root))
    except DataError as e:  # the reader speaks of train's config keys; pretrain has --data-root only
        raise DataError(str(e).replace(", or set data.download=true", "").replace("data.root", "--data-root")) from None
    x_train, y_train = _images_to_tensor(splits.train.images), torch.from_numpy(splits.train.targets)
    x_test, y_test = _images_to_tensor(splits.test.images), torch.from_numpy(splits.test.targets)
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=len(splits.class_names), **cfg.vit_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    start, step = time.perf_counter(), 0
    bar = phase_progress(total, "pretrain", progress, leave=True)
    for _epoch in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(cfg.batch_size):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, warmup, cfg.lr)
            xb = _random_shift(x_train[idx], cfg.max_shift, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_s = time.perf_counter() - start
    test_acc = _accuracy(model, x_test, y_test)
    backbone = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PgpclError(f"cannot create {out_dir} ({e.strerror}); choose a writable --out") from None
    weights_path = out_dir / f"{cfg.name}.safetensors"
    atomic_write_bytes(weights_path, save(backbone))
    record = {
        "arch": cfg.arch,
        "kwargs": cfg.vit_kwargs,
        "sha256": sha256_file(weights_path),
        "params": sum(v.numel() for v in backbone.values()),
        "pretrain": {**asdict(cfg), "train_images": len(x_train), "test_images": len(x_test)},
        "fashion_mnist_test_acc": round(test_acc, 2),
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    atomic_write_text(out_dir / f"{cfg.name}.json", json.dumps(record, indent=2) + "\n")
    return record
