"""Run folders: never overwrite a run unless told to; resume one instead.

A run folder holds ``config.yaml`` (the resolved config), ``results.json`` (status running / complete /
failed) and ``checkpoints/``. ``check_run_dir`` only reads, so a bad command fails before anything is
written; ``prepare_run_dir`` clears an old run only once the new one is ready to start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
from pathlib import Path

from pgpcl.engine.results import RESULTS_FILENAME
from pgpcl.errors import PgpclError


def run_status(run_dir: Path) -> str | None:
    """'complete', 'running', 'failed', 'unreadable', or None when the folder holds no run."""
    path = Path(run_dir) / RESULTS_FILENAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("status", "unreadable")
    except (OSError, ValueError, AttributeError):
        return "unreadable"


LOCK_FILE = ".pgpcl.lock"
_held: dict[Path, int] = {}  # run folder -> fd of its lock file, for the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock fds. An flock belongs to the open
    file, which a fork shares, so workers that outlive a killed trainer by seconds (until torch's
    watchdog ends them) would keep its folder locked and refuse an immediate ``--resume``."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def real_path(run_dir: Path) -> Path:
    """The folder ``run_dir`` will be once created: ``new/../old`` is ``old``, which may hold a run."""
    return Path(os.path.realpath(run_dir))


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir`` for this process until :func:`unlock_run_dir` (or the process ends).

    Two processes writing one run folder would interleave checkpoints and results; the second is
    refused. The folder must exist. Taking a lock this process already holds is a no-op.
    """
    run_dir = real_path(run_dir)
    if run_dir in _held:
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise PgpclError(f"cannot write {run_dir} ({e.strerror}); choose a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise PgpclError(
            f"{run_dir} is in use by another pgpcl process (pid {owner}); wait for it to end, or choose "
            "another folder with --run-dir or name=..."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(real_path(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing releases the flock


def discard_new_run_dir(run_dir: Path) -> None:
    """After a set-up that wrote nothing of the run (a full disk at the first write): remove the lock
    file and the folders :func:`prepare_run_dir` created, as long as they hold nothing else."""
    run_dir = real_path(run_dir)
    top = _created.pop(run_dir, None)
    if top is None:
        return
    if [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
    folder = run_dir
    while True:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        if folder == top:
            return
        folder = folder.parent


def _refuse_a_file(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise PgpclError(f"{run_dir} is a file, not a folder; choose another --run-dir")
    try:
        os.stat(run_dir)
    except OSError as e:
        if e.errno == errno.ELOOP:  # else mkdir says 'File exists'
            raise PgpclError(f"{run_dir} is a loop of symbolic links; point it at a folder, or choose another "
                             "--run-dir") from None


def check_run_dir(run_dir: Path, *, overwrite: bool) -> str | None:
    """Refuse a folder that holds a run unless ``overwrite``; writes nothing. Returns its status."""
    run_dir = real_path(run_dir)
    _refuse_a_file(run_dir)
    status = run_status(run_dir)
    if status is None and any((run_dir / "checkpoints").glob("*.pt")):
        status = "no results.json, but checkpoints"
    if status is not None and not overwrite:
        what = "a finished run" if status == "complete" else f"an unfinished run (status: {status})"
        resume = "" if status == "complete" else f", pgpcl train --resume {shlex.quote(str(run_dir))} to continue it"
        raise PgpclError(
            f"{run_dir} already holds {what}; pass --overwrite to replace it{resume}, or choose another "
            "folder with --run-dir or name=..."
        )
    return status


_created: dict[Path, Path] = {}  # run folder -> the topmost folder prepare_run_dir created for it


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> Path:
    """Create and lock the folder, check it, then clear an old run's files (with ``overwrite``)."""
    run_dir = real_path(run_dir)
    _refuse_a_file(run_dir)  # before mkdir, which would fail on it with a less helpful error
    top = None
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        top = folder
    run_dir.mkdir(parents=True, exist_ok=True)
    if top is not None:
        _created[run_dir] = top
    lock_run_dir(run_dir)  # before the check: another process may be starting a run here right now
    try:
        status = check_run_dir(run_dir, overwrite=overwrite)
    except PgpclError:
        unlock_run_dir(run_dir)
        raise
    if status is not None:
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / RESULTS_FILENAME).unlink(missing_ok=True)
    return run_dir
