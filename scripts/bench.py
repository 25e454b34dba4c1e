"""npcam against the torch way, side by side in one run.

    pip install -e '.[export,bench]'
    python scripts/bench.py [--rounds 5] [--json FILE]

Same weights for everyone (a seeded random-init ResNet-18, and EfficientNet-Lite0's
real ones), same inputs (photos from ../shared/eval plus generated 1 MP and
12 MP JPEGs), same output (a JPEG overlay of the top-1 CAM). Methods alternate
within each round (A B C A B C …) and every figure is a median, because the
machines are shared and noisy. Measures:

1. end to end per image, decode to file written, with npcam's stage breakdown:
   npcam fp32, npcam int8, a plain torch pipeline (forward, CAM, F.interpolate,
   OpenCV colormap and blend) and TorchCAM (its CAM extractor and overlay);
2. post-trunk work: at 0.2 MP as a share of the trunk, and at 12 MP npcam's
   upsample+colormap+blend vs OpenCV's resize+applyColorMap+addWeighted;
3. cold start and peak RSS: one ``python -m npcam`` process vs a one-image torch script;
4. installed size of the runtime's dependencies vs torch's;
5. throughput over a directory of 200 photos: the pipelined CLI vs a sequential loop.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchcam.methods import CAM
from torchcam.utils import overlay_mask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # export/ runs from a checkout, it is not installed

import npcam  # noqa: E402
from export.__main__ import run as export  # noqa: E402
from export.archs import ARCHS  # noqa: E402
from export.bundle import _Trunk  # noqa: E402
from export.weights import find_weights, load_state_dict  # noqa: E402
from npcam.cli import Job, parse_args, run, save_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO.parent / "shared" / "eval" / "images"
PHOTOS = [
    "227/ILSVRC2012_val_00000361.JPEG",
    "crop8/ILSVRC2012_val_00000006.JPEG",
    "crop8/ILSVRC2012_val_00000022.JPEG",
    "package_photos/coffee.png",
    "package_photos/bus.jpg",
    "package_photos/zidane.jpg",
]
STAGES = ["decode", "preprocess", "trunk", "head+CAM", "upsample", "colormap+blend", "encode"]


def median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000)


# The methods: each writes the top-1 CAM overlay of `path` to `out` as JPEG.


def npcam_staged(model: npcam.Model, path: Path, out: Path) -> dict[str, float]:
    """npcam's CLI path, one step at a time, with each step timed."""
    t = [time.perf_counter()]
    rgb = npcam.read_image(path)
    t.append(time.perf_counter())
    x = model.preprocess(rgb)
    t.append(time.perf_counter())
    features = model.features(x)
    t.append(time.perf_counter())
    logits = npcam.logits(features, model.fc_weight, model.fc_bias)[0]
    cam = npcam.class_activation_maps(features[0], model.fc_weight, [int(np.argmax(logits))])[0]
    npcam.softmax(logits)
    t.append(time.perf_counter())
    full = npcam.upsample(cam, rgb.shape[:2])
    t.append(time.perf_counter())
    picture = npcam.overlay(rgb, full, 0.5)
    t.append(time.perf_counter())
    save_image(out, picture)
    t.append(time.perf_counter())
    return dict(zip(STAGES, np.diff(t)))


class TorchWay:
    """The same job in torch: what a user of the seed tutorial would write, done right."""

    def __init__(self, net: torch.nn.Module, fc: torch.nn.Linear, size: int, mean, std):
        self.net, self.fc, self.size = net.eval(), fc, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def tensor(self, img: Image.Image) -> torch.Tensor:
        resized = img.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
        return ((x - self.mean) / self.std)[None]

    def __call__(self, path: Path, out: Path) -> None:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            features = self.net.trunk(self.tensor(img))
            logits = self.fc(features.mean(dim=(2, 3)))
            cam = torch.relu(torch.einsum("k,khw->hw", self.fc.weight[logits.argmax()], features[0]))
            cam = cam / cam.max().clamp(min=1e-12)
            cam = F.interpolate(cam[None, None], size=(img.height, img.width), mode="bilinear", align_corners=False)
        heat = cv2.applyColorMap((cam[0, 0] * 255).round().byte().numpy(), cv2.COLORMAP_JET)
        bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out), cv2.addWeighted(heat, 0.5, bgr, 0.5, 0), [cv2.IMWRITE_JPEG_QUALITY, 90])


class TorchCamWay(TorchWay):
    """TorchCAM's CAM extractor and overlay on the same module."""

    def __init__(self, net, fc, size, mean, std):
        super().__init__(net, fc, size, mean, std)
        # TorchCAM hooks a module's output, so the trunk becomes a module ahead of GAP + FC.
        self.classifier = torch.nn.Sequential(_Trunk(net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc).eval()
        self.extractor = CAM(self.classifier, target_layer=self.classifier[0], fc_layer=self.classifier[3])

    def __call__(self, path: Path, out: Path) -> None:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            scores = self.classifier(self.tensor(img))
            cam = self.extractor(int(scores.argmax()), scores)[0][0]
        overlay_mask(img, Image.fromarray(cam.numpy(), mode="F"), alpha=0.5).save(out, quality=90)


# Setup


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


def random_resnet18_weights(tmp: Path) -> Path:
    from export import resnet

    torch.manual_seed(0)
    path = tmp / "resnet18-random.pth"
    torch.save(resnet.resnet18().state_dict(), path)
    return path


def torch_net(arch_name: str, weights: Path) -> tuple[torch.nn.Module, torch.nn.Linear]:
    arch = ARCHS[arch_name]
    net = arch.build()
    net.load_state_dict(load_state_dict(weights), strict=True)
    return net.eval(), getattr(net, arch.fc_name)


# Measurements


def end_to_end(models: dict, inputs: list[Path], tmp: Path, rounds: int) -> dict:
    """Median seconds per (method, image), methods alternating within each round."""
    times: dict[tuple[str, str], list[float]] = {}
    stages: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in range(rounds + 1):  # round 0 warms up caches and lazy initialisation
        for name, method in models.items():
            for path in inputs:
                out = tmp / f"out_{name.replace(' ', '_')}_{path.stem}.jpg"
                start = time.perf_counter()
                result = method(path, out)
                elapsed = time.perf_counter() - start
                if r == 0:
                    continue
                times.setdefault((name, path.name), []).append(elapsed)
                if isinstance(result, dict):
                    for stage, seconds in result.items():
                        stages.setdefault((name, path.name), {}).setdefault(stage, []).append(seconds)
    return {
        "ms": {f"{m}|{p}": median_ms(t) for (m, p), t in times.items()},
        "stages_ms": {f"{m}|{p}": {s: median_ms(t) for s, t in st.items()} for (m, p), st in stages.items()},
    }


def post_trunk_vs_opencv(rounds: int) -> dict:
    """At 12 MP: npcam's upsample+colormap+blend vs OpenCV's resize+applyColorMap+addWeighted."""
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


def timed_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:4]} failed: {process.stderr.read().decode()[-500:]}")
    return elapsed, usage.ru_maxrss / 1024


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


def throughput(bundle: Path, tmp: Path, rounds: int) -> dict:
    """200 photos: the CLI's pipelined run vs a plain loop over the API, in one process."""
    photos = sorted(p for p in EVAL.rglob("*") if p.is_file())[:200]
    model = npcam.load(bundle)
    args = parse_args(["x"])
    out = tmp / "dir_out"
    out.mkdir(exist_ok=True)
    jobs = [Job(p, out / f"{i}_cam.jpg") for i, p in enumerate(photos)]

    def sequential():
        for job in jobs:
            save_image(job.output, model.overlay(model.predict(job.image)))

    def pipelined():
        for _, result in run(model, jobs, args, None):
            assert not isinstance(result, str), result

    times = {"sequential": [], "pipelined": []}
    for _ in range(rounds):
        for name, fn in (("sequential", sequential), ("pipelined", pipelined)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"images": len(photos), **{f"{k}_s": float(np.median(v)) for k, v in times.items()}}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# Report


def report(results: dict, inputs: list[Path]) -> str:
    e2e = results["end_to_end"]["ms"]
    methods = list(dict.fromkeys(k.split("|")[0] for k in e2e))
    lines = [
        f"npcam benchmark, {results['date']}, {results['cpu']}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, onnxruntime {npcam.model.ort.__version__}, {results['rounds']} rounds, medians",
        "",
        "End to end per image, decode to JPEG written (ms):",
        "| image | size | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for path in inputs:
        with Image.open(path) as im:
            size = f"{im.width}x{im.height}"
        lines.append(
            f"| {path.name} | {size} | " + " | ".join(f"{e2e[f'{m}|{path.name}']:.1f}" for m in methods) + " |"
        )
    geo = {m: float(np.exp(np.mean([np.log(e2e[f"{m}|{p.name}"]) for p in inputs[:-1]]))) for m in methods}
    lines.append("| geometric mean, photos ≤ 1 MP | | " + " | ".join(f"{geo[m]:.1f}" for m in methods) + " |")
    lines += ["", "Ratios (geometric mean over the photos ≤ 1 MP):"]
    for arch in ("ResNet-18", "Lite0"):
        base = f"TorchCAM {arch}"
        if base in geo:
            for m in (f"npcam {arch} fp32", f"npcam {arch} int8", f"torch {arch}"):
                if m in geo:
                    lines.append(f"- {m} / {base}: {geo[m] / geo[base]:.2f}")
    stages = results["end_to_end"]["stages_ms"]
    lines += [
        "",
        "npcam stage breakdown (ms):",
        "| method, image | " + " | ".join(STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    for key, st in stages.items():
        lines.append(f"| {key.replace('|', ', ')} | " + " | ".join(f"{st[s]:.2f}" for s in STAGES) + " |")
    share = results["post_trunk_share"]
    lines += [
        "",
        f"Post-trunk work (head+CAM, upsample, colormap+blend) on {share['image']}: "
        + ", ".join(f"{m} {v:.1%} of the trunk" for m, v in share["share"].items()),
    ]
    opencv = results["post_trunk_12mp"]
    lines.append(
        f"12 MP upsample+colormap+blend: npcam {opencv['npcam_ms']:.1f} ms, OpenCV resize+applyColorMap+addWeighted "
        f"{opencv['opencv_ms']:.1f} ms, ratio {opencv['npcam_ms'] / opencv['opencv_ms']:.2f}"
    )
    cold = results["cold_start"]
    lines += ["", "Cold start, one process for one image (wall ms, peak RSS MiB):"]
    for arch, r in cold.items():
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
    t = results["throughput"]
    lines.append(
        f"Directory of {t['images']} photos (ResNet-18): sequential loop {t['sequential_s']:.2f} s, pipelined CLI "
        f"{t['pipelined_s']:.2f} s, speed-up {t['sequential_s'] / t['pipelined_s']:.2f}x"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args()
    if not EVAL.is_dir():
        print(f"bench: error: {EVAL} is absent: the benchmark needs its photos", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        inputs = make_inputs(tmp)
        calibration = EVAL / "crop8"
        r18_weights = random_resnet18_weights(tmp)
        lite_weights = find_weights(ARCHS["efficientnet_lite0"])
        bundles = {
            "ResNet-18 fp32": export("resnet18", tmp / "r18", r18_weights),
            "ResNet-18 int8": export("resnet18", tmp / "r18_int8", r18_weights, int8=calibration),
            "Lite0 fp32": export("efficientnet_lite0", tmp / "lite0"),
            "Lite0 int8": export("efficientnet_lite0", tmp / "lite0_int8", int8=calibration),
        }
        models = {
            f"npcam {k}": (lambda m: lambda path, out: npcam_staged(m, path, out))(npcam.load(b))
            for k, b in bundles.items()
        }
        for arch, name, weights in (
            ("ResNet-18", "resnet18", r18_weights),
            ("Lite0", "efficientnet_lite0", lite_weights),
        ):
            net, fc = torch_net(name, weights)
            a = ARCHS[name]
            models[f"torch {arch}"] = TorchWay(net, fc, a.input_size, a.mean, a.std)
            models[f"TorchCAM {arch}"] = TorchCamWay(net, fc, a.input_size, a.mean, a.std)
        print(f"measuring {len(models)} methods on {len(inputs)} images, {args.rounds} rounds…", file=sys.stderr)
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "cpu": cpu_name(),
            "rounds": args.rounds,
            "end_to_end": end_to_end(models, inputs, tmp, args.rounds),
        }
        small = "ILSVRC2012_val_00000006.JPEG"  # 496x368, 0.18 MP
        post = ("head+CAM", "upsample", "colormap+blend")
        results["post_trunk_share"] = {
            "image": small,
            "share": {
                m: sum(st[s] for s in post) / st["trunk"]
                for key, st in results["end_to_end"]["stages_ms"].items()
                for m in [key.split("|")[0]]
                if key.endswith(small)
            },
        }
        results["post_trunk_12mp"] = post_trunk_vs_opencv(args.rounds)
        print("cold starts…", file=sys.stderr)
        results["cold_start"] = {
            "ResNet-18": cold_start("resnet18", bundles["ResNet-18 fp32"], r18_weights, inputs[1], tmp, args.rounds),
            "Lite0": cold_start("efficientnet_lite0", bundles["Lite0 fp32"], lite_weights, inputs[1], tmp, args.rounds),
        }
        runtime_mib, runtime = installed_mib(["numpy", "pillow", "onnxruntime"])
        torch_mib, _ = installed_mib(["torch"])
        results["installed"] = {"runtime_mib": runtime_mib, "runtime": runtime, "torch_mib": torch_mib}
        print("directory throughput…", file=sys.stderr)
        results["throughput"] = throughput(bundles["ResNet-18 fp32"], tmp, max(2, args.rounds // 2))
        text = report(results, inputs)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
