"""SVHN (cropped digits): the official MATLAB files ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits, fetch, find_or_fetch, resolve_root
from pgpcl.errors import DataError, describe

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# The official site (http://ufldl.stanford.edu/housenumbers/) also serves extra_32x32.mat; it is not read.
SVHN_CLASSES = [str(d) for d in range(10)]


def _loadmat(path: Path) -> dict:
    """The file's X and y; scipy's MATLAB reader builds arrays only (no pickles, no code)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN's .mat files needs scipy: pip install scipy (or pgpcl[svhn])") from None
    try:
        return loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError:  # a v7.3 (HDF5) file: not what the official site serves
        raise DataError(f"{path} is a MATLAB v7.3 file, not the official SVHN file; download it again") from None
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, zlib.error... on a damaged file
        raise DataError(f"{path} cannot be read as a MATLAB file ({describe(e)}); download it again") from None


def read_svhn_mat(path: Path) -> DatasetSplit:
    """One split: X uint8 (32, 32, 3, N) becomes HWC images (N, 32, 32, 3); labels 1..10, where 10 is the
    digit 0, become 0..9."""
    mat = _loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} lacks the variables X and y; it is not an SVHN cropped-digits file")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X has shape {x.shape} {x.dtype}, expected uint8 (32, 32, 3, N); download it again")
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.array_equal(y, np.round(y))):
        raise DataError(f"{path}: y holds {y.dtype} values, expected the whole numbers 1..10; download it again")
    if len(y) != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but {len(y)} labels; download it again")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels span {y.min()}..{y.max()}, expected 1..10; download it again")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return DatasetSplit(images=images, paths=None, targets=(y.astype(np.int64) % 10))


def _download(root: Path) -> None:
    def torchvision_download() -> None:
        from torchvision.datasets import SVHN

        for split in SVHN_FILES:
            SVHN(str(root), split=split, download=True)

    fetch("SVHN", root, "train_32x32.mat and test_32x32.mat", torchvision_download)


def _folder(base: Path) -> Path | None:
    for cand in (base, base / "svhn", base / "SVHN"):
        if all((cand / f).is_file() for f in SVHN_FILES.values()):
            return cand
    return None


@DATASETS.register("svhn")
def read_svhn(root: str | None, download: bool) -> DatasetSplits:
    """SVHN: train 73257 / test 26032 RGB 32x32 house-number digits, classes '0'..'9'."""
    base = resolve_root(root)
    folder = find_or_fetch(lambda: _folder(base), lambda: _download(base), download)
    if folder is None:
        raise DataError(
            f"SVHN not found under {base}: put train_32x32.mat and test_32x32.mat there "
            "(http://ufldl.stanford.edu/housenumbers/), or set data.download=true"
        )
    train, test = (read_svhn_mat(folder / SVHN_FILES[role]) for role in ("train", "test"))
    return DatasetSplits("svhn", train, test, list(SVHN_CLASSES))
