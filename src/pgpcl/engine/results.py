"""The per-run ``results.json`` file (schema version 1, documented in docs/results-schema.md).

The engine creates one :class:`Results` with :func:`new_results`, fills accuracies, timings and
projection statistics as tasks finish, and rewrites the file atomically after each task with
:func:`write_results`, so a crash leaves the last complete state behind. :func:`read_results` validates
what it reads; a malformed file raises :class:`ResultsError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, get_args

from pgpcl.engine.metrics import summarize, tasks_done, validate_matrix
from pgpcl.errors import PgpclError, describe
from pgpcl.io import atomic_write_json

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"
STATUSES = ("running", "complete", "failed")
EVAL_SETTINGS = ("cil", "til")

# Top-level keys every schema-1 file must have, with the JSON types they must hold.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "status": (str,),
    "run_name": (str,),
    "method": (str,),
    "pgp": (bool,),
    "setting": (str,),
    "config": (dict,),
    "seed": (int,),
    "class_order": (list,),
    "task_classes": (list,),
    "class_names": (list,),
    "versions": (dict,),
    "weights": (dict,),
    "device": (str,),
    "acc": (dict,),
    "metrics": (dict,),
    "timings": (list,),
    "projection": (list,),
    "created": (str,),
    "updated": (str,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {"error": (str, type(None)), "domain_names": (list,)}

# Distribution name, module name: metadata first (no import needed), else an already-imported module.
_VERSIONED = {
    "torch": ("torch", "torch"),
    "torchvision": ("torchvision", "torchvision"),
    "timm": ("timm", "timm"),
    "numpy": ("numpy", "numpy"),
    "open_clip": ("open_clip_torch", "open_clip"),
}


class ResultsError(PgpclError):
    """A results file is missing, unreadable or does not follow the schema."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of pgpcl, Python and the installed libraries that affect results (absent ones left out)."""
    from pgpcl import __version__

    versions = {"pgpcl": __version__, "python": platform.python_version()}
    for key, (dist, module) in _VERSIONED.items():
        v = _installed_version(dist, module)
        if v is not None:
            versions[key] = v
    return versions


def _installed_version(dist: str, module: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        mod = sys.modules.get(module)
        return getattr(mod, "__version__", None) if mod is not None else None


def _entry_label(entry: str) -> str:
    """A ``data.datasets`` / ``data.domains`` entry as a report shows it: the reader's name (``svhn`` for
    ``svhn=/data/svhn``), except for an image folder, whose own name says more (``photo`` for
    ``image_folder=/data/photo``)."""
    name, sep, path = entry.partition("=")
    if not sep or name.strip() == "image_folder":
        return (path if sep else name).strip().rstrip("/").rsplit("/", 1)[-1]
    return name.strip()


def empty_matrix(num_tasks: int) -> list[list[float | None]]:
    return [[None] * num_tasks for _ in range(num_tasks)]


@dataclass
class Results:
    """One run's results; field meanings are in docs/results-schema.md."""

    run_name: str
    method: str
    pgp: bool
    setting: str
    config: dict[str, Any]
    seed: int
    class_order: list[int] = field(default_factory=list)
    task_classes: list[list[int]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    domain_names: list[str] | None = None
    """DIL: the domain each task trains on, in task order; None (and left out of the file) otherwise."""
    versions: dict[str, str] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=lambda: {"source": None, "sha256": None})
    device: str = "cpu"
    acc: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)
    projection: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    error: str | None = None
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys a newer writer added that this version does not know; kept so a rewrite preserves them."""

    @property
    def num_tasks(self) -> int:
        return len(self.acc["cil"])

    @property
    def dataset(self) -> str:
        """``data.dataset``; for a run over ``data.domains`` or ``data.datasets``, those joined by '+'."""
        data = self.config.get("data", {})
        for key in ("datasets", "domains"):
            listed = data.get(key) if isinstance(data, dict) else None
            if isinstance(listed, list) and listed:
                return "+".join(_entry_label(str(d)) for d in listed)
        return str(data.get("dataset", "?"))

    def set_acc(self, setting: str, i: int, t: int, value: float) -> None:
        """Record accuracy (%) on task ``i`` after training task ``t`` for ``cil`` or ``til``."""
        if not 0 <= i <= t < self.num_tasks:
            raise IndexError(f"need 0 <= i <= t < {self.num_tasks}, got i={i}, t={t}")
        if self.acc.get(setting) is None:
            raise KeyError(f"this run stores no '{setting}' accuracies")
        self.acc[setting][i][t] = float(value)

    def refresh_metrics(self) -> None:
        self.metrics = {s: None if m is None else summarize(m) for s, m in self.acc.items()}

    def add_timing(
        self, task: int, train_s: float, eval_s: float, basis_s: float, steps: int, train_images: int,
        setup_s: float = 0.0, checkpoint_s: float = 0.0,
    ) -> None:
        rate = train_images / train_s if train_s > 0 else None
        self.timings.append(
            {"task": task, "train_s": float(train_s), "eval_s": float(eval_s), "basis_s": float(basis_s),
             "setup_s": float(setup_s), "checkpoint_s": float(checkpoint_s), "steps": int(steps),
             "train_images_per_s": rate}
        )

    def add_projection(self, task: int, group: str, rank: int, dim: int, leak: float | None) -> None:
        self.projection.append(
            {"task": task, "group": group, "rank": int(rank), "dim": int(dim),
             "leak": None if leak is None else float(leak)}
        )

    def mark(self, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.status, self.error = status, error

    def to_dict(self) -> dict[str, Any]:
        order = ["schema_version", "status", "error", *[k for k in _REQUIRED if k not in ("schema_version", "status")]]
        if self.domain_names is not None:
            order.insert(order.index("class_names") + 1, "domain_names")
        return _plain({**{k: getattr(self, k) for k in order}, **self.extra})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Results:
        """Build from a validated dict (see :func:`validate_results`)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})


def new_results(
    config: Any,
    *,
    num_tasks: int,
    class_order: list[int] | None = None,
    task_classes: list[list[int]] | None = None,
    class_names: list[str] | None = None,
    domain_names: list[str] | None = None,
    weights: dict[str, Any] | None = None,
    device: str = "cpu",
    eval_til: bool = True,
) -> Results:
    """A fresh ``running`` results record for ``config`` (a Config or its ``to_dict()``).

    ``eval_til=False`` stores ``acc.til = null`` for settings where task-restricted evaluation means
    nothing (e.g. domain-incremental, where every task has the same classes).
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    acc = {"cil": empty_matrix(num_tasks), "til": empty_matrix(num_tasks) if eval_til else None}
    r = Results(
        run_name=str(cfg.get("name", "run")),
        method=str(cfg.get("method", {}).get("name", "?")),
        pgp=bool(cfg.get("pgp", {}).get("enabled", False)),
        setting=str(cfg.get("data", {}).get("setting", "cil")),
        config=cfg,
        seed=int(cfg.get("seed", 0)),
        class_order=list(class_order or []),
        task_classes=[list(c) for c in task_classes or []],
        class_names=list(class_names or []),
        domain_names=None if domain_names is None else [str(n) for n in domain_names],
        versions=package_versions(),
        weights=dict(weights or {"source": None, "sha256": None}),
        device=str(device),
        acc=acc,
    )
    r.refresh_metrics()
    return r


# ----------------------------------------------------------------------------------------------------
# Plain JSON values and validation


def _plain(obj: Any) -> Any:
    """Convert numpy/torch scalars, tuples and paths to JSON types (json.dumps rejects e.g. float32)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a results file")


def _nonfinite(obj: Any, where: str = "") -> str | None:
    """Path of the first NaN/inf number in ``obj`` (or an integer too large for a float), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "value"
    if isinstance(obj, int) and abs(obj) > sys.float_info.max:  # JSON allows it; float(obj) overflows
        return where or "value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        sub = f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{k}" if where else str(k))
        found = _nonfinite(v, sub)
        if found:
            return found
    return None


def validate_results(d: Any) -> str | None:
    """The first problem with results dict ``d`` as one phrase, or None when it is valid."""
    if not isinstance(d, dict):
        return f"the top level is a {type(d).__name__}, not an object"
    version = d.get("schema_version")
    if "schema_version" not in d:
        return "missing key schema_version"
    if type(version) is not int or version != SCHEMA_VERSION:
        return f"schema_version {version!r} is not {SCHEMA_VERSION}, the version this pgpcl reads"
    return _check_keys(d) or _check_values(d) or _check_acc(d) or _check_fields_of(d)


def _check_keys(d: dict[str, Any]) -> str | None:
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key, types in {**_REQUIRED, **_OPTIONAL}.items():
        if key in d and (not isinstance(d[key], types) or (bool not in types and isinstance(d[key], bool))):
            return f"key '{key}' has type {type(d[key]).__name__}, expected {types[0].__name__}"
    return None


def _check_values(d: dict[str, Any]) -> str | None:
    if d["status"] not in STATUSES:
        return f"status {d['status']!r} is not one of {', '.join(STATUSES)}"
    bad = _nonfinite(d)
    if bad:
        return f"{bad} is not a finite number"
    for key in ("timings", "projection"):
        if not all(isinstance(x, dict) for x in d[key]):
            return f"every entry of '{key}' must be an object"
    if not all(isinstance(c, list) for c in d["task_classes"]):
        return "every entry of 'task_classes' must be a list of class ids"
    return None


def _check_acc(d: dict[str, Any]) -> str | None:
    acc = d["acc"]
    if not isinstance(acc.get("cil"), list):
        return "acc.cil must be an accuracy matrix"
    sizes = {}
    for s, m in acc.items():
        if s not in EVAL_SETTINGS:
            return f"acc has unknown setting '{s}' (expected {', '.join(EVAL_SETTINGS)})"
        if m is None:
            continue
        try:
            sizes[s] = validate_matrix(m)
        except (ValueError, TypeError) as e:
            return f"acc.{s}: {e}"
    return _check_sizes(d, sizes)


def _check_sizes(d: dict[str, Any], sizes: dict[str, int]) -> str | None:
    T = sizes["cil"]
    if any(n != T for n in sizes.values()):
        return f"acc matrices have different sizes {sizes}"
    if d["task_classes"] and len(d["task_classes"]) != T:
        return f"task_classes lists {len(d['task_classes'])} tasks but acc.cil has {T}"
    names = d.get("domain_names")
    if names is not None and (len(names) != T or not all(isinstance(n, str) for n in names)):
        return f"domain_names must be {T} strings, one per task, got {names!r:.80}"
    if d["status"] == "complete":
        for s, m in d["acc"].items():
            if m is not None and tasks_done(m) != T:
                return f"status is complete but acc.{s} has {tasks_done(m)} of {T} tasks filled"
    return None


# Fields of the list entries and sections a report reads (docs/results-schema.md): checked here, on every
# read and write, so a damaged file is one line naming the field, not a traceback or a silent "?".
Check = tuple[str, Callable[[Any], bool]]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_INT: Check = ("an integer", lambda v: type(v) is int)
_NUMBER: Check = ("a number", _is_number)
_NUMBER_OR_NULL: Check = ("a number or null", lambda v: v is None or _is_number(v))
_STRING: Check = ("a string", lambda v: isinstance(v, str))
_ENTRIES: dict[str, dict[str, Check]] = {
    "projection": {"task": _INT, "group": _STRING, "rank": _INT, "dim": _INT, "leak": _NUMBER_OR_NULL},
    "timings": {"task": _INT, "train_s": _NUMBER, "eval_s": _NUMBER, "basis_s": _NUMBER, "setup_s": _NUMBER,
                "checkpoint_s": _NUMBER, "steps": _INT, "train_images_per_s": _NUMBER_OR_NULL},
    "basis": {"task": _INT, "group": _STRING, "rank_before": _INT, "rank_after": _INT, "dim": _INT,
              "energy_captured": _NUMBER, "rows": _INT},
}
_MAY_LACK = frozenset({"setup_s", "checkpoint_s"})  # timing fields added later: older files lack them
_METRICS: dict[str, Check] = {"final_acc": _NUMBER_OR_NULL, "avg_inc_acc": _NUMBER_OR_NULL,
                              "forgetting": _NUMBER_OR_NULL, "bwt": _NUMBER_OR_NULL, "num_tasks_done": _INT}
_CONFIG_SECTIONS = ("data", "backbone", "train", "pgp", "method")


def _check_fields_of(d: dict[str, Any]) -> str | None:
    return _check_setting(d) or _check_config(d["config"]) or _check_metrics(d["metrics"]) or _check_entries(d)


def _check_setting(d: dict[str, Any]) -> str | None:
    from pgpcl.config import Setting

    settings = get_args(Setting)
    setting = d.get("setting")
    return None if setting in settings else f"setting {_show(setting)} is not one of {', '.join(settings)}"


def _check_config(config: dict[str, Any]) -> str | None:
    if "data" not in config:
        return "config lacks 'data'"
    for key in _CONFIG_SECTIONS:
        if key in config and not isinstance(config[key], dict):
            return f"config.{key} is {_show(config[key])}, expected an object"
    method = config.get("method")
    if isinstance(method, dict) and "name" in method and not isinstance(method["name"], str):
        return f"config.method.name is {_show(method['name'])}, expected a string"
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


def _check_entries(d: dict[str, Any]) -> str | None:
    basis = d.get("basis", [])
    if not isinstance(basis, list):
        return f"basis is {_show(basis)}, expected a list"
    for key, entries in (("projection", d["projection"]), ("timings", d["timings"]), ("basis", basis)):
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


# ----------------------------------------------------------------------------------------------------
# Files


def write_results(path: str | Path, results: Results | dict[str, Any]) -> None:
    """Validate and write ``results`` atomically.

    A :class:`Results` object gets its ``metrics`` recomputed from ``acc`` and ``updated`` stamped first,
    so the file never holds stale metrics. Invalid content raises ValueError (a bug in the caller).
    """
    if isinstance(results, Results):
        results.refresh_metrics()
        results.updated = now_iso()
        d = results.to_dict()
    else:
        d = _plain(results)
    problem = validate_results(d)
    if problem:
        raise ValueError(f"refusing to write invalid results to {path}: {problem}")
    atomic_write_json(path, d)


def read_results(path: str | Path) -> Results:
    """Read and validate a results file, its metrics recomputed from ``acc``; raises :class:`ResultsError`
    on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"results file {path} not found; check the path or rerun the run") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"results file {path} cannot be read ({describe(e)}); rerun or restore it") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"results file {path} is not valid JSON: {e}; rerun or restore it") from None
    problem = validate_results(d)
    if problem:
        raise ResultsError(f"results file {path} is malformed: {problem}; rerun or restore it")
    problem = _foreign_config(path, d["config"])
    if problem:
        raise ResultsError(f"results file {path} is not this run's: {problem}; rerun or restore it")
    r = Results.from_dict(d)
    r.refresh_metrics()  # derived from acc: a hand-edited or stale copy must not reach a reader
    return r


def _foreign_config(path: Path, config: dict[str, Any]) -> str | None:
    """Where a run folder's results.json disagrees with its config.yaml in a key that changes the numbers
    (a file copied in from another run), else None. An unreadable config.yaml is left to the commands that
    load it: each has its own message for that."""
    import yaml

    from pgpcl.config import config_difference, with_legacy_values

    beside = path.parent / "config.yaml"
    if path.name != RESULTS_FILENAME or not beside.is_file():
        return None
    try:
        own = yaml.safe_load(beside.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(own, dict):
        return None
    # A key only one of them has is no evidence (written by different pgpcl versions): the shared keys are
    # compared. with_defaults would fill the gaps, but it imports every method, and torch, into pgpcl report.
    diff = config_difference(with_legacy_values(own), with_legacy_values(config), shared_only=True)
    if diff is None:
        return None
    key, run_value, file_value = diff
    return (f"its config differs from {beside} in {key} (config.yaml has {run_value!r}, results.json has "
            f"{file_value!r}), as if copied from another run")


def find_results(path: str | Path) -> Path:
    """The results file of a run: ``path`` itself if it is a file, else ``path/results.json``."""
    path = Path(path)
    if path.is_file():
        return path
    candidate = path / RESULTS_FILENAME
    if path.is_dir() and candidate.is_file():
        return candidate
    if path.is_dir():
        raise ResultsError(f"no {RESULTS_FILENAME} in {path}; give a run directory or a results file")
    raise ResultsError(f"{path} does not exist; give a run directory or a {RESULTS_FILENAME} path")


def collect_results(paths: list[str | Path]) -> list[Path]:
    """Results files under ``paths``: files as given, run dirs, or folders searched recursively."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / RESULTS_FILENAME).is_file():
            below = sorted(p.rglob(RESULTS_FILENAME))
            if not below:
                raise ResultsError(f"no {RESULTS_FILENAME} under {p}; give run directories or results files")
            found.extend(below)
        else:
            found.append(find_results(p))
    if not found:
        raise ResultsError("no results paths given; pass run directories or results files")
    return list(dict.fromkeys(f.resolve() for f in found))
