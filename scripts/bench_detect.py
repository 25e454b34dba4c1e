"""npcam against torch on a YOLOv8n-sized detector: one detection's Grad-CAM, whole pipeline, and D-RISE.

    python scripts/bench_detect.py [--photo PATH] [--repeats 5] [--masks 256] [--detections 5] [--threads 2]

The detector is scripts/yolo_like.py's (3.2 M parameters, seeded random weights) at 640x640, its bundle made by
hand from the same weights (npcam's exporter has no detector route on this branch). Two worker processes, one
per side (npcam's never imports torch), are driven alternately, so that each ratio is measured in one run under
the same load:

- **Grad-CAM, whole pipeline**: read the photo, letterbox it, run the network, decode and suppress (npcam's
  ``select`` on both sides), then the best detection's Grad-CAM at the three maps, combined as pytorch-grad-cam
  combines layers, cropped to the photo's part of the input. torch: forward hooks' tensors and
  ``torch.autograd.grad`` of the detection's score, the map by the same formula with ``F.interpolate``.
- **D-RISE**: the same masks (npcam's seeded draws; torch smooths them with ``F.interpolate``), the same batch
  size, the detections' similarity computed in torch, batched; the time per detection is the run's over the
  ``--detections`` explained together.
- **Memory**: each worker's peak resident set (``VmHWM``) after each part.

Both sides' maps are compared (their largest difference is printed), so the two compute the same thing.
Medians of ``--repeats``; the machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
PHOTO = REPO.parent / "shared" / "eval" / "images" / "package_photos" / "bus.jpg"
SIZE = (640, 640)


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# The workers


class NpcamSide:
    def __init__(self, bundle: Path, threads: int):
        import npcam

        self.npcam = npcam
        self.model = npcam.load(bundle, threads=threads)

    def gradcam(self, photo: str) -> tuple[np.ndarray, dict]:
        pred = self.model.predict(photo)
        return self.model.cam(pred, detection=0, method="gradcam"), {"detections": len(pred.detections)}

    def drise(self, photo: str, detections: int, masks: int, cells: int, seed: int, batch: int | None):
        from npcam.probe import MethodOptions, Probe

        pred = self.model.predict(photo)
        chosen = list(range(min(detections, len(pred.detections))))
        if batch is not None:
            Probe.input_batch = lambda self, limit=32: batch  # noqa: ARG005 (the size the other side used)
        options = MethodOptions(masks=masks, mask_cells=cells, seed=seed)
        probe = self.model.probes(pred, chosen, options=options)[0]
        used = probe.input_batch()
        maps = self.model.cam(pred, detection=chosen, method="drise", options=options)
        return maps, {"batch": used, "k": len(chosen)}


class TorchSide:
    def __init__(self, threads: int):
        import torch
        import yolo_like

        torch.set_num_threads(threads)
        self.torch, self.net = torch, yolo_like.make()

    def _input(self, photo: str):
        from npcam.image import letterbox_placement, open_image, preprocess

        pil = open_image(photo)
        x = preprocess(pil, SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), pad=(114, 114, 114))
        return x, letterbox_placement(pil.height, pil.width, SIZE)

    def _detections(self, raw: np.ndarray, placement, photo_size):
        from npcam.detect import Decoder, select

        decoder = Decoder(
            {"decode": "yolo", "classes": 80, "outputs": [{"name": "o", "offset": 0, "shape": list(raw.shape)}]},
            {}, SIZE, "torch",
        )  # fmt: skip
        candidates = decoder.decode(raw.reshape(1, -1))[0]
        kept = select(candidates)
        boxes = placement.to_photo(candidates.boxes[[a for a, _, _ in kept]], photo_size)
        keep = [(a, c) for (a, c, _), b in zip(kept, boxes) if b[2] > b[0] and b[3] > b[1]]
        return candidates, keep

    def gradcam(self, photo: str) -> tuple[np.ndarray, dict]:
        torch = self.torch
        functional = torch.nn.functional
        x, place = self._input(photo)
        layers = []
        hook = self.net.trunk.register_forward_hook(lambda module, args, out: layers.extend(out))
        try:
            out = self.net(torch.from_numpy(x))
        finally:
            hook.remove()
        from PIL import Image

        with Image.open(photo) as im:
            photo_size = (im.height, im.width)
        _, keep = self._detections(out.detach().numpy(), place, photo_size)
        candidate, cls = keep[0]
        score = out[0, 4 + cls, candidate]
        grads = torch.autograd.grad(score, layers)
        maps = []
        with torch.no_grad():
            for a, g in zip(layers, grads):
                cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))  # [1, 1, h, w]
                cam = cam / cam.amax().clamp_min(torch.finfo(cam.dtype).tiny)
                maps.append(functional.interpolate(cam, size=SIZE, mode="bilinear", align_corners=False))
            cam = torch.stack(maps).mean(0)[0, 0]
            cam = cam / cam.max()
            cam = cam[place.top : place.top + place.size[0], place.left : place.left + place.size[1]]
            cam = cam / cam.max()
        return cam.numpy(), {"detections": len(keep)}

    def drise(self, photo: str, detections: int, masks: int, cells: int, seed: int, batch: int | None):
        from PIL import Image

        from npcam.methods.drise import PROBABILITY, cell_size, draw_masks

        torch = self.torch
        functional = torch.nn.functional
        x, place = self._input(photo)
        with Image.open(photo) as im:
            photo_size = (im.height, im.width)
        with torch.no_grad():
            raw = self.net(torch.from_numpy(x)).numpy()
        candidates, keep = self._detections(raw, place, photo_size)
        chosen = [a for a, _ in keep[:detections]]
        target_boxes = torch.from_numpy(candidates.boxes[chosen])  # [k, 4] float64
        target_vectors = torch.from_numpy(candidates.scores[chosen])  # [k, C]
        top, left, (h, w) = place.top, place.left, place.size
        grids, shifts = draw_masks(masks, cells, (h, w), seed)
        cell_h, cell_w = cell_size((h, w), cells)
        big = ((cells + 1) * cell_h, (cells + 1) * cell_w)
        total = torch.zeros(len(chosen), h * w, dtype=torch.float64)
        weight_sum = torch.zeros(len(chosen), dtype=torch.float64)
        image = torch.from_numpy(x)
        with torch.no_grad():
            for start in range(0, masks, batch):
                stop = min(start + batch, masks)
                up = functional.interpolate(
                    torch.from_numpy(grids[start:stop]).float()[:, None], size=big, mode="bilinear", align_corners=False
                )[:, 0]
                m = torch.stack([up[i, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts[start:stop])])
                inputs = image.repeat(stop - start, 1, 1, 1)
                inputs[:, :, top : top + h, left : left + w] *= m[:, None]
                out = self.net(inputs).double()  # [n, 84, N]
                xy, wh = out[:, :2], out[:, 2:4]
                boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1).transpose(1, 2)  # [n, N, 4]
                vectors = out[:, 4:].transpose(1, 2)  # [n, N, C]
                lo = torch.maximum(target_boxes[None, :, None, :2], boxes[:, None, :, :2])
                hi = torch.minimum(target_boxes[None, :, None, 2:], boxes[:, None, :, 2:])
                inter = (hi - lo).clamp_min(0).prod(-1)  # [n, k, N]
                area = lambda b: (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
                union = area(target_boxes)[None, :, None] + area(boxes)[:, None, :] - inter
                iou = torch.where(union > 0, inter / union, torch.zeros_like(inter))
                cosine = functional.cosine_similarity(target_vectors[None, :, None, :], vectors[:, None, :, :], dim=-1)
                confidence = vectors.amax(-1)[:, None, :]  # no objectness: the candidates' best class scores
                weights = (iou * cosine * confidence).amax(-1)  # [n, k]
                total += weights.T @ m.reshape(len(m), -1).double()
                weight_sum += weights.sum(0)
        sal = (total / (masks * PROBABILITY)).reshape(len(chosen), h, w)
        sal = torch.relu(sal - (weight_sum / masks)[:, None, None])  # less the weights' mean, as npcam's map
        sal = sal / sal.amax(dim=(1, 2), keepdim=True)
        return sal.float().numpy(), {"batch": batch, "k": len(chosen)}


def worker(kind: str, bundle: str, threads: int) -> None:
    side = NpcamSide(Path(bundle), threads) if kind == "npcam" else TorchSide(threads)
    for line in sys.stdin:
        order = json.loads(line)
        what = order.pop("do")
        if what == "peak":
            print(json.dumps({"peak_mib": peak_mib()}), flush=True)
            continue
        start = time.perf_counter()
        maps, facts = getattr(side, what)(**order)
        seconds = time.perf_counter() - start
        path = Path(tempfile.gettempdir()) / f"bench_detect_{kind}_{os.getpid()}.npy"
        np.save(path, maps)
        print(json.dumps({"seconds": seconds, "map": str(path), **facts}), flush=True)


class Worker:
    def __init__(self, kind: str, bundle: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, __file__, "--worker", kind, "--bundle", str(bundle), "--threads", str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **order) -> dict:
        self.process.stdin.write(json.dumps(order) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker stopped (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side for Grad-CAM (default 5)")
    p.add_argument("--drise-repeats", type=int, default=3, help="timed runs of each side for D-RISE (default 3)")
    p.add_argument("--masks", type=int, default=256, help="D-RISE's masks (default 256)")
    p.add_argument("--mask-cells", type=int, default=16)
    p.add_argument("--detections", type=int, default=5, help="detections D-RISE explains together (default 5)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime's, NumPy's and torch's threads (default 2)")
    p.add_argument("--bundle", type=Path, help="reuse this bundle of yolo_like.make() (default: make one)")
    p.add_argument("--worker", choices=["npcam", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, str(args.bundle), args.threads)
        return 0
    if not args.photo.is_file():
        print(f"bench_detect: error: {args.photo}: no such photo (give one with --photo)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:
        bundle = args.bundle
        if bundle is None:
            import yolo_like

            bundle = yolo_like.bundle(yolo_like.make(), Path(work) / "yolo_like")
        sides = {kind: Worker(kind, bundle, args.threads) for kind in ("npcam", "torch")}
        try:
            report(args, sides)
        finally:
            for side in sides.values():
                side.close()
    return 0


def measure(sides: dict, repeats: int, **order) -> tuple[dict, dict, float]:
    """Each side run ``repeats + 1`` times, alternately (the first run of each is a warm-up): their times, their
    answers' facts, and the largest difference between their maps."""
    times: dict[str, list[float]] = {kind: [] for kind in sides}
    answers: dict[str, dict] = {}
    for r in range(repeats + 1):
        for kind, side in sides.items():
            answer = side.ask(**order)
            if r:
                times[kind].append(answer["seconds"])
            answers[kind] = answer
            if kind == "npcam" and "batch" in answer:
                order["batch"] = answer["batch"]  # the torch side takes the batch npcam chose
    a, b = (np.load(answers[kind]["map"]) for kind in sides)
    difference = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
    return times, answers, difference


def report(args, sides: dict) -> None:
    photo = str(args.photo)
    load = os.getloadavg()
    print(f"{cpu_name()}, {os.cpu_count()} cores, threads {args.threads}; load average {load[0]:.1f} at the start")
    print(f"photo {args.photo.name}, input {SIZE[0]}x{SIZE[1]} letterboxed, detector yolo_like (3.2 M parameters)")
    times, answers, diff = measure(sides, args.repeats, do="gradcam", photo=photo)
    peaks = {kind: side.ask(do="peak")["peak_mib"] for kind, side in sides.items()}
    median = {kind: float(np.median(t)) for kind, t in times.items()}
    print(f"\nGrad-CAM of one detection, whole pipeline ({answers['npcam']['detections']} detections), median of "
          f"{args.repeats}:")  # fmt: skip
    print(f"  {'':8} {'seconds':>8} {'min':>8} {'peak RSS MiB':>13}")
    for kind in sides:
        print(f"  {kind:8} {median[kind]:8.3f} {min(times[kind]):8.3f} {peaks[kind]:13.0f}")
    print(f"  npcam / torch: {median['npcam'] / median['torch']:.2f} (min {min(times['npcam']) / min(times['torch']):.2f});"
          f" maps differ by at most {diff:.1e}")  # fmt: skip
    order = dict(photo=photo, detections=args.detections, masks=args.masks, cells=args.mask_cells, seed=0, batch=None)
    times, answers, diff = measure(sides, args.drise_repeats, do="drise", **order)
    peaks = {kind: side.ask(do="peak")["peak_mib"] for kind, side in sides.items()}
    k, batch = answers["npcam"]["k"], answers["npcam"]["batch"]
    median = {kind: float(np.median(t)) for kind, t in times.items()}
    print(f"\nD-RISE: {args.masks} masks of {args.mask_cells}x{args.mask_cells} cells, batches of {batch}, "
          f"{k} detections explained together, median of {args.drise_repeats}:")  # fmt: skip
    print(f"  {'':8} {'s/detection':>11} {'ms/mask':>8} {'peak RSS MiB':>13}")
    for kind in sides:
        print(f"  {kind:8} {median[kind] / k:11.2f} {1000 * median[kind] / args.masks:8.1f} {peaks[kind]:13.0f}")
    print(f"  npcam / torch: {median['npcam'] / median['torch']:.2f}; maps differ by at most {diff:.1e}")
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
