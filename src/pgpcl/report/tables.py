"""Plain-text and Markdown tables of grouped runs and paired PGP - baseline differences."""

from __future__ import annotations

from collections.abc import Sequence

from pgpcl.report.published import FORGETTING_NOTE, SOURCE, published_for, released_forgetting_stat
from pgpcl.report.runs import COLUMNS, PairedDifference, RunGroup, subspace_summaries

FORMATS = ("text", "markdown")
_HEAD = ["method", "dataset", "setting", "n"] + [c[1] for c in COLUMNS]


def _pm(fmt: str) -> str:
    return "±" if fmt == "markdown" else "+-"


def _labels(g: RunGroup, n: int) -> list[str]:
    """The label cells that start a group's row: method, dataset, setting, n."""
    return [g.method_label, g.first.dataset, g.first.setting, str(n)]


def group_rows(groups: Sequence[RunGroup], fmt: str) -> list[list[str]]:
    return [_labels(g, len(g.runs)) + [g.stat(col).format(_pm(fmt)) for col, *_ in COLUMNS] for g in groups]


def paired_rows(pairs: Sequence[tuple[RunGroup, RunGroup, PairedDifference]], fmt: str) -> list[list[str]]:
    return [_labels(pgp_group, len(diff.seeds)) + [diff.stats[col].format(_pm(fmt), signed=True) for col, *_ in COLUMNS]
            for pgp_group, _, diff in pairs]


_PGP_HEAD = ["method", "dataset", "setting", "group", "D", "rank after each task", "leak max", "leak mean"]


def subspace_rows(groups: Sequence[RunGroup]) -> list[list[str]]:
    """One row per protected group of every PGP run group (mean rank over seeds, leak pooled)."""
    rows = []
    for g in groups:
        r = g.first
        for sub in subspace_summaries(g):
            ranks = " ".join(_rank(st.mean) for st in sub.rank_after) or "-"
            leak_max = "-" if sub.leak_max is None else f"{sub.leak_max:.2g}"
            leak_mean = "-" if sub.leak.mean is None else f"{sub.leak.mean:.2g}"
            rows.append([g.method_label, r.dataset, r.setting, sub.group, str(sub.dim), ranks, leak_max, leak_mean])
    return rows


_PUB_HEAD = ["method", "dataset", "setting", "n", "CIL final", "published", "difference", "CIL forget",
             "published", "difference"]


def published_rows(groups: Sequence[RunGroup], fmt: str) -> list[list[str]]:
    """Groups that are runs of a published experiment: their CIL final accuracy and forgetting (by the
    released definition, :data:`FORGETTING_NOTE`) beside the paper's (difference = this report's mean
    minus the published number)."""
    rows = []
    for g in groups:
        pub = published_for(g.first)
        if pub is None:
            continue
        cells = _labels(g, len(g.runs))
        for stat, value in ((g.stat("cil_final"), pub.final_acc), (released_forgetting_stat(g), pub.forgetting)):
            diff = "-" if stat.mean is None else f"{stat.mean - value:+.2f}"
            cells += [stat.format(_pm(fmt)), f"{value:.2f}", diff]
        rows.append(cells)
    return rows


def _rank(mean: float | None) -> str:
    if mean is None:
        return "-"
    return str(int(mean)) if float(mean).is_integer() else f"{mean:.1f}"


def render(rows: list[list[str]], fmt: str, head: Sequence[str] = _HEAD, labels: int = 3) -> str:
    """A table of ``rows`` under ``head``; the first ``labels`` columns are left-aligned text."""
    if fmt == "markdown":
        lines = [_md_line(head), _md_line(["---"] * labels + ["---:"] * (len(head) - labels))]
        return "\n".join(lines + [_md_line(r) for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join(_text_line(r, widths, labels) for r in [head, *rows])


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _text_line(cells: Sequence[str], widths: Sequence[int], labels: int = 3) -> str:
    # Labels left-aligned, numbers right-aligned so decimal points line up.
    parts = [c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return "  ".join(parts).rstrip()


def format_report(
    groups: Sequence[RunGroup],
    pairs: Sequence[tuple[RunGroup, RunGroup, PairedDifference]],
    notes: Sequence[str],
    fmt: str = "text",
) -> str:
    """The whole report: main table, the paired section when there are pairs, then notes."""
    n_runs = sum(len(g.runs) for g in groups)
    title = (f"Results: {n_runs} run(s) in {len(groups)} group(s); top-1 accuracy (%), "
             f"mean {_pm(fmt)} sample std over seeds")
    sections = [_section(title, render(group_rows(groups, fmt), fmt), fmt)]
    if pairs:
        sub = "PGP - baseline (paired by seed; n = matched seeds)"
        sections.append(_section(sub, render(paired_rows(pairs, fmt), fmt), fmt))
    pgp = subspace_rows(groups)
    if pgp:
        sub = ("PGP subspaces: basis rank after each task's memory update (mean over seeds) out of D; leak = "
               "||dtheta U U^T|| / ||dtheta|| of each projected task's real change (all seeds and tasks)")
        sections.append(_section(sub, render(pgp, fmt, _PGP_HEAD, labels=4), fmt))
    bullet = "- " if fmt == "markdown" else "note: "
    published = published_rows(groups, fmt)
    if published:
        sub = f"Published numbers ({SOURCE}) beside this report's"
        gap = "\n\n" if fmt == "markdown" else "\n"  # a Markdown table ends at a blank line
        sections.append(_section(sub, render(published, fmt, _PUB_HEAD) + gap + bullet + FORGETTING_NOTE, fmt))
    if notes:
        sections.append("\n".join(bullet + n for n in notes))
    return "\n\n".join(sections) + "\n"


def _section(title: str, table: str, fmt: str) -> str:
    return f"### {title}\n\n{table}" if fmt == "markdown" else f"{title}\n{table}"
