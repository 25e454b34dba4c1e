"""The energy-based pointing game of a detector's maps: how much of each detection's map lies in its own box.

    python scripts/eval_pointing.py MANIFEST ROOT --model DIR [--methods gradcam,eigencam,drise,...]
        [--conf 0.5] [--iou 0.3] [--masks N] [--mask-cells S] [--subset K/N]

For every photo of MANIFEST (a CSV like ../shared/eval/manifest.csv) with ground-truth boxes, the detector runs
with the given thresholds, and each detection's map (all detections of a photo explained together) is made at
the photo's size. A detection's score for a map ``M`` is ``sum of M inside its box / sum of M`` (Wang et al.'s
energy-based pointing game, Score-CAM, CVPR-W 2020), over the pixels whose centres lie in the box; a map with no
energy scores 0. Two maps that do not look at the image frame the methods' figures:

- ``uniform``: a constant map, whose share is the box's share of the photo: chance;
- ``gaussian``: a map that knows only the box, a Gaussian centred in it with a standard deviation of a quarter of
  its width and of its height (about 91% of its mass inside the box, more where the photo's edge cuts it off):
  what a method gets for drawing a soft box. The box itself would score 1.

Prints, per method, the detections' mean share (with its standard error) and median; the command and the table
are in docs/methods.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import npcam  # noqa: E402
from npcam.detect import Thresholds  # noqa: E402
from npcam.probe import MethodOptions  # noqa: E402

METHODS = "gradcam,hirescam,xgradcam,layercam,gradcampp,ablationcam,reciprocam,eigencam,drise"


def photos_with_boxes(manifest: Path, root: Path) -> list[Path]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return [root / row["file"] for row in csv.DictReader(f) if row["bboxes_xyxy"].strip()]


def inside(box, size: tuple[int, int]) -> np.ndarray:
    """bool ``[H, W]``: the pixels whose centres lie in ``box`` (x0, y0, x1, y1 in pixels)."""
    height, width = size
    x = np.arange(width) + 0.5
    y = np.arange(height) + 0.5
    return ((y >= box[1]) & (y <= box[3]))[:, None] & ((x >= box[0]) & (x <= box[2]))[None, :]


def share(energy: np.ndarray, mask: np.ndarray) -> float:
    """The energy-based pointing game: ``energy``'s share inside ``mask`` (0 for a map with no energy)."""
    total = float(energy.sum(dtype=np.float64))
    return float(energy[mask].sum(dtype=np.float64)) / total if total > 0 else 0.0


def gaussian(box, size: tuple[int, int]) -> np.ndarray:
    """A Gaussian centred in ``box``, its standard deviations a quarter of the box's width and height."""
    height, width = size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sx, sy = max((box[2] - box[0]) / 4, 0.5), max((box[3] - box[1]) / 4, 0.5)
    gx = np.exp(-0.5 * ((np.arange(width) + 0.5 - cx) / sx) ** 2)
    gy = np.exp(-0.5 * ((np.arange(height) + 0.5 - cy) / sy) ** 2)
    return gy[:, None] * gx[None, :]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("root", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    p.add_argument("--conf", type=float, default=0.5, help="the detections' score threshold (default 0.5)")
    p.add_argument("--iou", type=float, default=0.3, help="NMS's IoU threshold (default 0.3)")
    p.add_argument("--masks", type=int, default=MethodOptions.masks)
    p.add_argument("--mask-cells", type=int, default=MethodOptions.mask_cells)
    p.add_argument("--subset", default="0/1", help="K/N: every N-th photo from the K-th (default all)")
    args = p.parse_args()
    model = npcam.load(args.model)
    if model.bundle.task != "detect":
        print(f"eval_pointing: error: {args.model}: not a detector", file=sys.stderr)
        return 2
    first, step = (int(v) for v in args.subset.split("/"))
    photos = photos_with_boxes(args.manifest, args.root)[first::step]
    names = [npcam.methods.resolve(n).name for n in args.methods.split(",")]
    options = MethodOptions(masks=args.masks, mask_cells=args.mask_cells)
    thresholds = Thresholds(conf=args.conf, iou=args.iou)
    shares: dict[str, list[float]] = {name: [] for name in ["uniform", "gaussian", *names]}
    seconds = dict.fromkeys(names, 0.0)
    used = 0
    for path in photos:
        pred = model.predict(path, thresholds=thresholds)
        if not pred.detections:
            continue
        used += 1
        chosen = list(range(len(pred.detections)))
        masks = [inside(d.box, pred.size) for d in pred.detections]
        for mask, d in zip(masks, pred.detections):
            shares["uniform"].append(share(np.ones(pred.size, np.float32), mask))
            shares["gaussian"].append(share(gaussian(d.box, pred.size), mask))
        for name in names:
            start = time.perf_counter()
            maps = model.cam(pred, detection=chosen, method=name, size=pred.size, options=options)
            seconds[name] += time.perf_counter() - start
            shares[name] += [share(m, mask) for m, mask in zip(maps, masks)]
    count = len(shares["uniform"])
    print(f"{count} detections on {used} of {len(photos)} photos with boxes; model {model.bundle.arch}, "
          f"conf {args.conf}, iou {args.iou}; D-RISE {args.masks} masks of {args.mask_cells}x{args.mask_cells}")  # fmt: skip
    print(f"{'map':<12} {'mean':>6} {'± s.e.':>7} {'median':>7} {'s/photo':>8}")
    for name, values in shares.items():
        v = np.asarray(values)
        error = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        cost = f"{seconds[name] / max(used, 1):8.3f}" if name in seconds else f"{'':>8}"
        print(f"{name:<12} {v.mean():6.3f} {error:7.3f} {np.median(v):7.3f} {cost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
