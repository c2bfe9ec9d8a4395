"""Projector: keeps protected parameters out of span(U), on gradients or on the applied update.

One training step, whatever the optimizer::

    loss.backward(); clip_grad_norm_(...)
    projector.before_step()   # target=gradient: g <- g - g U U^T; snapshots for the step leak
    optimizer.step()
    projector.after_step()    # target=update: delta <- delta - delta U U^T; records the step leak

At task boundaries: ``begin_task()`` before training, ``end_task()`` after training and *before*
the memory update (the leak is measured against the basis that was in force during the task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pgpcl.projection.groups import ProtectedGroup, check_unique, shares_storage, snapshot
from pgpcl.projection.memory import SubspaceMemory

Target = Literal["gradient", "update"]


@dataclass
class _Operator:
    """Cached projection data for one group on the parameter's device."""

    version: tuple[int, int]  # (memory version, rank in force)
    basis: Tensor  # (D, k) compute dtype
    outer: Tensor | None  # U U^T (D, D) when one matmul with it is cheaper than two thin ones

    @property
    def full(self) -> bool:
        """span(U) is all of R^D: everything is protected. The projection then sets values exactly
        (zero gradient, undone update) instead of subtracting x U U^T, whose rounding residue (~1e-7 of
        x) Adam would rescale into full-size steps: measured leak 1.0 on a LoRA factor of rank 4."""
        return self.basis.shape[1] == self.basis.shape[0]

    def component(self, x: Tensor) -> Tensor:
        """The part of x (..., D) in span(U): x U U^T, same shape, compute dtype (x itself when full, so
        that subtracting it leaves exactly 0)."""
        if x.dtype != self.basis.dtype:  # a no-op .to() still costs a dispatch, per group and step
            x = x.to(self.basis.dtype)
        if self.full:
            return x
        if self.outer is not None:
            return x @ self.outer
        return (x @ self.basis) @ self.basis.T

    def undo_inside(self, current: Tensor, before: Tensor, comp: Tensor | None = None) -> None:
        """In place: take out of ``current`` the part of its change since ``before`` inside span(U)
        (``comp``: that part, when the caller has it). Full: back to ``before`` exactly, which
        ``current - (current - before)`` is not in floating point."""
        if self.full:
            current.copy_(before)
            return
        comp = self.component(current - before) if comp is None else comp
        current.sub_(comp if comp.dtype == current.dtype else comp.to(current.dtype))


@dataclass
class _BlockOperator:
    """The projection of one set of column-block groups (:class:`Block`) as one block-diagonal matrix."""

    versions: tuple[tuple[int, int], ...]
    outer: Tensor | None  # (D_all, D_all) compute dtype: U_h U_h^T on each partial block, 0 elsewhere; None if none
    full: Tensor | None  # columns of the blocks whose basis spans their whole space (set exactly), or None

    def component(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """x U U^T over the partial blocks, in ``dtype``."""
        x = x if x.dtype == self.outer.dtype else x.to(self.outer.dtype)
        y = x @ self.outer
        return y if y.dtype == dtype else y.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision projections would leave a visible component in span(U); do them in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _units(groups: Sequence[ProtectedGroup]) -> list[ProtectedGroup | list[ProtectedGroup]]:
    """The groups in order, each set of :class:`Block` siblings gathered into one list (applied together)."""
    units: list = []
    blocks: dict[str, list[ProtectedGroup]] = {}
    for g in groups:
        if g.block is None:
            units.append(g)
            continue
        members = blocks.get(g.block.key)
        if members is None:
            members = blocks[g.block.key] = []
            units.append(members)
        elif members[0].param is not g.param:
            raise ValueError(f"groups '{members[0].name}' and '{g.name}' share block key '{g.block.key}' "
                             "but not their parameter")
        members.append(g)
    return units


def check_disjoint(groups: Sequence[ProtectedGroup]) -> None:
    """ValueError when an element of a parameter lies in two groups' views (checked once, on an owner map).

    Projecting one group out of the complement of its span can move the shared elements back into the
    other's span, so neither would be protected: overlapping parts need one group (one basis) instead.
    """
    owners: dict[int, Tensor] = {}
    for i, g in enumerate(groups):
        owner = owners.setdefault(id(g.param), torch.full(g.param.shape, -1, dtype=torch.int64))
        part = g.select(owner)
        taken = part[part >= 0]
        if taken.numel():
            other = groups[int(taken[0])].name
            raise ValueError(
                f"protected groups '{other}' and '{g.name}' overlap on the same parameter; the projection "
                "cannot protect both: give the shared part to one group"
            )
        part.fill_(i)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0 (no change means no leak)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


class Projector:
    """Applies the memory's bases to the protected groups; knows nothing of the method."""

    def __init__(
        self,
        groups: Sequence[ProtectedGroup],
        memory: SubspaceMemory,
        target: Target = "gradient",
        measure_step_leak: bool = True,
    ) -> None:
        if target not in ("gradient", "update"):
            raise ValueError(f"target must be 'gradient' or 'update', got {target!r}")
        check_unique(list(groups))
        check_disjoint(list(groups))
        self.groups = list(groups)
        self.memory = memory
        self.target: Target = target
        self.measure_step_leak = measure_step_leak
        self._ops: dict[str, _Operator] = {}
        self._block_ops: dict[str, _BlockOperator] = {}
        self._units = _units(self.groups)
        self._step_before: dict[str, Tensor] = {}
        self._param_before: dict[int, Tensor] = {}
        # target=update without the step leak snapshots each protected parameter once, not each group
        # (several groups per parameter: per-head key bases, ...; they never overlap).
        self._per_param = target == "update" and not measure_step_leak
        self._step_leak: dict[str, tuple[Tensor, Tensor]] = {}
        self._task_start: dict[str, Tensor] | None = None  # None: outside a task
        # Per group, how many of the basis's leading columns are in force (None: all). A basis built at a
        # task's start from that task's data (L2P) protects the tasks after it, not the task itself; the
        # memory only appends columns, so the earlier tasks' basis is the leading block.
        self._in_force: dict[str, int] | None = None

    def rank_in_force(self, name: str) -> int:
        """Columns of group ``name``'s basis that the projection uses now."""
        rank = self.memory.rank(name)
        limit = None if self._in_force is None else self._in_force.get(name)
        return rank if limit is None else min(rank, limit)

    def _basis_in_force(self, name: str) -> Tensor | None:
        rank = self.rank_in_force(name)
        return None if rank == 0 else self.memory.basis(name)[:, :rank]

    # ------------------------------------------------------------------ operators

    def _operator(self, group: ProtectedGroup) -> _Operator | None:
        """The group's cached operator, refreshed when the memory changed; None if U is empty."""
        rank = self.rank_in_force(group.name)
        if rank == 0:
            return None
        version = (self.memory.version(group.name), rank)
        op = self._ops.get(group.name)
        if op is not None and op.version == version:
            return op  # the per-step path: no basis slicing
        basis = self.memory.basis(group.name)[:, :rank]
        if basis.shape[0] != group.dim:
            raise ValueError(
                f"group '{group.name}': basis is {basis.shape[0]}-D, the parameter view is {group.dim}-D"
            )
        dtype = _compute_dtype(group.param.dtype)
        basis = basis.to(group.param.device, dtype)
        d, k = basis.shape
        # Two thin matmuls cost 2 D k per row, one with U U^T costs D^2 per row.
        outer = basis @ basis.T if d > k and 2 * k >= d else None
        op = _Operator(version, basis, outer)
        self._ops[group.name] = op
        return op

    def _block_operator(self, members: list[ProtectedGroup]) -> _BlockOperator | None:
        """The cached operator of one set of block groups, refreshed when any basis changed; None while
        all are empty."""
        versions = tuple((self.memory.version(g.name), self.rank_in_force(g.name)) for g in members)
        if all(rank == 0 for _, rank in versions):
            return None
        key = members[0].block.key
        op = self._block_ops.get(key)
        if op is not None and op.versions == versions:
            return op
        first = members[0]
        width = first.block.view(first.param.detach()).shape[-1]
        dtype, device = _compute_dtype(first.param.dtype), first.param.device
        outer, full = None, []
        for g in members:
            basis = self._basis_in_force(g.name)
            if basis is None:
                continue
            if basis.shape[0] != g.dim:
                raise ValueError(f"group '{g.name}': basis is {basis.shape[0]}-D, the parameter view is {g.dim}-D")
            if basis.shape[1] == basis.shape[0]:
                full.extend(range(width)[g.block.cols])
                continue
            outer = torch.zeros(width, width, dtype=dtype, device=device) if outer is None else outer
            u = basis.to(device, dtype)
            outer[g.block.cols, g.block.cols] = u @ u.T
        op = _BlockOperator(versions, outer, torch.tensor(full, device=device) if full else None)
        self._block_ops[key] = op
        return op

    def active(self) -> bool:
        """True when at least one group has a non-empty basis (from the second task on)."""
        return any(self.rank_in_force(g.name) > 0 for g in self.groups)

    # ------------------------------------------------------------------ per step

    @torch.no_grad()
    def project_gradients(self) -> None:
        """In place, for every group with a basis and a gradient: g_view <- g_view - g_view U U^T."""
        for unit in self._units:
            if isinstance(unit, list):
                self._project_block_gradients(unit)
                continue
            op = self._operator(unit)
            grad = unit.selected_grad() if op is not None else None
            if grad is not None:
                grad.sub_(op.component(grad).to(grad.dtype))

    def _project_block_gradients(self, members: list[ProtectedGroup]) -> None:
        op = self._block_operator(members)
        grad = members[0].param.grad
        if op is None or grad is None:
            return
        wide = members[0].block.view(grad)
        if not shares_storage(wide, grad):
            raise RuntimeError(f"group '{members[0].name}': block view copied the gradient (strides {grad.stride()})")
        if op.outer is not None:
            wide.sub_(op.component(wide, wide.dtype))
        if op.full is not None:
            wide.index_fill_(-1, op.full, 0)

    @torch.no_grad()
    def before_step(self) -> None:
        """Call after backward (and clipping), before optimizer.step()."""
        if self.target == "gradient":
            self.project_gradients()
        self._step_before.clear()
        if self._per_param:
            params = {id(g.param): g.param for g in self.groups if self.rank_in_force(g.name) > 0}
            self._param_before = {key: p.detach().clone() for key, p in params.items()}
        elif self.target == "update" or self.measure_step_leak:
            for group in self.groups:
                if self._operator(group) is not None:
                    self._step_before[group.name] = snapshot(group)

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after optimizer.step(). target=update: removes the step's change inside span(U).

        The optimizer's state (e.g. Adam's moments) is left as is: it keeps its memory of the raw
        gradients, and the correction is applied again after every step.
        """
        self._step_leak.clear()
        if self._per_param:
            self._undo_inside_per_param()
            return
        if not self._step_before:  # target=gradient without leak measurement: nothing to do after a step
            return
        for group in self.groups:
            before = self._step_before.get(group.name)
            op = self._operator(group)
            if before is None or op is None:
                continue
            current = group.selected_data()
            delta = current - before
            comp = op.component(delta)
            raw = _ratio(comp.norm(), delta.norm().to(comp.dtype))
            if self.target == "update":
                op.undo_inside(current, before, comp)
                delta = current - before
                comp = op.component(delta)
            self._step_leak[group.name] = (raw, _ratio(comp.norm(), delta.norm().to(comp.dtype)))
        self._step_before.clear()

    def _undo_inside_per_param(self) -> None:
        """target=update from per-parameter snapshots: one change per parameter, each group's part of it
        projected (the groups are disjoint, so the order does not matter)."""
        deltas = {key: None for key in self._param_before}
        for group in self._units:
            if isinstance(group, list):
                self._undo_block_inside(group)
                continue
            before = self._param_before.get(id(group.param))
            op = self._operator(group)
            if before is None or op is None:
                continue
            comp = None
            if not op.full:
                delta = deltas[id(group.param)]
                if delta is None:
                    delta = deltas[id(group.param)] = group.param.detach() - before
                comp = op.component(group.select(delta))
            op.undo_inside(group.selected_data(), group.select(before), comp)
        self._param_before = {}

    def _undo_block_inside(self, members: list[ProtectedGroup]) -> None:
        first = members[0]
        before = self._param_before.get(id(first.param))
        op = self._block_operator(members)
        if before is None or op is None:
            return
        view = first.block.view
        current, start = view(first.param.detach()), view(before)
        if op.outer is not None:
            current.sub_(op.component(current - start, current.dtype))
        if op.full is not None:
            current.index_copy_(-1, op.full, start.index_select(-1, op.full))

    def step_leak(self) -> dict[str, dict[str, float]]:
        """Leak of the last step per protected group with a basis (synchronises with the device).

        ``optimizer``: ||delta U U^T|| / ||delta|| of the change the optimizer made; ``applied``: the
        same for the change that stayed (equal for target=gradient, ~0 for target=update).
        """
        return {
            name: {"optimizer": float(raw), "applied": float(applied)}
            for name, (raw, applied) in self._step_leak.items()
        }

    # ------------------------------------------------------------------ per task

    @torch.no_grad()
    def begin_task(self, in_force: Mapping[str, int] | None = None) -> None:
        """Remember every group's protected part, to measure the task's total change.

        ``in_force``: per group, the basis rank to project with during this task (default: the whole
        basis). A method that builds the basis at a task's start passes the ranks from before that
        build, so the task is projected only out of the earlier tasks' spaces.
        """
        self._in_force = None if in_force is None else dict(in_force)
        self._task_start = {g.name: snapshot(g) for g in self.groups}

    def task_start(self) -> dict[str, Tensor]:
        """The snapshot taken by :meth:`begin_task` (group name -> protected part); empty outside a task."""
        return dict(self._task_start or {})

    def set_task_start(self, snapshots: dict[str, Tensor], in_force: Mapping[str, int] | None = None) -> None:
        """Re-enter a task mid-way (resume) with the snapshots and ranks its :meth:`begin_task` took."""
        self._in_force = None if in_force is None else dict(in_force)
        self._task_start = dict(snapshots)

    @torch.no_grad()
    def end_task(self) -> dict[str, dict[str, float]]:
        """Per group: rank and dim of the basis in force, and the leak of the task's real change.

        leak = ||dtheta U U^T|| / ||dtheta||, dtheta = (param now - param at begin_task) through the
        view; 0 when the basis is empty or nothing changed. ``change`` = ||dtheta||.
        """
        if self._task_start is None:
            raise RuntimeError("Projector.end_task() called without begin_task()")
        report = {}
        for group in self.groups:
            delta = group.selected_data() - self._task_start[group.name]
            op = self._operator(group)
            change = float(delta.norm())
            leak = 0.0
            if op is not None:
                comp = op.component(delta)
                leak = float(_ratio(comp.norm(), delta.norm().to(comp.dtype)))
            report[group.name] = {
                "rank": self.rank_in_force(group.name),
                "dim": group.dim,
                "leak": leak,
                "change": change,
            }
        self._task_start, self._in_force = None, None
        return report
