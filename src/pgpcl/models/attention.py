"""Which attention kernel to use where: shared by the ViT and CLIP wrappers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def plain_product_preferred(t: Tensor) -> bool:
    """Whether attention on ``t``'s device and precision should be the plain softmax(QK^T)V product
    rather than F.scaled_dot_product_attention: in bf16 / fp16 on the CPU (a low-precision tensor, or
    CPU autocast to one). There torch's fused CPU kernel measured 2.3x slower than the plain product for
    forward + backward and 1.4x for forward alone, while the plain product's matmuls run in bf16
    (BENCHMARKS.md, section 6). Elsewhere the fused kernel is the better choice.
    """
    if t.device.type != "cpu":
        return False
    return t.dtype in LOW_PRECISION or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in LOW_PRECISION
    )


def plain_product(
    q: Tensor, k: Tensor, v: Tensor, scale: float, attn_mask: Tensor | None = None,
    drop: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """softmax(q k^T * scale + attn_mask) v, the attention matrix materialised: (B, H, T, hd) queries,
    (B, H, S, hd) keys and values, additive float mask broadcastable to (B, H, T, S) -> (B, H, T, hd).
    ``drop``: dropout applied to the attention weights."""
    w = attention_weights(q, k, scale, attn_mask)
    return (w if drop is None else drop(w)) @ v


def attention_weights(q: Tensor, k: Tensor, scale: float, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + attn_mask): (B, H, T, hd) queries, (B, H, S, hd) keys -> (B, H, T, S)."""
    w = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        w = w + attn_mask.to(w.dtype)
    return w.softmax(dim=-1)


def preferred_product(q: Tensor, k: Tensor, v: Tensor, scale: float, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + attn_mask) v by the kernel that is faster for ``q``: the plain product in
    bf16 / fp16 on the CPU (:func:`plain_product_preferred`), F.scaled_dot_product_attention elsewhere."""
    if plain_product_preferred(q):
        return plain_product(q, k, v, scale, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def check_clip_attention(attn, what: str) -> None:
    """ValueError unless ``attn`` is open_clip's plain batch-first self-attention ``nn.MultiheadAttention``
    (what the CLIP wrappers, LoRA and prefix, re-implement)."""
    if not (attn.batch_first and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn):
        raise ValueError(f"{what} on CLIP attention needs open_clip's plain batch-first self-attention")


def check_self_attention_call(query: Tensor, key, value, need_weights: bool, name: str) -> None:
    """The wrappers are called as open_clip's block calls attention: attn(x, x, x, need_weights=False)."""
    if (key is not None and key is not query) or (value is not None and value is not query) or need_weights:
        raise ValueError(f"{name} computes self-attention only, without attention weights")
