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


class CLIPSelfAttention(nn.Module):
    """open_clip's ``nn.MultiheadAttention`` (batch-first self-attention) written out, with its output
    projection called as a module: torch's own attention function reads ``out_proj.weight`` directly, so
    a LoRA wrapped around ``out_proj`` would be bypassed there. Called as the module it replaces
    (``attn(x, x, x, need_weights=False, attn_mask=...)``, as open_clip's block does); returns
    (output, None). The product is F.scaled_dot_product_attention, or the plain one where that is faster
    (:func:`preferred_product`). Subclasses change the packed q/k/v projection (:meth:`packed_qkv`).
    """

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        check_clip_attention(attn, "LoRA")
        for name, p in attn.named_parameters():
            if not name.startswith("out_proj.lora_"):  # the pretrained weights; a LoRA on out_proj keeps training
                p.requires_grad_(False)
        self.attn = attn

    def packed_qkv(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, 3D): W_in x + b_in."""
        return F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None) -> tuple[Tensor, None]:
        check_self_attention_call(query, key, value, need_weights, type(self).__name__)
        B, T, D = query.shape
        H = self.attn.num_heads
        q, k, v = self.packed_qkv(query).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        out = preferred_product(q, k, v, (D // H) ** -0.5, attn_mask)
        return self.attn.out_proj(out.transpose(1, 2).reshape(B, T, D)), None


class LoRAAttention(CLIPSelfAttention):
    """:class:`CLIPSelfAttention` with LoRA on its packed q/k/v projection: qkv = W_in x + b_in +
    scale * (x A^T) B^T; A: (r, D), B: (3D, r), W_in frozen. ``capture`` / ``captured`` as
    :class:`LoRALinear`: the layer's inputs x.
    """

    def __init__(self, attn: nn.MultiheadAttention, rank: int, alpha: float):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        super().__init__(attn)
        dim = attn.embed_dim
        self.lora_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_b = nn.Parameter(torch.zeros(3 * dim, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = float(alpha) / rank
        self.capture = False
        self.captured: Tensor | None = None

    def packed_qkv(self, x: Tensor) -> Tensor:
        if self.capture:
            self.captured = x.detach()
        return super().packed_qkv(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale:g}"


CLIP_TARGETS = ("qkv", "proj", "fc1", "fc2")
"""LoRA targets in an open_clip ResidualAttentionBlock: the attention's packed q/k/v projection and its
output projection (both through :class:`CLIPSelfAttention`, which replaces the block's
``nn.MultiheadAttention``), the MLP's c_fc and c_proj."""


def add_clip_lora(
    blocks: Sequence[nn.Module], indices: Iterable[int], targets: Iterable[str], rank: int, alpha: float
) -> dict[str, nn.Module]:
    """LoRA on ``targets`` (of :data:`CLIP_TARGETS`) of each open_clip block of ``blocks`` in ``indices``;
    returns {"b{i}.{target}": module}, in the order given (the factors are drawn in it)."""
    targets = list(targets)
    for target in targets:
        if target not in CLIP_TARGETS:
            raise ValueError(f"unknown CLIP LoRA target '{target}'; choose from {', '.join(CLIP_TARGETS)}")
    added: dict[str, nn.Module] = {}
    for i, blk in chosen_blocks(blocks, indices):
        for target in targets:
            wrapped = _clip_lora_on(blk, target, rank, alpha)
            if wrapped is None:
                raise ValueError(f"block {i} {target} has LoRA already")
            added[f"b{i}.{target}"] = wrapped
    return added


def _clip_lora_on(blk: nn.Module, target: str, rank: int, alpha: float) -> nn.Module | None:
    """Put LoRA on ``target`` of one open_clip block; returns the LoRA module, or None if it has one."""
    attn = blk.attn
    mha = attn.attn if isinstance(attn, CLIPSelfAttention) else attn
    device = mha.in_proj_weight.device
    if target == "qkv":
        if isinstance(attn, LoRAAttention):
            return None
        blk.attn = LoRAAttention(mha, rank, alpha).to(device)
        return blk.attn
    if target == "proj":
        if isinstance(mha.out_proj, LoRALinear):
            return None
        if not isinstance(attn, CLIPSelfAttention):
            blk.attn = CLIPSelfAttention(mha)
        mha.out_proj = LoRALinear(mha.out_proj, rank, alpha).to(device)
        return mha.out_proj
    parent, attr = blk.mlp, "c_fc" if target == "fc1" else "c_proj"
    layer = getattr(parent, attr)
    if isinstance(layer, LoRALinear):
        return None
    setattr(parent, attr, LoRALinear(layer, rank, alpha).to(layer.weight.device))
    return getattr(parent, attr)


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
