"""MNIST and Fashion-MNIST in their original gzipped IDX files."""

from __future__ import annotations

import gzip
import zipfile
import zlib
from pathlib import Path

import numpy as np

from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits, fetch, find_or_fetch, resolve_root
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
    """Parse an IDX file (optionally gzipped) of unsigned bytes with ``ndim`` dimensions."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e}); delete it and fetch it again") from None
    return parse_idx(raw, str(path), ndim, gzipped=path.suffix == ".gz")


def parse_idx(raw: bytes, name: str, ndim: int, gzipped: bool) -> np.ndarray:
    """The array in IDX bytes ``raw`` (of the file or archive member ``name``, for messages).

    Layout: 2 zero bytes, type code 0x08, ndim, ndim big-endian uint32 sizes, then the raw bytes.
    """
    if gzipped and raw[:2] != b"\x1f\x8b" and raw[:3] == bytes([0, 0, _UBYTE]):
        gzipped = False  # already decompressed (gunzip -k, or a browser that unpacked it) under its .gz name
    if gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{name} cannot be read ({e}); delete it and fetch it again") from None
    head = 4 + 4 * ndim
    if len(raw) < head or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(
            f"{name} is not an IDX file of {ndim}-d unsigned bytes (bad magic number); delete it and fetch it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if 0 in dims[1:]:
        raise DataError(f"{name} holds images of size {dims[1:]}; the file is damaged, fetch it again")
    if len(raw) != head + int(np.prod(dims)):
        raise DataError(
            f"{name} is truncated or padded (dims {dims}, {len(raw) - head} data bytes); fetch it again"
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
                f"{folder}: {img_stem} has {len(images)} images but {lbl_stem} {len(labels)} labels; the files are of "
                "different releases or one is truncated: fetch both again"
            )
        if labels.size and labels.max() >= num_classes:
            raise DataError(
                f"{folder}/{lbl_stem}: label {labels.max()} >= {num_classes}; the file is not this dataset: fetch it again"
            )
        out.append(DatasetSplit(images=images.copy(), paths=None, targets=labels))
    return out[0], out[1]


def _download(kind: str, root: Path) -> None:
    def torchvision_download() -> None:
        from torchvision import datasets

        getattr(datasets, kind)(str(root), train=True, download=True)
        getattr(datasets, kind)(str(root), train=False, download=True)

    fetch(kind, root, "the IDX .gz files", torchvision_download)


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
    folder = find_or_fetch(lambda: _folder_with_files(candidates), lambda: _download(kind, base), download)
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


# ----------------------------------------------------------------------------------------------------
# Kuzushiji-MNIST: the same four IDX files as MNIST, or the official .npz arrays

KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
KMNIST_NPZ = {
    "train": ("kmnist-train-imgs.npz", "kmnist-train-labels.npz"),
    "test": ("kmnist-test-imgs.npz", "kmnist-test-labels.npz"),
}


def _npz_array(path: Path) -> np.ndarray:
    """``arr_0`` of an .npz file, read without pickles."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["arr_0"])
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as e:  # truncated, bad CRC
        raise DataError(f"{path} is not a KMNIST .npz file ({describe(e)}); delete it and fetch it again") from None


def _kmnist_npz(folder: Path) -> DatasetSplits:
    splits = []
    for img_name, lbl_name in KMNIST_NPZ.values():
        images, labels = _npz_array(folder / img_name), _npz_array(folder / lbl_name)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(f"{folder / img_name}: images have shape {images.shape} {images.dtype}, expected uint8 "
                            "(N, 28, 28); fetch it again")
        if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
            raise DataError(f"{folder / lbl_name}: {labels.shape} {labels.dtype} labels for {len(images)} images, "
                            "expected one integer each; fetch it again")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(KMNIST_CLASSES):
            raise DataError(f"{folder / lbl_name}: labels span {labels.min()}..{labels.max()}, expected 0..9; the file "
                            "is not KMNIST: fetch it again")
        splits.append(DatasetSplit(images=images, paths=None, targets=labels.astype(np.int64)))
    return DatasetSplits("kmnist", splits[0], splits[1], list(KMNIST_CLASSES))


@DATASETS.register("kmnist")
def read_kmnist(root: str | None, download: bool) -> DatasetSplits:
    """Kuzushiji-MNIST: 60000 / 10000 gray 28x28 cursive hiragana, 10 classes (romanised names).

    Reads the four IDX .gz files (as MNIST) or the four ``kmnist-{train,test}-{imgs,labels}.npz`` files.
    """
    base = resolve_root(root)
    for folder in (base, base / "kmnist"):
        if all((folder / f).is_file() for pair in KMNIST_NPZ.values() for f in pair):
            return _kmnist_npz(folder)
    return _read("kmnist", "KMNIST", root, download, "or the four kmnist-*.npz files, ", KMNIST_CLASSES)


# ----------------------------------------------------------------------------------------------------
# EMNIST: emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz], or the official gzip.zip

EMNIST_ZIP = "gzip.zip"
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
_UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_MERGED_LOWER = list("abdefghnqrt")  # the lower-case letters that bymerge/balanced keep apart from upper case
EMNIST_CLASSES = {
    "balanced": DIGIT_CLASSES + _UPPER + _MERGED_LOWER,
    "bymerge": DIGIT_CLASSES + _UPPER + _MERGED_LOWER,
    "byclass": DIGIT_CLASSES + _UPPER + [c.lower() for c in _UPPER],
    "digits": DIGIT_CLASSES,
    "mnist": DIGIT_CLASSES,
    "letters": [f"{c}{c.lower()}" for c in _UPPER],  # upper and lower case share a class
}


def _emnist_stem(split: str, role: str, kind: str) -> str:
    part = "images-idx3" if kind == "images" else "labels-idx1"
    return f"emnist-{split}-{role}-{part}-ubyte"


class _EmnistFiles:
    """The split's IDX members, from a folder (.gz or not) or straight from the official zip."""

    def __init__(self, base: Path, split: str):
        self.split, self.folder, self.zip = split, None, None
        stems = [_emnist_stem(split, r, k) for r in ("train", "test") for k in ("images", "labels")]
        for cand in (base, base / "gzip", base / "emnist", base / "emnist" / "gzip", base / "EMNIST" / "raw"):
            if all(_find(cand, s) for s in stems):
                self.folder = cand
                return
        for cand in (base / EMNIST_ZIP, base / "emnist" / EMNIST_ZIP, base / "EMNIST" / "raw" / EMNIST_ZIP):
            if cand.is_file():
                self.zip = cand
                return

    @classmethod
    def at(cls, base: Path, split: str) -> _EmnistFiles | None:
        """The split's files under ``base``, or None if neither the files nor the zip are there."""
        files = cls(base, split)
        return files if files.folder is not None or files.zip is not None else None

    def read(self, role: str, kind: str) -> np.ndarray:
        stem = _emnist_stem(self.split, role, kind)
        ndim = 3 if kind == "images" else 1
        if self.folder is not None:
            return read_idx(_find(self.folder, stem), ndim)
        member = f"gzip/{stem}.gz"
        try:
            with zipfile.ZipFile(self.zip) as z:
                raw = z.read(member)  # checks the member's CRC-32
        except KeyError:
            raise DataError(f"{self.zip} lacks {member}; it is not the EMNIST gzip.zip, download it again") from None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{self.zip} cannot be read ({describe(e)}); delete it and download it again") from None
        return parse_idx(raw, f"{self.zip}:{member}", ndim, gzipped=True)


def _emnist_split(files: _EmnistFiles, role: str, num_classes: int) -> DatasetSplit:
    images, labels = files.read(role, "images"), files.read(role, "labels").astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"EMNIST {files.split} {role}: {len(images)} images but {len(labels)} labels; fetch it again")
    if files.split == "letters":  # the files number the 26 letters from 1
        labels = labels - 1
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"EMNIST {files.split} {role}: labels span {labels.min()}..{labels.max()} for "
                        f"{num_classes} classes; the files are not this split, fetch them again")
    # The files store each character transposed (column-major); hand out upright images.
    return DatasetSplit(images=np.ascontiguousarray(images.transpose(0, 2, 1)), paths=None, targets=labels)


def read_emnist(root: str | None, download: bool, split: str) -> DatasetSplits:
    """EMNIST ``split``: gray 28x28 handwritten characters (upright), classes as the split defines them."""
    base = resolve_root(root)
    files = find_or_fetch(lambda: _EmnistFiles.at(base, split), lambda: _download_emnist(base, split), download)
    if files is None:
        raise DataError(
            f"EMNIST not found under {base}: put the official {EMNIST_ZIP} (or its gzip/ folder with "
            f"{_emnist_stem(split, 'train', 'images')}.gz and the other three files) there, or set data.download=true"
        )
    names = EMNIST_CLASSES[split]
    train, test = (_emnist_split(files, role, len(names)) for role in ("train", "test"))
    return DatasetSplits(f"emnist_{split}", train, test, list(names))


def _download_emnist(root: Path, split: str) -> None:
    def torchvision_download() -> None:
        from torchvision.datasets import EMNIST

        EMNIST(str(root), split=split, train=True, download=True)

    fetch("EMNIST", root, EMNIST_ZIP, torchvision_download)


def _register_emnist(split: str) -> None:
    def reader(root: str | None, download: bool) -> DatasetSplits:
        return read_emnist(root, download, split)

    reader.__doc__ = (f"EMNIST {split}: {len(EMNIST_CLASSES[split])} classes of handwritten characters, gray 28x28, "
                      f"from the official {EMNIST_ZIP} or its gzip/ folder.")
    DATASETS.register(f"emnist_{split}")(reader)


for _split_name in EMNIST_SPLITS:
    _register_emnist(_split_name)
