"""Weakly supervised localization with CAM boxes, as in Zhou et al. (2016), at several box thresholds.

`npcam evaluate` measures every method on every metric; this script sweeps the box rule's threshold
(docs/methods.md, "Localization on the dev set, and the box threshold"), with npcam evaluate's CSV
reader and GT-known rule.

    python scripts/eval_localization.py MANIFEST ROOT --model DIR [--method NAME] [--threshold T]
        [--keep-aspect] [--size S|fine] [--sweep 0.1,0.2,...] [--subset K/N] [--json FILE]

MANIFEST is a CSV like ../shared/eval/manifest.csv: ``file`` (relative to
ROOT), ``imagenet_index`` (the first of ``|``-separated values is the label)
and ``bboxes_xyxy`` (``x0,y0,x1,y1;…`` in the stored image's pixels,
inclusive); rows without boxes are skipped.

Metrics:
- top1_cls: the top-1 class is the label;
- gt_known_loc: the box from the label's CAM has IoU >= 0.5 with a ground-truth box;
- top1_loc: the top-1 class is right and its CAM's box has IoU >= 0.5.

The last line is ``n=… top1_cls=… gt_known_loc=… top1_loc=…`` for --threshold;
--sweep adds a line per threshold before it, from the same CAMs.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import npcam
from npcam import annotations
from npcam.boxes import DEFAULT_THRESHOLD, cam_box, parse_threshold
from npcam.image import FINE, fine_size
from npcam.localization import IOU, best_iou


def read_manifest(manifest: Path, root: Path, labels) -> list[tuple[Path, int, list[tuple[int, int, int, int]]]]:
    """Rows with a class and boxes, as (image path, label, boxes), read by npcam evaluate's CSV reader."""
    found = annotations.read(manifest, labels)
    return [(root / key, a.label, list(a.boxes)) for key, a in found.by_path.items() if a.label is not None and a.boxes]


def evaluate(
    model, rows, thresholds, keep_aspect=False, size=None, batch=32, method=None
) -> dict[float, dict[str, float]]:
    """Counts of correct classification and localization at each threshold."""
    hits = {t: {"gt_known_loc": 0, "top1_loc": 0} for t in thresholds}
    top1 = 0
    with ThreadPoolExecutor(max_workers=2) as pool:  # decoding overlaps the trunk (onnxruntime drops the GIL)
        chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        images = pool.map(lambda chunk: [npcam.open_image(p) for p, _, _ in chunk], chunks)
        for done, (chunk, rgbs) in enumerate(zip(chunks, images)):
            for (_, label, gt_boxes), pred in zip(chunk, model.predict(rgbs, keep_aspect=keep_aspect, size=size)):
                correct = pred.top1 == label
                top1 += correct
                cam = model.cam(pred, label, size=pred.image.shape[:2], method=method)
                for t in thresholds:
                    found = best_iou(cam_box(cam, t), gt_boxes) >= IOU
                    hits[t]["gt_known_loc"] += found
                    hits[t]["top1_loc"] += found and correct  # the top-1 CAM is the label's CAM
            if sys.stderr.isatty():
                sys.stderr.write(f"\r{min((done + 1) * batch, len(rows))}/{len(rows)}")
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    n = len(rows)
    return {
        t: {"n": n, "top1_cls": top1 / n, "gt_known_loc": h["gt_known_loc"] / n, "top1_loc": h["top1_loc"] / n}
        for t, h in hits.items()
    }


def line(result: dict[str, float]) -> str:
    return (
        f"n={result['n']} top1_cls={result['top1_cls']:.4f} "
        f"gt_known_loc={result['gt_known_loc']:.4f} top1_loc={result['top1_loc']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("root", type=Path, help="directory the manifest's file names are relative to")
    p.add_argument("--model", type=Path, help="bundle directory (default: npcam's default)")
    p.add_argument("--method", help="explanation method (default: the model's, cam or gradcam)")
    p.add_argument("--threshold", type=parse_threshold, default=DEFAULT_THRESHOLD, help="'mean' or a fraction")
    p.add_argument("--keep-aspect", action="store_true")
    p.add_argument("--size", help="network input size, S or 'fine' (npcam.image.fine_size; default: the bundle's)")
    p.add_argument("--sweep", help="comma-separated extra thresholds to report")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--subset", metavar="K/N", help="only rows K, K+N, K+2N, … (for split-half checks)")
    args = p.parse_args(argv)
    try:
        model = npcam.load(args.model)
        rows = read_manifest(args.manifest, args.root, model.labels)
        if args.subset:
            k, n = (int(v) for v in args.subset.split("/"))
            rows = rows[k::n]
        if not rows:
            raise ValueError(f"{args.manifest}: no rows with boxes")
        sweep = list(dict.fromkeys(parse_threshold(t) for t in args.sweep.split(","))) if args.sweep else []
        method = npcam.methods.resolve(args.method, model.head.kind).name
        size = args.size
        if size == FINE:
            size = fine_size(model.bundle.input_size, model.bundle.stride)
        elif size is not None:
            size = int(size)
        thresholds = list(dict.fromkeys([*sweep, args.threshold]))
        results = evaluate(model, rows, thresholds, args.keep_aspect, size, method=method)
    except (npcam.NpcamError, OSError, KeyError, ValueError) as e:
        print(f"eval_localization: error: {e}", file=sys.stderr)
        return 2
    for t in sweep:
        print(f"threshold={t} {line(results[t])}")
    if args.json:
        args.json.write_text(json.dumps({str(t): r for t, r in results.items()}, indent=2))
    print(line(results[args.threshold]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
