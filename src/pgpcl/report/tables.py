"""Plain-text and Markdown tables of grouped runs and paired PGP - baseline differences."""

from __future__ import annotations

from collections.abc import Sequence

from pgpcl.report.runs import COLUMNS, PairedDifference, RunGroup

FORMATS = ("text", "markdown")
_HEAD = ["method", "dataset", "setting", "n"] + [c[1] for c in COLUMNS]


def _pm(fmt: str) -> str:
    return "±" if fmt == "markdown" else "+-"


def group_rows(groups: Sequence[RunGroup], fmt: str) -> list[list[str]]:
    rows = []
    for g in groups:
        r = g.first
        cells = [g.stat(col).format(_pm(fmt)) for col, *_ in COLUMNS]
        rows.append([g.method_label, r.dataset, r.setting, str(len(g.runs)), *cells])
    return rows


def paired_rows(pairs: Sequence[tuple[RunGroup, RunGroup, PairedDifference]], fmt: str) -> list[list[str]]:
    rows = []
    for pgp_group, _, diff in pairs:
        r = pgp_group.first
        cells = [diff.stats[col].format(_pm(fmt), signed=True) for col, *_ in COLUMNS]
        rows.append([pgp_group.method_label, r.dataset, r.setting, str(len(diff.seeds)), *cells])
    return rows


def render(rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        lines = [_md_line(_HEAD), _md_line(["---"] * 3 + ["---:"] * (len(_HEAD) - 3))]
        return "\n".join(lines + [_md_line(r) for r in rows])
    widths = [max(len(x) for x in col) for col in zip(_HEAD, *rows)]
    return "\n".join(_text_line(r, widths) for r in [_HEAD, *rows])


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _text_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    # Labels left-aligned, numbers right-aligned so decimal points line up.
    parts = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
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
    if notes:
        bullet = "- " if fmt == "markdown" else "note: "
        sections.append("\n".join(bullet + n for n in notes))
    return "\n\n".join(sections) + "\n"


def _section(title: str, table: str, fmt: str) -> str:
    return f"### {title}\n\n{table}" if fmt == "markdown" else f"{title}\n{table}"
