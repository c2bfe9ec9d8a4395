"""Loading runs, grouping seeds of one configuration, and statistics over seeds.

Runs are grouped by their full config, apart from the seed and keys that cannot change the numbers
(:data:`IGNORED_KEYS`). When PGP is off the other ``pgp.*`` keys are inert, so they are dropped too:
baselines that differ only there still form one group. A results file written before a config key
existed reads that key as its default (``config.with_defaults``), so old and new runs of one
configuration still group together.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgpcl.config import RESULT_NEUTRAL_KEYS, inert_keys, with_defaults
from pgpcl.engine.metrics import accuracy_curve, summarize, tasks_done
from pgpcl.engine.results import RESULTS_FILENAME, Results, collect_results, read_results
from pgpcl.errors import PgpclError

IGNORED_KEYS = frozenset({"seed", "name", "data.download"} | RESULT_NEUTRAL_KEYS)

# (column key, header, eval setting, summary key)
COLUMNS: list[tuple[str, str, str, str]] = [
    ("cil_final", "CIL final", "cil", "final_acc"),
    ("cil_avg_inc", "CIL avg-inc", "cil", "avg_inc_acc"),
    ("cil_forgetting", "CIL forget", "cil", "forgetting"),
    ("cil_bwt", "CIL BWT", "cil", "bwt"),
    ("til_final", "TIL final", "til", "final_acc"),
    ("til_avg_inc", "TIL avg-inc", "til", "avg_inc_acc"),
    ("til_forgetting", "TIL forget", "til", "forgetting"),
    ("til_bwt", "TIL BWT", "til", "bwt"),
]


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof=1; None for a single value) of the defined values."""

    mean: float | None
    std: float | None
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return cls(None, None, 0, [])
        std = statistics.stdev(vals) if len(vals) > 1 else None
        return cls(statistics.fmean(vals), std, len(vals), vals)

    def format(self, pm: str = "+-", signed: bool = False, digits: int = 2) -> str:
        if self.mean is None:
            return "-"
        value = round(self.mean, digits) + 0.0  # + 0.0: a mean that rounds to zero prints 0.00, not -0.00
        mean = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
        return mean if self.std is None else f"{mean} {pm} {self.std:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


@dataclass
class Run:
    path: Path
    results: Results

    @property
    def seed(self) -> int:
        return self.results.seed

    def summary(self, setting: str) -> dict[str, Any] | None:
        m = self.results.acc.get(setting)
        return None if m is None else summarize(m)

    def value(self, column: str) -> float | None:
        _, _, setting, key = _column(column)
        s = self.summary(setting)
        return None if s is None else s[key]

    def curve(self, setting: str) -> list[float] | None:
        m = self.results.acc.get(setting)
        return None if m is None else accuracy_curve(m)


@dataclass
class RunGroup:
    """Runs of one configuration that differ only in seed."""

    key: tuple
    runs: list[Run]
    variant: str = ""
    """Config keys that tell this group apart from others with the same method/dataset/setting."""

    @property
    def first(self) -> Results:
        return self.runs[0].results

    @property
    def method_label(self) -> str:
        base = self.first.method + ("-PGP" if self.first.pgp else "")
        return f"{base} [{self.variant}]" if self.variant else base

    @property
    def label(self) -> str:
        return f"{self.method_label} {self.first.dataset} {self.first.setting}"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def stat(self, column: str) -> Stat:
        return Stat.of([r.value(column) for r in self.runs])


@dataclass
class SubspaceSummary:
    """One protected group of a PGP run group, over its seeds: how the basis grew and how much of each
    projected task's real parameter change stayed inside it."""

    group: str
    dim: int
    rank_after: list[Stat]
    """Basis rank after each task's memory update (task order), over seeds."""
    leak: Stat
    """||dtheta U U^T|| / ||dtheta|| of every projected task's change, all seeds and tasks pooled."""

    @property
    def leak_max(self) -> float | None:
        return max(self.leak.values, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "dim": self.dim, "rank_after": [r.to_dict() for r in self.rank_after],
                "leak": self.leak.to_dict(), "leak_max": self.leak_max}


def subspace_summaries(group: RunGroup) -> list[SubspaceSummary]:
    """Per protected group (first-seen order) of a PGP run group, from its results files' ``basis``
    log and ``projection`` records; empty for baselines and for files without them."""
    if not group.first.pgp:
        return []
    ranks: dict[str, dict[int, list[float]]] = {}
    dims: dict[str, int] = {}
    leaks: dict[str, list[float | None]] = {}
    for run in group.runs:
        for rec in run.results.extra.get("basis") or []:
            ranks.setdefault(rec["group"], {}).setdefault(int(rec["task"]), []).append(float(rec["rank_after"]))
            dims[rec["group"]] = int(rec["dim"])
        for rec in run.results.projection:
            leaks.setdefault(rec["group"], []).append(rec.get("leak"))
            dims.setdefault(rec["group"], int(rec["dim"]))
    out = []
    for name in dict.fromkeys([*ranks, *leaks]):
        per_task = ranks.get(name, {})
        out.append(SubspaceSummary(name, dims[name], [Stat.of(per_task[t]) for t in sorted(per_task)],
                                   Stat.of(leaks.get(name, []))))
    return out


def _column(key: str) -> tuple[str, str, str, str]:
    for col in COLUMNS:
        if col[0] == key:
            return col
    raise KeyError(f"unknown report column {key!r}")


# ----------------------------------------------------------------------------------------------------
# Loading


def load_runs(paths: Sequence[str | Path], include_incomplete: bool = False) -> tuple[list[Run], list[str]]:
    """Read every results file under ``paths``; return the usable runs and a note per skipped one.

    A path named on its own that is not a readable run is an error (the user meant it); under a folder
    searched for runs (``pgpcl report runs/``), a foreign or damaged ``results.json`` and an empty
    folder are skipped with a note, so one stray file does not hide every run beside it.
    """
    runs, skipped, unreadable = [], [], []
    for f, r in _read_found(paths, skipped, unreadable):
        done, total = tasks_done(r.acc["cil"]), r.num_tasks
        if done == 0 or (r.status != "complete" and not include_incomplete):
            skipped.append(f"skipped {f} (status {r.status}, {done}/{total} tasks done)")
            continue
        runs.append(Run(f, r))
    if not runs:
        if unreadable and len(unreadable) == len(skipped):  # nothing but unreadable files and empty folders
            raise unreadable[0]
        raise PgpclError(
            f"none of the {len(skipped)} results file(s) is a complete run; "
            "wait for running runs to finish, or continue stopped ones with pgpcl train --resume RUN_DIR"
        )
    return runs, skipped


def _read_found(paths: Sequence[str | Path], skipped: list[str], unreadable: list[PgpclError]):
    """Yield (file, Results) for each results file under ``paths``, once; what a searched folder holds
    that cannot be read goes to ``unreadable`` with a note in ``skipped`` (see :func:`load_runs`)."""
    def tolerate(e: PgpclError, note: str, searched: bool) -> None:
        if not searched:
            raise e
        unreadable.append(e)
        skipped.append(note)

    seen: set[Path] = set()
    for path in map(Path, paths):
        searched = path.is_dir() and not (path / RESULTS_FILENAME).is_file()
        try:
            files = collect_results([path])
        except PgpclError as e:
            tolerate(e, f"skipped {path} (no {RESULTS_FILENAME} below it)", searched)
            continue
        for f in (f for f in files if f not in seen):
            seen.add(f)
            try:
                yield f, read_results(f)
            except PgpclError as e:
                tolerate(e, f"skipped {f}, found under {path} ({_reason(e, f)})", searched)


def _reason(e: PgpclError, path: Path) -> str:
    """What is wrong with the file, without the message's leading 'results file PATH' and its advice."""
    text = str(e).replace(f"results file {path} ", "", 1)
    return text.rsplit("; rerun or restore it", 1)[0]


# ----------------------------------------------------------------------------------------------------
# Grouping


def flatten_config(config: dict[str, Any]) -> dict[str, str]:
    """Dotted config keys -> JSON-encoded values of a config mapping."""
    flat: dict[str, str] = {}
    _flatten(config, "", flat)
    return flat


def flat_config(r: Results) -> dict[str, str]:
    """Dotted config keys -> JSON-encoded values, with the run's own method/pgp/setting fields."""
    flat = flatten_config(with_defaults(r.config))
    flat.update({"method.name": json.dumps(r.method), "pgp.enabled": json.dumps(r.pgp),
                 "data.setting": json.dumps(r.setting)})
    return flat


def _flatten(node: Any, prefix: str, out: dict[str, str]) -> None:
    # A mapping contributes its entries only: an empty one (pgp.eps={}, every kind at the method's
    # default) adds no key, so a run that sets pgp.eps.prefix differs from it in that key alone.
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.dumps(node, sort_keys=True)


def result_items(flat: dict[str, str], pgp: bool, setting: str) -> dict[str, str]:
    """The entries of a flattened config that can change a run's numbers: without seed and inert keys,
    pgp.* only when ``pgp``, nor what the config sets but does not use (:func:`pgpcl.config.inert_keys`)."""
    plain = {"data.setting": setting, "data.class_order": json.loads(flat.get("data.class_order", '"label"'))}
    inert = IGNORED_KEYS | inert_keys(plain)
    return {k: v for k, v in flat.items() if k not in inert and (pgp or not k.startswith("pgp."))}


def group_key(r: Results, drop_pgp: bool = False) -> tuple:
    """Hashable identity of a run's configuration, without seed and inert keys."""
    return tuple(sorted(result_items(flat_config(r), r.pgp and not drop_pgp, r.setting).items()))


def group_runs(runs: Sequence[Run]) -> tuple[list[RunGroup], list[str]]:
    """Group runs by config; keep the newest run when a seed repeats. Returns groups and notes."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        by_key.setdefault(group_key(run.results), []).append(run)
    groups, notes = [], []
    for key, members in by_key.items():
        kept, dropped = _latest_per_seed(members)
        notes.extend(f"seed {d.seed} repeats; used {k.path}, ignored {d.path}" for d, k in dropped)
        groups.append(RunGroup(key, kept))
    _set_variants(groups)
    groups.sort(key=_sort_key)
    for g in groups:
        done = sorted({tasks_done(r.results.acc["cil"]) for r in g.runs})
        if len(done) > 1:  # only with include_incomplete: its final columns are of different tasks
            notes.append(f"{g.label}: its runs stopped after different tasks ({', '.join(map(str, done))} of "
                         f"{g.first.num_tasks}); its final numbers mix them")
    return groups, notes


def _latest_per_seed(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    by_seed: dict[int, Run] = {}
    dropped = []
    # A complete run wins over an incomplete one, then the newest `updated`; equal stamps (second
    # resolution) fall back to the later path, for determinism.
    order = sorted(runs, key=lambda r: (r.results.status == "complete", r.results.updated, str(r.path)), reverse=True)
    for run in order:
        if run.seed in by_seed:
            dropped.append((run, by_seed[run.seed]))
        else:
            by_seed[run.seed] = run
    return sorted(by_seed.values(), key=lambda r: r.seed), dropped


def _sort_key(g: RunGroup) -> tuple:
    r = g.first
    return (r.dataset, r.setting, r.method, r.pgp, g.variant)


VARIANT_KEYS = 4


def _set_variants(groups: list[RunGroup]) -> None:
    """Groups of one method, dataset and setting get the config keys that tell them apart as a variant.

    Keys other than pgp.* come first and are shown on PGP and baseline groups alike, so a PGP group
    carries the variant of the baseline it pairs with: every such key that differs, up to
    :data:`VARIANT_KEYS` of them (showing one of two keys that both differ would credit the difference to
    it); beyond that only those a greedy pass needs to tell the groups apart, and a count of the rest.
    pgp.* keys are added (on PGP groups) only where those leave two PGP groups alike, and only those that
    separate groups not yet told apart.
    """
    by_base: dict[tuple, list[RunGroup]] = {}
    for g in groups:
        by_base.setdefault((g.first.method, g.first.dataset, g.first.setting), []).append(g)
    for same in by_base.values():
        if len(same) < 2:
            continue
        dicts = [dict(g.key) for g in same]
        differ = sorted({k for d in dicts for k in d if len({e.get(k) for e in dicts}) > 1})
        others = [k for k in differ if not k.startswith("pgp.")]
        shared = others if len(others) <= VARIANT_KEYS else _separating(dicts, others)
        more = f"; {len(others) - len(shared)} more keys differ" if len(shared) < len(others) else ""
        pgp_dicts = [d for g, d in zip(same, dicts) if g.first.pgp]
        pgp_keys = [k for k in differ if k.startswith("pgp.") and k != "pgp.enabled"]
        own = [k for k in _separating(pgp_dicts, shared + pgp_keys) if k.startswith("pgp.")]
        for g, d in zip(same, dicts):
            g.variant = ", ".join(f"{k}={_show(d.get(k))}" for k in shared + (own if g.first.pgp else [])) + more


def _separating(dicts: list[dict[str, str]], keys: list[str]) -> list[str]:
    """Of ``keys`` (in order), those that a greedy pass needs to tell apart every two of ``dicts`` that
    differ in any of ``keys``."""
    def classes(ks: list[str]) -> int:
        return len({tuple(d.get(k) for k in ks) for d in dicts})

    target, chosen = classes(keys), []
    for k in keys:
        if classes(chosen) == target:
            break
        if classes([*chosen, k]) > classes(chosen):
            chosen.append(k)
    return chosen


def _show(encoded: str | None) -> str:
    if encoded is None:  # an entry of a mapping the other group sets (pgp.eps.<kind>): the default
        return "default"
    value = json.loads(encoded)
    return value if isinstance(value, str) else encoded


# ----------------------------------------------------------------------------------------------------
# Paired differences


@dataclass
class PairedDifference:
    """Per-seed differences ``a - b`` over the seeds both groups share."""

    seeds: list[int]
    stats: dict[str, Stat]
    label: str = ""


def _as_runs(group: RunGroup | Sequence[Run] | Sequence[Results]) -> list[Run]:
    items = group.runs if isinstance(group, RunGroup) else list(group)
    runs = [x if isinstance(x, Run) else Run(Path("."), x) for x in items]
    return _latest_per_seed(runs)[0]


def paired_difference(
    group_a: RunGroup | Sequence[Run] | Sequence[Results],
    group_b: RunGroup | Sequence[Run] | Sequence[Results],
) -> PairedDifference:
    """Mean +- sample std of ``a - b`` per report column, for runs matched by seed."""
    a = {r.seed: r for r in _as_runs(group_a)}
    b = {r.seed: r for r in _as_runs(group_b)}
    seeds = sorted(set(a) & set(b))
    stats = {}
    for col, *_ in COLUMNS:
        diffs = [_diff(a[s].value(col), b[s].value(col)) for s in seeds]
        stats[col] = Stat.of(diffs)
    return PairedDifference(seeds, stats)


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def pgp_pairs(groups: Sequence[RunGroup]) -> list[tuple[RunGroup, RunGroup]]:
    """(PGP group, baseline group) pairs whose configs are identical apart from ``pgp.*``."""
    baselines = {group_key(g.first, drop_pgp=True): g for g in groups if not g.first.pgp}
    pairs = []
    for g in groups:
        base = baselines.get(group_key(g.first, drop_pgp=True)) if g.first.pgp else None
        if base is not None:
            pairs.append((g, base))
    return pairs
