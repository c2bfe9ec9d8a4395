"""Checkpoints: everything needed to continue a run, never the frozen backbone.

Files in ``RUN_DIR/checkpoints/``, written atomically (temp file, fsync, rename) and read with
``torch.load(weights_only=True)`` only, so no pickled code ever runs:

- ``taskNNN.pt``: after task NNN was trained, evaluated and recorded; the state to start task NNN+1
  from. Kept; ``pgpcl eval`` reads the newest.
- ``last.pt``: a mid-task state, written every ``train.checkpoint_every`` steps, at the end of each
  task's training and on Ctrl+C; removed once the task's own file exists.

Contents (version 2, plain tensors / numbers / strings only):

``position``       {"task", "stage": "start" | "train", "step"}: where to continue. "start": task
                   ``task`` has not begun; "train": ``step`` optimizer steps of task ``task`` are done
                   (the data order is a function of (seed, task, epoch), so the position says which
                   batches to skip).
``method``         trainable parameters (``Method.trainable_state_dict``); ``method_extra``: buffers and
                   extra state of the method, if any.
``optimizer``, ``scheduler``   mid-task only (both are re-created every task).
``pgp``            the subspace memory (all bases), ``pgp_task_start``: the projector's task-start
                   snapshot (for the task's leak), ``basis_log``: JSON of the basis updates so far.
``rng``            python, numpy, torch (and CUDA) generator states.
``results``        JSON of the results record so far (accuracy matrix, timings, projection stats).
``timing``         the running task's partial timings.
``config``         JSON of the resolved config; ``scenario``: class order, task classes and sizes;
``weights_sha256`` the backbone file's hash: a resume and ``pgpcl eval`` check all three against what they
                   rebuild (:func:`check_matches_run`).
"""

from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgpcl.errors import CheckpointError
from pgpcl.io import atomic_torch_save, safe_torch_load, torch_load_reason

CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STAGES = ("start", "train")
LAST_NAME = "last.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, task: int) -> Path:
    return checkpoint_dir(run_dir) / f"task{task:03d}.pt"


def last_path(run_dir: Path) -> Path:
    return checkpoint_dir(run_dir) / LAST_NAME


def task_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(checkpoint_dir(run_dir).glob("task[0-9][0-9][0-9].pt"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest end-of-task checkpoint (what ``pgpcl eval`` evaluates), or None."""
    files = task_checkpoints(run_dir)
    return files[-1] if files else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    atomic_torch_save(path, {"version": CHECKPOINT_VERSION, **state})
    return Path(path)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, its structure checked (see :func:`check_structure`)."""
    path = Path(path)
    try:
        state = safe_torch_load(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the run folder") from None
    except Exception as e:  # corrupt zip, truncated file, pickled code
        msg = torch_load_reason(e)
        if not zipfile.is_zipfile(path) and not msg.startswith("refused"):  # torch: "[Errno 22]", "EOFError", "101"
            msg = f"truncated or not a checkpoint: {path.stat().st_size} bytes with no complete zip archive"
        raise CheckpointError(f"checkpoint {path} cannot be read ({msg}); {delete_fix(path)}") from None
    check_version(path, state)
    check_structure(path, state)
    return state


def delete_fix(path: Path) -> str:
    """The advice for a bad checkpoint file: delete it, and what that leads to."""
    if any(p.name != Path(path).name for p in Path(path).parent.glob("*.pt")):
        return "delete it to fall back to the previous checkpoint"
    return "delete it (it is the run's only checkpoint, so --resume then trains from the start)"


def method_extra_state(method: torch.nn.Module) -> dict[str, Any]:
    """The method's state that is not a parameter (buffers, extra state), as copies: ``method_extra``."""
    params = {n for n, _ in method.named_parameters()}
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in method.state_dict().items() if k not in params}


def load_method_state(method: torch.nn.Module, state: dict, path: Path) -> None:
    """The checkpoint's trained parameters (``method``) and the method's other state (``method_extra``)
    into ``method``; CheckpointError naming the file if they do not fit the method the run's config
    builds."""
    fix = (f"{delete_fix(path)}, or give the run folder it came from (if every checkpoint of the run says "
           "this, the pgpcl that wrote them reads them)")
    try:
        method.load_trainable_state_dict(state["method"])
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the method the run's config builds ({e}); {fix}") from None
    extra = state.get("method_extra") or {}
    own = method_extra_state(method)
    for k, v in extra.items():
        ok = k in own and (not isinstance(own[k], torch.Tensor) or
                           (isinstance(v, torch.Tensor) and v.shape == own[k].shape))
        if not ok:
            raise CheckpointError(f"checkpoint {path} holds method state '{k}' that does not fit the method the "
                                  f"run's config builds; {fix}")
    if extra:
        method.load_state_dict(extra, strict=False)


def check_version(path: Path, state: Any) -> None:
    version = state.get("version") if isinstance(state, dict) else None
    if _is_count(version) and version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by a newer pgpcl (version {version}; this pgpcl reads version "
            f"{CHECKPOINT_VERSION}); upgrade pgpcl to read it"
        )
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} is not a pgpcl checkpoint (no pgpcl version record); delete it or give the "
            "run folder it came from"
        )


# ----------------------------------------------------------------------------------------------------
# Structure: every field the trainer and eval read, so that a damaged file is one line, not a traceback


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_tensors(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _is(*types: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, types)


_NONE = type(None)
_SCENARIO_LABELS = {"class_order": "class order", "task_classes": "task split",
                    "train_sizes": "training images per task", "test_sizes": "test images per task"}
SCENARIO_KEYS = tuple(_SCENARIO_LABELS)
# (key, what it must be, check): what Trainer._state writes
_V1_FIELDS = (("task", "a task number", _is_count), ("method", "a dict of parameter tensors", _is_tensors))
_FIELDS = (
    *_V1_FIELDS,
    ("position", "a position record", _is(dict)),
    ("method_extra", "a dict", _is(dict)),
    ("optimizer", "an optimizer state or None", _is(dict, _NONE)),
    ("scheduler", "a scheduler state or None", _is(dict, _NONE)),
    ("pgp", "a subspace memory or None", _is(dict, _NONE)),
    ("pgp_task_start", "a snapshot or None", _is(dict, _NONE)),
    ("basis_log", "JSON text", _is(str)),
    ("rng", "a record of generator states", _is(dict)),
    ("results", "JSON text", _is(str)),
    ("timing", "a timing record or None", _is(dict, _NONE)),
    ("config", "JSON text", _is(str)),
    ("scenario", "a scenario record", _is(dict)),
    ("weights_sha256", "a sha256 or None", _is(str, _NONE)),
)
_POSITION = (("task", "a task number", _is_count), ("stage", f"one of {', '.join(STAGES)}", lambda v: v in STAGES),
             ("step", "a step count", _is_count))
_SCENARIO = tuple((key, "a list", _is(list)) for key in SCENARIO_KEYS)
_MID_TASK = (("optimizer", "an optimizer state (mid-task)", _is(dict)),
             ("timing", "a timing record (mid-task)", _is(dict)))


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged ({problem}); {delete_fix(path)}")


def _shown(v: Any) -> str:
    # a record or tensor would flood the one-line message: name its type instead
    return repr(v)[:40] if isinstance(v, (str, int, float, _NONE)) else f"a {type(v).__name__}"


def _check_fields(path: Path, record: dict, fields: tuple, prefix: str = "") -> None:
    for key, what, ok in fields:
        if key not in record:
            raise _damaged(path, f"'{prefix}{key}' is missing")
        if not ok(record[key]):
            raise _damaged(path, f"'{prefix}{key}' is {_shown(record[key])}, not {what}")


def check_structure(path: Path, state: dict) -> None:
    """Every field of a (version-checked) checkpoint has the type the trainer writes, and the trainable
    parameters are finite (the trainer never saves NaN / inf, so such a file was damaged later)."""
    if state["version"] == 1:  # before resume existed: the task and its trainable state only
        _check_fields(path, state, _V1_FIELDS)
    else:
        _check_fields(path, state, _FIELDS)
        _check_fields(path, state["position"], _POSITION, "position.")
        _check_fields(path, state["scenario"], _SCENARIO, "scenario.")
        if state["position"]["stage"] == "train":
            _check_fields(path, state, _MID_TASK)
    for name, value in state["method"].items():
        if not bool(torch.isfinite(value).all()):
            raise _damaged(path, f"parameter '{name}' holds NaN or infinite values")


def position_key(state: dict) -> tuple[int, int, int]:
    pos = state["position"]
    return int(pos["task"]), STAGES.index(pos["stage"]), int(pos["step"])


def describe(state: dict, num_tasks: int) -> str:
    """'after task 2/5' or 'task 3/5, step 40' for messages."""
    pos = state.get("position")
    if pos is None:
        return f"after task {int(state['task']) + 1}/{num_tasks}"
    if pos["stage"] == "start":
        return f"after task {int(pos['task'])}/{num_tasks}"
    return f"task {int(pos['task']) + 1}/{num_tasks}, step {int(pos['step'])}"


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The furthest resumable state in ``run_dir``: ``last.pt`` or the newest task file, or None.

    An unreadable file is an error (never silently skipped); delete it to fall back.
    """
    found = []
    for path in (last_path(run_dir), latest_checkpoint(run_dir)):
        if path is None or not path.exists():
            continue
        state = load_checkpoint(path)
        if state["version"] != CHECKPOINT_VERSION:  # no position: it cannot say where to continue
            raise CheckpointError(
                f"checkpoint {path} was written by an older pgpcl and cannot be resumed; start a new run"
            )
        found.append((position_key(state), path, state))
    if not found:
        return None
    _, path, state = max(found, key=lambda f: f[0])
    return path, state


# ----------------------------------------------------------------------------------------------------
# Does a checkpoint belong to the run? One check for ``pgpcl train --resume`` and ``pgpcl eval``


def scenario_record(scenario) -> dict:
    """What a checkpoint records of the scenario (and what a resume or eval compares it with)."""
    d = scenario.describe()
    return {**{k: d[k] for k in SCENARIO_KEYS}, "content_digest": scenario.content_digest()}


def weights_sha(method) -> str | None:
    """The sha256 of the method's backbone file; None for a backbone without one."""
    return getattr(getattr(method, "weights_info", None), "sha256", None)


def check_matches_run(path: Path, state: dict, *, config: dict, scenario: dict, weights_sha256: str | None,
                      pgp_enabled: bool, run_dir: Path) -> None:
    """CheckpointError unless ``state`` (from ``path``) was written by the run that ``config`` (the run's
    ``Config.to_dict()``), ``scenario`` (:func:`scenario_record`) and ``weights_sha256`` rebuild.

    Shapes alone would let a checkpoint of another seed, learning rate or class order through.
    Version 1 files recorded no config, scenario or weights: only the method and task count are checked.
    """
    if state["version"] != 1:
        _check_config(path, state, config, run_dir)
        _check_scenario(path, state["scenario"], scenario)
        _check_weights(state["weights_sha256"], weights_sha256, config)
    if (state.get("pgp") is None) == pgp_enabled:
        raise CheckpointError(f"checkpoint {path} does not match pgp.enabled; give the run folder it came from")
    num_tasks = len(scenario["task_classes"])
    if state["task"] >= num_tasks:
        raise CheckpointError(f"checkpoint {path} is after task {state['task'] + 1} but the run has {num_tasks} "
                              "tasks; it belongs to another run: give the run folder it came from")


def _check_config(path: Path, state: dict, config: dict, run_dir: Path) -> None:
    from pgpcl.config import config_difference, with_defaults

    then = from_json(state["config"], "config", path)
    if not isinstance(then, dict):
        raise _damaged(path, "its config record is not a mapping")
    # with_defaults: a key added to pgpcl since the checkpoint was written reads as its default
    diff = config_difference(with_defaults(then), config)
    if diff is not None:
        key, was, now = diff
        raise CheckpointError(
            f"checkpoint {path} was written with {key}={was!r} but the run's config.yaml now says "
            f"{now!r}; restore {Path(run_dir) / 'config.yaml'} (or, if the checkpoint was copied from another "
            "run, this run's own checkpoint) or start a new run"
        )


def _check_scenario(path: Path, then: dict, now: dict) -> None:
    for key, label in _SCENARIO_LABELS.items():
        if list(then[key]) != list(now[key]):
            raise CheckpointError(
                f"the dataset no longer matches checkpoint {path}: the {label} differs "
                f"({then[key]} then, {now[key]} now); restore the data the run started with"
            )
    if "content_digest" in then and then["content_digest"] != now["content_digest"]:  # recorded since 2026-12-02
        raise CheckpointError(
            f"the dataset no longer matches checkpoint {path}: the same classes and counts, but other images or "
            "labels (content digest differs); restore the data the run started with"
        )


def _check_weights(then: str | None, now: str | None, config: dict) -> None:
    if then != now:
        raise CheckpointError(
            f"the backbone weights differ from those the run started with (sha256 {str(then)[:12]} "
            f"then, {str(now)[:12]} now); restore backbone.weights={config['backbone']['weights']}"
        )


# ----------------------------------------------------------------------------------------------------
# Random generator states as plain tensors (weights_only-loadable)


def capture_rng() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss": py_gauss},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def to_json(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False)


def from_json(text: str, what: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: its {what} record is unreadable; delete the file") from None
