"""Writing a report folder as a whole: all of the new report, or nothing.

The files are first written into a hidden staging folder inside the output folder (same file system,
so moving them in is a rename) and only moved in once every one of them exists; a failure (disk
full, no permission, a file where the folder should be) leaves the folder as it was. The files the
previous report there listed in its ``summary.json`` and this one does not write (plots of groups no
longer reported, the other format's table) are then deleted, so the folder never mixes two reports;
files that no report listed are never touched: one the new report would replace is refused. A staging
folder that a killed report left behind (its process gone) is removed by the next report there.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pgpcl.errors import PgpclError

SUMMARY = "summary.json"
TABLES = ("table.txt", "table.md")
RUNS_CSV = "runs.csv"


def write_report_folder(out_dir: Path, write: Callable[[Path], list[str]]) -> list[Path]:
    """Call ``write(stage)``, which writes the report into the empty folder ``stage`` and returns the
    file names it wrote, then move those files into ``out_dir``; return their paths there."""
    created = _first_missing(out_dir)
    stage = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_stages(out_dir)
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out_dir))
        names = write(stage)
        previous = _previous_summary(out_dir)
        owned = _files_of(previous)
        stale = owned - set(names)
        _refuse_foreign(out_dir, names, owned | _fixed_names_of_old_report(previous))
        _move_in(stage, out_dir, names)
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
    except BaseException as e:
        _remove_created(out_dir, created, stage)
        if isinstance(e, OSError):
            raise write_error(out_dir, e) from None
        raise
    stage.rmdir()
    return [out_dir / name for name in names]


STAGE_PREFIX = ".pgpcl-report-"


def _remove_abandoned_stages(out_dir: Path) -> None:
    """Staging folders that a killed report left behind (SIGKILL, power loss): those whose process is
    gone. One of a report still writing here (its process alive) is left alone."""
    for stage in out_dir.glob(f"{STAGE_PREFIX}*"):
        pid = stage.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if stage.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def write_error(out_dir: Path, e: OSError) -> PgpclError:
    reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or str(e)
    return PgpclError(f"cannot write the report to {out_dir} ({reason}); "
                      "choose a writable folder with --out or free disk space")


def _previous_summary(out_dir: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of the report already in ``out_dir``, or None (none, or not a pgpcl one)."""
    try:
        d = json.loads((out_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and "report_version" in d else None


def _files_of(summary: dict[str, Any] | None) -> set[str]:
    """Names of the files the report with ``summary`` wrote (empty for None)."""
    return set() if summary is None else {name for name in _listed(summary) if _is_report_file(name)}


def _refuse_foreign(out_dir: Path, names: list[str], owned: set[str]) -> None:
    """PgpclError if a file the new report would replace was not written by the report there."""
    for name in names:
        if name not in owned and (out_dir / name).is_file():
            raise PgpclError(f"{out_dir / name} exists and no pgpcl report wrote it; move it away or choose "
                             "another folder with --out")


def _listed(d: dict[str, Any]) -> Iterable[Any]:
    if isinstance(d.get("files"), list):
        return d["files"]
    # Summaries written before "files" existed name their plots only (and were themselves written).
    groups = d.get("groups") if isinstance(d.get("groups"), list) else []
    plots = [g.get("plots") for g in groups if isinstance(g, dict) and isinstance(g.get("plots"), list)]
    return [name for names in plots for name in names] + [d.get("curves_plot"), SUMMARY]


def _fixed_names_of_old_report(summary: dict[str, Any] | None) -> set[str]:
    """The tables, when ``summary`` is of a report from before summaries listed their files: one of them
    is that report's, so a new one may replace it; neither is deleted, since which one is not known."""
    old = summary is not None and not isinstance(summary.get("files"), list)
    return set(TABLES) if old else set()


def _is_report_file(name: Any) -> bool:
    # A damaged or hand-edited summary must not make the report delete anything outside its own files.
    if not isinstance(name, str) or name != Path(name).name or name.startswith("."):
        return False
    return name.endswith(".png") or name in (*TABLES, SUMMARY, RUNS_CSV)


def _move_in(stage: Path, out_dir: Path, names: list[str]) -> None:
    # A folder in the way would stop the moves half-way, so look for one before moving anything.
    for name in names:
        if (out_dir / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, f"{name} is a folder", str(out_dir / name))
    for name in names:
        os.replace(stage / name, out_dir / name)


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (the first one mkdir will create)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _remove_created(out_dir: Path, created: Path | None, stage: Path | None) -> None:
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    if created is None:
        return
    for p in (out_dir, *out_dir.parents):
        try:
            p.rmdir()  # only empty folders: whatever someone else put there stays
        except OSError:
            return
        if p == created:
            return
