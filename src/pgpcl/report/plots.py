"""PNG plots: per-group accuracy-matrix heatmaps and accuracy-over-tasks curves.

Figures are built with matplotlib's object API (``Figure`` rendered by Agg on save) rather than
pyplot, so plotting works headless and never switches the backend of a caller's interactive session.
Each PNG is rendered to memory and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgpcl.io import atomic_write_bytes
from pgpcl.report.runs import RunGroup, group_key

SETTINGS = ("cil", "til")


def mean_matrix(group: RunGroup, setting: str) -> np.ndarray | None:
    """Entry-wise mean over the group's runs; NaN where no run has a value (i > t or not trained)."""
    mats = [r.results.acc.get(setting) for r in group.runs]
    mats = [m for m in mats if m is not None]
    if not mats:
        return None
    stack = np.array([[[np.nan if a is None else a for a in row] for row in m] for m in mats], dtype=float)
    filled = ~np.isnan(stack)
    total = np.where(filled, stack, 0.0).sum(axis=0)
    count = filled.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def curve_stats(group: RunGroup, setting: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and sample std (NaN with one run) over runs of ``A_t`` after each task."""
    curves = [r.curve(setting) for r in group.runs]
    curves = [c for c in curves if c]
    if not curves:
        return None
    length = max(len(c) for c in curves)
    arr = np.full((len(curves), length), np.nan)
    for k, c in enumerate(curves):
        arr[k, : len(c)] = c
    return _nan_mean(arr), _nan_std(arr)


def _nan_mean(arr: np.ndarray) -> np.ndarray:
    count = (~np.isnan(arr)).sum(axis=0)
    return np.where(count > 0, np.nansum(arr, axis=0) / np.maximum(count, 1), np.nan)


def _nan_std(arr: np.ndarray) -> np.ndarray:
    count = (~np.isnan(arr)).sum(axis=0)
    dev = np.where(np.isnan(arr), 0.0, arr - _nan_mean(arr)) ** 2
    return np.where(count > 1, np.sqrt(dev.sum(axis=0) / np.maximum(count - 1, 1)), np.nan)


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_matrices(group: RunGroup, path: Path) -> bool:
    """Heatmaps of the group's mean CIL (and TIL) matrices, values annotated. False if nothing to plot."""
    from matplotlib.figure import Figure

    mats = {s: m for s in SETTINGS if (m := mean_matrix(group, s)) is not None}
    if not mats:
        return False
    T = next(iter(mats.values())).shape[0]
    side = min(2.0 + 0.45 * T, 14.0)
    fig = Figure(figsize=(side * len(mats) + 1.5, side + 0.6), layout="constrained")
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    names = {tuple(r.results.domain_names or ()) for r in group.runs}
    domains = list(next(iter(names))) if len(names) == 1 and len(next(iter(names))) == T else None
    for ax, (setting, m) in zip(axes, mats.items()):
        _heatmap(fig, ax, m, setting.upper(), domains)
    fig.suptitle(matrix_title(group), fontsize=10)
    _save(fig, path)
    return True


def matrix_title(group: RunGroup) -> str:
    """The heatmaps' title: how many runs each column averages, where that differs (include_incomplete
    lets runs that stopped after different tasks into one group)."""
    from pgpcl.engine.metrics import tasks_done

    n = len(group.runs)
    done = sorted({tasks_done(r.results.acc["cil"]) for r in group.runs})
    if len(done) == 1:
        return f"{group.label} (mean of {n} run(s))"
    counts = [sum(tasks_done(r.results.acc["cil"]) > t for r in group.runs) for t in range(done[-1])]
    return f"{group.label} (mean of {n} runs; runs per column: {' '.join(map(str, counts))})"


def _heatmap(fig: Any, ax: Any, m: np.ndarray, title: str, domains: list[str] | None = None) -> None:
    """``domains``: a DIL run's domain per task, shown beside the task numbers."""
    T = m.shape[0]
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0.0, vmax=100.0, cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8, label="top-1 accuracy (%)")
    size = max(4.0, 10.0 - 0.3 * T)
    for i in range(T):
        for t in range(T):
            if not np.isnan(m[i, t]):
                color = "white" if m[i, t] < 60 else "black"
                ax.text(t, i, f"{m[i, t]:.1f}", ha="center", va="center", fontsize=size, color=color)
    ax.set_xticks(range(T))
    ax.set_yticks(range(T), [f"{i} {d}" for i, d in enumerate(domains)] if domains else None)
    ax.set_xlabel("after training task t")
    ax.set_ylabel("evaluated task i")
    ax.set_title(title)


def plot_curves(groups: Sequence[RunGroup], path: Path) -> bool:
    """``A_t`` after each task, one curve per group (mean, with a +-1 std band over seeds)."""
    from matplotlib.figure import Figure

    panels = [s for s in SETTINGS if any(curve_stats(g, s) is not None for g in groups)]
    if not panels:
        return False
    fig = Figure(figsize=(6.0 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, setting in zip(axes, panels):
        _curve_panel(ax, groups, setting)
    _save(fig, path)
    return True


def _curve_panel(ax: Any, groups: Sequence[RunGroup], setting: str) -> None:
    # A learner and its PGP variants share a colour (PGP dashed), so pairs stay visible among many curves.
    colours: dict[tuple, str] = {}
    for g in groups:
        stats = curve_stats(g, setting)
        if stats is None:
            continue
        mean, std = stats
        x = np.arange(1, len(mean) + 1)
        pair = group_key(g.first, drop_pgp=True)
        colour = colours.setdefault(pair, f"C{len(colours) % 10}")
        line = ax.plot(x, mean, color=colour, linestyle="--" if g.first.pgp else "-",
                       marker="s" if g.first.pgp else "o", markersize=3, label=f"{g.label} (n={len(g.runs)})")[0]
        if not np.all(np.isnan(std)):
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy A_t (%)")
    ax.set_title(f"{setting.upper()} accuracy over tasks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
