"""LoRA on a frozen timm ViT: low-rank updates wrapped around chosen linear layers of chosen blocks.

``add_lora`` replaces e.g. ``blocks[i].attn.qkv`` by a :class:`LoRALinear` holding the original
``nn.Linear`` (frozen) and two trainable factors, so every code path that calls the layer as a
module (timm's own block forward included) sees W + scale * B A. timm's files are not touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.models.frozen import chosen_blocks

TARGETS = {
    "qkv": ("attn", "qkv"),
    "proj": ("attn", "proj"),
    "fc1": ("mlp", "fc1"),
    "fc2": ("mlp", "fc2"),
}
"""LoRA target name -> (sub-module of a timm Block, linear layer in it)."""


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T, base frozen; A: (r, in), B: (out, r).

    B starts at zero, so the wrapped layer starts equal to the pretrained one. While ``capture`` is
    set, the input of each call is kept in ``captured`` ((..., in), detached): the rows PGP needs for
    this layer (its old input space protects A; those inputs through A protect B).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, for the input side
        self.scale = float(alpha) / rank
        self.capture = False
        self.captured: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.capture:
            self.captured = x.detach()
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def add_lora(
    vit: nn.Module, blocks: Iterable[int], targets: Iterable[str], rank: int, alpha: float
) -> dict[str, LoRALinear]:
    """Wrap ``targets`` of each block in ``blocks`` with LoRA; returns {"b{i}.{target}": module}.

    The ViT keeps its other parameters frozen (as :class:`PromptedViT` leaves them).
    """
    added: dict[str, LoRALinear] = {}
    for i, blk in chosen_blocks(vit.blocks, blocks):
        for target in targets:
            if target not in TARGETS:
                raise ValueError(f"unknown LoRA target '{target}'; choose from {', '.join(TARGETS)}")
            parent_name, attr = TARGETS[target]
            parent = getattr(blk, parent_name)
            layer = getattr(parent, attr)
            if isinstance(layer, LoRALinear):
                raise ValueError(f"block {i} {target} has LoRA already")
            wrapped = LoRALinear(layer, rank, alpha).to(layer.weight.device)
            setattr(parent, attr, wrapped)
            added[f"b{i}.{target}"] = wrapped
    return added
