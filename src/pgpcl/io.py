"""Atomic file writes and hashing: a crash never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()
"""What open() would give a new file: mkstemp's temp files are 0600, which would leave every result
readable by its owner only, whatever the user's umask says."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power loss only once its folder is synced
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform or file system that cannot open folders: the rename is as durable as it gets
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (e.g. OpenAI's original CLIP ``.pt``), which holds code."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except OSError:
        return False


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, so no
    pickled code in the file ever runs. Errors are torch's; :func:`torch_load_reason` shortens them.

    A zip-format file's checksums are checked first (ValueError naming the entry): torch.load does not
    check them, so flipped bytes inside a tensor would load as wrong numbers.
    """
    import torch

    check_zip_checksums(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def check_zip_checksums(path: str | os.PathLike) -> None:
    """ValueError if ``path`` is a zip file (torch's format since 1.6) with an entry whose CRC-32 does not
    match its bytes; nothing for other files (torch.load judges those). An entry recorded with CRC 0 is
    not checked: torch writes 0 for every entry when saved with
    ``torch.serialization.set_crc32_options(False)``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                try:
                    with z.open(info) as f:  # reading to the end checks the CRC
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    raise ValueError(f"damaged file: entry '{info.filename}' fails its checksum") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        return  # not a (whole) zip file: torch.load gives its own reason


def torch_load_reason(e: BaseException, limit: int = 160) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words for a one-line message.

    torch wraps the cause in several lines of advice (including re-running with weights_only=False,
    which pgpcl never does); keep only the cause, e.g. "refused pickled code or objects: posix.system;
    ..." or "not a torch file of tensors: Unsupported operand 103".
    """
    text = str(e).strip()
    if not text:
        return type(e).__name__
    if text.startswith("Weights only load failed"):
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            reason = f"refused pickled code or objects: {refused.group(1)}; pgpcl loads tensors only"
        else:
            cause = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
            detail = " ".join(cause.group(1).split()) if cause else "unsupported content"
            reason = f"not a torch file of tensors: {detail}"
    else:
        reason = text.splitlines()[0].split(". ")[0].rstrip(".")
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
