"""Long work that reports its progress and stops between batches: the callbacks multi-pass methods take.

Score-CAM, Ablation-CAM and Recipro-CAM run the network or its head many times. They call ``on_progress(done,
total)`` after each batch and :func:`check` before it, so that Ctrl-C in the CLI and the server's time limit
stop them there, without writing anything.
"""

from __future__ import annotations

from collections.abc import Callable

OnProgress = Callable[[int, int], None]  # called as on_progress(done, total)
ShouldStop = Callable[[], bool]


class Cancelled(Exception):
    """A multi-pass method stopped between two batches because ``should_stop()`` said so."""


def check(should_stop: ShouldStop | None) -> None:
    """Raise :class:`Cancelled` if ``should_stop`` is given and returns true."""
    if should_stop is not None and should_stop():
        raise Cancelled
