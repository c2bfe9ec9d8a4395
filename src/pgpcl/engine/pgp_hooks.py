"""Glue between the engine's task loop and the method-agnostic projection component."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pgpcl.config import PGPConfig
from pgpcl.errors import ConfigError, PgpclError
from pgpcl.projection import PGP


class _EpsTable(dict):
    """eps per kind, as a method reads it in ``protected_groups``: a kind nobody set is a config error."""

    def __missing__(self, kind: str) -> float:
        raise ConfigError(f"no eps for protected group kind '{kind}'; set pgp.eps.{kind}=<value in (0, 1]>")


HEAD_KIND, HEAD_EPS = "head", 0.97
"""``pgp.protect_head``: the eps kind of the head's groups and its default."""


def head_groups(method, eps: float) -> list:
    """The classifier head's groups: its weight (C, D), rows = the head's inputs; its bias (C,) as a
    (C, 1) view whose single input is the constant 1, so one task's basis already holds it."""
    from torch import nn

    from pgpcl.projection import ProtectedGroup

    head = getattr(method, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"pgp.protect_head=true needs a linear classifier head (method.head), and "
                          f"{type(method).__name__} has none; set pgp.protect_head=false")
    groups = [ProtectedGroup("head", HEAD_KIND, head.weight, None, eps)]
    if head.bias is not None:
        groups.append(ProtectedGroup("head.bias", HEAD_KIND, head.bias, lambda b: b.unsqueeze(-1), eps))
    return groups


def head_rows(method, x: torch.Tensor, task: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward of the method; the head's inputs (B, D), and ones (B, 1) for its bias."""
    seen: list[torch.Tensor] = []
    handle = method.head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        method(x, task)
    finally:
        handle.remove()
    rows = seen[-1].reshape(-1, seen[-1].shape[-1])
    return {"head": rows, "head.bias": torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)}


class BasisInterrupted(Exception):
    """The representation pass was stopped by a signal before the basis was built (memory unchanged)."""


class PGPHooks:
    """Builds bases from a method's declared representations and projects its protected parameters.

    Protected parameters are held by reference (``ProtectedGroup.param``), so wrapping the method in
    DistributedDataParallel (``module.`` names) cannot switch the projection off.
    """

    def __init__(self, method, cfg: PGPConfig, device: torch.device):
        self.method = method
        self.device = device
        default_eps = {**method.default_eps, **({HEAD_KIND: HEAD_EPS} if cfg.protect_head else {})}
        eps = _EpsTable({**default_eps, **cfg.eps})
        groups = method.protected_groups(eps)
        if not groups:
            raise ConfigError(f"pgp.enabled=true but the method ({type(method).__name__}) protects no parameters "
                              "(protected_groups() is empty); set pgp.enabled=false")
        head = head_groups(method, eps[HEAD_KIND]) if cfg.protect_head else []
        self.method_groups, self.head_groups = [g.name for g in groups], [g.name for g in head]
        # measure_step_leak=False: the task-level leak (end_task) is measured anyway, at no step cost.
        self.pgp = PGP([*groups, *head], cfg, default_eps, measure_step_leak=False)
        for name, rows in method.extra_representations().items():  # before any training: fail early
            self.pgp.check_extra_rows(name, rows.shape[0])
        self.basis_log: list[dict] = []
        self.active = False

    def check_representations(self, x: torch.Tensor, task: torch.Tensor) -> None:
        """Run the method's ``representations`` on one batch and check every group's rows, before any
        training: a wrong shape would otherwise surface only at the first basis pass, after a whole task."""
        was_training = self.method.training
        self.method.eval()
        with torch.inference_mode():
            reps = self.method.representations(x, task)
        self.method.train(was_training)
        where = f"{type(self.method).__name__}.representations()"
        for name, rows in reps.items():
            if name not in self.method_groups:
                raise ValueError(f"{where} gave rows for '{name}', which is none of its protected groups "
                                 f"({', '.join(self.method_groups)})")
            dim = self.pgp.group(name).dim
            if rows.dim() not in (2, 3) or rows.shape[-1] != dim or rows.shape[0] != x.shape[0]:
                raise ValueError(f"{where} gave group '{name}' rows of shape {tuple(rows.shape)} for a batch of "
                                 f"{x.shape[0]}; give (B, n, {dim}) or (B, {dim}), D being the feature axis of "
                                 "the protected parameter")

    @property
    def protect_head(self) -> bool:
        return bool(self.head_groups)

    def part_built_at(self, when: str) -> str | None:
        """Which groups the basis pass at a task's ``when`` (``task_start`` / ``task_end``) builds, for
        :meth:`build_basis`'s ``part``; None: no pass then. The head's groups are always built at the
        task's end, once the head has learned the task."""
        if self.method.basis_timing == when:
            return "all" if when == "task_end" else "method"
        return "head" if when == "task_end" and self.protect_head else None

    @torch.no_grad()
    def build_basis(
        self,
        task: int,
        loader,
        *,
        should_stop: Callable[[], bool] | None = None,
        agree: Callable[[BaseException | None, bool], bool] | None = None,
        on_batch: Callable[[], None] | None = None,
        part: str = "all",
    ) -> None:
        """Collect the task's representations (batched, no grad) and grow the groups' bases.

        ``part``: ``all`` groups, the ``method``'s own, or the classifier ``head``'s
        (``pgp.protect_head``); :meth:`part_built_at` says which, when.

        Under torch.distributed ``loader`` holds this rank's share of the samples; the collectors
        combine all ranks' statistics in ``build()`` and every rank ends with the same bases.
        ``should_stop`` is polled per batch; ``agree(error, stopped)`` is the ranks' sync point before
        the collective build (it raises on any rank's error and returns True if any rank stopped).
        """
        own, head = part in ("all", "method"), part in ("all", "head") and self.protect_head
        was_training = self.method.training
        self.method.eval()
        self.pgp.collectors([*(self.method_groups if own else []), *(self.head_groups if head else [])])
        error, stopped = None, False
        try:
            for x, _, t in loader:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                # inference_mode: less per-op bookkeeping than no_grad (~5% of a tiny preset's pass);
                # the collectors copy the rows into ordinary tensors.
                x, t = x.to(self.device), t.to(self.device)
                with torch.inference_mode():
                    reps = self.method.representations(x, t) if own else {}
                    if head:
                        reps = {**reps, **head_rows(self.method, x, t)}
                self.pgp.collect(reps)
                if on_batch is not None:
                    on_batch()
        except PgpclError as e:
            error = e
        if agree is not None:
            stopped = agree(error, stopped)
        elif error is not None:
            raise error
        if stopped:
            self.method.train(was_training)
            raise BasisInterrupted(f"stopped while building the basis of task {task}")
        if own and task >= self.method.extra_from_task:
            for name, rows in self.method.extra_representations().items():
                self.pgp.collect_extra(name, rows)
        for name, info in self.pgp.build().items():
            self.basis_log.append(
                {"task": task, "group": name, "rank_before": info.rank_before, "rank_after": info.rank_after,
                 "dim": info.dim, "energy_captured": info.energy_captured, "rows": info.num_rows}
            )
        self.method.train(was_training)

    def begin_task(self, task: int) -> None:
        # No projection on the first task, even when the method builds its basis at task start (L2P).
        self.active = task > 0
        if self.active:
            self.pgp.begin_task(self.ranks_in_force(task))

    def ranks_in_force(self, task: int) -> dict[str, int]:
        """Per group, the basis rank that projects task ``task``: all of it, except that a basis built
        at this task's start from its own data (L2P, as released) serves from the next task on, so the
        ranks from before that build (its log entry's ``rank_before``) are in force."""
        ranks = self.pgp.ranks()
        if self.method.own_task_basis_in_force:
            return ranks
        for rec in self.basis_log:
            if rec["task"] == task:
                ranks[rec["group"]] = rec["rank_before"]
        return ranks

    def before_step(self) -> None:
        if self.active:
            self.pgp.before_step()

    def after_step(self) -> None:
        if self.active:
            self.pgp.after_step()

    def end_task(self, task: int) -> dict[str, dict[str, float]]:
        """Per group: basis rank in force during the task and the leak of the task's real change;
        empty for the first task, which is never projected."""
        return self.pgp.end_task() if self.active else {}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The subspace memory (every group's basis)."""
        return self.pgp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pgp.load_state_dict(state)

    def task_start_state(self) -> dict[str, torch.Tensor]:
        """The projector's snapshot of each protected part at ``begin_task`` (for the task's leak);
        empty when the running task is not projected (the first)."""
        if not self.active:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.pgp.projector.task_start().items()}

    def load_task_start_state(self, task: int, state: dict[str, torch.Tensor] | None) -> None:
        """Re-enter task ``task`` mid-way (resume): what ``begin_task`` set, from a checkpoint."""
        from pgpcl.errors import CheckpointError

        self.active = task > 0
        if not self.active:
            return
        state = state or {}
        groups = {g.name: g for g in self.pgp.groups}
        if set(state) != set(groups):
            raise CheckpointError(
                f"checkpoint protects groups {sorted(state)}, this method {sorted(groups)}; resume with "
                "the config the run was started with"
            )
        out = {}
        for name, value in state.items():
            ref = groups[name].selected_data()
            if tuple(value.shape) != tuple(ref.shape):
                raise CheckpointError(
                    f"checkpoint snapshot of group '{name}' has shape {tuple(value.shape)}, the method "
                    f"{tuple(ref.shape)}; resume with the config the run was started with"
                )
            out[name] = value.to(ref.device, ref.dtype)
        self.pgp.projector.set_task_start(out, self.ranks_in_force(task))
