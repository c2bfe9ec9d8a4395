"""``report_runs``: the table, the paired PGP - baseline section, plots and ``summary.json``."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgpcl.engine.results import now_iso
from pgpcl.errors import PgpclError
from pgpcl.io import atomic_write_json, atomic_write_text
from pgpcl.report.outdir import RUNS_CSV, SUMMARY, TABLES, write_report_folder
from pgpcl.report.plots import SETTINGS, curve_stats, mean_matrix, plot_curves, plot_matrices
from pgpcl.report.published import published_for, released_forgetting_stat
from pgpcl.report.runs import (
    COLUMNS,
    PairedDifference,
    Run,
    RunGroup,
    group_runs,
    load_runs,
    paired_difference,
    pgp_pairs,
    subspace_summaries,
)
from pgpcl.report.tables import FORMATS, format_report

Pair = tuple[RunGroup, RunGroup, PairedDifference]


def report_runs(
    paths: Sequence[str | Path],
    out_dir: str | Path | None = None,
    plots: bool = True,
    *,
    fmt: str = "text",
    include_incomplete: bool = False,
) -> str:
    """Summarise runs over seeds and return the report text (the caller prints it).

    ``paths``: run directories, ``results.json`` files, or folders searched recursively.
    Files (``summary.json``, ``table.txt``/``table.md`` and, with ``plots``, PNGs) are written when
    ``plots`` is true or ``out_dir`` is given. Default ``out_dir``: ``<run dir>/report`` for a single
    run, else ``./report``. The new files replace the report already there, all at once, or none on a
    failure (:mod:`pgpcl.report.outdir`). Runs not ``complete`` are skipped unless ``include_incomplete``.
    """
    if fmt not in FORMATS:
        raise PgpclError(f"unknown report format '{fmt}'; use one of {', '.join(FORMATS)}")
    runs, skipped = load_runs(paths, include_incomplete)
    groups, dup_notes = group_runs(runs)
    pairs, pair_notes = _pairs(groups)
    notes = skipped + dup_notes + pair_notes
    text = format_report(groups, pairs, notes, fmt)
    if not plots and out_dir is None:
        return text
    target = Path(out_dir) if out_dir is not None else default_out_dir(runs)
    written = write_outputs(target, groups, pairs, notes, text, fmt, plots)
    return text + f"\nwrote {len(written)} file(s) to {target}\n"


def default_out_dir(runs: Sequence[Run]) -> Path:
    return runs[0].path.parent / "report" if len(runs) == 1 else Path("report")


def _pairs(groups: Sequence[RunGroup]) -> tuple[list[Pair], list[str]]:
    pairs, notes = [], []
    for pgp_group, base in pgp_pairs(groups):
        diff = paired_difference(pgp_group, base)
        if diff.seeds:
            diff.label = pgp_group.label
            pairs.append((pgp_group, base, diff))
        else:
            notes.append(f"{pgp_group.label} shares no seed with {base.label}; no paired difference")
    return pairs, notes


# ----------------------------------------------------------------------------------------------------
# Files


def write_outputs(
    out_dir: Path, groups: Sequence[RunGroup], pairs: Sequence[Pair], notes: Sequence[str],
    text: str, fmt: str, plots: bool,
) -> list[Path]:
    """Write table, plots and summary.json into ``out_dir``, replacing the report there; return the paths."""

    def write(stage: Path) -> list[str]:
        table = TABLES[1] if fmt == "markdown" else TABLES[0]
        atomic_write_text(stage / table, text)
        atomic_write_text(stage / RUNS_CSV, runs_csv(groups))
        plot_names = _write_plots(stage, groups) if plots else {}
        files = [table, RUNS_CSV, *(name for names in plot_names.values() for name in names), SUMMARY]
        atomic_write_json(stage / SUMMARY, summary_dict(groups, pairs, notes, plot_names, files))
        return files

    return write_report_folder(out_dir, write)


RUN_FIELDS = ("group", "method", "pgp", "dataset", "setting", "variant", "seed", "run")


def runs_csv(groups: Sequence[RunGroup]) -> str:
    """One row per run, in the report's group order: what the table averages, for pandas or a spreadsheet.
    Metrics are in % (empty where a run has none, e.g. TIL in DIL); ``run`` is the run's results file."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*RUN_FIELDS, *(key for key, *_ in COLUMNS)])
    for g in groups:
        for run in g.runs:
            r = run.results
            values = [run.value(key) for key, *_ in COLUMNS]
            writer.writerow([g.label, r.method, str(r.pgp).lower(), r.dataset, r.setting, g.variant, r.seed,
                             str(run.path), *("" if v is None else repr(float(v)) for v in values)])
    return buf.getvalue()


def _write_plots(out_dir: Path, groups: Sequence[RunGroup]) -> dict[str, list[str]]:
    """Plot file names keyed by group index (as a string), and "curves" for the shared curve plot."""
    names: dict[str, list[str]] = {}
    for k, g in enumerate(groups):
        name = f"{k:02d}_{slug(g.label)}_acc_matrix.png"
        if plot_matrices(g, out_dir / name):
            names[str(k)] = [name]
    if plot_curves(groups, out_dir / "accuracy_curves.png"):
        names["curves"] = ["accuracy_curves.png"]
    return names


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "group"


def _finite(arr: np.ndarray | None) -> list | None:
    # JSON has no NaN: entries without data become null.
    if arr is None:
        return None
    return [_finite(x) if isinstance(x, np.ndarray) else (None if np.isnan(x) else float(x)) for x in arr]


def summary_dict(
    groups: Sequence[RunGroup], pairs: Sequence[Pair], notes: Sequence[str], plots: dict[str, list[str]],
    files: Sequence[str] = (),
) -> dict[str, Any]:
    return {
        "report_version": 1,
        "created": now_iso(),
        "columns": {key: header for key, header, *_ in COLUMNS},
        "groups": [_group_dict(g, plots.get(str(k), [])) for k, g in enumerate(groups)],
        "paired": [_pair_dict(p, b, d) for p, b, d in pairs],
        "curves_plot": plots.get("curves", [None])[0],
        "notes": list(notes),
        "files": list(files),  # what the next report into this folder replaces (report/outdir.py)
    }


def _group_dict(g: RunGroup, plot_files: list[str]) -> dict[str, Any]:
    r = g.first
    curves = {s: (None if (c := curve_stats(g, s)) is None else {"mean": _finite(c[0]), "std": _finite(c[1])})
              for s in SETTINGS}
    return {
        "label": g.label, "method": r.method, "pgp": r.pgp, "variant": g.variant,
        "dataset": r.dataset, "setting": r.setting, "n": len(g.runs), "seeds": g.seeds,
        "runs": [str(run.path) for run in g.runs],
        "metrics": {col: g.stat(col).to_dict() for col, *_ in COLUMNS},
        "curves": curves,
        "acc_mean": {s: _finite(mean_matrix(g, s)) for s in SETTINGS},
        "pgp_subspaces": [sub.to_dict() for sub in subspace_summaries(g)],
        "published": None if (pub := published_for(r)) is None else {
            **pub.to_dict(), "this_cil_forgetting_released": released_forgetting_stat(g).to_dict()},
        "plots": plot_files,
    }


def _pair_dict(pgp_group: RunGroup, base: RunGroup, diff: PairedDifference) -> dict[str, Any]:
    return {
        "label": diff.label, "pgp_group": pgp_group.label, "baseline_group": base.label,
        "seeds": diff.seeds, "metrics": {col: s.to_dict() for col, s in diff.stats.items()},
    }
