"""Localization and time of npcam's explanations at several network input sizes, paired photo by photo.

    python scripts/localization_sizes.py MANIFEST ROOT --model DIR [--sizes native,fine,...]
        [--methods cam,gradcam,...] [--threshold T] [--limit N] [--boot 1000] [--json FILE]

MANIFEST is an annotation file that ``npcam evaluate`` reads (a CSV with ``file``, the class and
``bboxes_xyxy``; paths relative to ROOT). Each size is ``native`` (the bundle's own), ``fine``
(:func:`npcam.image.fine_size`), ``S`` or ``HxW``. Every photo goes through :func:`npcam.explain.explain`
once per size, as ``npcam evaluate`` does (the default method's maps, ``pixels=False``); each other method
then maps the same prediction. Scores, per method and size, over all photos and per subset of the dev set
(``crop8``: photos at their original resolution, ``squashed``: squash-resized by their publishers), with the
product's metric functions (:mod:`npcam.localization`):

- GT-known Loc and Top-1 Loc at the box rule ``--threshold`` (npcam's default ``mean``);
- MaxBoxAccV2 (Choe et al. 2020) over the map at the photo's size.

Intervals are 95% percentile bootstrap intervals over the photos; each size after the first also gets the
interval of its paired difference from the first. Time: each photo's wall and CPU time of ``explain`` (decode,
trunk, the default method's map; one onnxruntime thread) per size, the sizes taking turns on each photo so that the machine's load
falls on all of them alike; the ratio of the totals is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import npcam
from npcam import annotations
from npcam import localization as loc
from npcam.explain import Explanation, Options, explain
from npcam.image import FINE, parse_size

METRICS = ("gt_known", "top1_loc", "maxboxacc")


def read_rows(manifest: Path, root: Path, labels) -> list[tuple[Path, int, list]]:
    """Annotated photos with a class and boxes: ``(path, class index, boxes)``."""
    found = annotations.read(manifest, labels)
    return [(root / key, a.label, list(a.boxes)) for key, a in found.by_path.items() if a.label is not None and a.boxes]


def subset_of(path: Path) -> str:
    """``crop8`` for the dev set's photos at their original resolution, ``squashed`` for the others."""
    return "crop8" if path.parent.name == "crop8" else "squashed"


def size_option(text: str):
    """A ``--sizes`` item as :class:`npcam.explain.Options`' ``size``: None, ``"fine"`` or ``(H, W)``."""
    text = text.strip().lower()
    if text == "native":
        return None
    return FINE if text == FINE else parse_size(text)


def measure(model, rows, sizes: list[str], methods: list[str], threshold) -> dict:
    """Per size and method, each photo's outcome; per size, each photo's seconds.

    Returns ``{"outcome": {size: {method: {"gt_known": bool [N], "top1_loc": bool [N], "ious": float64 [N, T]}}},
    "seconds": {size: float64 [N]}, "cpu": {size: float64 [N]}, "input": {size: (H, W)}}``: each photo's
    wall and CPU seconds of ``explain`` (one onnxruntime thread, so CPU time is little moved by other users).
    """
    checked = {s: Options(size=size_option(s), threshold=threshold).checked(model) for s in sizes}
    outcome = {s: {m: {"gt_known": [], "top1_loc": [], "ious": []} for m in methods} for s in sizes}
    seconds = {s: [] for s in sizes}
    cpu = {s: [] for s in sizes}
    for n, (path, label, truth) in enumerate(rows):
        for s in sizes:
            options = checked[s]
            started, used = time.perf_counter(), time.process_time()
            first = explain(model, path, options, pixels=False)
            seconds[s].append(time.perf_counter() - started)
            cpu[s].append(time.process_time() - used)
            prediction = first.prediction
            correct = prediction.top1 == label
            for m in methods:
                maps = model.cam(prediction, [label], method=m)
                explanation = Explanation(str(path), prediction, m, [label], maps)
                known = loc.best_iou(explanation.box(0, options.threshold), truth) >= loc.IOU
                outcome[s][m]["gt_known"].append(known)
                outcome[s][m]["top1_loc"].append(known and correct)
                outcome[s][m]["ious"].append(loc.box_ious(explanation.full(0), truth))
        sys.stderr.write(f"\r{n + 1}/{len(rows)}")
    sys.stderr.write("\n")
    for per_method in outcome.values():
        for o in per_method.values():
            o.update({k: np.asarray(v) for k, v in o.items()})
    inputs = {s: checked[s].size or model.bundle.input_size for s in sizes}
    return {
        "outcome": outcome,
        "seconds": {s: np.asarray(v) for s, v in seconds.items()},
        "cpu": {s: np.asarray(v) for s, v in cpu.items()},
        "input": inputs,
    }


def scores(o: dict, weights: np.ndarray) -> np.ndarray:
    """GT-known, Top-1 Loc and MaxBoxAccV2 of the photos weighted by ``weights`` (float ``[B, N]``, rows summing
    to 1): float64 ``[B, 3]``."""
    accuracy = np.stack([weights @ (o["ious"] >= level) for level in loc.MAXBOXACC_IOUS])  # [levels, B, T]
    return np.stack([weights @ o["gt_known"], weights @ o["top1_loc"], accuracy.max(axis=2).mean(axis=0)], axis=1)


def report(data: dict, rows, sizes: list[str], methods: list[str], draws: int, seed: int = 0) -> list[dict]:
    """Print and return each (method, size, subset)'s metrics with intervals (and the paired difference's)."""
    groups = {"all": np.arange(len(rows))}
    for name in ("crop8", "squashed"):
        members = np.array([i for i, (p, _, _) in enumerate(rows) if subset_of(p) == name], dtype=np.intp)
        if 0 < members.size < len(rows):
            groups[name] = members
    rng = np.random.default_rng(seed)
    results = []
    for group, members in groups.items():
        picks = rng.integers(0, members.size, (draws, members.size))
        weights = np.zeros((draws, len(rows)))
        np.add.at(weights, (np.arange(draws)[:, None], members[picks]), 1.0 / members.size)
        point = np.zeros((1, len(rows)))
        point[0, members] = 1.0 / members.size
        for m in methods:
            base = None
            for s in sizes:
                o = data["outcome"][s][m]
                estimate, resampled = scores(o, point)[0], scores(o, weights)
                row = {"method": m, "size": s, "input": list(data["input"][s]), "subset": group, "n": int(members.size)}
                for k, key in enumerate(METRICS):
                    low, high = np.percentile(resampled[:, k], [2.5, 97.5])
                    row[key] = [float(estimate[k]), float(low), float(high)]
                    if base is not None:
                        d = resampled[:, k] - base[1][:, k]
                        row["d_" + key] = [float(estimate[k] - base[0][k]), *map(float, np.percentile(d, [2.5, 97.5]))]
                if base is None:
                    base = (estimate, resampled)
                results.append(row)
                diff = "".join(
                    f"  d_{key} {row['d_' + key][0]:+.3f} [{row['d_' + key][1]:+.3f}, {row['d_' + key][2]:+.3f}]"
                    for key in METRICS
                    if "d_" + key in row
                )
                print(
                    f"{m:11s} {s:7s} {group:8s} n={members.size:3d} "
                    + " ".join(f"{key}={row[key][0]:.3f} [{row[key][1]:.3f}, {row[key][2]:.3f}]" for key in METRICS)
                    + diff,
                    flush=True,
                )
    wall = {s: float(data["seconds"][s].sum()) for s in sizes}
    cpu = {s: float(data["cpu"][s].sum()) for s in sizes}
    for s in sizes:
        print(
            f"time {s:7s} wall {1000 * wall[s] / len(rows):7.1f} ms/photo x{wall[s] / wall[sizes[0]]:.2f}  "
            f"cpu {1000 * cpu[s] / len(rows):7.1f} ms/photo x{cpu[s] / cpu[sizes[0]]:.2f}"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("root", type=Path, help="directory the manifest's file names are relative to")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument(
        "--sizes", default="native,fine", help="comma-separated: native, fine, S or HxW; the first is the base"
    )
    p.add_argument("--methods", default="cam", help="comma-separated method names (default: cam)")
    p.add_argument("--threshold", default="mean", help="the box rule: 'mean' or a fraction of the max")
    p.add_argument("--limit", type=int, help="only the first N annotated photos")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        model = npcam.load(args.model, threads=1)
        rows = read_rows(args.manifest, args.root, model.labels)[: args.limit]
        if not rows:
            raise ValueError(f"{args.manifest}: no photos with a class and boxes")
        sizes = [s.strip() for s in args.sizes.split(",")]
        methods = [npcam.methods.resolve(m, model.head.kind).name for m in args.methods.split(",")]
        threshold = npcam.boxes.parse_threshold(args.threshold)
        data = measure(model, rows, sizes, methods, threshold)
    except (npcam.NpcamError, OSError, ValueError) as e:
        print(f"localization_sizes: error: {e}", file=sys.stderr)
        return 2
    results = report(data, rows, sizes, methods, args.boot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
