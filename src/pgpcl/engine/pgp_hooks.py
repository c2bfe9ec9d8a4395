"""Glue between the engine's task loop and the method-agnostic projection component."""

from __future__ import annotations

import torch

from pgpcl.config import PGPConfig
from pgpcl.projection import PGP


class PGPHooks:
    """Builds bases from a method's declared representations and projects its protected parameters."""

    def __init__(self, method, cfg: PGPConfig, device: torch.device):
        self.method = method
        self.device = device
        eps = {**method.default_eps, **cfg.eps}
        # measure_step_leak=False: the task-level leak (end_task) is measured anyway, at no step cost.
        self.pgp = PGP(method.protected_groups(eps), cfg, method.default_eps, measure_step_leak=False)
        self.basis_log: list[dict] = []
        self.active = False

    @torch.no_grad()
    def build_basis(self, task: int, loader) -> None:
        """Collect the task's representations (batched, no grad) and grow every group's basis."""
        was_training = self.method.training
        self.method.eval()
        self.pgp.collectors()
        for x, _, t in loader:
            self.pgp.collect(self.method.representations(x.to(self.device), t.to(self.device)))
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
            self.pgp.begin_task()

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

    def state_dict(self) -> dict:
        return self.pgp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pgp.load_state_dict(state)
