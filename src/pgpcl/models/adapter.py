"""Parallel bottleneck adapters on a frozen timm ViT (AdaptFormer-style), wrapped around blocks' MLPs.

``add_adapters`` replaces ``blocks[i].mlp`` by an :class:`AdapterMLP` holding the original MLP
(frozen) and a trainable bottleneck beside it: mlp(x) + scale * up(relu(down(x))). timm's and open_clip's
files are not touched; their block forwards call the wrapper like the MLP it replaced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.models.frozen import chosen_blocks


class AdapterMLP(nn.Module):
    """y = mlp(x) + scale * relu(x W_down^T) W_up^T; W_down (h, D), W_up (D, h), no biases.

    W_up starts at zero, so the block starts equal to the pretrained one. No biases: a bias change would
    move the output for every input, old ones included, and no input-space projection can stop that.
    While ``capture`` is set, the input x and the hidden activations relu(x W_down^T) of each call are
    kept (detached) in ``captured``: the rows PGP needs for W_down and W_up.
    """

    def __init__(self, mlp: nn.Module, dim: int, hidden: int, scale: float):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"adapter width must be >= 1, got {hidden}")
        self.mlp = mlp.requires_grad_(False)
        self.down = nn.Parameter(torch.empty(hidden, dim))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own init
        self.up = nn.Parameter(torch.zeros(dim, hidden))
        self.scale = float(scale)
        self.capture = False
        self.captured: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(F.linear(x, self.down))
        if self.capture:
            self.captured = (x.detach(), hidden.detach())
        return self.mlp(x) + self.scale * F.linear(hidden, self.up)

    def extra_repr(self) -> str:
        return f"hidden={self.down.shape[0]}, scale={self.scale:g}"


def add_adapters(
    blocks: Sequence[nn.Module], indices: Iterable[int], dim: int, hidden: int, scale: float
) -> dict[str, AdapterMLP]:
    """Put an adapter beside the MLP (``.mlp``) of each block of ``blocks`` in ``indices``: a timm ViT's
    ``blocks`` or an open_clip tower's ``transformer.resblocks``, width ``dim``. Returns {"b{i}": adapter}."""
    added: dict[str, AdapterMLP] = {}
    for i, blk in chosen_blocks(blocks, indices):
        if isinstance(blk.mlp, AdapterMLP):
            raise ValueError(f"block {i} has an adapter already")
        blk.mlp = AdapterMLP(blk.mlp, dim, hidden, scale).to(next(blk.parameters()).device)
        added[f"b{i}"] = blk.mlp
    return added
