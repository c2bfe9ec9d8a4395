"""LoRA on a frozen timm ViT or open_clip image tower: low-rank updates wrapped around chosen layers.

``add_lora`` replaces e.g. ``blocks[i].attn.qkv`` by a :class:`LoRALinear` holding the original
``nn.Linear`` (frozen) and two trainable factors, so every code path that calls the layer as a
module (timm's own block forward included) sees W + scale * B A. timm's files are not touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.models.attention import check_clip_attention, check_self_attention_call, preferred_product
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


class LoRAAttention(nn.Module):
    """open_clip's ``nn.MultiheadAttention`` (batch-first self-attention) with LoRA on its packed q/k/v
    projection: qkv = W_in x + b_in + scale * (x A^T) B^T; A: (r, D), B: (3D, r), W_in and the output
    projection frozen. The product is F.scaled_dot_product_attention, or the plain one where that is
    faster (:func:`plain_product_preferred`). Called as the module it replaces
    (``attn(x, x, x, need_weights=False, attn_mask=...)``, as open_clip's block does); returns
    (output, None). ``capture`` / ``captured`` as :class:`LoRALinear`: the layer's inputs x.
    """

    def __init__(self, attn: nn.MultiheadAttention, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        check_clip_attention(attn, "LoRA")
        self.attn = attn.requires_grad_(False)
        dim = attn.embed_dim
        self.lora_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_b = nn.Parameter(torch.zeros(3 * dim, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = float(alpha) / rank
        self.capture = False
        self.captured: Tensor | None = None

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None) -> tuple[Tensor, None]:
        check_self_attention_call(query, key, value, need_weights, "LoRAAttention")
        x, a = query, self.attn
        if self.capture:
            self.captured = x.detach()
        B, T, D = x.shape
        H = a.num_heads
        qkv = F.linear(x, a.in_proj_weight, a.in_proj_bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)
        q, k, v = qkv.reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        out = preferred_product(q, k, v, (D // H) ** -0.5, attn_mask)
        return a.out_proj(out.transpose(1, 2).reshape(B, T, D)), None

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale:g}"


CLIP_TARGETS = ("qkv", "fc1", "fc2")
"""LoRA targets in an open_clip ResidualAttentionBlock: the attention's packed q/k/v projection (its output
projection is read by torch's attention function directly, so it cannot be wrapped), the MLP's c_fc and
c_proj."""


def add_clip_lora(
    blocks: Sequence[nn.Module], indices: Iterable[int], targets: Iterable[str], rank: int, alpha: float
) -> dict[str, nn.Module]:
    """LoRA on ``targets`` (of :data:`CLIP_TARGETS`) of each open_clip block of ``blocks`` in ``indices``;
    returns {"b{i}.{target}": module}."""
    added: dict[str, nn.Module] = {}
    for i, blk in chosen_blocks(blocks, indices):
        for target in targets:
            if target not in CLIP_TARGETS:
                raise ValueError(f"unknown CLIP LoRA target '{target}'; choose from {', '.join(CLIP_TARGETS)}")
            parent, attr = (blk, "attn") if target == "qkv" else (blk.mlp, "c_fc" if target == "fc1" else "c_proj")
            layer = getattr(parent, attr)
            if isinstance(layer, (LoRALinear, LoRAAttention)):
                raise ValueError(f"block {i} {target} has LoRA already")
            wrap = LoRAAttention if target == "qkv" else LoRALinear
            wrapped = wrap(layer, rank, alpha).to(next(layer.parameters()).device)
            setattr(parent, attr, wrapped)
            added[f"b{i}.{target}"] = wrapped
    return added


def add_lora(
    blocks: Sequence[nn.Module], indices: Iterable[int], targets: Iterable[str], rank: int, alpha: float
) -> dict[str, LoRALinear]:
    """Wrap ``targets`` of each timm block of ``blocks`` (a ViT's ``blocks``) in ``indices`` with LoRA;
    returns {"b{i}.{target}": module}. The ViT keeps its other parameters frozen."""
    added: dict[str, LoRALinear] = {}
    for i, blk in chosen_blocks(blocks, indices):
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
