"""int8 against fp32 on a fixed part of the dev set that no int8 choice has seen.

    python scripts/int8_heldout.py FP32_BUNDLE INT8_BUNDLE [--eval ../shared/eval] [--part test] [--json FILE]

The split of the dev set (``EVAL/images``), fixed and the same on every machine:

- ``calibration``: ``images/crop8`` (43 full-size photos), the folder given to ``--int8``; the export
  calibrates on its even positions and checks on its odd ones.
- the other photos (``227``, ``224``, ``package_photos``: 310), in sorted order of their paths:
  even positions are ``selection`` (155, on which the int8 settings were compared and the default chosen),
  odd positions are ``test`` (155, touched by no choice, measured once the default was fixed).

For each photo of the part, both bundles predict it as the runtime does (``Model.predict``); printed: the top-1
agreement with its Wilson 95% interval, the mean and lowest Pearson correlation of fp32's top-1 CAM (feature
resolution) between the two, fp32's top-1 margin (logits) on the photos whose answer changed, and the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # export/ runs from a checkout

import npcam  # noqa: E402
from export import cpuinfo  # noqa: E402

PARTS = ("calibration", "selection", "test")


def split(root: Path) -> dict[str, list[Path]]:
    """The dev set's three parts (module docstring), as sorted lists of files under ``root/images``."""
    files = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    calibration = [p for p in files if p.parent.name == "crop8"]
    others = [p for p in files if p.parent.name != "crop8"]
    return {"calibration": calibration, "selection": others[0::2], "test": others[1::2]}


def wilson(agree: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``agree / n`` (95% for z = 1.96)."""
    p = agree / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def compare(fp32: npcam.Model, int8: npcam.Model, photos: list[Path]) -> dict:
    """Top-1 agreement and CAM correlation of ``int8`` with ``fp32`` on ``photos``."""
    agree, pearson, changed = [], [], []
    for path in photos:
        a, b = fp32.predict(path), int8.predict(path)
        top = a.top1
        agree.append(top == b.top1)
        weights = fp32.head.gradient(a.features.mean(axis=(1, 2)), [top])
        maps = [npcam.cam.weighted_maps(p.features, weights).ravel() for p in (a, b)]
        if maps[0].std() > 0 and maps[1].std() > 0:
            pearson.append(float(np.corrcoef(*maps)[0, 1]))
        if top != b.top1:
            logits = np.sort(a.logits)
            changed.append({"photo": str(path), "fp32_margin": float(logits[-1] - logits[-2])})
    n, k = len(agree), int(np.sum(agree))
    low, high = wilson(k, n)
    return {"photos": n, "agree": k, "top1_agreement": k / n, "wilson95": [low, high],
            "cam_pearson": float(np.mean(pearson)), "cam_pearson_min": float(np.min(pearson)), "changed": changed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--eval", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "eval")
    parser.add_argument("--part", choices=PARTS, default="test")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    photos = split(args.eval)[args.part]
    if not photos:
        parser.error(f"{args.eval}: no photos in the {args.part} part")
    fp32, int8 = npcam.load(args.fp32), npcam.load(args.int8)
    result = compare(fp32, int8, photos)
    result.update(part=args.part, cpu=cpuinfo.this_cpu(), settings=int8.bundle.meta.get("int8", {}).get("settings"))
    low, high = result["wilson95"]
    print(f"{args.int8} ({result['settings']}) against {args.fp32}, {args.part} part ({result['photos']} photos), "
          f"CPU {result['cpu']}: top-1 agrees on {result['agree']}/{result['photos']} = "
          f"{result['top1_agreement']:.1%} (Wilson 95%: {low:.1%}-{high:.1%}); CAM Pearson mean "
          f"{result['cam_pearson']:.4f}, lowest {result['cam_pearson_min']:.4f}")
    for c in result["changed"]:
        print(f"  changed: {c['photo']} (fp32's top-1 margin {c['fp32_margin']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
