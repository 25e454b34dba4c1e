"""A one-line progress display on stderr (a terminal only), shared by ``npcam`` and ``npcam dataset``."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress display on stderr, when stderr is a terminal: count, rate and time left.

    ``every``: where stderr is not a terminal (a log file), write the same as a plain line at most
    once every ``every`` seconds instead (None: nothing).
    """

    def __init__(self, stream=None, every: float | None = None):
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.shown = False
        self.every = every
        self.logged = self.start

    def show(self, n: int, total: int, label: object, unit: str = "img") -> None:
        terminal = self.stream.isatty()
        now = time.monotonic()
        if total <= 1 or not (terminal or (self.every is not None and now - self.logged >= self.every)):
            return
        elapsed = now - self.start
        rate = n / elapsed if elapsed > 0 else 0.0
        left = (total - n) / rate if rate > 0 else 0.0
        shown_rate = f"{rate:.1f}" if rate >= 0.1 else f"{rate:.2g}"  # slow work (npcam evaluate): 0.0083 photos/s
        line = f"[{n}/{total}] {shown_rate} {unit}/s, {_clock(left)} left  {label}"
        if not terminal:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.logged = now
            return
        self.stream.write(f"\r\x1b[K{line}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )
