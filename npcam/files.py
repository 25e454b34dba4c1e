"""Writing output files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import NpcamError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, then rename it over ``target``.

    On any failure (including Ctrl-C) the temporary file is removed and
    ``target`` is left as it was: absent, or the previous complete version.
    """
    if target.exists() and not target.is_file():
        # Renaming over a device, FIFO or directory would destroy it (think -o /dev/null as root).
        raise NpcamError(f"{target}: exists and is not a regular file; not replacing it")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
