"""Image transforms on uint8 tensors, built from torchvision.transforms.v2 functionals.

Every transform maps uint8 ``(C, H, W)`` (or a batch ``(N, C, H, W)``) with C in {1, 3} to float
``(channels, S, S)`` in [0, 1], optionally mean/std normalised. Random draws come from an explicit
``torch.Generator`` rather than torch's global RNG, so a loader's augmentation is reproducible from its
seed alone.

kinds:
  vit   train: RandomResizedCrop(S, scale 0.05-1, bilinear) + horizontal flip (the released PGP/L2P)
        test:  Resize(int(S * 256 / 224), bicubic) + CenterCrop(S)
  clip  train: RandomResizedCrop(S, scale 0.08-1) + flip; test: Resize(S, bicubic) + CenterCrop(S)
  plain train and test: resize to S x S (bilinear); no augmentation (digits, smoke runs)
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pgpcl.errors import ConfigError

KINDS = ("vit", "plain", "clip")
MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
TRAIN_SCALE = {"vit": (0.05, 1.0), "clip": (0.08, 1.0)}
CROP_RATIO = (3 / 4, 4 / 3)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert('L')


def random_resized_crop_box(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator | None
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area, torchvision's rule."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    # Fallback after 10 misses: the largest central crop whose aspect lies within ratio.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class ImageTransform:
    """Callable ``(uint8 (C,H,W) | (N,C,H,W), generator=None) -> float (channels,S,S) | (N,channels,S,S)``.

    It runs in two stages: :meth:`geometry` (resize/crop/flip on uint8) then :meth:`finish` (to float,
    channels, normalisation). ``augments`` is False for deterministic transforms, whose geometry stage
    may be applied once to a whole split (the fast path); ``key`` identifies that stage's output.
    """

    def __init__(self, kind: str, img_size: int, channels: int, normalize: str, train: bool):
        if kind not in KINDS:
            raise ConfigError(f"unknown transform {kind!r}; choose one of {list(KINDS)}")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        if img_size < 1:
            raise ConfigError(f"data.img_size must be >= 1, got {img_size}")
        if normalize != "none" and normalize not in MEAN_STD:
            raise ConfigError(f"unknown normalize {normalize!r}; choose none or one of {sorted(MEAN_STD)}")
        self.kind, self.size, self.channels, self.normalize = kind, img_size, channels, normalize
        self.augments = train and kind != "plain"
        # Identifies the geometry stage's output, which is all the fast path caches.
        self.key = (kind, img_size, self.augments)
        self._mean_std = self._stats(normalize, channels)

    @staticmethod
    def _stats(normalize: str, channels: int) -> tuple[list[float], list[float]] | None:
        if normalize == "none":
            return None
        mean, std = MEAN_STD[normalize]
        if channels == 1:  # one gray channel: average the RGB statistics
            return [sum(mean) / 3], [sum(std) / 3]
        return list(mean), list(std)

    def __repr__(self) -> str:
        mode = "train" if self.augments else "test"
        return f"ImageTransform({self.kind}/{mode}, size={self.size}, channels={self.channels}, norm={self.normalize})"

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.ndim not in (3, 4) or img.shape[-3] not in (1, 3):
            raise ValueError(
                f"expected uint8 (C,H,W) or (N,C,H,W) with C in 1/3, got {img.dtype} {tuple(img.shape)}"
            )
        return self.finish(self.geometry(img, generator))

    def geometry(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The resize / crop / flip stage; stays uint8 with the input's channels, so it is cheap to cache."""
        if not self.augments:
            return self._deterministic(img)
        if img.ndim == 4:
            return torch.stack([self._augment(im, generator) for im in img])
        return self._augment(img, generator)

    def finish(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, S, S) -> float in [0, 1], converted to ``channels``, normalised if asked."""
        x = self._to_channels(img.float().div_(255.0))
        if self._mean_std is not None:
            x = F.normalize(x, *self._mean_std)
        return x

    def _augment(self, img: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        h, w = img.shape[-2:]
        top, left, ch, cw = random_resized_crop_box(h, w, TRAIN_SCALE[self.kind], CROP_RATIO, gen)
        img = F.resized_crop(
            img, top, left, ch, cw, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )
        if torch.rand(1, generator=gen).item() < 0.5:
            img = F.horizontal_flip(img)
        return img

    def _deterministic(self, img: torch.Tensor) -> torch.Tensor:
        s = self.size
        if self.kind == "plain":
            if tuple(img.shape[-2:]) == (s, s):
                return img
            return F.resize(img, [s, s], InterpolationMode.BILINEAR, antialias=True)
        short = int(s * 256 / 224) if self.kind == "vit" else s
        if min(img.shape[-2:]) != short:
            img = F.resize(img, [short], InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(img, [s, s])

    def _to_channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.channels:
            return x
        if c == 1:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
        w = torch.tensor(LUMA, dtype=x.dtype).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)


def build_transform(kind: str, img_size: int, channels: int, normalize: str, train: bool) -> ImageTransform:
    """The transform of ``kind`` ('vit' | 'plain' | 'clip') for training (augmenting) or testing."""
    return ImageTransform(kind, img_size, channels, normalize, train)
