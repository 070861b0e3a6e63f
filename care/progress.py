"""Progress that reads well in a terminal and in a log file.

On a terminal the CLI draws one bar per stage (rich, or the trainer's own). Off a terminal (a log, CI, `nohup`)
there are no bars: `LineProgress` writes one plain line every `every_s` seconds and one at the end (step,
total, loss when known, elapsed, ETA) through the `care.progress` logger, which the CLI prints to stderr.
Library code never prints; it only logs here.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("care.progress")

EVERY_S = float(os.environ.get("CARE_PROGRESS_EVERY", "15"))  # seconds between two lines off a terminal


def on_terminal() -> bool:
    """Whether stderr is a terminal that can redraw a bar in place."""
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """Periodic one-line progress for `total` units of work (steps, questions)."""

    def __init__(self, desc: str, total: int | None, every_s: float | None = None, unit: str = "") -> None:
        self.desc = desc
        self.total = total
        self.every_s = EVERY_S if every_s is None else every_s
        self.unit = unit
        self.done = 0
        self.t0 = time.monotonic()
        self._last_line = self.t0
        self._start_done = 0

    def restart_at(self, done: int) -> None:
        """Resumed work: count speed (and ETA) from here, not from zero."""
        self.done = self._start_done = done
        self.t0 = self._last_line = time.monotonic()

    def line(self, **fields: float | str | None) -> str:
        elapsed = time.monotonic() - self.t0
        parts = [f"{self.desc}: {self.unit}{self.done}" + (f"/{self.total}" if self.total else "")]
        for key, value in fields.items():
            if value is None:
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"elapsed {fmt_duration(elapsed)}")
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {fmt_duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def update(self, done: int, force: bool = False, **fields: float | str | None) -> bool:
        """Set the count; log a line if `every_s` passed, the work is finished, or `force`. True if logged."""
        self.done = done
        now = time.monotonic()
        finished = bool(self.total) and done >= (self.total or 0)
        if force or finished or now - self._last_line >= self.every_s:
            self._last_line = now
            log.info("%s", self.line(**fields))
            return True
        return False

    def advance(self, n: int = 1, **fields: float | str | None) -> bool:
        return self.update(self.done + n, **fields)
