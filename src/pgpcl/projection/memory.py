"""Subspace memory: one orthonormal basis U (D, k) per protected group, grown task after task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pgpcl.errors import CheckpointError, PgpclError
from pgpcl.projection import dist
from pgpcl.projection.collect import GramCollector, RepresentationCollector, SampleCollector
from pgpcl.projection.linalg import grow_basis
from pgpcl.projection.reference import check_sample_count, reference_update

Mode = Literal["feature", "reference"]
_FORMAT = 1


@dataclass
class UpdateInfo:
    """What one memory update did to one group."""

    name: str
    rank_before: int
    rank_after: int
    dim: int
    energy_before: float
    """Fraction of this task's energy already inside the old basis."""
    energy_captured: float
    """Fraction of this task's energy inside the new basis: >= eps * (1 - 1e-9) unless the basis is full
    or the rest is numerically null (under 1e-12 of the total per direction)."""
    num_rows: int
    """Token rows (feature mode) or samples (reference mode) the update was computed from."""


class SubspaceMemory:
    """Orthonormal bases per group name, float64 on CPU.

    ``feature`` mode: bases live in R^D, energy = sigma^2 of the (sum-space) representation rows.
    ``reference`` mode: the released arithmetic (see :mod:`pgpcl.projection.reference`); bases are
    indexed by samples, N == D.
    Every change bumps a per-group version so projectors know when to refresh their caches.
    """

    def __init__(self, mode: Mode = "feature") -> None:
        if mode not in ("feature", "reference"):
            raise ValueError(f"mode must be 'feature' or 'reference', got {mode!r}")
        self.mode: Mode = mode
        self._bases: dict[str, Tensor] = {}
        self._updates: dict[str, int] = {}
        self._versions: dict[str, int] = {}

    # ------------------------------------------------------------------ queries

    def basis(self, name: str) -> Tensor | None:
        """U (D, k) float64 on CPU, or None before the group's first update."""
        return self._bases.get(name)

    def rank(self, name: str) -> int:
        basis = self._bases.get(name)
        return 0 if basis is None else int(basis.shape[1])

    def version(self, name: str) -> int:
        return self._versions.get(name, 0)

    def names(self) -> list[str]:
        return list(self._bases)

    # ------------------------------------------------------------------ update

    def update(self, name: str, collector: RepresentationCollector, eps: float) -> UpdateInfo:
        """Grow the basis of group ``name`` from this task's representations (GPM), identically on all
        ranks, until it captures the fraction ``eps`` of their energy.

        Combines the collector across ranks first (idempotent), computes the new basis on every rank
        and then takes rank 0's, so all ranks hold bit-identical bases.
        """
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        if collector.mode != self.mode:
            raise ValueError(f"a {collector.mode}-mode collector cannot update a {self.mode}-mode memory")
        collector.synchronize()
        old = self._bases.get(name)
        if isinstance(collector, GramCollector):
            new, before, after = self._update_feature(old, collector, eps, name)
        elif isinstance(collector, SampleCollector):
            new, before, after = self._update_reference(old, collector, eps, name)
        else:
            raise TypeError(f"unknown collector type {type(collector).__name__}")
        new = dist.broadcast_matrix(new.contiguous())
        self._set(name, new)
        self._updates[name] = self._updates.get(name, 0) + 1
        rank_before = 0 if old is None else int(old.shape[1])
        return UpdateInfo(
            name, rank_before, int(new.shape[1]), int(new.shape[0]), before, after, collector.num_rows
        )

    @staticmethod
    def _update_feature(
        old: Tensor | None, col: GramCollector, eps: float, name: str
    ) -> tuple[Tensor, float, float]:
        basis = torch.zeros(col.dim, 0, dtype=torch.float64) if old is None else old
        return grow_basis(basis, _finite(col.gram(), name), eps)

    @staticmethod
    def _update_reference(
        old: Tensor | None, col: SampleCollector, eps: float, name: str
    ) -> tuple[Tensor, float, float]:
        samples = col.samples()
        check_sample_count(int(samples.shape[0]), col.dim)
        return reference_update(_finite(col.matrix(), name), old, eps)

    def _set(self, name: str, basis: Tensor) -> None:
        self._bases[name] = basis.to("cpu", torch.float64)
        self._versions[name] = self._versions.get(name, 0) + 1

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python scalars only: loadable with torch.load(weights_only=True)."""
        return {
            "format": _FORMAT,
            "mode": self.mode,
            "bases": {k: v.clone() for k, v in self._bases.items()},
            "updates": dict(self._updates),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("bases"), dict):
            raise CheckpointError("PGP memory state is not a mapping with 'bases'; it is damaged or not a PGP state")
        if state.get("format") != _FORMAT:
            raise CheckpointError(
                f"PGP memory format {state.get('format')!r} is not supported (expected {_FORMAT})"
            )
        if state.get("mode") != self.mode:
            raise CheckpointError(
                f"PGP memory in the checkpoint was built with pgp.mode={state.get('mode')}, "
                f"this run uses pgp.mode={self.mode}; the bases are not interchangeable"
            )
        for name, basis in state["bases"].items():
            _check_loaded_basis(name, basis)
        self._bases.clear()
        for name, basis in state["bases"].items():
            self._set(name, basis)
        self._updates = {k: int(v) for k, v in state.get("updates", {}).items()}


def _finite(matrix: Tensor, name: str) -> Tensor:
    """``matrix``, or a one-line error: NaN rows would give a NaN basis or none, and the group no protection."""
    if not bool(torch.isfinite(matrix).all()):
        raise PgpclError(
            f"the representations of protected group '{name}' hold NaN or infinite values (the model's "
            "features diverged, or the data holds NaN); lower train.lr or check the data"
        )
    return matrix


def _check_loaded_basis(name: str, basis: Any) -> None:
    """A basis from a checkpoint: (D, k <= D), finite and orthonormal, as the memory only ever holds."""
    if not isinstance(basis, Tensor) or basis.dim() != 2 or basis.shape[1] > basis.shape[0]:
        shape = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
        raise CheckpointError(f"PGP basis '{name}' has shape {shape}, expected (D, k<=D)")
    u = basis.to(torch.float64)
    if not bool(torch.isfinite(u).all()) or not torch.allclose(
        u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-6
    ):
        raise CheckpointError(f"PGP basis '{name}' is not orthonormal (or not finite); the checkpoint is damaged")
