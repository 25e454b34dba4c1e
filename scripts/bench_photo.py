"""Camera-size photos: npcam against torch + OpenCV on 12 MP JPEGs, side by side in one run.

    python scripts/bench_photo.py [--rounds 5] [--photos DIR] [--json FILE]

The photos are made here (never shipped): each sample in ``samples/`` upscaled
to 4000x3000 (or 3000x4000) with a little noise, saved as JPEG quality 90,
about 3.3 MB each, like a phone's. Or ``--photos DIR`` uses yours. The model
is a seeded random-init ResNet-18, the same weights for everyone. Each method
runs in a worker process of its own and the workers take turns, photo by
photo; every figure is a median over the rounds. Measures:

1. default mode, decode to JPEG overlay written: npcam's CLI path
   (``explain`` + ``write``), npcam as it was before (full decode, array
   copy, exact resize, upsample, overlay, array-copy encode) and the plain
   torch + OpenCV pipeline of ``scripts/bench.py`` (default threads, and one
   thread for torch, OpenCV, onnxruntime and npcam's overlay); with npcam's stages;
2. record-only runs (``--json --no-overlay``, ``npcam dataset`` without
   ``--overlays``, ``serve`` with ``format=json``): ``explain`` + ``describe``
   with full decode (before) and with reduced-scale decode (now), one image
   at a time (plain and with ``--bbox``, whose box needs the map at full
   size) and as a directory run over every core (the CLI's pipeline; before,
   ``--json`` also wrote the overlays).

Meant to be folded into ``scripts/bench.py``; it reuses that script's torch
pipeline, table and CPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import npcam  # noqa: E402, I001  (before NumPy: npcam sets its BLAS threads)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import bench  # noqa: E402
import bench_harness  # noqa: E402
import bench_pipelines  # noqa: E402
from npcam.explain import Options, describe, explain, explain_file, explain_files  # noqa: E402
from npcam.files import Job, save_image  # noqa: E402
from npcam.image import preprocess, read_photo  # noqa: E402

STAGES = ["decode", "preprocess", "trunk+head+CAM", "overlay", "encode"]


def make_photos(folder: Path) -> list[Path]:
    """The samples as 12 MP JPEGs: bicubic upscale, Gaussian noise of 8 levels, quality 90."""
    rng = np.random.default_rng(0)
    paths = []
    for sample in sorted((REPO / "samples").glob("*")):
        if sample.stem in ("overlay_example", "serve_page") or sample.suffix not in (".png", ".jpg"):
            continue
        img = Image.open(sample).convert("RGB")
        size = (4000, 3000) if img.width >= img.height else (3000, 4000)
        big = np.asarray(img.resize(size, Image.BICUBIC)).astype(np.float32)
        noisy = np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)
        path = folder / f"{sample.stem}_12mp.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


# Methods: each takes (photo, output path) and returns its stage times (or None).


def npcam_now(bundle: str, threads: int | None = None):
    """The CLI's default mode: explain_file (read_photo, preprocess, trunk, maps, fused overlay, encode)."""
    model = npcam.load(bundle, threads=threads)
    if threads == 1:
        npcam.render.usable_cores = lambda: 1  # the overlay's bands in this thread too
    options = Options().checked(model)

    def run(path: Path, out: Path):
        explain_file(model, options, frozenset(), Job(path, out))

    return run


def npcam_now_stages(bundle: str):
    """The same steps as explain() + write(), one at a time, to show where the time goes."""
    model = npcam.load(bundle)
    options = Options().checked(model)

    def run(path: Path, out: Path) -> dict[str, float]:
        t = [time.perf_counter()]
        pil, rgb, size = read_photo(path)
        t.append(time.perf_counter())
        x = model.preprocess(pil)
        t.append(time.perf_counter())
        pred = model.classify([rgb], [x], [size])[0]
        maps = model.cam(pred, [pred.top1])
        t.append(time.perf_counter())
        explanation = npcam.Explanation(str(path), pred, options.method, [pred.top1], maps)
        picture = npcam.draw(explanation, 0, options)
        t.append(time.perf_counter())
        save_image(out, picture)
        t.append(time.perf_counter())
        return dict(zip(STAGES, np.diff(t)))

    return run


def npcam_before(bundle: str):
    """npcam's default mode before this change: every step as it was, same onnxruntime."""
    model = npcam.load(bundle)

    def run(path: Path, out: Path) -> dict[str, float]:
        t = [time.perf_counter()]
        pil = npcam.open_image(path)
        rgb = np.asarray(pil)
        t.append(time.perf_counter())
        x = preprocess(pil, model.bundle.input_size, model.bundle.mean, model.bundle.std, reducing_gap=None)
        t.append(time.perf_counter())
        pred = model.classify([rgb], [x])[0]
        maps = model.cam(pred, [pred.top1])
        t.append(time.perf_counter())
        picture = npcam.overlay(rgb, npcam.upsample(maps[0], rgb.shape[:2]), 0.5)
        t.append(time.perf_counter())
        save_image(out, picture)
        t.append(time.perf_counter())
        return dict(zip(STAGES, np.diff(t)))

    return run


def records(bundle: str, pixels: bool, bbox: bool = False):
    """A record-only run: explain + describe, full decode (pixels=True, as before) or reduced (now)."""
    model = npcam.load(bundle)
    options = Options(bbox=bbox).checked(model)

    def run(path: Path, out: Path):
        describe(explain(model, path, options, pixels=pixels), options)

    return run


METHODS = {
    "npcam now": npcam_now,
    "npcam now, 1 thread": lambda b: npcam_now(b, threads=1),
    "npcam now, stages": npcam_now_stages,
    "npcam before": npcam_before,
    "records, full decode": lambda b: records(b, True),
    "records, reduced decode": lambda b: records(b, False),
    "records --bbox, full decode": lambda b: records(b, True, bbox=True),
    "records --bbox, reduced decode": lambda b: records(b, False, bbox=True),
}


def directory(bundle: str, photos: list[Path], out: Path, copies: int, overlays: bool) -> float:
    """Seconds for the CLI's pipelined directory run (one thread per worker, a worker per core) over the photos."""
    model = npcam.load(bundle, threads=1)
    options = Options().checked(model)
    jobs = [Job(p, out / f"{i}_{p.stem}_cam.jpg") for i in range(copies) for p in photos]
    start = time.perf_counter()
    for _, result in explain_files(model, jobs, options, overlays=overlays):
        assert not isinstance(result, str), result
    return time.perf_counter() - start


def worker(spec: dict) -> None:
    if spec["kind"].startswith("torch"):
        if spec["kind"] == "torch, 1 thread":
            import cv2
            import torch

            torch.set_num_threads(1)
            cv2.setNumThreads(1)
        method = bench_pipelines.torch_pipeline(bench_pipelines.torch_reference("resnet18", spec["weights"]))
    else:
        method = METHODS[spec["kind"]](spec["bundle"])
    out = Path(spec["out"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "photo":
            path = Path(command["photo"])
            start = time.perf_counter()
            stages = method(path, out / f"{path.stem}_cam.jpg")
            reply = {"total": time.perf_counter() - start, "stages": stages}
        elif command["do"] == "directory":
            photos = [Path(p) for p in command["photos"]]
            reply = {"seconds": directory(spec["bundle"], photos, out, command["copies"], command["overlays"])}
        else:
            break
        print(json.dumps(reply), flush=True)


def export_resnet18(tmp: Path) -> tuple[Path, Path]:
    import torch

    from export import resnet
    from export.api import run as export

    torch.manual_seed(0)
    weights = tmp / "resnet18-random.pth"
    torch.save(resnet.resnet18().state_dict(), weights)
    return export("resnet18", tmp / "r18", weights), weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--photos", type=Path, help="a folder of JPEGs to use instead of the generated 12 MP ones")
    p.add_argument("--copies", type=int, default=4, help="each photo this many times in the directory runs")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    ram = Path("/dev/shm")  # outputs on a RAM disk, as in bench.py
    with tempfile.TemporaryDirectory(dir=ram if ram.is_dir() else None) as tmp_name:
        tmp = Path(tmp_name)
        if args.photos:
            photos = sorted(q for q in args.photos.iterdir() if q.suffix.lower() in (".jpg", ".jpeg"))
        else:
            (tmp / "photos").mkdir()
            photos = make_photos(tmp / "photos")
        bundle, weights = export_resnet18(tmp)
        kinds = ["npcam now", "npcam before", "torch", "npcam now, 1 thread", "torch, 1 thread", "npcam now, stages",
                 "records, full decode", "records, reduced decode", "records --bbox, full decode",
                 "records --bbox, reduced decode"]  # fmt: skip
        workers = {}
        for i, kind in enumerate(kinds):
            (tmp / f"out{i}").mkdir()
            spec = {"kind": kind, "bundle": str(bundle), "weights": str(weights), "out": str(tmp / f"out{i}")}
            workers[kind] = bench_harness.Worker(spec, [sys.executable, __file__, "--worker"])
        totals: dict[str, list[float]] = {k: [] for k in kinds}
        stages: dict[str, dict[str, list[float]]] = {}
        print(f"{len(kinds)} methods, {len(photos)} photos, {args.rounds} rounds…", file=sys.stderr)
        for r in range(args.rounds + 1):
            for photo in photos:
                for kind, w in workers.items():
                    reply = w.ask({"do": "photo", "photo": str(photo)})
                    if r == 0:
                        continue  # warm-up
                    totals[kind].append(reply["total"])
                    for stage, seconds in (reply["stages"] or {}).items():
                        stages.setdefault(kind, {}).setdefault(stage, []).append(seconds)
        print("directory runs…", file=sys.stderr)
        runs: dict[str, list[float]] = {"overlays (before: --json wrote them)": [], "--no-overlay": []}
        for _ in range(max(1, args.rounds // 2)):
            for name, overlays in (("overlays (before: --json wrote them)", True), ("--no-overlay", False)):
                reply = workers["npcam now"].ask(
                    {"do": "directory", "photos": [str(q) for q in photos], "copies": args.copies, "overlays": overlays}
                )
                runs[name].append(reply["seconds"])
        for w in workers.values():
            w.close()
        sizes = sorted({"x".join(map(str, Image.open(q).size)) for q in photos})
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": bench_harness.cpu_name(),
        "cores": os.cpu_count(),
        "photos": len(photos),
        "sizes": sizes,
        "rounds": args.rounds,
        "ms": {k: bench_harness.median_ms(v) for k, v in totals.items()},
        "stages_ms": {k: {s: bench_harness.median_ms(v) for s, v in st.items()} for k, st in stages.items()},
        "directory": {
            k: {"images": len(photos) * args.copies, "seconds": float(np.median(v))} for k, v in runs.items()
        },
    }
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict) -> str:
    ms = results["ms"]
    torch_ms = ms["torch"]
    lines = [
        f"12 MP photos, {results['date']}, {results['cpu']}, {results['cores']} cores, {results['photos']} photos "
        f"({', '.join(results['sizes'])}), {results['rounds']} rounds, medians over photos and rounds",
        "",
        "Default mode, decode to JPEG overlay written (ms):",
    ]
    rows = [[k, f"{ms[k]:.0f}", f"{ms[k] / torch_ms:.2f}"] for k in ("npcam now", "npcam before", "torch")]
    one = ms["torch, 1 thread"]
    rows += [
        [k, f"{ms[k]:.0f}", f"{ms[k] / one:.2f} (of torch, 1 thread)"]
        for k in ("npcam now, 1 thread", "torch, 1 thread")
    ]
    lines += bench.markdown_table(["method", "ms", "/ torch + OpenCV"], rows)
    lines += ["", "npcam's stages (ms):"]
    rows = [[k, *(f"{st[s]:.1f}" for s in STAGES)] for k, st in results["stages_ms"].items()]
    lines += bench.markdown_table(["method", *STAGES], rows)
    lines += [""]
    for flags in ("", " --bbox"):
        full, reduced = ms[f"records{flags}, full decode"], ms[f"records{flags}, reduced decode"]
        lines.append(
            f"Record-only{flags}, one image at a time (explain + describe): full decode {full:.0f} ms, "
            f"reduced decode {reduced:.0f} ms ({full / reduced:.2f}x the images/s)"
        )
    for name, d in results["directory"].items():
        lines.append(
            f"Directory run, {d['images']} images, {name}: {d['seconds']:.2f} s, {d['images'] / d['seconds']:.2f} images/s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
