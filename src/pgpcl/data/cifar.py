"""CIFAR-100, python version: ``cifar-100-python/{train,test,meta}`` pickles or the official tar.gz."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits, resolve_root
from pgpcl.errors import DataError, describe
from pgpcl.io import atomic_write_bytes, md5_file

CIFAR100_DIR = "cifar-100-python"
CIFAR100_TGZ = "cifar-100-python.tar.gz"
CIFAR100_TGZ_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_TGZ_BYTES = 169_001_437
_MEMBERS = ("train", "test", "meta")


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


def _field(d: dict, key: bytes, path: Path) -> Any:
    if key not in d:
        raise DataError(f"{path} lacks key {key!r}; it is not the CIFAR-100 python version, re-extract it")
    return d[key]


def _labels(raw: Any, path: Path) -> np.ndarray:
    """``fine_labels`` as int64 (N,); DataError for anything but a flat list of integers."""
    try:
        labels = np.asarray(raw)
    except ValueError:
        labels = None
    if labels is None or labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: fine_labels is not a list of integer labels; re-extract it")
    return labels.astype(np.int64)


def _split(path: Path) -> DatasetSplit:
    d = load_pickle(path)
    try:
        data = np.asarray(_field(d, b"data", path))
    except ValueError:
        raise DataError(f"{path}: data rows differ in length, expected uint8 (N, 3072); re-extract it") from None
    labels = _labels(_field(d, b"fine_labels", path), path)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: data has shape {data.shape} {data.dtype}, expected uint8 (N, 3072); re-extract it"
        )
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} fine_labels; re-extract it")
    # Rows are channel-planar (3, 32, 32); readers hand out HWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return DatasetSplit(images=images, paths=None, targets=labels)


def extract_cifar100(tgz: Path, dest: Path, md5: str = CIFAR100_TGZ_MD5) -> Path:
    """Check ``tgz``'s md5, then write only its train/test/meta members under ``dest/cifar-100-python``."""
    got = md5_file(tgz)
    if got != md5:
        raise DataError(
            f"{tgz} has md5 {got}, expected {md5} (official archive is {CIFAR100_TGZ_BYTES} bytes); "
            "delete it and download it again"
        )
    wanted = {f"{CIFAR100_DIR}/{m}" for m in _MEMBERS}
    found = set()
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            # Copy the three known regular files by name: nothing else (links, ../ paths) is written.
            for member in tar:
                if member.isfile() and member.name in wanted:
                    atomic_write_bytes(dest / member.name, tar.extractfile(member).read())
                    found.add(member.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz} cannot be extracted ({e}); delete it and download it again") from None
    if found != wanted:
        missing = ", ".join(sorted(wanted - found))
        raise DataError(f"{tgz} lacks {missing}; it is not the CIFAR-100 python archive")
    return dest / CIFAR100_DIR


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=True, download=True)
    except Exception as e:  # any network/IO failure becomes one actionable line
        msg = describe(e)
        raise DataError(
            f"CIFAR-100 download into {root} failed ({msg}); put {CIFAR100_TGZ} there by hand"
        ) from None


def _locate(root: Path, download: bool, md5: str) -> Path:
    for cand in (root / CIFAR100_DIR, root):
        if all((cand / m).is_file() for m in _MEMBERS):
            return cand
    if (root / CIFAR100_TGZ).is_file():
        return extract_cifar100(root / CIFAR100_TGZ, root, md5)
    if download:
        _download(root)
        return _locate(root, False, md5)
    raise DataError(
        f"CIFAR-100 not found under {root}: put {CIFAR100_DIR}/{{train,test,meta}} or {CIFAR100_TGZ} there, "
        "or set data.download=true"
    )


@DATASETS.register("cifar100")
def read_cifar100(root: str | None, download: bool, *, md5: str = CIFAR100_TGZ_MD5) -> DatasetSplits:
    """CIFAR-100: train 50000 / test 10000 RGB 32x32, 100 fine classes (names from ``meta``).

    ``md5`` is the expected checksum of ``cifar-100-python.tar.gz`` (tests pass their own).
    """
    folder = _locate(resolve_root(root), download, md5)
    meta_path = folder / "meta"
    raw_names = _field(load_pickle(meta_path), b"fine_label_names", meta_path)
    if not isinstance(raw_names, list) or not all(isinstance(n, (bytes, str)) for n in raw_names):
        raise DataError(f"{meta_path}: fine_label_names is not a list of names; re-extract it")
    names = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in raw_names]
    return DatasetSplits("cifar100", _split(folder / "train"), _split(folder / "test"), names)
