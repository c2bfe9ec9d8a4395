"""Shared fixtures. Data fixtures (``data_*``) write tiny datasets in their real on-disk formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian uint32 dims, raw bytes."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def index_images(labels: np.ndarray, size: int = 28) -> np.ndarray:
    """uint8 (N, size, size) images whose pixels (0,0),(0,1) encode the row index and (1,0) the label."""
    n = len(labels)
    img = np.zeros((n, size, size), dtype=np.uint8)
    idx = np.arange(n)
    img[:, 0, 0], img[:, 0, 1], img[:, 1, 0] = idx // 256, idx % 256, np.asarray(labels) * 10
    return img


def decode_index(x: torch.Tensor) -> list[int]:
    """Inverse of :func:`index_images` for a batch transformed by 'plain' at native size (B, C, S, S)."""
    px = (x[:, 0, 0, :2] * 255).round().long()
    return (px[:, 0] * 256 + px[:, 1]).tolist()


@pytest.fixture
def data_write_idx():
    """``write(folder, train_labels, test_labels, size=28) -> folder`` with the 4 gzipped IDX files."""

    def write(folder: Path, train_labels, test_labels, size: int = 28) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
            labels = np.asarray(labels, dtype=np.uint8)
            (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(_idx_bytes(index_images(labels, size)))
            )
            (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
        return folder

    return write


@pytest.fixture
def data_write_image():
    """``write(path, color=(r, g, b), size=(w, h))``: a tiny image file, format from the suffix."""
    from PIL import Image

    def write(path: Path, color=(200, 100, 50), size=(12, 10)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, tuple(color)).save(path)
        return path

    return write


@pytest.fixture
def data_decode_index():
    return decode_index


@pytest.fixture(autouse=False)
def data_one_thread():
    """Keep torch to one thread: the test machines' cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def module_one_thread():
    """One torch thread for a whole module (its module-scoped fixtures build models): these tensors are
    tiny, and on shared cores OpenMP workers waiting for each other make every op much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
