"""Dataset containers, the reader registry and small helpers shared by the readers.

A reader turns one on-disk format into a :class:`DatasetSplits`; it never resizes or augments (that is
:mod:`pgpcl.data.transforms`) and never splits into tasks (that is :mod:`pgpcl.data.scenario`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgpcl.errors import DataError
from pgpcl.registry import Registry

Reader = Callable[[str | None, bool], "DatasetSplits"]
DATASETS: Registry[Reader] = Registry("dataset")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

DATA_ROOT_ENV = "PGPCL_DATA_ROOT"


@dataclass(eq=False)
class DatasetSplit:
    """One split (train or test) of a dataset. Exactly one of ``images`` / ``paths`` is set.

    images: uint8 (N, H, W) gray or (N, H, W, 3) RGB, in memory.
    paths: N image file paths, decoded on demand.
    targets: int64 (N,) original labels in [0, num_classes).
    domains: int64 (N,) domain index per sample, or None.
    """

    images: np.ndarray | None
    paths: list[str] | None
    targets: np.ndarray
    domains: np.ndarray | None = None
    # Converted tensors keyed by transform; filled by the scenario's fast path, never by readers.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ValueError("DatasetSplit needs exactly one of images / paths")
        self.targets = np.asarray(self.targets, dtype=np.int64)
        n = len(self.targets)
        if self.images is not None:
            img = self.images
            if img.dtype != np.uint8 or not (img.ndim == 3 or (img.ndim == 4 and img.shape[-1] == 3)):
                raise ValueError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {img.dtype} {img.shape}")
            if len(img) != n:
                raise ValueError(f"{len(img)} images but {n} targets")
        elif len(self.paths) != n:
            raise ValueError(f"{len(self.paths)} paths but {n} targets")
        if self.domains is not None:
            self.domains = np.asarray(self.domains, dtype=np.int64)
            if len(self.domains) != n:
                raise ValueError(f"{len(self.domains)} domain labels but {n} targets")

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(eq=False)
class DatasetSplits:
    """A dataset as read from disk: train and test splits sharing ``class_names``."""

    name: str
    train: DatasetSplit
    test: DatasetSplit
    class_names: list[str]
    domain_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check(self) -> DatasetSplits:
        """Raise DataError if labels fall outside the class list (a reader or file bug)."""
        for role, split in (("train", self.train), ("test", self.test)):
            if len(split) == 0:
                raise DataError(f"{self.name}: the {role} split is empty; check the dataset files")
            lo, hi = int(split.targets.min()), int(split.targets.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"{self.name}: {role} labels span {lo}..{hi} but there are {self.num_classes} classes; "
                    "the label files are inconsistent, re-extract the dataset"
                )
        return self


def default_root() -> Path:
    """Where readers look (and download to) when ``data.root`` is unset: $PGPCL_DATA_ROOT or ~/.cache."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pgpcl" / "data"


def resolve_root(root: str | None) -> Path:
    return Path(root).expanduser() if root else default_root()


def find_dir(root: Path, name: str, marker: str) -> Path | None:
    """``root/name`` if it holds ``marker``, else ``root`` itself if it does (user pointed inside)."""
    for cand in (root / name, root):
        if (cand / marker).exists():
            return cand
    return None


def is_image(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name so labels never depend on the OS order.

    A link to an image that is gone is an error, not a file to skip: skipping it would change the dataset.
    """
    files = sorted(p for p in folder.iterdir() if is_image(p.name) and not p.is_dir())
    broken = [p for p in files if not p.is_file()]
    if broken:
        raise DataError(f"{broken[0]} is a broken link or not a regular file; restore it or remove it")
    return files


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file; DataError naming the file if it is missing."""
    if not path.is_file():
        raise DataError(f"{what}: {path} is missing; re-extract the dataset archive")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [ln.strip() for ln in f if ln.strip()]


def load_dataset(data_cfg: Any) -> DatasetSplits:
    """Read ``data_cfg.dataset`` from ``data_cfg.root`` (or its default) with the registered reader."""
    return read_dataset(data_cfg.dataset, data_cfg.root, data_cfg.download)


def read_dataset(name: str, root: str | None, download: bool = False) -> DatasetSplits:
    reader = DATASETS.get(name)
    return reader(root, download).check()
