"""The benchmark's harness: worker processes, the inputs and bundles, and each measurement.

scripts/bench.py drives it and prints the report; the pipelines being timed are
in scripts/bench_pipelines.py. Each pipeline runs in a worker process of its own,
as it would for its users (npcam's workers never import torch), driven over
stdin/stdout with one JSON line each way: ``python scripts/bench_harness.py SPEC``.
Every figure is a median, because the machines are shared and noisy.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # export/ runs from a checkout, it is not installed

# npcam before NumPy, as in the CLI: npcam then sets NumPy's BLAS threads (see npcam/__init__.py).
import npcam  # noqa: E402, I001
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import bench_pipelines as pipelines  # noqa: E402
from npcam.explain import Options, explain_files  # noqa: E402
from npcam.files import Job, save_image  # noqa: E402

# torch, torchcam, OpenCV and export/ are imported where they are used, so that
# the processes that measure npcam never load them.

EVAL = REPO.parent / "shared" / "eval" / "images"
PHOTOS = [
    "227/ILSVRC2012_val_00000361.JPEG",
    "crop8/ILSVRC2012_val_00000006.JPEG",
    "crop8/ILSVRC2012_val_00000022.JPEG",
    "package_photos/coffee.png",
    "package_photos/bus.jpg",
    "package_photos/zidane.jpg",
]
SMALL = "ILSVRC2012_val_00000006.JPEG"  # 496x368, 0.18 MP


def median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000)


# Worker processes: one per method, driven over stdin/stdout, one JSON line each way.


def pipeline(spec: dict):
    """The pipeline a worker's ``spec`` names: ``kind`` npcam (with ``bundle``), torch or torchcam (``arch``, ``weights``)."""
    if spec["kind"] == "npcam":
        return pipelines.npcam_pipeline(spec["bundle"])
    ref = pipelines.torch_reference(spec["arch"], spec["weights"])
    return (pipelines.torchcam_pipeline if spec["kind"] == "torchcam" else pipelines.torch_pipeline)(ref)


def worker(spec: dict) -> None:
    method = pipeline(spec) if spec["inputs"] else None
    inputs = [Path(p) for p in spec["inputs"]]
    out = Path(spec["out"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "round":
            reply = {}
            for path in inputs:
                start = time.perf_counter()
                stages = method(path, out / f"{path.stem}.jpg")
                reply[path.name] = {"total": time.perf_counter() - start, "stages": stages}
        elif command["do"] == "throughput":
            reply = throughput(spec["bundle"], out, command["rounds"])
        elif command["do"] == "methods":
            reply = method_costs(spec["bundle"], command["rounds"])
        elif command["do"] == "scorecam":
            reply = scorecam_seconds(spec, [Path(p) for p in command["photos"]])
        else:
            break
        print(json.dumps(reply), flush=True)


class Worker:
    """A benchmark worker process: one JSON line each way over stdin/stdout.

    ``command`` starts it, the spec is its last argument (default: this file's own worker).
    """

    def __init__(self, spec: dict, command: list[str] | None = None):
        command = [*(command or [sys.executable, __file__]), json.dumps(spec)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(None)

    def ask(self, command: dict | None) -> dict:
        if command is not None:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a benchmark worker died (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def throughput(bundle: str, tmp: Path, rounds: int) -> dict:
    """200 photos: the CLI's pipeline vs a plain loop over the API, each with its own default threads."""
    photos = sorted(p for p in EVAL.rglob("*") if p.is_file())[:200]
    out = tmp / "directory"
    out.mkdir(exist_ok=True)
    jobs = [Job(p, out / f"{i}_cam.jpg") for i, p in enumerate(photos)]
    loop_model = npcam.load(bundle)  # onnxruntime uses every core for each image
    cli_model = npcam.load(bundle, threads=1)  # what the CLI loads for several images: one thread per worker

    def sequential():
        for job in jobs:
            pred = loop_model.predict(job.image)
            full = loop_model.cam(pred, size=pred.image.shape[:2])
            save_image(job.output, npcam.overlay(pred.image, full, 0.5))

    def pipelined():
        for _, result in explain_files(cli_model, jobs, Options().checked(cli_model)):
            assert not isinstance(result, str), result

    times = {"sequential": [], "pipelined": []}
    for _ in range(rounds):
        for name, fn in (("sequential", sequential), ("pipelined", pipelined)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"images": len(photos), **{f"{k}_s": float(np.median(v)) for k, v in times.items()}}


def method_costs(bundle: str, rounds: int) -> dict:
    """Median ms of each method's maps (the top-1 class, after prediction) on the 0.2 MP photo, and einsum vs matmul."""
    model = npcam.load(bundle)
    pred = model.predict(EVAL / "crop8" / SMALL)
    times: dict[str, list[float]] = {}
    for _ in range(rounds + 1):
        for name, method in npcam.METHODS.items():
            if name == "scorecam" or (method.affine_only and model.head.kind != "affine"):
                continue
            start = time.perf_counter()
            model.cam(pred, pred.top1, method=name)
            times.setdefault(name, []).append(time.perf_counter() - start)
    weights = model.head.weight[[pred.top1]]
    f = pred.features

    def matmul():  # the CAM weighting before the method registry
        return weights.astype(np.float64) @ f.reshape(f.shape[0], -1).astype(np.float64)

    contraction = {"einsum": lambda: npcam.cam.weighted_maps(f, weights), "matmul": matmul}
    for _ in range(rounds * 20):
        for name, fn in contraction.items():
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
    return {name: median_ms(t[1:]) for name, t in times.items()}


def scorecam_seconds(spec: dict, photos: list[Path]) -> dict:
    """Seconds per photo for Score-CAM of the top-1 class, from file to map: npcam or TorchCAM."""
    if spec["kind"] == "npcam":
        run = pipelines.npcam_scorecam(spec["bundle"])
    else:
        run = pipelines.torchcam_scorecam(pipelines.torch_reference(spec["arch"], spec["weights"]))
    out = {}
    for path in photos:
        start = time.perf_counter()
        run(path)
        out[path.name] = time.perf_counter() - start
    return out


def methods_section(bundles: dict, weights: dict, rounds: int, tmp: Path) -> dict:
    """Method costs in the npcam workers, and Score-CAM npcam vs TorchCAM, taking turns photo set by photo set."""
    photos = [str(EVAL / p) for p in PHOTOS[:3]]
    result: dict = {"costs_ms": {}, "scorecam_s": {}}
    for arch, name in (("ResNet-18", "resnet18"), ("Lite0", "efficientnet_lite0")):
        ours = Worker({"kind": "npcam", "bundle": str(bundles[f"{arch} fp32"]), "inputs": [], "out": str(tmp)})
        theirs = Worker(
            {"kind": "torchcam", "arch": name, "weights": str(weights[arch]), "inputs": [], "out": str(tmp)}
        )
        result["costs_ms"][arch] = ours.ask({"do": "methods", "rounds": rounds})
        runs: dict[str, list[dict]] = {"npcam": [], "TorchCAM": []}
        for _ in range(max(1, rounds // 2)):
            runs["npcam"].append(ours.ask({"do": "scorecam", "photos": photos}))
            runs["TorchCAM"].append(theirs.ask({"do": "scorecam", "photos": photos}))
        result["scorecam_s"][arch] = {
            who: {Path(p).name: float(np.median([r[Path(p).name] for r in rs])) for p in photos}
            for who, rs in runs.items()
        }
        ours.close()
        theirs.close()
    return result


# Measurements driven from the main process


def end_to_end(workers: dict[str, Worker], rounds: int) -> dict:
    """Median ms per (method, image) and npcam's stages; a warm-up round first."""
    totals: dict[str, list[float]] = {}
    stages: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds + 1):
        for name, w in workers.items():
            reply = w.ask({"do": "round"})
            if r == 0:
                continue
            for image, result in reply.items():
                totals.setdefault(f"{name}|{image}", []).append(result["total"])
                for stage, seconds in (result["stages"] or {}).items():
                    stages.setdefault(f"{name}|{image}", {}).setdefault(stage, []).append(seconds)
    return {
        "ms": {k: median_ms(v) for k, v in totals.items()},
        "stages_ms": {k: {s: median_ms(t) for s, t in v.items()} for k, v in stages.items()},
    }


def post_trunk_vs_opencv(rounds: int) -> dict:
    """At 12 MP: npcam's upsample+colormap+blend vs OpenCV's resize+applyColorMap+addWeighted."""
    import cv2

    rng = np.random.default_rng(1)
    cam = rng.random((7, 7), dtype=np.float32)
    image = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    ours, theirs = [], []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        npcam.overlay(image, npcam.upsample(cam, image.shape[:2]), 0.5)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        full = cv2.resize(cam, (4000, 3000), interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(np.uint8(np.clip(full * 255 + 0.5, 0, 255)), cv2.COLORMAP_JET)
        cv2.addWeighted(heat, 0.5, image, 0.5, 0)
        theirs.append(time.perf_counter() - t)
    return {"npcam_ms": median_ms(ours[1:]), "opencv_ms": median_ms(theirs[1:])}


# Runs a command and reports its wall time and peak RSS. A child forked from a big
# process would start with that process's RSS as its high-water mark, so a small
# launcher process forks the command instead.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the command's own output is not the report
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def timed_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process running ``command``."""
    result = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *command], capture_output=True, text=True)
    wall, rss_kib, code = result.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{command[:4]} failed: {result.stderr[-500:]}")
    return float(wall), int(rss_kib) / 1024


def cold_start(arch: str, bundle: Path, weights: Path, image: Path, tmp: Path, rounds: int) -> dict:
    script = Path(pipelines.__file__)  # its __main__: the torch pipeline on one image
    commands = {
        "npcam": [sys.executable, "-m", "npcam", str(image), "-m", str(bundle), "-o", str(tmp / "cold_npcam.jpg")],
        "torch": [sys.executable, str(script), arch, str(weights), str(image), str(REPO), str(tmp / "cold_torch.jpg")],
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            runs[name].append(timed_process(command))
    return {
        name: {"wall_ms": median_ms([w for w, _ in r]), "peak_rss_mib": float(np.median([m for _, m in r]))}
        for name, r in runs.items()
    }


def installed_mib(roots: list[str]) -> tuple[float, list[str]]:
    """Size on disk of these distributions and everything they require (extras excluded)."""
    seen, todo, total = set(), list(roots), 0
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for f in dist.files or []:
            path = Path(dist.locate_file(f))
            if path.is_file():
                total += path.stat().st_size
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return total / 2**20, sorted(seen)


def make_inputs(tmp: Path) -> list[Path]:
    paths = [EVAL / p for p in PHOTOS]
    rng = np.random.default_rng(0)
    for name, (h, w) in {"1mp.jpg": (864, 1152), "12mp.jpg": (3000, 4000)}.items():
        y, x = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(x[..., None] / 97.0 + y[..., None] / 61.0 + np.array([0, 2, 4]))
        noisy = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(tmp / name, quality=90)
        paths.append(tmp / name)
    return paths


def export_bundles(tmp: Path, int8: bool = True) -> tuple[dict[str, Path], dict[str, Path]]:
    """The bundles to time, and the torch weights behind them."""
    import torch

    from export import resnet
    from export.api import run as export
    from export.archs import ARCHS
    from export.weights import find_weights

    torch.manual_seed(0)
    weights = {"ResNet-18": tmp / "resnet18-random.pth", "Lite0": find_weights(ARCHS["efficientnet_lite0"])}
    torch.save(resnet.resnet18().state_dict(), weights["ResNet-18"])
    calibration = EVAL / "crop8"
    bundles = {
        "ResNet-18 fp32": export("resnet18", tmp / "r18", weights["ResNet-18"]),
        "Lite0 fp32": export("efficientnet_lite0", tmp / "lite0"),
    }
    if int8:
        bundles["ResNet-18 int8"] = export("resnet18", tmp / "r18_int8", weights["ResNet-18"], int8=calibration)
        bundles["Lite0 int8"] = export("efficientnet_lite0", tmp / "lite0_int8", int8=calibration)
    order = ("ResNet-18 fp32", "ResNet-18 int8", "Lite0 fp32", "Lite0 int8")
    return {k: bundles[k] for k in order if k in bundles}, weights


def cpu_name() -> str:
    from export.quantize import cpu_name as name

    return name()


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
