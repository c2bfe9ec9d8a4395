"""Prompt pools with key-query selection (L2P, DualPrompt) and prefix helpers for prefix-tuning.

A :class:`PromptPool` holds M prompts of any shape and one key per prompt. L2P uses prompts of shape
(L, D) inserted as tokens; DualPrompt uses e-prompts of shape (n_layers, 2, L, D) whose axis ``2``
holds the key-prefix (index 0) and the value-prefix (index 1) of each prefixed layer.

The released DualPrompt code turned its (layers, 2, B, ...) prompt tensor into (layers, B, 2, ...)
with a reshape and no permute, so half of a batch received key-prefixes in both slots and the other
half value-prefixes in both. Here the batch axis always comes first and :func:`prefix_split`
*indexes* the ``2`` axis, so keys and values never mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.errors import ConfigError

Init = Literal["uniform", "zero", "normal"]


class Selection(NamedTuple):
    """``idx`` (B, k) long: chosen prompt ids; ``sim`` (B, M): cosine of the query to every key;
    ``key_sim`` (B, k): cosine of the query to each chosen key (for the pull constraint)."""

    idx: Tensor
    sim: Tensor
    key_sim: Tensor


def init_prompt_(t: Tensor, kind: str) -> None:
    """Initialise a prompt tensor in place: 'uniform' in [-1, 1] (as released: L2P / DualPrompt
    prompt_init=uniform), 'normal' (std 0.02) or 'zero'; ConfigError for another name (a method whose
    Params types the choice as a plain str gets no check from the config)."""
    if kind == "uniform":
        nn.init.uniform_(t, -1.0, 1.0)
    elif kind == "normal":
        nn.init.normal_(t, std=0.02)
    elif kind == "zero":
        nn.init.zeros_(t)
    else:
        raise ConfigError(f"unknown prompt init '{kind}'; choose from uniform, normal, zero")


class PromptPool(nn.Module):
    """M prompts of ``prompt_shape`` with M keys of width ``key_dim``.

    Parameters: ``prompts`` (M, *prompt_shape), ``keys`` (M, key_dim).
    """

    def __init__(
        self,
        pool_size: int,
        prompt_shape: Sequence[int],
        key_dim: int,
        init: Init = "uniform",
        key_init: Init | None = None,
    ):
        super().__init__()
        if pool_size < 1 or key_dim < 1 or any(int(s) < 1 for s in prompt_shape):
            raise ValueError(
                f"bad pool: pool_size={pool_size}, prompt_shape={tuple(prompt_shape)}, key_dim={key_dim}"
            )
        self.pool_size = int(pool_size)
        self.prompt_shape = tuple(int(s) for s in prompt_shape)
        self.prompts = nn.Parameter(torch.empty(self.pool_size, *self.prompt_shape))
        self.keys = nn.Parameter(torch.empty(self.pool_size, int(key_dim)))
        init_prompt_(self.prompts.data, init)
        init_prompt_(self.keys.data, key_init or init)

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarity (B, M) between queries (B, D) and all keys."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).t()

    def select(
        self,
        query: Tensor,
        top_k: int,
        batchwise: bool = False,
        force_idx: Tensor | None = None,
    ) -> Selection:
        """Pick prompts for each sample of query (B, D).

        Default: each sample's ``top_k`` most similar keys. ``batchwise``: the ``top_k`` ids chosen most
        often over the batch, used for every sample. ``force_idx`` (B,) or (B, k) overrides the choice
        (DualPrompt training uses the true task); ``key_sim`` is computed for whatever was chosen.
        """
        sim = self.similarity(query)
        if force_idx is not None:
            idx = self.forced_ids(force_idx, sim.shape[0])
        else:
            if not 1 <= top_k <= self.pool_size:
                raise ValueError(f"top_k must be in 1..{self.pool_size}, got {top_k}")
            idx = sim.topk(top_k, dim=1).indices
            if batchwise:
                idx = batch_vote(idx, sim, top_k).expand(sim.shape[0], -1)
        return Selection(idx, sim, sim.gather(1, idx))

    def forced_ids(self, force_idx: Tensor, B: int) -> Tensor:
        """Checked ids (B, k) from force_idx (B,) or (B, k)."""
        idx = force_idx.to(device=self.keys.device, dtype=torch.long)
        idx = idx.reshape(B, -1) if idx.dim() == 1 else idx
        if idx.dim() != 2 or idx.shape[0] != B:
            raise ValueError(f"force_idx must be (B={B},) or (B, k), got {tuple(force_idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.pool_size):
            raise ValueError(f"force_idx ids must be in 0..{self.pool_size - 1}")
        return idx

    def gather(self, idx: Tensor) -> Tensor:
        """Prompts of ids (B, k) -> (B, k, *prompt_shape); differentiable w.r.t. ``prompts``."""
        return self.prompts[idx]

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, prompt_shape={self.prompt_shape}, key_dim={self.keys.shape[1]}"


def batch_vote(idx: Tensor, sim: Tensor, top_k: int) -> Tensor:
    """Batch-wise selection: the ``top_k`` ids most frequent in ``idx`` (B, k) -> (1, top_k).

    Ties go to the lower id. If fewer than ``top_k`` distinct ids occur, the rest are the unchosen ids
    of highest mean similarity ``sim`` (B, M).
    """
    M = sim.shape[1]
    counts = torch.bincount(idx.flatten(), minlength=M)
    order = torch.argsort(-counts, stable=True)  # stable: equal counts keep ascending id order
    chosen = order[counts[order] > 0][:top_k]
    if chosen.numel() < top_k:
        mean = sim.mean(dim=0).clone()
        mean[chosen] = float("-inf")
        chosen = torch.cat([chosen, mean.topk(top_k - chosen.numel()).indices])
    return chosen.unsqueeze(0)


def prefix_split(p: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix prompt (..., 2, L, D) -> (key_prefix (..., L, D), value_prefix (..., L, D)).

    Indexes the ``2`` axis (index 0 = key, 1 = value); never reshapes across other axes.
    """
    if p.dim() < 3 or p.shape[-3] != 2:
        raise ValueError(f"a prefix prompt must be (..., 2, L, D), got {tuple(p.shape)}")
    return p[..., 0, :, :], p[..., 1, :, :]


def join_layer_prefixes(prompts: Tensor, layers: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """Turn prefix prompts into PromptedViT's ``prefixes`` argument.

    prompts: (B, n_layers, 2, L, D), or (B, k, n_layers, 2, L, D) for k selected prompts, whose
    k prefixes are concatenated along L (as released for top-k > 1). ``layers``: the n_layers block
    indices. Returns {layer: (key_prefix (B, k*L, D), value_prefix (B, k*L, D))}.
    """
    if prompts.dim() == 6:  # (B, k, n, 2, L, D) -> (B, n, 2, k*L, D): permute first, then merge k and L
        B, k, n, two, L, D = prompts.shape
        prompts = prompts.permute(0, 2, 3, 1, 4, 5).reshape(B, n, two, k * L, D)
    if prompts.dim() != 5 or prompts.shape[2] != 2:
        raise ValueError(
            f"prompts must be (B, n_layers, 2, L, D) or (B, k, n_layers, 2, L, D), got {tuple(prompts.shape)}"
        )
    if len(layers) != prompts.shape[1]:
        raise ValueError(f"{len(layers)} layers given for {prompts.shape[1]} prompt layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}")
    keys, values = prefix_split(prompts)  # (B, n, L, D) each
    return {int(layer): (keys[:, i], values[:, i]) for i, layer in enumerate(layers)}
