"""Run folders: never overwrite a run unless told to; resume one instead.

A run folder holds ``config.yaml`` (the resolved config), ``results.json`` (status running / complete /
failed) and ``checkpoints/``. ``check_run_dir`` only reads, so a bad command fails before anything is
written; ``prepare_run_dir`` clears an old run only once the new one is ready to start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pgpcl.errors import PgpclError


def run_status(run_dir: Path) -> str | None:
    """'complete', 'running', 'failed', 'unreadable', or None when the folder holds no run."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("status", "unreadable")
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def check_run_dir(run_dir: Path, *, overwrite: bool) -> str | None:
    """Refuse a folder that holds a run unless ``overwrite``; writes nothing. Returns its status."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PgpclError(f"{run_dir} is a file, not a folder; choose another --run-dir")
    status = run_status(run_dir)
    if status is None and any((run_dir / "checkpoints").glob("*.pt")):
        status = "no results.json, but checkpoints"
    if status is not None and not overwrite:
        what = "a finished run" if status == "complete" else f"an unfinished run (status: {status})"
        resume = "" if status == "complete" else f", 'pgpcl train --resume {run_dir}' to continue it"
        raise PgpclError(
            f"{run_dir} already holds {what}; pass --overwrite to replace it{resume}, or choose another "
            "folder with --run-dir or name=..."
        )
    return status


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> Path:
    """Check, then clear an old run's files (with ``overwrite``) and create the folder."""
    run_dir = Path(run_dir)
    status = check_run_dir(run_dir, overwrite=overwrite)
    if status is not None:
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / "results.json").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
