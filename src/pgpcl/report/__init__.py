"""Tables and plots from results files: ``report_runs`` groups seeds of a config into mean +- std."""

from pgpcl.report.core import report_runs
from pgpcl.report.runs import (
    COLUMNS,
    IGNORED_KEYS,
    PairedDifference,
    Run,
    RunGroup,
    Stat,
    group_runs,
    load_runs,
    paired_difference,
    pgp_pairs,
)

__all__ = [
    "COLUMNS",
    "IGNORED_KEYS",
    "PairedDifference",
    "Run",
    "RunGroup",
    "Stat",
    "group_runs",
    "load_runs",
    "paired_difference",
    "pgp_pairs",
    "report_runs",
]
