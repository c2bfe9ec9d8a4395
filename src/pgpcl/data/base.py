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

from pgpcl.errors import DataError, describe
from pgpcl.registry import Registry

Reader = Callable[[str | None, bool], "DatasetSplits"]
DATASETS: Registry[Reader] = Registry("dataset")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

DATA_ROOT_ENV = "PGPCL_DATA_ROOT"


class MalformedSplit(DataError):
    """A reader returned data that breaks the :class:`DatasetSplit` contract (a reader bug)."""


def _labels(values: Any, what: str) -> np.ndarray:
    """int64 (N,) from ``values``: whole numbers >= 0 (floats such as 2.0 are taken, 2.7 is refused)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise MalformedSplit(f"{what} must be one label per image, shape (N,), got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))][0]
        raise MalformedSplit(f"{what} must be whole numbers, got {bad}; give integer labels")
    if arr.dtype.kind not in "iuf":
        raise MalformedSplit(f"{what} must be integers, got {arr.dtype} values; give integer labels")
    if arr.size and arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:  # would wrap negative
        raise MalformedSplit(f"{what} must be class numbers 0..N-1, got {arr.max()}; number them from 0")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise MalformedSplit(f"{what} must be >= 0, got {int(arr.min())}; number them from 0")
    return arr


def _images(images: Any) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) from ``images`` (numpy or CPU torch arrays), or why not."""
    img = np.asarray(images)
    shape = tuple(img.shape)
    if img.ndim == 4 and img.shape[1] in (1, 3) and img.shape[-1] not in (1, 3):
        raise MalformedSplit(f"images must be channels-last (N,H,W) or (N,H,W,3), got shape {shape}; "
                             "give images.transpose(0, 2, 3, 1) (and drop a single channel)")
    if img.ndim == 4 and img.shape[-1] == 1:
        raise MalformedSplit(f"gray images must be (N,H,W), got shape {shape}; give images[..., 0]")
    if img.ndim == 4 and img.shape[-1] == 4:
        raise MalformedSplit(f"images must be gray or RGB, got 4 channels {shape}; drop alpha: images[..., :3]")
    if not (img.ndim == 3 or (img.ndim == 4 and img.shape[-1] == 3)):
        raise MalformedSplit(f"images must be uint8 (N,H,W) or (N,H,W,3), got shape {shape}")
    if img.dtype != np.uint8:
        raise MalformedSplit(f"images must be uint8 0..255, got {img.dtype}; convert them, e.g. "
                             "(x * 255).round().astype(np.uint8) for floats in 0..1")
    return img


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
            raise MalformedSplit("a DatasetSplit needs exactly one of images / paths")
        self.targets = _labels(self.targets, "targets")
        n = len(self.targets)
        if self.images is not None:
            self.images = _images(self.images)
            if len(self.images) != n:
                raise MalformedSplit(f"{len(self.images)} images but {n} targets; give one label per image")
        elif len(self.paths) != n:
            raise MalformedSplit(f"{len(self.paths)} paths but {n} targets; give one label per image")
        if self.domains is not None:
            self.domains = _labels(self.domains, "domains")
            if len(self.domains) != n:
                raise MalformedSplit(f"{len(self.domains)} domain labels but {n} targets; give one per image")

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
    notes: list[str] = field(default_factory=list)
    """One line each for the user about what the reader did (e.g. broken files it left out); the
    trainer prints them when the run starts."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check(self) -> DatasetSplits:
        """Raise DataError if names or labels do not fit together (a reader or file bug)."""
        names = self.class_names
        if not (isinstance(names, (list, tuple, np.ndarray)) and all(isinstance(c, str) for c in names)):
            raise MalformedSplit(f"{self.name}: class_names must be a list of strings, one per class")
        self.class_names = [str(c) for c in names]  # numpy's str_ too: plain text for results.json
        for role, split in (("train", self.train), ("test", self.test)):
            if len(split) == 0:
                raise DataError(f"{self.name}: the {role} split is empty; the dataset files are incomplete: "
                                "re-extract or download them again")
            lo, hi = int(split.targets.min()), int(split.targets.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"{self.name}: {role} labels span {lo}..{hi} but there are {self.num_classes} class names; "
                    "the label files are inconsistent, re-extract the dataset"
                )
        self._check_domains()
        return self

    def _check_domains(self) -> None:
        tr, te = self.train.domains, self.test.domains
        if (tr is None) != (te is None):
            has = "train" if te is None else "test"
            raise MalformedSplit(f"{self.name}: only the {has} split has domain labels; give both splits domains "
                                 "or neither")
        if tr is None:
            return
        count = len(self.domain_names) if self.domain_names is not None else int(max(tr.max(), te.max())) + 1
        for role, ids in (("train", tr), ("test", te)):
            found = np.unique(ids).tolist()
            if found != list(range(count)):
                names = f"{count} domain names" if self.domain_names is not None else f"domains up to {count - 1}"
                raise MalformedSplit(
                    f"{self.name}: {role} domain labels are {found} for {names}; number the domains 0..K-1 "
                    "with images of every domain in both splits (and one domain name each)"
                )


def default_root() -> Path:
    """Where readers look (and download to) when ``data.root`` is unset: $PGPCL_DATA_ROOT or ~/.cache."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pgpcl" / "data"


def fetch(name: str, root: Path, by_hand: str, download: Callable[[], None], where: str = "") -> None:
    """Run ``download`` (a public download into ``root``); any failure becomes one line saying what to put
    there by hand instead."""
    try:
        download()
    except Exception as e:  # network/IO failure -> one actionable line
        raise DataError(f"{name} download into {root} failed ({describe(e)}); put {by_hand} there by hand{where}") from None


def find_or_fetch(find: Callable[[], Any], fetch: Callable[[], None], download: bool) -> Any:
    """``find()``; when it finds nothing (None) and ``download`` is set, ``fetch()`` and look again."""
    found = find()
    if found is None and download:
        fetch()
        found = find()
    return found


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
    # hidden files are no images of the dataset: macOS leaves '._name.png' metadata beside each image
    files = sorted(p for p in folder.iterdir() if is_image(p.name) and not p.name.startswith(".") and not p.is_dir())
    broken = [p for p in files if not p.is_file()]
    if broken:
        raise DataError(f"{broken[0]} is a broken link or not a regular file; restore it or remove it")
    return files


def subdirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder`` (class or domain folders), sorted. A link to a folder that is
    gone (an unmounted disk) is an error: skipping it would drop a class without a word."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise DataError(f"{p} is a link to a folder that is not there (or a loop of links); mount or restore "
                            "it, or remove the link")
        if p.is_dir():
            check_utf8_name(p)
            found.append(p)
    return found


def check_utf8_name(path: Path) -> None:
    """Folder names become class and domain names in results.json, which holds text: refuse bytes that
    are not UTF-8 (Python keeps them as lone surrogates, which other JSON readers reject)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise DataError(f"folder name '{shown}' in {path.parent} is not UTF-8 text; rename it (e.g. with convmv "
                        "-f latin1 -t utf8)") from None


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file; DataError naming the file if it is missing."""
    if not path.is_file():
        state = "is not a file" if path.exists() else "is missing"
        raise DataError(f"{what}: {path} {state}; re-extract the dataset archive")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [ln.strip() for ln in f if ln.strip()]


def load_dataset(data_cfg: Any) -> DatasetSplits:
    """Read ``data_cfg.dataset`` from ``data_cfg.root`` (or its default) with the registered reader."""
    return read_dataset(data_cfg.dataset, data_cfg.root, data_cfg.download)


def read_dataset(name: str, root: str | None, download: bool = False) -> DatasetSplits:
    """The dataset ``name`` read by its registered reader, its contract checked. A reader reports missing
    or bad files with a DataError (one line naming the file and the fix); a FileNotFoundError it lets
    escape is reported the same way."""
    reader = DATASETS.get(name)
    try:
        data = reader(root, download)
    except MalformedSplit as e:
        raise _broken(name, reader, e) from None
    except FileNotFoundError as e:
        raise DataError(f"dataset '{name}': {describe(e)}; check data.root") from None
    if not isinstance(data, DatasetSplits):
        raise DataError(f"the reader of dataset '{name}' returned {type(data).__name__}, not DatasetSplits; "
                        "return DatasetSplits(name, train, test, class_names)")
    try:
        return data.check()
    except MalformedSplit as e:
        raise _broken(name, reader, e) from None


def _broken(name: str, reader: Callable, e: MalformedSplit) -> MalformedSplit:
    """A reader of one's own broke the contract; a reader pgpcl ships read files that hold such values."""
    if getattr(reader, "__module__", "").startswith("pgpcl."):
        problem = str(e).split("; ", 1)[0]
        return MalformedSplit(f"dataset '{name}': its files hold bad values ({problem}); they are damaged or not "
                              "this dataset: re-extract or download it again")
    return MalformedSplit(f"dataset '{name}' broke the reader contract: {e}")
