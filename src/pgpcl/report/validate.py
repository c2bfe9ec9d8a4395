"""Checks of the results.json fields a report reads, beyond what ``read_results`` already checks.

``read_results`` validates the top level (keys, types, status, NaN, the accuracy matrices); the
entries of ``projection``, ``timings`` and ``basis``, the ``metrics`` objects and the config sections
were taken on trust, so a damaged file ended in a traceback or, worse, in a table that silently showed
it (a setting "xyz", a dataset "?"). Every such field is checked here, once, as the runs are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pgpcl.config import Setting
from pgpcl.engine.results import EVAL_SETTINGS, Results, ResultsError

Check = tuple[str, Callable[[Any], bool]]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_INT: Check = ("an integer", lambda v: type(v) is int)
_NUMBER: Check = ("a number", _is_number)
_NUMBER_OR_NULL: Check = ("a number or null", lambda v: v is None or _is_number(v))
_STRING: Check = ("a string", lambda v: isinstance(v, str))

# Required fields of each entry of these lists (docs/results-schema.md); "basis" is optional itself.
_ENTRIES: dict[str, dict[str, Check]] = {
    "projection": {"task": _INT, "group": _STRING, "rank": _INT, "dim": _INT, "leak": _NUMBER_OR_NULL},
    "timings": {"task": _INT, "train_s": _NUMBER, "eval_s": _NUMBER, "basis_s": _NUMBER, "setup_s": _NUMBER,
                "checkpoint_s": _NUMBER, "steps": _INT, "train_images_per_s": _NUMBER_OR_NULL},
    "basis": {"task": _INT, "group": _STRING, "rank_after": _INT, "dim": _INT},
}
# Timing fields added later: files written before them lack them.
_MAY_LACK = frozenset({"setup_s", "checkpoint_s"})
_METRICS: dict[str, Check] = {"final_acc": _NUMBER_OR_NULL, "avg_inc_acc": _NUMBER_OR_NULL,
                              "forgetting": _NUMBER_OR_NULL, "bwt": _NUMBER_OR_NULL, "num_tasks_done": _INT}
# Config sections the report reads keys from (grouping, labels, published numbers).
_CONFIG_SECTIONS = ("data", "backbone", "train", "pgp", "method")


def check_results(r: Results, path: Path) -> None:
    """Raise :class:`ResultsError` naming ``path`` and the first bad field of ``r``."""
    problem = _check_setting(r) or _check_config(r.config) or _check_metrics(r.metrics) or _check_entries(r)
    if problem:
        raise ResultsError(f"results file {path} is malformed: {problem}; rerun or restore it")


def _check_setting(r: Results) -> str | None:
    settings = get_args(Setting)
    return None if r.setting in settings else f"setting {_show(r.setting)} is not one of {', '.join(settings)}"


def _check_config(config: dict[str, Any]) -> str | None:
    if "data" not in config:
        return "config lacks 'data'"
    for key in _CONFIG_SECTIONS:
        if key in config and not isinstance(config[key], dict):
            return f"config.{key} is {_show(config[key])}, expected an object"
    return _check_fields(config["data"], {"dataset": _STRING}, "config.data")


def _check_metrics(metrics: dict[str, Any]) -> str | None:
    for setting, m in metrics.items():
        if setting not in EVAL_SETTINGS:
            return f"metrics has unknown setting '{setting}' (expected {', '.join(EVAL_SETTINGS)})"
        if m is not None:
            problem = _check_fields(m, _METRICS, f"metrics.{setting}")
            if problem:
                return problem
    return None


def _check_entries(r: Results) -> str | None:
    basis = r.extra.get("basis", [])
    if not isinstance(basis, list):
        return f"basis is {_show(basis)}, expected a list"
    for key, entries in (("projection", r.projection), ("timings", r.timings), ("basis", basis)):
        for i, entry in enumerate(entries):
            problem = _check_fields(entry, _ENTRIES[key], f"{key}[{i}]")
            if problem:
                return problem
    return None


def _check_fields(obj: Any, fields: dict[str, Check], where: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{where} is {_show(obj)}, expected an object"
    for name, (expected, ok) in fields.items():
        if name not in obj:
            if name in _MAY_LACK:
                continue
            return f"{where} lacks '{name}'"
        if not ok(obj[name]):
            return f"{where}.{name} is {_show(obj[name])}, expected {expected}"
    return None


def _show(value: Any, limit: int = 40) -> str:
    # JSON spelling (null, "x"), as in the file; one short line even for a whole list where a number belongs.
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
