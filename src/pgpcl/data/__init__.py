"""Datasets, transforms and continual scenarios.

One reader per on-disk format is registered in :data:`DATASETS` (cifar10, cifar100, svhn, imagenet_r,
tiny_imagenet, cub200, domainnet, notmnist, fashion_mnist, mnist, kmnist, emnist_<split>, mnist5k,
image_folder);
:func:`build_scenario` cuts a dataset into tasks.
"""

from pgpcl.data import cifar, folders, idx, mnist5k, svhn  # noqa: F401  (registers the readers)
from pgpcl.data.base import DATASETS, DatasetSplit, DatasetSplits, default_root, load_dataset, read_dataset
from pgpcl.data.scenario import Scenario, build_scenario
from pgpcl.data.taskset import TaskDataset, load_image
from pgpcl.data.transforms import ImageTransform, build_transform

__all__ = [
    "DATASETS",
    "DatasetSplit",
    "DatasetSplits",
    "ImageTransform",
    "Scenario",
    "TaskDataset",
    "build_scenario",
    "build_transform",
    "default_root",
    "load_dataset",
    "load_image",
    "read_dataset",
]
