"""A one-line progress display on stderr (a terminal only), shared by ``npcam`` and ``npcam dataset``."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress display on stderr, when stderr is a terminal: count, rate and time left."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.shown = False

    def show(self, n: int, total: int, label: object, unit: str = "img") -> None:
        if total <= 1 or not self.stream.isatty():
            return
        elapsed = time.monotonic() - self.start
        rate = n / elapsed if elapsed > 0 else 0.0
        left = (total - n) / rate if rate > 0 else 0.0
        self.stream.write(f"\r\x1b[K[{n}/{total}] {rate:.1f} {unit}/s, {_clock(left)} left  {label}")
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
