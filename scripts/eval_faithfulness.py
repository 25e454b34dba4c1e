"""Faithfulness of each explanation method, one table row per method (npcam.metrics, as TorchCAM defines them).

    python scripts/eval_faithfulness.py MANIFEST ROOT --model DIR [--methods cam,gradcam,...]
        [--subset K/N] [--size S] [--json FILE]

MANIFEST is a CSV like ../shared/eval/manifest.csv (``file`` relative to ROOT);
every row is used, boxes or not. Each image is explained for its top-1 class,
as TorchCAM's metrics do by default. Columns: Average Drop (lower is better),
Increase in Confidence (higher), Deletion AUC (lower), Insertion AUC
(higher), and the method's own time per image (the map only, not the metrics).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import npcam
import npcam.methods
import npcam.metrics as metrics


def read_files(manifest: Path, root: Path) -> list[Path]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return [root / row["file"] for row in csv.DictReader(f)]


def evaluate(model: npcam.Model, files: list[Path], methods: list[str], size: int | None = None) -> dict[str, dict]:
    """Mean metrics per method over ``files``."""
    sums = {
        m: {"avg_drop": 0.0, "increase": 0.0, "deletion_auc": 0.0, "insertion_auc": 0.0, "ms": 0.0} for m in methods
    }
    n = 0
    for i, path in enumerate(files):
        try:
            pred = model.predict(path, size=size)
        except npcam.NpcamError as e:
            print(f"eval_faithfulness: skipping {e}", file=sys.stderr)
            continue
        n += 1
        for method in methods:
            start = time.perf_counter()
            cam = model.cam(pred, pred.top1, method=method)
            sums[method]["ms"] += (time.perf_counter() - start) * 1000
            drop, increase = metrics.confidence_change(model, pred, cam, pred.top1)
            deletion, insertion = metrics.deletion_insertion(model, pred, cam, pred.top1)
            for key, value in zip(
                ("avg_drop", "increase", "deletion_auc", "insertion_auc"), (drop, increase, deletion, insertion)
            ):
                sums[method][key] += float(value)
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{i + 1}/{len(files)}")
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    return {m: {"n": n, **{k: v / max(n, 1) for k, v in s.items()}} for m, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("root", type=Path, help="directory the manifest's file names are relative to")
    p.add_argument("--model", type=Path, help="bundle directory (default: npcam's default)")
    p.add_argument("--methods", default=",".join(npcam.METHODS), help="comma-separated (default: all)")
    p.add_argument("--size", type=int, help="network input size (default: the bundle's)")
    p.add_argument("--subset", metavar="K/N", help="only rows K, K+N, K+2N, …")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        model = npcam.load(args.model)
        methods = [npcam.methods.resolve(m, model.head.kind).name for m in args.methods.split(",")]
        files = read_files(args.manifest, args.root)
        if args.subset:
            k, every = (int(v) for v in args.subset.split("/"))
            files = files[k::every]
    except (npcam.NpcamError, OSError, KeyError, ValueError) as e:
        print(f"eval_faithfulness: error: {e}", file=sys.stderr)
        return 2
    results = evaluate(model, files, methods, args.size)
    n = next(iter(results.values()))["n"]
    print(f"{model.bundle.arch}, {n} images, top-1 class; drop and deletion: lower is better\n")
    print("| method | Average Drop | Increase in Confidence | Deletion AUC | Insertion AUC | ms/image (map) |")
    print("|---|---|---|---|---|---|")
    for m, r in results.items():
        print(
            f"| {m} | {r['avg_drop']:.3f} | {r['increase']:.3f} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} | {r['ms']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
