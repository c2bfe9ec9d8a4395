"""User-facing errors.

Anything a user can cause (bad config, missing data, corrupt files) raises :class:`PgpclError` with a
one-line message that names the problem and the fix. The CLI prints it without a traceback and exits 2.
"""

import re


class PgpclError(Exception):
    """An error caused by user input; its message is shown as is, on one line."""


class ConfigError(PgpclError):
    """Invalid configuration: unknown key, wrong type, out-of-range value."""


class DataError(PgpclError):
    """Missing, partial or malformed dataset files, or an impossible split."""


class CheckpointError(PgpclError):
    """Unreadable, corrupt or mismatched checkpoint or weights file."""


def first_line(text: object, limit: int = 200) -> str:
    """The first line of an exception's text, shortened to ``limit`` characters (messages stay on one line)."""
    text = str(text).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(e: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """``e`` on one line for a message: the first line of its text ('Type: text' with ``with_type``), or
    its class name when the text is empty (``FileNotFoundError()`` says nothing by itself)."""
    text = first_line(e, limit)
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type else text


def one_line(e: BaseException) -> str:
    """A user error's message on one line.

    Errors re-raised by DataLoader workers carry the worker's traceback; its last line holds the original
    message, after the exception's class name, which is dropped.
    """
    text = str(e).strip()
    if "\n" in text:
        last = text.splitlines()[-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.split(".")[-1].endswith("Error") else last
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)  # bytes of a binary file quoted in it


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class OutOfMemory(PgpclError):
    """An allocation failed (host or device memory): the sizes asked for do not fit."""


_ALLOC_PHRASES = ("can't allocate memory", "out of memory")
_ASKED = re.compile(r"tried to allocate (\d+(?:\.\d+)?) ?(bytes|[KMGTP]iB)", re.IGNORECASE)
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def allocation_failure(e: BaseException) -> str | None:
    """What failed to be allocated ('tried to allocate 20.0 GiB'), when ``e`` is an out-of-memory error;
    else None.

    torch raises ``torch.OutOfMemoryError`` for device memory but a plain ``RuntimeError`` when the CPU
    allocator fails, so the text is checked too; ``MemoryError`` is Python's own.
    """
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and any(p in text for p in _ALLOC_PHRASES))):
        return None
    asked = _ASKED.search(text)
    if asked is None:
        return describe(e, 120)
    size, unit = float(asked.group(1)), [u.lower() for u in _UNITS].index(asked.group(2).lower())
    while size >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"tried to allocate {size:.1f} {_UNITS[unit]}" if unit else f"tried to allocate {int(size)} bytes"
