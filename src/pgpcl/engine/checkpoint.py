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
``weights_sha256`` the backbone file's hash: a resume checks all three against what it rebuilds.
"""

from __future__ import annotations

import json
import random
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
    try:
        state = safe_torch_load(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the run folder") from None
    except Exception as e:  # corrupt zip, truncated file, pickled code
        msg = torch_load_reason(e)
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({msg}); delete it to fall back to the previous checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} is not a pgpcl checkpoint (version {CHECKPOINT_VERSION}); delete it or "
            "give the run folder it came from"
        )
    return state


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
        if state.get("version") != CHECKPOINT_VERSION or "position" not in state:
            raise CheckpointError(
                f"checkpoint {path} was written by an older pgpcl and cannot be resumed; start a new run"
            )
        found.append((position_key(state), path, state))
    if not found:
        return None
    _, path, state = max(found, key=lambda f: f[0])
    return path, state


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
