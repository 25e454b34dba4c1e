"""The CPU name an int8 bundle records, parsed from ``/proc/cpuinfo`` texts of x86 and ARM machines.

The EPYC and qemu texts were recorded on the dev machine (trimmed to the fields that matter and two
cores); the arm64 hardware texts follow the layout arm64 kernels print, with the codes of those cores.
"""

from __future__ import annotations

from export.cpuinfo import describe

# This project's dev machine (first core; later cores repeat it).
X86_EPYC = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC
stepping	: 1
cpu MHz		: 2596.126
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
bugs		: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass srso spectre_v2_user
bogomips	: 5192.25
address sizes	: 48 bits physical, 48 bits virtual
power management:

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC
flags		: fpu vme de pse tsc avx2 avx512f avx512_vnni
"""

# An AVX2-only Intel CPU: no VNNI, no AVX-512.
X86_HASWELL = """\
processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 63
model name	: Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2
"""

# A Graviton2-class arm64 server (Neoverse-N1): arm64 kernels print no "model name".
ARM64_NEOVERSE_N1 = """\
processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1

processor	: 1
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1
"""

# A big.LITTLE board (RK3588-class: Cortex-A55 and Cortex-A76 cores).
ARM64_BIG_LITTLE = """\
processor	: 0
BogoMIPS	: 48.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x2
CPU part	: 0xd05
CPU revision	: 0

processor	: 4
BogoMIPS	: 48.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 0
"""

# qemu-user's emulated Neoverse-V1 (QEMU_CPU=neoverse-v1): it adds a generic "model name".
QEMU_NEOVERSE_V1 = """\
processor	: 0
model name	: ARMv8 Processor rev 2 (v8l)
BogoMIPS	: 100.00
Features	: fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm paca pacg dcpodp svei8mm svebf16 i8mm bf16 rng
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 2
"""

# An arm64 core not in the table (qemu's default "max" CPU reports implementer 0x00).
ARM64_UNKNOWN = """\
processor	: 0
Features	: fp asimd i8mm
CPU implementer	: 0x00
CPU part	: 0x051
"""


def test_x86_names_the_model_and_its_int8_instructions():
    assert describe(X86_EPYC, "x86_64") == "AMD EPYC (avx512_vnni, avx512f, avx2)"
    assert describe(X86_HASWELL, "x86_64") == "Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz (avx2)"


def test_arm64_names_the_core_from_implementer_and_part():
    assert describe(ARM64_NEOVERSE_N1, "aarch64") == "ARM Neoverse-N1 (aarch64, 0x41:0xd0c; asimd, asimddp)"


def test_arm64_lists_each_kind_of_core_once():
    assert describe(ARM64_BIG_LITTLE, "aarch64") == (
        "ARM Cortex-A55 + ARM Cortex-A76 (aarch64, 0x41:0xd05, 0x41:0xd0b; asimd, asimddp)"
    )


def test_arm64_codes_win_over_a_generic_model_name():
    assert describe(QEMU_NEOVERSE_V1, "aarch64") == (
        "ARM Neoverse-V1 (aarch64, 0x41:0xd40; asimd, asimddp, i8mm, sve, svei8mm)"
    )


def test_unknown_arm_core_keeps_its_codes():
    assert describe(ARM64_UNKNOWN, "aarch64") == "implementer 0x00 part 0x051 (aarch64, 0x00:0x051; asimd, i8mm)"


def test_no_cpuinfo_names_the_architecture():
    assert describe("", "aarch64") == "aarch64 (aarch64)"
    assert describe("", "x86_64") == "x86_64 (x86_64)"
