"""CIFAR-10 and CIFAR-100, python version: the official pickles or their tar.gz."""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits, fetch, resolve_root
from pgpcl.errors import DataError
from pgpcl.io import atomic_write_bytes, md5_file

CIFAR100_DIR = "cifar-100-python"
CIFAR100_TGZ = "cifar-100-python.tar.gz"
CIFAR100_TGZ_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_TGZ_BYTES = 169_001_437


def _numpy_global(name: str) -> Any:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray._reconstruct if name == "_reconstruct" else numeric._frombuffer


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3's protocol-2 pickles call to rebuild bytes; any other codec is refused."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}")
    return text.encode("latin1")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and numpy arrays; refuses every other global, so no code can run.

    The official files store ``data`` as a numpy array, so numpy's array-rebuilding names must be allowed
    (``_frombuffer`` for files re-saved with protocol 5, latin-1 ``_codecs.encode`` for Python 3's
    protocol 2); they only allocate an array or bytes from raw data.
    """

    _NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return _numpy_global(name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_pickle(path: Path) -> dict:
    """Load one CIFAR pickle the official way (``encoding='bytes'``), restricted to plain data."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path} is not a valid CIFAR pickle ({e}); delete it and re-extract the archive"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} is not a CIFAR pickle (no dict inside); delete it and re-extract the archive"
        )
    return obj


def _field(d: dict, key: bytes, path: Path, what: str) -> Any:
    if key not in d:
        raise DataError(f"{path} lacks key {key!r}; it is not the {what} python version, re-extract it")
    return d[key]


@dataclass(frozen=True)
class CifarFormat:
    """Where one CIFAR variant keeps its pickles and which keys hold labels and class names."""

    name: str  # CIFAR-10 / CIFAR-100, for messages
    folder: str  # the folder inside the official archive
    tgz: str
    tgz_md5: str
    tgz_bytes: int
    train: tuple[str, ...]  # pickles concatenated, in this order, into the train split
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    download_class: str  # torchvision's class, used only with data.download=true

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)

    @property
    def listing(self) -> str:
        """The members as a message shows them: {train,test,meta} or {data_batch_1..5,test_batch,batches.meta}."""
        train = self.train[0] if len(self.train) == 1 else f"{self.train[0][:-1]}1..{len(self.train)}"
        return "{" + ",".join((train, self.test, self.meta)) + "}"


CIFAR100 = CifarFormat(
    "CIFAR-100", CIFAR100_DIR, CIFAR100_TGZ, CIFAR100_TGZ_MD5, CIFAR100_TGZ_BYTES, ("train",), "test", "meta",
    b"fine_labels", b"fine_label_names", "CIFAR100",
)  # fmt: skip
CIFAR10 = CifarFormat(
    "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170_498_071,
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels", b"label_names",
    "CIFAR10",
)  # fmt: skip


def _labels(raw: Any, path: Path, key: bytes) -> np.ndarray:
    """The label list as int64 (N,); DataError for anything but a flat list of integers."""
    try:
        labels = np.asarray(raw)
    except ValueError:
        labels = None
    if labels is None or labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {key.decode()} is not a list of integer labels; re-extract it")
    return labels.astype(np.int64)


def _pickle_arrays(path: Path, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3072) channel-planar rows and int64 (N,) labels of one pickle."""
    d = load_pickle(path)
    try:
        data = np.asarray(_field(d, b"data", path, fmt.name))
    except ValueError:
        raise DataError(f"{path}: data rows differ in length, expected uint8 (N, 3072); re-extract it") from None
    labels = _labels(_field(d, fmt.label_key, path, fmt.name), path, fmt.label_key)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: data has shape {data.shape} {data.dtype}, expected uint8 (N, 3072); re-extract it"
        )
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} {fmt.label_key.decode()}; re-extract it")
    return data, labels


def _split(folder: Path, members: tuple[str, ...], fmt: CifarFormat) -> DatasetSplit:
    parts = [_pickle_arrays(folder / m, fmt) for m in members]
    data = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    # Rows are channel-planar (3, 32, 32); readers hand out HWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return DatasetSplit(images=images, paths=None, targets=labels)


def extract_cifar(tgz: Path, dest: Path, fmt: CifarFormat, md5: str | None = None) -> Path:
    """Check ``tgz``'s md5, then write only the format's pickles under ``dest/<fmt.folder>``."""
    want_md5 = md5 or fmt.tgz_md5
    got = md5_file(tgz)
    if got != want_md5:
        raise DataError(
            f"{tgz} has md5 {got}, expected {want_md5} (official archive is {fmt.tgz_bytes} bytes); "
            "delete it and download it again"
        )
    wanted = {f"{fmt.folder}/{m}" for m in fmt.members}
    found = set()
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            # Copy the known regular files by name: nothing else (links, ../ paths) is written.
            for member in tar:
                if member.isfile() and member.name in wanted:
                    atomic_write_bytes(dest / member.name, tar.extractfile(member).read())
                    found.add(member.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz} cannot be extracted ({e}); delete it and download it again") from None
    if found != wanted:
        missing = ", ".join(sorted(wanted - found))
        raise DataError(f"{tgz} lacks {missing}; it is not the {fmt.name} python archive")
    return dest / fmt.folder


def _download(root: Path, fmt: CifarFormat) -> None:
    def torchvision_download() -> None:
        from torchvision import datasets

        getattr(datasets, fmt.download_class)(str(root), train=True, download=True)

    fetch(fmt.name, root, fmt.tgz, torchvision_download)


def _locate(root: Path, download: bool, md5: str | None, fmt: CifarFormat) -> Path:
    for cand in (root / fmt.folder, root):
        if all((cand / m).is_file() for m in fmt.members):
            return cand
    if (root / fmt.tgz).is_file():
        return extract_cifar(root / fmt.tgz, root, fmt, md5)
    if download:
        _download(root, fmt)
        return _locate(root, False, md5, fmt)
    raise DataError(
        f"{fmt.name} not found under {root}: put {fmt.folder}/{fmt.listing} or {fmt.tgz} there, "
        "or set data.download=true"
    )


def _class_names(folder: Path, fmt: CifarFormat) -> list[str]:
    meta_path = folder / fmt.meta
    raw = _field(load_pickle(meta_path), fmt.names_key, meta_path, fmt.name)
    if not isinstance(raw, list) or not all(isinstance(n, (bytes, str)) for n in raw):
        raise DataError(f"{meta_path}: {fmt.names_key.decode()} is not a list of names; re-extract it")
    names = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in raw]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # the official files name each class once: two classes would read as one
        raise DataError(f"{meta_path}: {fmt.names_key.decode()} names {twice!r} twice; re-extract it")
    return names


def read_cifar(root: str | None, download: bool, fmt: CifarFormat, md5: str | None = None) -> DatasetSplits:
    folder = _locate(resolve_root(root), download, md5, fmt)
    names = _class_names(folder, fmt)
    train, test = _split(folder, fmt.train, fmt), _split(folder, (fmt.test,), fmt)
    return DatasetSplits(fmt.name.lower().replace("-", ""), train, test, names)


@DATASETS.register("cifar100")
def read_cifar100(root: str | None, download: bool, *, md5: str = CIFAR100_TGZ_MD5) -> DatasetSplits:
    """CIFAR-100: train 50000 / test 10000 RGB 32x32, 100 fine classes (names from ``meta``).

    ``md5`` is the expected checksum of ``cifar-100-python.tar.gz`` (tests pass their own).
    """
    return read_cifar(root, download, CIFAR100, md5)


@DATASETS.register("cifar10")
def read_cifar10(root: str | None, download: bool, *, md5: str | None = None) -> DatasetSplits:
    """CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or the official
    ``cifar-10-python.tar.gz`` (md5-checked); train 50000 / test 10000 RGB 32x32, 10 classes."""
    return read_cifar(root, download, CIFAR10, md5)
