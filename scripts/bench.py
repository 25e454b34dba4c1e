"""npcam against the torch way, side by side in one run.

    pip install -e '.[export,bench]'
    python scripts/bench.py [--rounds 5] [--json FILE]

Same weights for everyone (a seeded random-init ResNet-18, and EfficientNet-Lite0's
real ones), same inputs (photos from ../shared/eval plus generated 1 MP and
12 MP JPEGs), same output (a JPEG overlay of the top-1 CAM). Each method runs in
a worker process of its own, as it would for its users (npcam's workers never
import torch), and the workers take turns: round 1 of A, B, C…, then round 2.
Every figure is a median, because the machines are shared and noisy. Measures:

1. end to end per image, decode to file written, with npcam's stage breakdown:
   npcam fp32, npcam int8, a plain torch pipeline (forward, CAM, F.interpolate,
   OpenCV colormap and blend) and TorchCAM (its CAM extractor and overlay);
2. post-trunk work: at 0.2 MP as a share of the trunk, and at 12 MP npcam's
   upsample+colormap+blend vs OpenCV's resize+applyColorMap+addWeighted;
3. cold start and peak RSS: one ``python -m npcam`` process vs a one-image torch script;
4. installed size of the runtime's dependencies vs torch's;
5. throughput over a directory of 200 photos: the pipelined CLI vs a sequential loop;
6. the explanation methods (``--only methods`` runs just this): each method's own
   time at 0.2 MP against CAM's, the CAM weighting as ``np.einsum`` against the
   float64 matmul it replaced, and Score-CAM per image against TorchCAM's
   ScoreCAM on the same weights and photos.

The pipelines are in bench_pipelines.py, the workers and measurements in
bench_harness.py; this file holds the command line and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import bench_harness as harness  # first: it puts the checkout on sys.path and imports npcam before NumPy
import numpy as np
from bench_harness import EVAL, SMALL
from bench_pipelines import STAGES
from PIL import Image

import npcam

POST_TRUNK = ("head+CAM", "upsample", "colormap+blend")


def methods_report(section: dict) -> list[str]:
    lines = ["", "Explanation methods: ms for the maps of the top-1 class after prediction, on "
             f"{SMALL} (0.18 MP), medians:"]  # fmt: skip
    archs = list(section["costs_ms"])
    names = [n for n in npcam.METHODS if n != "scorecam"] + ["einsum", "matmul"]
    rows = [[n, *(f"{section['costs_ms'][a].get(n, float('nan')):.3f}" for a in archs)] for n in names]
    lines += markdown_table(["method", *archs], rows)
    lines += ["", "Score-CAM of the top-1 class per photo, file to map, seconds (median), npcam vs TorchCAM ScoreCAM:"]
    rows = []
    for arch, runs in section["scorecam_s"].items():
        for photo in runs["npcam"]:
            ours, theirs = runs["npcam"][photo], runs["TorchCAM"][photo]
            rows.append([arch, photo, f"{ours:.2f}", f"{theirs:.2f}", f"{ours / theirs:.2f}"])
    lines += markdown_table(["model", "photo", "npcam s", "TorchCAM s", "ratio"], rows)
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def report(results: dict) -> str:
    e2e = results["end_to_end"]["ms"]
    methods = list(dict.fromkeys(k.split("|")[0] for k in e2e))
    inputs = results["inputs"]
    small = [n for n in inputs if n != "12mp.jpg"]
    geo = {m: float(np.exp(np.mean([np.log(e2e[f"{m}|{n}"]) for n in small]))) for m in methods}
    rows = [[name, size, *(f"{e2e[f'{m}|{name}']:.1f}" for m in methods)] for name, size in inputs.items()]
    rows.append(["geometric mean, photos ≤ 1 MP", "", *(f"{geo[m]:.1f}" for m in methods)])
    lines = [
        f"npcam benchmark, {results['date']}, {results['cpu']}, {os.cpu_count()} cores, "
        f"{results['versions']}, {results['rounds']} rounds, medians, outputs in {results['outputs']}",
        "",
        "End to end per image, decode to JPEG written (ms):",
        *markdown_table(["image", "size", *methods], rows),
    ]
    lines += ["", "Ratios to TorchCAM (geometric mean over the photos ≤ 1 MP):"]
    for arch in ("ResNet-18", "Lite0"):
        for m in (f"npcam {arch} fp32", f"npcam {arch} int8", f"torch {arch}"):
            lines.append(f"- {m} / TorchCAM {arch}: {geo[m] / geo[f'TorchCAM {arch}']:.2f}")
    stages = results["end_to_end"]["stages_ms"]
    rows = [[key.replace("|", ", "), *(f"{st[s]:.2f}" for s in STAGES)] for key, st in stages.items()]
    lines += ["", "npcam stage breakdown (ms):", *markdown_table(["method, image", *STAGES], rows)]
    lines += ["", f"Post-trunk work (head+CAM, upsample, colormap+blend) on {SMALL}, as a share of the trunk:"]
    for key, st in stages.items():
        if key.endswith(SMALL):
            lines.append(
                f"- {key.split('|')[0]}: {sum(st[s] for s in POST_TRUNK):.2f} ms, {sum(st[s] for s in POST_TRUNK) / st['trunk']:.1%}"
            )
    opencv = results["post_trunk_12mp"]
    lines.append(
        f"12 MP upsample+colormap+blend: npcam {opencv['npcam_ms']:.1f} ms, OpenCV resize+applyColorMap+addWeighted "
        f"{opencv['opencv_ms']:.1f} ms, ratio {opencv['npcam_ms'] / opencv['opencv_ms']:.2f}"
    )
    lines += ["", "Cold start, one process for one image (wall ms, peak RSS MiB):"]
    for arch, r in results["cold_start"].items():
        lines.append(
            f"- {arch}: npcam {r['npcam']['wall_ms']:.0f} ms / {r['npcam']['peak_rss_mib']:.0f} MiB, torch script "
            f"{r['torch']['wall_ms']:.0f} ms / {r['torch']['peak_rss_mib']:.0f} MiB, wall ratio "
            f"{r['npcam']['wall_ms'] / r['torch']['wall_ms']:.2f}"
        )
    size = results["installed"]
    lines.append(
        f"\nInstalled size: npcam's runtime dependencies {size['runtime_mib']:.0f} MiB "
        f"({', '.join(size['runtime'])}); torch and its dependencies {size['torch_mib']:.0f} MiB"
    )
    for arch, t in results["throughput"].items():
        lines.append(
            f"Directory of {t['images']} photos ({arch} fp32): sequential loop {t['sequential_s']:.2f} s, "
            f"pipelined CLI {t['pipelined_s']:.2f} s, speed-up {t['sequential_s'] / t['pipelined_s']:.2f}x"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--only", choices=["all", "methods"], default="all", help="run every part, or the methods part only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        harness.worker(json.loads(args.worker))
        return 0
    if not EVAL.is_dir():
        print(f"bench: error: {EVAL} is absent: the benchmark needs its photos", file=sys.stderr)
        return 2
    # Outputs go to a RAM disk when there is one: on the project's VMs a write to the
    # virtual disk costs the next compute ~10 ms (measured: ResNet-18 trunk 17.8 ms
    # alone, 30.8 ms after a 100 kB write to /tmp, 17.6 ms after one to /dev/shm),
    # for every method alike, which would hide the differences being measured.
    ram = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=ram if ram.is_dir() else None) as tmp_name:
        tmp = Path(tmp_name)
        if args.only == "methods":
            bundles, weights = harness.export_bundles(tmp, int8=False)
            import torch

            section = harness.methods_section(bundles, weights, args.rounds, tmp)
            print(f"npcam benchmark (methods), {time.strftime('%Y-%m-%d')}, {harness.cpu_name()}, {os.cpu_count()} cores, "
                  f"torch {torch.__version__}, onnxruntime {npcam.model.ort.__version__}, {args.rounds} rounds")  # fmt: skip
            print("\n".join(methods_report(section)))
            if args.json:
                args.json.write_text(json.dumps(section, indent=2))
            return 0
        inputs = harness.make_inputs(tmp)
        bundles, weights = harness.export_bundles(tmp)
        specs = {f"npcam {name}": {"kind": "npcam", "bundle": str(b)} for name, b in bundles.items()}
        for arch, name in (("ResNet-18", "resnet18"), ("Lite0", "efficientnet_lite0")):
            specs[f"torch {arch}"] = {"kind": "torch", "arch": name, "weights": str(weights[arch])}
            specs[f"TorchCAM {arch}"] = {"kind": "torchcam", "arch": name, "weights": str(weights[arch])}
        workers = {}
        for i, (name, spec) in enumerate(specs.items()):
            (tmp / f"out{i}").mkdir()
            workers[name] = harness.Worker({**spec, "inputs": [str(p) for p in inputs], "out": str(tmp / f"out{i}")})
        import torch

        results = {
            "date": time.strftime("%Y-%m-%d"),
            "cpu": harness.cpu_name(),
            "versions": f"torch {torch.__version__}, onnxruntime {npcam.model.ort.__version__}",
            "rounds": args.rounds,
            "outputs": str(tmp.parent),
            "inputs": {p.name: "x".join(map(str, Image.open(p).size)) for p in inputs},
        }
        print(f"measuring {len(workers)} methods on {len(inputs)} images, {args.rounds} rounds…", file=sys.stderr)
        results["end_to_end"] = harness.end_to_end(workers, args.rounds)
        results["post_trunk_12mp"] = harness.post_trunk_vs_opencv(args.rounds)
        print("directory throughput…", file=sys.stderr)
        results["throughput"] = {
            arch: workers[f"npcam {arch} fp32"].ask({"do": "throughput", "rounds": max(2, args.rounds // 2)})
            for arch in ("ResNet-18", "Lite0")
        }
        for w in workers.values():
            w.close()
        print("cold starts…", file=sys.stderr)
        results["cold_start"] = {
            arch: harness.cold_start(name, bundles[f"{arch} fp32"], weights[arch], inputs[1], tmp, args.rounds)
            for arch, name in (("ResNet-18", "resnet18"), ("Lite0", "efficientnet_lite0"))
        }
        runtime_mib, runtime = harness.installed_mib(["numpy", "pillow", "onnxruntime"])
        torch_mib, _ = harness.installed_mib(["torch"])
        results["installed"] = {"runtime_mib": runtime_mib, "runtime": runtime, "torch_mib": torch_mib}
        print("explanation methods…", file=sys.stderr)
        results["methods"] = harness.methods_section(bundles, weights, args.rounds, tmp)
    text = report(results) + "\n" + "\n".join(methods_report(results["methods"]))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
