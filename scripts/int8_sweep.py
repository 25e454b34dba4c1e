"""How each int8 setting does on a bundle: held-out agreement with fp32 and the trunk's speed.

    python scripts/int8_sweep.py BUNDLE IMAGES [--check DIR] [--settings S ...] [--json FILE]

BUNDLE is an fp32 bundle. Calibration and held-out images are chosen as the
exporter does (export.quantize.image_sets: IMAGES's even positions calibrate, its odd ones are checked;
with --check, all of IMAGES calibrate and DIR's images are checked). Each
setting (a string of export.quantize's words, e.g. "u8s8 reduce_range entropy float=depthwise") is
quantized, then timed against fp32 on the held-out inputs, the two taking turns
on each input, so that a load on the machine weighs on both alike. Settings that calibrate alike share
onnxruntime's calibration cache. Prints one table row per setting and the CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # export/ runs from a checkout

import npcam  # noqa: E402
from export import quantize  # noqa: E402
from npcam import bundle as bundle_format  # noqa: E402

DEFAULT = [
    "u8s8 unsigned gptq float=first3",
    "u8s8 unsigned float=first3",
    "u8s8 reduce_range gptq float=first3",
    "u8s8 unsigned gptq",
    "u8s8",
    "u8s8 reduce_range",
    "u8u8",
    "s8s8",
    "u8s8 reduce_range per_tensor",
    "u8s8 reduce_range symmetric",
    "u8s8 reduce_range entropy",
    "u8s8 reduce_range percentile",
    "u8s8 reduce_range images=64",
    "u8s8 reduce_range images=256",
    "u8s8 reduce_range float=first",
    "u8s8 reduce_range float=last",
    "u8s8 reduce_range float=depthwise",
    "u8s8 reduce_range fixed",
    "u8s8 float=first3",
    "u8s8 fixed float=first3",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--check", type=Path, help="held-out images (default: the odd half of IMAGES)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    fp32 = npcam.load(args.bundle, threads=1)
    calibration, held_out, described = quantize.image_sets(args.images, args.check)
    checks = quantize.network_inputs(held_out, fp32, quantize.CHECK_IMAGES)
    cpu = quantize.cpu_name()
    print(f"# {args.bundle} ({fp32.bundle.arch}); checked on {len(checks)} images: {described}; CPU {cpu}")
    columns = ("setting", "calibration images", "held-out top-1 agreement", "CAM Pearson", "trunk ms int8", "fp32",
               "fp32/int8", "portable", "quantize s")  # fmt: skip
    print(f"| {' | '.join(columns)} |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        original = tmp / "fp32.onnx"
        original.write_bytes(fp32.bundle.trunk)
        copy = tmp / "bundle"
        shutil.copytree(args.bundle, copy)
        meta = bundle_format.peek_meta(copy)
        for setting in args.settings:
            options = quantize.parse_setting(setting)
            inputs = quantize.network_inputs(calibration, fp32, options["images"])
            method = options["calibrate_method"].name
            cache = tmp / f"ranges-{method}-{len(inputs)}-{options['fixed']}.json"
            start = time.perf_counter()
            out = tmp / "int8.onnx"
            try:
                quantize.quantize_trunk(original, inputs, out, setting, cache)
            except Exception as e:  # one setting the quantizer or onnxruntime refuses is a row, not the end
                print(f"| {setting} | {len(inputs)} | failed: {str(e).splitlines()[0][:120]} | | | | | | |", flush=True)
                continue
            spent = time.perf_counter() - start
            bundle_format.replace_trunk(copy, out.read_bytes(), meta)
            int8 = npcam.load(copy, threads=1)
            fp32_ms, int8_ms = quantize.trunk_ms([fp32, int8], checks)
            agree = quantize.agreement(fp32, int8, checks)
            row = {
                "setting": setting,
                "calibration_images": len(inputs),
                **agree,
                "int8_ms": int8_ms,
                "fp32_ms": fp32_ms,
                "speedup": fp32_ms / int8_ms,
                "portable": quantize.portable(setting),
                "quantize_s": spent,
            }
            rows.append(row)
            print(
                f"| {setting} | {len(inputs)} | {row['top1_agreement']:.1%} | {row['cam_pearson']:.4f} | "
                f"{int8_ms:.2f} | {fp32_ms:.2f} | {row['speedup']:.2f}× | {'yes' if row['portable'] else 'no'} | "
                f"{spent:.0f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "cpu": cpu, "checked_on": described,
                                         "check_images": len(checks), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
