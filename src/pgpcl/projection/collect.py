"""Representation collectors: what a memory update is computed from.

One collector per protected group and task. The method feeds it, under no_grad, token rows
(B, n, D) per batch (patch tokens, W_q LN(x) at a layer, or a query feature as (B, 1, D)) and
optionally once an "extra" matrix (m, D) (e.g. the prompt pool, for the sum space).

- :class:`GramCollector` (``feature`` mode) keeps streaming float64 Gram matrices D x D, so memory
  does not grow with the number of samples.
- :class:`SampleCollector` (``reference`` mode) keeps the per-sample flattened features that the
  released arithmetic needs (PCA over samples), N x (n*D) float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from pgpcl.projection import dist
from pgpcl.projection.reference import sum_space

Weighting = Literal["trace", "sum"]


def _as_rows3(rows: Tensor, dim: int) -> Tensor:
    """(B, n, D) or (B, D) -> (B, n, D), detached; checks D."""
    if rows.dim() == 2:
        rows = rows.unsqueeze(1)
    if rows.dim() != 3 or rows.shape[-1] != dim:
        raise ValueError(f"representation rows must be (B, n, {dim}) or (B, {dim}), got {tuple(rows.shape)}")
    return rows.detach()


def _check_extra(rows: Tensor, dim: int) -> Tensor:
    rows = rows.detach().reshape(-1, rows.shape[-1])
    if rows.shape[-1] != dim:
        raise ValueError(f"extra rows must be (m, {dim}), got {tuple(rows.shape)}")
    return rows


class RepresentationCollector:
    """Common interface; see the module docstring."""

    mode: str = ""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._synced = False

    def add(self, rows: Tensor) -> None:
        """Accumulate one batch of token rows (B, n, D) or (B, D)."""
        raise NotImplementedError

    def add_extra(self, rows: Tensor) -> None:
        """Set the extra matrix (m, D) (any leading shape, flattened to rows); replaces a previous one.

        Assumed identical on every rank (it is a parameter), so it is never reduced across ranks.
        """
        raise NotImplementedError

    @property
    def num_rows(self) -> int:
        """Token rows (feature mode) or samples (reference mode) collected so far on all ranks."""
        raise NotImplementedError

    def _check_open(self) -> None:
        # Rows added after a cross-rank reduction would be counted again by the next one.
        if self._synced:
            raise RuntimeError("collector already synchronised across ranks; use a fresh one per task")

    def synchronize(self) -> None:
        """Combine the statistics of all ranks (idempotent; no-op without torch.distributed)."""
        if not self._synced:
            self._synchronize()
            self._synced = True

    def _synchronize(self) -> None:
        raise NotImplementedError


class GramCollector(RepresentationCollector):
    """Streaming Gram statistics for ``feature`` mode.

    Sum space weighting (``weighting``):
    - ``trace`` (default): each source's Gram is divided by its trace, then the extra one is scaled
      by ``extra_weight``. The paper's two constraints (X_old dP^T = 0 and P_old dP^T = 0) have equal
      standing, but there are thousands of token rows against a few dozen prompt rows; unit trace
      makes each source contribute in proportion to its own spectrum, not its row count.
    - ``sum``: plain sum of the raw Gram matrices (every row counts once; prompts nearly vanish).
    """

    mode = "feature"

    def __init__(self, dim: int, weighting: Weighting = "trace", extra_weight: float = 1.0) -> None:
        super().__init__(dim)
        if weighting not in ("trace", "sum"):
            raise ValueError(f"weighting must be 'trace' or 'sum', got {weighting!r}")
        if extra_weight < 0:
            raise ValueError(f"extra_weight must be >= 0, got {extra_weight}")
        self.weighting = weighting
        self.extra_weight = extra_weight
        self.token_gram: Tensor | None = None  # (D, D) float64, sum of x x^T over token rows
        self.extra_gram: Tensor | None = None  # (D, D) float64
        self._rows = 0

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        self._check_open()
        x = _as_rows3(rows, self.dim).reshape(-1, self.dim).to(torch.float64)
        gram = x.T @ x
        self.token_gram = gram if self.token_gram is None else self.token_gram + gram
        self._rows += x.shape[0]

    @torch.no_grad()
    def add_extra(self, rows: Tensor) -> None:
        x = _check_extra(rows, self.dim).to(torch.float64)
        self.extra_gram = x.T @ x

    @property
    def num_rows(self) -> int:
        return self._rows

    def _synchronize(self) -> None:
        if not dist.is_distributed():
            return
        gram = self.token_gram
        if gram is None:
            gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        count = torch.tensor([float(self._rows)], dtype=torch.float64, device=gram.device)
        self.token_gram = dist.all_reduce_sum(gram)
        self._rows = int(dist.all_reduce_sum(count).item())

    def gram(self) -> Tensor:
        """The combined Gram matrix (D, D) float64 on CPU whose eigenvectors span the sum space."""
        sources = [g.detach().cpu() for g in (self.token_gram, self.extra_gram) if g is not None]
        if not sources:
            return torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.weighting == "sum":
            return sum(sources[1:], sources[0])
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.token_gram is not None:
            total += _unit_trace(self.token_gram.cpu())
        if self.extra_gram is not None:
            total += self.extra_weight * _unit_trace(self.extra_gram.cpu())
        return total


def _unit_trace(gram: Tensor) -> Tensor:
    tr = float(torch.trace(gram))
    return gram / tr if tr > 0 else gram


class SampleCollector(RepresentationCollector):
    """Per-sample flattened features for ``reference`` mode (the released arithmetic).

    Memory: N x n*D float32 per group (768 x 196 x 768 x 4 B = 462 MB for L2P's patch tokens), kept on
    the device the rows arrive on.
    """

    mode = "reference"

    def __init__(self, dim: int, components: int) -> None:
        super().__init__(dim)
        self.components = components
        self._chunks: list[Tensor] = []
        self._samples: Tensor | None = None  # (N, n*D) after synchronize
        self.extra: Tensor | None = None  # (m, D)

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        self._check_open()
        x = _as_rows3(rows, self.dim)
        if self._chunks and x.shape[1] * self.dim != self._chunks[0].shape[1]:
            raise ValueError(f"token count changed between batches: {x.shape[1]} vs earlier batches")
        self._chunks.append(x.reshape(x.shape[0], -1).to(torch.float32))
        self._samples = None

    @torch.no_grad()
    def add_extra(self, rows: Tensor) -> None:
        self.extra = _check_extra(rows, self.dim).to(torch.float32)

    def _local(self) -> Tensor:
        if not self._chunks:
            return torch.zeros(0, 0)
        return torch.cat(self._chunks)

    @property
    def num_rows(self) -> int:
        return int(self.samples().shape[0]) if self._synced else sum(c.shape[0] for c in self._chunks)

    def _synchronize(self) -> None:
        self._samples = dist.all_gather_rows(self._local())

    def samples(self) -> Tensor:
        """All samples (N, n*D), rank 0's first under torch.distributed (synchronize() first)."""
        if self._samples is None:
            self._samples = self._local()
        return self._samples

    def matrix(self) -> Tensor:
        """The released representation matrix R (N, components) float64: PCA of the samples over
        samples, plus the PCA of the transposed extra matrix when one was given (sum space)."""
        return sum_space(self.samples(), self.extra, self.components)
