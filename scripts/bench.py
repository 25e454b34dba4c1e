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
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # export/ runs from a checkout, it is not installed

# npcam before NumPy, as in the CLI: npcam then sets NumPy's BLAS threads (see npcam/__init__.py).
import npcam  # noqa: E402, I001
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

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
STAGES = ["decode", "preprocess", "trunk", "head+CAM", "upsample", "colormap+blend", "encode"]
POST_TRUNK = ("head+CAM", "upsample", "colormap+blend")


def median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000)


# The methods: each writes the top-1 CAM overlay of `path` to `out` as a JPEG.


def npcam_method(bundle: str):
    """npcam's CLI path, one step at a time, each step timed."""
    model = npcam.load(bundle)

    def method(path: Path, out: Path) -> dict[str, float]:
        t = [time.perf_counter()]
        pil = npcam.image.open_image(path)  # as Model.predict does
        rgb = np.asarray(pil)
        t.append(time.perf_counter())
        x = model.preprocess(pil)
        t.append(time.perf_counter())
        features = model.features(x)
        t.append(time.perf_counter())
        logits = npcam.logits(features, model.fc_weight, model.fc_bias)[0]
        npcam.softmax(logits)
        cam = npcam.class_activation_maps(features[0], model.fc_weight, [int(np.argmax(logits))])[0]
        t.append(time.perf_counter())
        full = npcam.upsample(cam, rgb.shape[:2])
        t.append(time.perf_counter())
        picture = npcam.overlay(rgb, full, 0.5)
        t.append(time.perf_counter())
        save_image(out, picture)
        t.append(time.perf_counter())
        return dict(zip(STAGES, np.diff(t)))

    return method


def torch_method(arch_name: str, weights: str, use_torchcam: bool):
    """The same job in torch: plainly, or through TorchCAM's extractor and overlay."""
    import cv2
    import torch
    import torch.nn.functional as F

    from export.archs import ARCHS
    from export.weights import load_state_dict

    arch = ARCHS[arch_name]
    net = arch.build()
    net.load_state_dict(load_state_dict(Path(weights)), strict=True)
    net.eval()
    fc = getattr(net, arch.fc_name)
    mean, std = torch.tensor(arch.mean).view(3, 1, 1), torch.tensor(arch.std).view(3, 1, 1)

    def tensor(img: Image.Image) -> torch.Tensor:
        resized = img.resize((arch.input_size, arch.input_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
        return ((x - mean) / std)[None]

    def plain(path: Path, out: Path) -> None:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            features = net.trunk(tensor(img))
            logits = fc(features.mean(dim=(2, 3)))
            cam = torch.relu(torch.einsum("k,khw->hw", fc.weight[logits.argmax()], features[0]))
            cam = cam / cam.max().clamp(min=1e-12)
            cam = F.interpolate(cam[None, None], size=(img.height, img.width), mode="bilinear", align_corners=False)
        heat = cv2.applyColorMap((cam[0, 0] * 255).round().byte().numpy(), cv2.COLORMAP_JET)
        bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out), cv2.addWeighted(heat, 0.5, bgr, 0.5, 0), [cv2.IMWRITE_JPEG_QUALITY, 90])

    if not use_torchcam:
        return plain

    from torchcam.methods import CAM
    from torchcam.utils import overlay_mask

    from export.from_torch import Trunk

    # TorchCAM hooks a module's output, so the trunk becomes a module ahead of GAP + FC.
    classifier = torch.nn.Sequential(Trunk(net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc).eval()
    extractor = CAM(classifier, target_layer=classifier[0], fc_layer=classifier[3])

    def torchcam_way(path: Path, out: Path) -> None:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            scores = classifier(tensor(img))
            cam = extractor(int(scores.argmax()), scores)[0][0]
        overlay_mask(img, Image.fromarray(cam.numpy(), mode="F"), alpha=0.5).save(out, quality=90)

    return torchcam_way


# Worker processes: one per method, driven over stdin/stdout, one JSON line each way.


def worker(spec: dict) -> None:
    if spec["kind"] == "npcam":
        method = npcam_method(spec["bundle"])
    else:
        method = torch_method(spec["arch"], spec["weights"], spec["kind"] == "torchcam")
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
    def __init__(self, spec: dict):
        command = [sys.executable, __file__, "--worker", json.dumps(spec)]
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
            save_image(job.output, loop_model.overlay(loop_model.predict(job.image)))

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
    weights = model.fc_weight[[pred.top1]]
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
        model = npcam.load(spec["bundle"])

        def run(path):
            pred = model.predict(path)
            model.cam(pred, pred.top1, method="scorecam")

    else:
        import torch
        from torchcam.methods import ScoreCAM

        from export.archs import ARCHS
        from export.from_torch import Trunk
        from export.weights import load_state_dict

        arch = ARCHS[spec["arch"]]
        net = arch.build()
        net.load_state_dict(load_state_dict(Path(spec["weights"])), strict=True)
        net.eval()
        fc = getattr(net, arch.fc_name)
        classifier = torch.nn.Sequential(Trunk(net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc).eval()
        extractor = ScoreCAM(classifier, target_layer=classifier[0], batch_size=32)
        mean, std = torch.tensor(arch.mean).view(3, 1, 1), torch.tensor(arch.std).view(3, 1, 1)

        def run(path):
            img = Image.open(path).convert("RGB").resize((arch.input_size,) * 2, Image.BILINEAR)
            x = ((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std)[None]
            with torch.no_grad():
                scores = classifier(x)
                extractor(int(scores.argmax()), scores)

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


TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import cv2, numpy as np, torch, torch.nn.functional as F
    from PIL import Image
    sys.path.insert(0, sys.argv[4])
    from export.archs import ARCHS
    arch = ARCHS[sys.argv[1]]
    net = arch.build()
    net.load_state_dict(torch.load(sys.argv[2], map_location="cpu", weights_only=True))
    net.eval()
    fc = getattr(net, arch.fc_name)
    img = Image.open(sys.argv[3]).convert("RGB")
    x = torch.from_numpy(np.asarray(img.resize((arch.input_size,) * 2, Image.BILINEAR)).copy())
    x = ((x.permute(2, 0, 1).float() / 255 - torch.tensor(arch.mean).view(3, 1, 1)) / torch.tensor(arch.std).view(3, 1, 1))[None]
    with torch.no_grad():
        f = net.trunk(x)
        logits = fc(f.mean(dim=(2, 3)))
        cam = torch.relu(torch.einsum("k,khw->hw", fc.weight[logits.argmax()], f[0]))
        cam = F.interpolate((cam / cam.max())[None, None], size=(img.height, img.width), mode="bilinear")
    heat = cv2.applyColorMap((cam[0, 0] * 255).round().byte().numpy(), cv2.COLORMAP_JET)
    cv2.imwrite(sys.argv[5], cv2.addWeighted(heat, 0.5, cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR), 0.5, 0))
    """
)

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
    script = tmp / "torch_cam.py"
    script.write_text(TORCH_SCRIPT)
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
    from export.__main__ import run as export
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
        worker(json.loads(args.worker))
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
            bundles, weights = export_bundles(tmp, int8=False)
            import torch

            section = methods_section(bundles, weights, args.rounds, tmp)
            print(f"npcam benchmark (methods), {time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, "
                  f"torch {torch.__version__}, onnxruntime {npcam.model.ort.__version__}, {args.rounds} rounds")  # fmt: skip
            print("\n".join(methods_report(section)))
            if args.json:
                args.json.write_text(json.dumps(section, indent=2))
            return 0
        inputs = make_inputs(tmp)
        bundles, weights = export_bundles(tmp)
        specs = {f"npcam {name}": {"kind": "npcam", "bundle": str(b)} for name, b in bundles.items()}
        for arch, name in (("ResNet-18", "resnet18"), ("Lite0", "efficientnet_lite0")):
            specs[f"torch {arch}"] = {"kind": "torch", "arch": name, "weights": str(weights[arch])}
            specs[f"TorchCAM {arch}"] = {"kind": "torchcam", "arch": name, "weights": str(weights[arch])}
        workers = {}
        for i, (name, spec) in enumerate(specs.items()):
            (tmp / f"out{i}").mkdir()
            workers[name] = Worker({**spec, "inputs": [str(p) for p in inputs], "out": str(tmp / f"out{i}")})
        import torch

        results = {
            "date": time.strftime("%Y-%m-%d"),
            "cpu": cpu_name(),
            "versions": f"torch {torch.__version__}, onnxruntime {npcam.model.ort.__version__}",
            "rounds": args.rounds,
            "outputs": str(tmp.parent),
            "inputs": {p.name: "x".join(map(str, Image.open(p).size)) for p in inputs},
        }
        print(f"measuring {len(workers)} methods on {len(inputs)} images, {args.rounds} rounds…", file=sys.stderr)
        results["end_to_end"] = end_to_end(workers, args.rounds)
        results["post_trunk_12mp"] = post_trunk_vs_opencv(args.rounds)
        print("directory throughput…", file=sys.stderr)
        results["throughput"] = {
            arch: workers[f"npcam {arch} fp32"].ask({"do": "throughput", "rounds": max(2, args.rounds // 2)})
            for arch in ("ResNet-18", "Lite0")
        }
        for w in workers.values():
            w.close()
        print("cold starts…", file=sys.stderr)
        results["cold_start"] = {
            arch: cold_start(name, bundles[f"{arch} fp32"], weights[arch], inputs[1], tmp, args.rounds)
            for arch, name in (("ResNet-18", "resnet18"), ("Lite0", "efficientnet_lite0"))
        }
        runtime_mib, runtime = installed_mib(["numpy", "pillow", "onnxruntime"])
        torch_mib, _ = installed_mib(["torch"])
        results["installed"] = {"runtime_mib": runtime_mib, "runtime": runtime, "torch_mib": torch_mib}
        print("explanation methods…", file=sys.stderr)
        results["methods"] = methods_section(bundles, weights, args.rounds, tmp)
    text = report(results) + "\n" + "\n".join(methods_report(results["methods"]))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
