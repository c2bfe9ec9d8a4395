"""MNIST and Fashion-MNIST in their original gzipped IDX files."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits, resolve_root
from pgpcl.errors import DataError, describe

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(i) for i in range(10)]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes with ``ndim`` dimensions.

    Layout: 2 zero bytes, type code 0x08, ndim, ndim big-endian uint32 sizes, then the raw bytes.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({e}); delete it and fetch it again") from None
    head = 4 + 4 * ndim
    if len(raw) < head or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number); delete it and fetch it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if 0 in dims[1:]:
        raise DataError(f"{path} holds images of size {dims[1:]}; the file is damaged, fetch it again")
    if len(raw) != head + int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated or padded (dims {dims}, {len(raw) - head} data bytes); fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _folder_with_files(candidates: list[Path]) -> Path | None:
    stems = [s for pair in IDX_FILES.values() for s in pair]
    for folder in candidates:
        if all(_find(folder, s) for s in stems):
            return folder
    return None


def read_idx_splits(folder: Path, num_classes: int = 10) -> tuple[DatasetSplit, DatasetSplit]:
    """Train and test splits from the four IDX files in ``folder``."""
    out = []
    for img_stem, lbl_stem in IDX_FILES.values():
        images = read_idx(_find(folder, img_stem), 3)
        labels = read_idx(_find(folder, lbl_stem), 1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(
                f"{folder}: {img_stem} has {len(images)} images but {lbl_stem} {len(labels)} labels"
            )
        if labels.size and labels.max() >= num_classes:
            raise DataError(
                f"{folder}/{lbl_stem}: label {labels.max()} >= {num_classes}; the file is not this dataset"
            )
        out.append(DatasetSplit(images=images.copy(), paths=None, targets=labels))
    return out[0], out[1]


def _download(kind: str, root: Path) -> None:
    try:
        from torchvision import datasets

        getattr(datasets, kind)(str(root), train=True, download=True)
        getattr(datasets, kind)(str(root), train=False, download=True)
    except Exception as e:  # network/IO failure -> one actionable line
        msg = describe(e)
        raise DataError(
            f"{kind} download into {root} failed ({msg}); put the IDX .gz files there by hand"
        ) from None


def _read(
    name: str,
    kind: str,
    root: str | None,
    download: bool,
    hint: str,
    classes: list[str],
    extra: tuple[Path, ...] = (),
) -> DatasetSplits:
    base = resolve_root(root)
    # torchvision keeps its downloads in <root>/<Kind>/raw; accept that layout as well.
    candidates = [*extra, base, base / kind / "raw", base / name]
    folder = _folder_with_files(candidates)
    if folder is None and download:
        _download(kind, base)
        folder = _folder_with_files(candidates)
    if folder is None:
        where = " or ".join(str(p) for p in (*extra, base))
        raise DataError(
            f"{kind} not found under {where}: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz there, {hint}or set data.download=true"
        )
    train, test = read_idx_splits(folder, len(classes))
    return DatasetSplits(name, train, test, list(classes))


@DATASETS.register("fashion_mnist")
def read_fashion_mnist(root: str | None, download: bool) -> DatasetSplits:
    """Fashion-MNIST: 60000 / 10000 gray 28x28, 10 classes.

    root None: the Debian package's folder (``apt-get install dataset-fashion-mnist``), else the default
    data root (where data.download=true puts it).
    """
    if root is None:
        hint = "run apt-get install dataset-fashion-mnist, set data.root, "
        extra = (Path(FASHION_MNIST_DEBIAN),)
    else:
        hint, extra = "", ()
    return _read("fashion_mnist", "FashionMNIST", root, download, hint, FASHION_MNIST_CLASSES, extra)


@DATASETS.register("mnist")
def read_mnist(root: str | None, download: bool) -> DatasetSplits:
    """MNIST: 60000 / 10000 gray 28x28 digits. Offline alternative: dataset mnist5k."""
    return _read("mnist", "MNIST", root, download, "use dataset=mnist5k offline, ", DIGIT_CLASSES)
