"""Progress of a long stage: a line every few seconds with the count, the rate and the time left.

Lines, not a redrawn bar, so that a log file, a pipe and a job scheduler's output show the same
thing as a terminal. The first line comes once the first piece of work is done (its rate is then
known); the last when the stage ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "format_seconds"]

EVERY_S = 5.0


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Progress:
    """``Progress("embed unit 0", total=1200, what="texts")``; ``advance(n)`` after each piece of work."""

    def __init__(self, label: str, total: int, what: str, done: int = 0, every: float = EVERY_S,
                 say: Callable[[str], None] | None = None):
        self.label, self.total, self.what, self.every = label, int(total), what, every
        self.start_done = self.done = int(done)
        self.t0 = self.last = time.perf_counter()
        self._say = say or (lambda m: print(f"memlm prepare: {m}", file=sys.stdout, flush=True))
        self._first = True

    def advance(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self._first or now - self.last >= self.every or self.done >= self.total:
            self._first = False
            self.last = now
            self._say(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "done" if self.done >= self.total else (f"ETA {format_seconds(left)}" if rate > 0 else "ETA ?")
        return (f"{self.label}: {self.done:,}/{self.total:,} {self.what} ({100 * self.done / max(self.total, 1):.0f}%, "
                f"{rate:,.1f}/s, {eta})")
