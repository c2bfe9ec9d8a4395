"""The torch Dataset behind every scenario loader, image decoding and the in-memory fast path."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as F

from pgpcl.data.base import DatasetSplit
from pgpcl.data.transforms import ImageTransform
from pgpcl.errors import DataError

FAST_PATH_MAX_BYTES = 2 << 30
"""Largest converted split kept in memory; bigger ones are transformed per batch instead."""
_CHUNK = 2048


def eight_bit(im: Image.Image) -> Image.Image:
    """``im`` with 8-bit channels. Pillow's convert('RGB') / convert('L') clips wider values to 0..255, which
    turns a 16-bit scan nearly white and a float image in [0, 1] black: scale them instead. 16-bit
    integers map 0..65535 to 0..255; floats in [0, 1] are multiplied by 255, others clipped to 0..255."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        a = a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a
    elif im.mode.startswith("I;16") or a.max(initial=0) > 255:  # mode 'I' holding 8-bit values stays as is
        a = np.clip(a, 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def load_image(path: str) -> torch.Tensor:
    """Decode one file to uint8 (3, H, W); DataError naming the file if it is corrupt or missing."""
    # Deleting the file is no fix: it changes the dataset, which a resumed run refuses.
    try:
        with Image.open(path) as im:
            return F.pil_to_tensor(eight_bit(im).convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; restore it (re-extract the dataset)") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely ({e}); replace it with a smaller copy") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path} ({e}); replace it with a readable copy (re-extract the dataset)") from None


def array_to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W)."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def raw_item(split: DatasetSplit, i: int) -> torch.Tensor:
    """Sample ``i`` of ``split`` as uint8 (C, H, W)."""
    if split.images is not None:
        return array_to_chw(split.images[i : i + 1])[0]
    return load_image(split.paths[i])


def convert_split(
    split: DatasetSplit, transform: ImageTransform, indices: np.ndarray
) -> tuple[np.ndarray, torch.Tensor] | None:
    """Fast path: run a deterministic ``transform``'s geometry once on rows ``indices`` of an in-memory split.

    Returns (row_of: int64 (len(split),) position in the tensor or -1, tensor uint8 (M, C, S, S)),
    cached in ``split.cache`` per geometry so train/test/sample loaders share one conversion; None when
    the split is path-based, the transform augments, or the result would exceed FAST_PATH_MAX_BYTES.
    Kept as uint8 with the source's channels: float conversion per batch is cheap, 4-12x the memory is not.
    """
    if split.images is None or transform.augments or len(indices) == 0:
        return None
    hit = split.cache.get(transform.key)
    if hit is not None and (hit[0][indices] >= 0).all():
        return hit
    if hit is not None:  # grow the cache rather than drop what other loaders already use
        indices = np.union1d(indices, np.flatnonzero(hit[0] >= 0))
    indices = np.unique(indices)
    probe = transform.geometry(array_to_chw(split.images[indices[:1]]))
    if probe[0].numel() * len(indices) > FAST_PATH_MAX_BYTES:
        return None
    parts = [
        transform.geometry(array_to_chw(split.images[indices[s : s + _CHUNK]]))
        for s in range(0, len(indices), _CHUNK)
    ]
    row_of = np.full(len(split), -1, dtype=np.int64)
    row_of[indices] = np.arange(len(indices))
    split.cache[transform.key] = (row_of, torch.cat(parts))
    return split.cache[transform.key]


class TaskDataset(Dataset):
    """Rows ``indices`` of one split with remapped labels, all tagged with task id ``task``.

    ``cached`` is :func:`convert_split`'s result for the split; rows it covers skip decoding and the
    geometry stage. Items are ``(x float (C,S,S), y int64 (), task int64 ())``; ``__getitems__``
    returns whole batches ``(x (B,C,S,S), y (B,), task (B,))`` so the DataLoader skips collation.
    """

    def __init__(
        self,
        split: DatasetSplit,
        indices: np.ndarray,
        labels: np.ndarray,
        task: int,
        transform: ImageTransform,
        seed: int = 0,
        cached: tuple[np.ndarray, torch.Tensor] | None = None,
    ):
        self.split, self.transform, self.task = split, transform, task
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        # Augmentation draws come from this generator, not the global RNG: reproducible from seed.
        self.generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
        rows = None if cached is None else cached[0][self.indices]
        covered = rows is not None and bool((rows >= 0).all())
        self._cache = cached[1] if covered else None
        self._rows = torch.from_numpy(rows) if covered else None

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed) % (1 << 63))

    def __len__(self) -> int:
        return len(self.indices)

    def _x(self, items: list[int]) -> torch.Tensor:
        if self._cache is not None:
            return self.transform.finish(self._cache[self._rows[items]])
        geo = [
            self.transform.geometry(raw_item(self.split, int(self.indices[i])), self.generator) for i in items
        ]
        return self.transform.finish(torch.stack(geo))

    def __getitems__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = list(items)
        x = self._x(items)
        y = self.labels[items]
        return x, y, torch.full((len(items),), self.task, dtype=torch.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, t = self.__getitems__([i])
        return x[0], y[0], t[0]


def collate_batch(batch):
    """TaskDataset already returns collated batches; anything else gets torch's default collation."""
    if isinstance(batch, tuple):
        return batch
    return torch.utils.data.default_collate(batch)


def seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from the loader's seeded base seed."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, TaskDataset):
        info.dataset.reseed(torch.initial_seed())
