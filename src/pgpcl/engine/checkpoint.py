"""Per-task checkpoints: the trainable state and the projection memory, never the frozen backbone.

Files are written atomically and loaded with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pgpcl.errors import CheckpointError
from pgpcl.io import atomic_torch_save

CHECKPOINT_VERSION = 1


def checkpoint_path(run_dir: Path, task: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"task{task:03d}.pt"


def save_task_checkpoint(run_dir: Path, task: int, method, pgp, results) -> Path:
    state = {
        "version": CHECKPOINT_VERSION,
        "task": task,
        "method": method.trainable_state_dict(),
        "pgp": pgp.state_dict() if pgp is not None else None,
        "acc": results.acc,
    }
    path = checkpoint_path(run_dir, task)
    atomic_torch_save(path, state)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    files = sorted((Path(run_dir) / "checkpoints").glob("task*.pt"))
    return files[-1] if files else None


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the run folder") from None
    except Exception as e:  # corrupt zip, truncated file, pickled code
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({msg}); delete it to fall back to the previous task") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a pgpcl v{CHECKPOINT_VERSION} checkpoint")
    return state
