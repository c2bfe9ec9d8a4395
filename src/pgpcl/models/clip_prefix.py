"""Prefix-tuning on a frozen open_clip image tower: a key/value prefix joined to chosen blocks' attention.

``add_clip_prefixes`` replaces a block's ``nn.MultiheadAttention`` by a :class:`PrefixAttention` that
holds it (frozen) and a trainable prefix; open_clip's block calls the wrapper as the module it replaced.
open_clip's files are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.models.attention import (
    attention_weights,
    check_clip_attention,
    check_self_attention_call,
    preferred_product,
)
from pgpcl.models.frozen import chosen_blocks


class PrefixAttention(nn.Module):
    """Batch-first self-attention whose queries are the T tokens and keys / values [prefix; tokens].

    ``prefix`` (2, L, D): key-prefix and value-prefix, in the space the attention product sees (after
    the input projection). While ``capture`` is set, each call keeps (detached) in ``captured`` the
    queries (B, T, D) and the tokens' softmax weights on the L prefix positions (B, H, T, L): the rows
    PGP needs for the key- and the value-prefix.
    """

    def __init__(self, attn: nn.MultiheadAttention, length: int):
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        check_clip_attention(attn, "a prefix")
        self.attn = attn.requires_grad_(False)
        self.prefix = nn.Parameter(torch.zeros(2, length, attn.embed_dim))
        self.capture = False
        self.captured: tuple[Tensor, Tensor] | None = None

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None) -> tuple[Tensor, None]:
        check_self_attention_call(query, key, value, need_weights, "PrefixAttention")
        a, x = self.attn, query
        B, T, D = x.shape
        H, L = a.num_heads, self.prefix.shape[1]
        q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        kp, vp = (p.to(x.dtype).reshape(1, L, H, D // H).transpose(1, 2).expand(B, -1, -1, -1) for p in self.prefix)
        k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        if attn_mask is not None:  # every token sees the prefix
            attn_mask = F.pad(attn_mask, (L, 0))
        scale = (D // H) ** -0.5
        if self.capture:
            w = attention_weights(q, k, scale, attn_mask)
            out = w @ v
            self.captured = (q.transpose(1, 2).reshape(B, T, D).detach(), w[..., :L].detach())
        else:
            out = preferred_product(q, k, v, scale, attn_mask)
        return a.out_proj(out.transpose(1, 2).reshape(B, T, D)), None

    def extra_repr(self) -> str:
        return f"length={self.prefix.shape[1]}"


def add_clip_prefixes(blocks: Sequence[nn.Module], indices: Iterable[int], length: int) -> dict[str, PrefixAttention]:
    """A prefix on the attention of each open_clip block of ``blocks`` in ``indices``; {"l{i}": module}."""
    added: dict[str, PrefixAttention] = {}
    for i, blk in chosen_blocks(blocks, indices):
        if not isinstance(blk.attn, nn.MultiheadAttention):
            raise ValueError(f"block {i} attention is {type(blk.attn).__name__}, not open_clip's nn.MultiheadAttention")
        blk.attn = PrefixAttention(blk.attn, length).to(blk.attn.in_proj_weight.device)
        added[f"l{i}"] = blk.attn
    return added
