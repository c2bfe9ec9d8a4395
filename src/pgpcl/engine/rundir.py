"""Run folders: never overwrite a finished run unless told to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pgpcl.errors import PgpclError


def run_status(run_dir: Path) -> str | None:
    """'complete', 'running', 'failed', 'unreadable', or None when the folder holds no run."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("status", "unreadable")
    except (OSError, ValueError):
        return "unreadable"


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> Path:
    run_dir = Path(run_dir)
    status = run_status(run_dir)
    if status is not None and not overwrite:
        what = "a finished run" if status == "complete" else f"an unfinished run (status: {status})"
        raise PgpclError(
            f"{run_dir} already holds {what}; pass --overwrite to replace it, --run-dir/name=... for a new "
            "folder, or --resume to continue it"
        )
    if status is not None and overwrite:
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / "results.json").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
