"""The PGP facade the engine uses: groups + memory + collectors + projector from one PGPConfig."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from pgpcl.config import PGPConfig
from pgpcl.errors import CheckpointError, ConfigError
from pgpcl.projection.collect import GramCollector, RepresentationCollector, SampleCollector, Weighting
from pgpcl.projection.groups import ProtectedGroup, check_unique
from pgpcl.projection.memory import SubspaceMemory, UpdateInfo
from pgpcl.projection.projector import Projector
from pgpcl.projection.reference import check_sample_count


def resolve_eps(
    groups: Sequence[ProtectedGroup], cfg_eps: Mapping[str, float], default_eps: Mapping[str, float]
) -> list[ProtectedGroup]:
    """Copies of the groups with eps set: ``pgp.eps.<kind>`` first, then the group's own eps, then
    the method's default for the kind."""
    # the method's default kinds count too: an option may switch a group off (prefix's protect_values)
    kinds = sorted({g.kind for g in groups} | set(default_eps))
    for kind in cfg_eps:
        if kind not in kinds:
            close = difflib.get_close_matches(str(kind), kinds, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"pgp.eps names group kind '{kind}', which this method does not know; {hint}"
                f"its kinds are: {', '.join(kinds)}"
            )
    out = []
    for g in groups:
        own = g.eps if g.eps is not None else default_eps.get(g.kind)
        eps = cfg_eps.get(g.kind, own)
        if eps is None:
            raise ConfigError(
                f"no eps for protected group kind '{g.kind}'; set pgp.eps.{g.kind}=<value in (0, 1]>"
            )
        if not 0.0 < eps <= 1.0:
            raise ConfigError(f"pgp.eps.{g.kind} must be in (0, 1], got {eps}")
        out.append(dataclasses.replace(g, eps=float(eps)))
    return out


class PGP:
    """Prompt Gradient Projection for any set of protected groups.

    Engine usage: ``collectors()`` / ``collect()`` / ``collect_extra()`` then ``build()`` at a task
    boundary; ``begin_task()`` / ``end_task()`` around training; ``before_step()`` /
    ``after_step()`` around ``optimizer.step()``; ``state_dict()`` into checkpoints.

    ``weighting`` and ``extra_weight`` set how the extra (prompt) rows enter the feature-mode sum
    space (see :class:`GramCollector`); reference mode ignores them.
    """

    def __init__(
        self,
        groups: Sequence[ProtectedGroup],
        cfg: PGPConfig,
        default_eps: Mapping[str, float] | None = None,
        *,
        weighting: Weighting = "trace",
        extra_weight: float = 1.0,
        measure_step_leak: bool = True,
    ) -> None:
        check_unique(list(groups))
        self.cfg = cfg
        self.groups = resolve_eps(groups, cfg.eps, default_eps or {})
        self._by_name = {g.name: g for g in self.groups}
        if cfg.mode == "reference":
            for g in self.groups:
                if g.components is None:
                    raise ConfigError(
                        f"pgp.mode=reference reproduces released PGP code, and group '{g.name}' has none "
                        "(no PCA width: ProtectedGroup.components); use pgp.mode=feature"
                    )
                check_sample_count(cfg.num_samples, g.dim)
        self.weighting: Weighting = weighting
        self.extra_weight = extra_weight
        self.memory = SubspaceMemory(cfg.mode)
        self.projector = Projector(self.groups, self.memory, cfg.target, measure_step_leak)
        self._collectors: dict[str, RepresentationCollector] | None = None

    # ------------------------------------------------------------------ building the memory

    def _new_collector(self, group: ProtectedGroup) -> RepresentationCollector:
        if self.cfg.mode == "reference":
            return SampleCollector(group.dim, int(group.components))
        return GramCollector(group.dim, self.weighting, self.extra_weight)

    def collectors(self, names: Sequence[str] | None = None) -> dict[str, RepresentationCollector]:
        """Fresh collectors, one per group name (only ``names`` if given), which the next ``build()``
        will use; the other groups' bases stay as they are."""
        unknown = sorted(set(names or ()) - set(self._by_name))
        if unknown:
            raise KeyError(f"no protected group named '{unknown[0]}' (groups: {', '.join(self._by_name)})")
        self._collectors = {g.name: self._new_collector(g) for g in self.groups if names is None or g.name in names}
        return self._collectors

    def _collector(self, name: str) -> RepresentationCollector:
        if self._collectors is None:
            self.collectors()
        if name not in self._collectors:
            raise KeyError(f"no protected group named '{name}' (groups: {', '.join(self._by_name)})")
        return self._collectors[name]

    def group(self, name: str) -> ProtectedGroup:
        """The protected group called ``name``."""
        return self._by_name[name]

    def collect(self, reps: Mapping[str, Tensor]) -> None:
        """Add one batch of representations: group name -> rows (B, n, D) or (B, D)."""
        for name, rows in reps.items():
            self._collector(name).add(rows)

    def check_extra_rows(self, name: str, count: int) -> None:
        """ConfigError if reference mode cannot reduce group ``name``'s ``count`` extra rows to its PCA
        width (the released arithmetic needs at least ``components`` of them)."""
        c = self._by_name[name].components
        if self.cfg.mode == "reference" and c is not None and count < c:
            raise ConfigError(
                f"pgp.mode=reference reduces group '{name}''s extra rows (its prompt tokens) to {c} PCA "
                f"components, but it has {count}; give the method at least {c} (e.g. method.length={c}) or "
                "use pgp.mode=feature"
            )

    def collect_extra(self, name: str, rows: Tensor) -> None:
        """Set the group's extra matrix (m, D) for this task (e.g. the prompt pool: sum space)."""
        self._collector(name).add_extra(rows)

    def build(self) -> dict[str, UpdateInfo]:
        """Grow the basis of every group that has a collector (all, unless ``collectors(names)`` chose
        some) from the collected representations; clears the collectors.

        Every such group must have received rows: a group left out would silently stay unprotected.
        """
        if self._collectors is None:
            raise RuntimeError("PGP.build() called before any representation was collected")
        for collector in self._collectors.values():  # collectives, in the same order on every rank
            collector.synchronize()
        empty = [n for n, c in self._collectors.items() if c.num_rows == 0]
        if empty:
            raise RuntimeError(f"no representations collected for group(s) {', '.join(empty)}")
        infos = {
            name: self.memory.update(name, c, float(self._by_name[name].eps)) for name, c in self._collectors.items()
        }
        self._collectors = None
        return infos

    # ------------------------------------------------------------------ training hooks

    def begin_task(self, in_force: Mapping[str, int] | None = None) -> None:
        """Start projecting a task. ``in_force``: per group, the basis rank to use (default: all of it);
        where the basis is built at a task's start from that task's data, pass :meth:`ranks` from
        before that build, so the task is projected out of the earlier tasks' spaces only."""
        self.projector.begin_task(in_force)

    def end_task(self) -> dict[str, dict[str, float]]:
        return self.projector.end_task()

    def before_step(self) -> None:
        self.projector.before_step()

    def after_step(self) -> None:
        self.projector.after_step()

    def step_leak(self) -> dict[str, dict[str, float]]:
        return self.projector.step_leak()

    def ranks(self) -> dict[str, int]:
        return {g.name: self.memory.rank(g.name) for g in self.groups}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the memory, refusing bases for groups this PGP does not have or of another width."""
        dims = {g.name: g.dim for g in self.groups}
        bases = state.get("bases") if isinstance(state, dict) else None
        for name, basis in (bases or {}).items():
            if name not in dims:
                raise CheckpointError(
                    f"the PGP state holds a basis for group '{name}', which this method does not declare "
                    f"(its groups: {', '.join(dims)}); load the state of the same method"
                )
            if isinstance(basis, Tensor) and basis.dim() == 2 and basis.shape[0] != dims[name]:
                raise CheckpointError(
                    f"the PGP basis of group '{name}' is {basis.shape[0]}-D, the group is {dims[name]}-D; "
                    "load the state of the same method and backbone"
                )
        self.memory.load_state_dict(state)
