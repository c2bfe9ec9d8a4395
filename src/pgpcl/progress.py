"""Progress of the long phases: a bar on a terminal or in a notebook, a timed plain line anywhere else.

tqdm redraws a bar with carriage returns up to ten times a second. Sent to a file (a cluster job's log,
``| tee``) that is one line without end that grows for hours and that log viewers show as a single
line. So off a terminal a phase writes a plain line at most every :data:`LINE_EVERY_S` seconds: a
short phase writes nothing, a long one shows that it is alive, how far it is and how long is left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

LINE_EVERY_S = 60.0


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether bars can be drawn: ``stream`` (default stderr) is a terminal, or this is a notebook kernel
    (whose stderr is no terminal, but where tqdm.auto draws a widget)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    return "ipykernel" in sys.modules


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class NoProgress:
    """The bar of a phase when bars are off. A disabled tqdm still costs its import and, on its first
    construction in a process, ~1 ms of set-up (measured on the first PGP basis pass of tiny_l2p_pgp,
    the first phase to ask for a bar there: a seventh of that pass)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress:
    """A bar's interface that writes ``desc: n/total (p%), elapsed, ~left[, key=value ...]`` to ``stream``
    at most every ``every_s`` seconds, and nothing else (the phase's result is reported elsewhere)."""

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.stream, self.clock = stream, clock
        self._start = self._last = clock()
        self._initial = self.n
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.line(now), file=self.stream or sys.stderr, flush=True)

    def set_postfix(self, **kwargs) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        pass

    def line(self, now: float) -> str:
        elapsed = now - self._start
        parts = [f"{self.desc}: {self.n}/{self.total}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{duration(elapsed)} elapsed")
        done = self.n - self._initial
        if 0 < done and self.n < self.total:
            parts.append(f"~{duration(elapsed / done * (self.total - self.n))} left")
        if self._postfix:
            parts.append(self._postfix)
        return ", ".join(parts)


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, leave: bool = False):
    """The progress display of a phase of ``total`` steps: nothing when not ``enabled``, a tqdm bar where
    one can be drawn (:func:`on_terminal`), else a :class:`LineProgress`. Each has ``update(n)``,
    ``set_postfix(**values)`` and ``close()``."""
    if not enabled:
        return NoProgress()
    if not on_terminal():
        return LineProgress(total, desc, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, initial=initial)
