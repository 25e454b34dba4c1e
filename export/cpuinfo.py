"""The CPU an int8 bundle was measured on, from ``/proc/cpuinfo``, for x86 and ARM alike.

x86 kernels print a ``model name`` and ``flags``. arm64 kernels print neither:
each core has ``CPU implementer`` and ``CPU part`` codes (named here for
common cores) and ``Features``. 32-bit ARM kernels and qemu-user print a
generic ``model name`` such as "ARMv8 Processor rev 3 (v8l)", so the codes
take precedence over it. The flags kept are those that decide onnxruntime's
int8 kernels: VNNI and AVX-512 on x86, dot-product and int8 matrix-multiply
instructions on ARM.
"""

from __future__ import annotations

import platform
from pathlib import Path

X86_INT8 = ("avx512_vnni", "avx_vnni", "avx512f", "avx2")
ARM_INT8 = ("asimd", "asimddp", "i8mm", "sve", "sve2", "svei8mm")

IMPLEMENTERS = {
    0x41: "ARM",
    0x42: "Broadcom",
    0x43: "Cavium",
    0x46: "Fujitsu",
    0x48: "HiSilicon",
    0x4E: "NVIDIA",
    0x50: "APM",
    0x51: "Qualcomm",
    0x61: "Apple",
    0xC0: "Ampere",
}
# (implementer, part) -> core; the boards they are in are listed in the docs.
PARTS = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD04): "Cortex-A35",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE",
    (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710",
    (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x46, 0x001): "A64FX",
    (0x48, 0xD01): "Kunpeng-920",
    (0xC0, 0xAC3): "Ampere-1",
}


def describe(text: str, machine: str) -> str:
    """A one-line name of the CPU that ``text`` (a ``/proc/cpuinfo``) describes.

    Parameters
    ----------
    text : str
        The contents of ``/proc/cpuinfo``.
    machine : str
        ``platform.machine()`` of that system, used when ``text`` names nothing.

    Returns
    -------
    str
        x86: ``"AMD EPYC 9R14 (avx512_vnni, avx512f, avx2)"``. ARM:
        ``"ARM Neoverse-N1 (aarch64, 0x41:0xd0c; asimd, asimddp)"``, a
        ``+``-joined list for cores of several kinds (big.LITTLE), an unknown
        part named by its vendor and code.
    """
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    flags = set(" ".join(fields.get("flags", fields.get("features", [""]))[:1]).split())
    cores = list(dict.fromkeys(zip(fields.get("cpu implementer", []), fields.get("cpu part", []))))
    if cores:
        names, codes = [], []
        for implementer, part in cores:
            try:
                i, p = int(implementer, 16), int(part, 16)
            except ValueError:
                continue
            vendor = IMPLEMENTERS.get(i, f"implementer 0x{i:02x}")
            names.append(f"{vendor} {PARTS[i, p]}" if (i, p) in PARTS else f"{vendor} part 0x{p:03x}")
            codes.append(f"0x{i:02x}:0x{p:03x}")
        isa = [f for f in ARM_INT8 if f in flags]
        arch = machine if machine.startswith(("aarch64", "arm")) else "arm"
        return f"{' + '.join(names)} ({', '.join([arch, *codes])}; {', '.join(isa) or 'no NEON'})"
    name = (fields.get("model name") or [machine or "unknown CPU"])[0]
    isa = [f for f in X86_INT8 if f in flags]
    return f"{name} ({', '.join(isa) or machine})"


def this_cpu() -> str:
    """:func:`describe` for this machine (its ``/proc/cpuinfo``, or just the architecture without one)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return describe(text, platform.machine())
