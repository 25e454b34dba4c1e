"""Which kind of CPU this is, for int8 trunks whose answers depend on the CPU's int8 kernels.

onnxruntime's int8 matrix kernels differ between x86 CPUs with VNNI, x86 CPUs without it (whose ``vpmaddubsw``
saturates 16-bit sums of u8 x s8 products) and other architectures. An int8 trunk that is not portable records
the families it was measured on (docs/export.md, int8); the runtime warns, once, when it runs elsewhere, and the
exporter records the family it measured on. Both use :func:`cpu_family`.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bundle import Bundle


def cpu_family(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The kind of CPU whose onnxruntime int8 kernels compute alike: ``"x86_64 vnni"``, ``"x86_64"`` (no
    VNNI: ``vpmaddubsw``, which saturates with 8-bit weights) or the architecture (e.g. ``"aarch64"``).

    ``cpuinfo`` is a ``/proc/cpuinfo`` text (default: this machine's), ``machine`` ``platform.machine()``.
    """
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64", "i686"):
        return machine
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return f"{machine} vnni" if {"avx512_vnni", "avx_vnni"} & set(flags) else machine


_warned: set[str] = set()


def warn_if_not_portable(bundle: Bundle) -> None:
    """One line on stderr, once per process, when an int8 trunk whose answers depend on the CPU's int8
    kernels is loaded on a kind of CPU where they were not measured to be the same."""
    same_on = bundle.int8_same_on
    if same_on is None or "int8" in _warned:
        return
    here = cpu_family()
    if here not in same_on:
        _warned.add("int8")
        print(
            f"npcam: warning: {bundle.path}: its int8 trunk ({bundle.meta['int8'].get('settings')}) computes as "
            f"measured on {', '.join(same_on)}, not necessarily on this CPU ({here}): its answers may differ from "
            "those measured (docs/export.md, int8)",
            file=sys.stderr,
        )
