"""Which input size, map combination, upsampling and box rule localize best: an experiment over cached maps.

    python scripts/localization_study.py cache MANIFEST ROOT --model DIR --cache DIR --size S [S ...]
        [--keep-aspect] [--flip] [--methods cam,layercam,...]
    python scripts/localization_study.py report MANIFEST ROOT --cache DIR CANDIDATE [CANDIDATE ...]
        [--methods ...] [--baseline CANDIDATE] [--boot 2000] [--json FILE]

``cache`` runs the trunk once per (size, aspect, mirror) setting and stores,
for every annotated row, each method's raw map of the true class at feature
resolution (before ReLU and scaling) and the logits. ``report`` then scores
candidates from those maps without running the network again.

A candidate is ``SCALES[:RULE[:UPSAMPLING]]``:

- ``SCALES``: one or more input settings joined by ``+``, each ``S`` (squash
  to S x S), ``Sk`` (keep the aspect, short side S) and an ``f`` suffix to
  also use the mirrored photo (its map mirrored back). Several settings give
  the average of their maps, each scaled to [0, 1] and upsampled to the photo
  first (a multi-scale average); the class probabilities are averaged too.
- ``RULE``: the box threshold, ``mean`` (npcam's default) or a fraction of the
  max (``0.2``: the paper's). Default ``mean``.
- ``UPSAMPLING``: ``bilinear`` (npcam's) or ``bicubic`` (Keys, a = -0.75, as
  torch and OpenCV; clipped to the map's range). Default ``bilinear``.

Metrics, per method and per subset of the dev set (``crop8``: photos at their
original resolution; ``squashed``: photos squash-resized by their publishers):

- GT-known Loc: the box of the largest 8-connected region above the rule's
  threshold (:func:`npcam.boxes.cam_box`), on the map at the photo's own size,
  has IoU >= 0.5 with a ground-truth box; Top-1 Loc: that, and top-1 right.
- MaxBoxAccV2 (Choe et al., CVPR 2020): the map is brought to a 224 x 224 frame
  (as their protocol resizes every image; IoU is unchanged by the anisotropic
  scaling, up to rounding) and min-max scaled; at each threshold
  t = 0, 0.01, ..., 0.99 the pixels above t are split into 8-connected
  components, and the image counts as found at IoU level d if any
  component's box has IoU >= d with any ground-truth box. For each d in
  {0.3, 0.5, 0.7} the accuracy is the best over t; MaxBoxAccV2 is their mean.
  (Their code boxes cv2.findContours' contours, holes included; here the
  components' boxes, computed in NumPy. This is the study's own
  implementation, not the product's metric module.)

Intervals are 95% percentile bootstrap intervals over the photos (paired with
``--baseline`` for the differences).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import npcam

try:  # only for speed: MaxBoxAccV2's 100 thresholds per map (the NumPy fallback gives the same boxes)
    import cv2
except ImportError:
    cv2 = None
from npcam.boxes import _runs, _touching_runs, cam_box, iou, parse_threshold
from npcam.cam import normalize, softmax
from npcam.upsample import interpolation_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_localization import read_manifest  # noqa: E402

# The methods that differ on an affine head (gradcam, hirescam and xgradcam are CAM there; scorecam costs
# seconds per photo and is left to eval_localization.py on a subset).
METHODS = ("cam", "layercam", "gradcampp", "ablationcam", "eigencam", "softmax", "reciprocam")
FRAME = 224  # MaxBoxAccV2's frame, as in Choe et al.
BOX_THRESHOLDS = np.arange(0, 1, 0.01)
IOU_LEVELS = (0.3, 0.5, 0.7)


def subset_of(path: Path) -> str:
    """``crop8`` for the photos at their original resolution, ``squashed`` for those squash-resized by their
    publishers (``images/227``, ``images/224``)."""
    return "crop8" if path.parent.name == "crop8" else "squashed"


def setting_input(setting: str, height: int, width: int) -> tuple[int, int]:
    """The network input ``(h, w)`` of a setting for a photo of ``height x width``: ``S`` squashes to S x S,
    ``Sk`` keeps the aspect with the short side S (npcam's ``keep_aspect``), ``Sa`` keeps the aspect with the
    area of S x S (the same pixels, so about the same trunk cost, as ``S``)."""
    mode = setting[-1] if setting[-1] in "ka" else ""
    side = int(setting.rstrip("ka"))
    if mode == "a":
        return round(side * (height / width) ** 0.5), round(side * (width / height) ** 0.5)
    return npcam.image.input_size(height, width, side, mode == "k")


def cache_setting(model, rows, setting: str, methods, reuse: dict | None = None, batch: int = 16) -> dict:
    """Raw maps of the true class for every row at one input setting (``S``, ``Sk``, ``Sa``, and ``F`` for
    the mirrored photo, its maps mirrored back).

    Returns ``{"files", "methods", "maps": [float32 [M, h, w]], "logits": float32 [N, K], "inputs": [(h, w)]}``.
    ``reuse``: a cached setting whose rows are taken as they are where their input was the same.
    """
    mirrored = setting.endswith("F")
    resolved = [npcam.methods.resolve(m, model.head.kind) for m in methods]
    maps, logits, shapes = [], [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pils = [npcam.open_image(path) for path, _, _ in chunk]
        wanted = [setting_input(setting.rstrip("F"), pil.height, pil.width) for pil in pils]
        todo = [
            i for i, shape in enumerate(wanted) if reuse is None or tuple(reuse["inputs"][start + i]) != tuple(shape)
        ]
        if mirrored:
            pils = [pil.transpose(0) for pil in pils]  # PIL.Image.FLIP_LEFT_RIGHT
        inputs = [model.preprocess(pils[i], False, wanted[i]) for i in todo]
        preds = dict(zip(todo, model.classify([np.zeros((1, 1, 3), np.uint8)] * len(todo), inputs)))
        for i, (_, label, _) in enumerate(chunk):
            if i in preds:
                raw = np.stack([m.maps(model, preds[i], [label])[0] for m in resolved]).astype(np.float32)
                maps.append(raw[:, :, ::-1].copy() if mirrored else raw)
                logits.append(preds[i].logits)
            else:
                maps.append(reuse["maps"][start + i])
                logits.append(reuse["logits"][start + i])
            shapes.append(wanted[i])
        sys.stderr.write(f"\r{setting} {min(start + batch, len(rows))}/{len(rows)}")
    sys.stderr.write("\n")
    return {
        "files": [str(path) for path, _, _ in rows],
        "methods": list(methods),
        "maps": maps,
        "logits": np.stack(logits).astype(np.float32),
        "inputs": shapes,
    }


# ---------------------------------------------------------------- maps


def cubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution as a ``[size_out, size_in]`` matrix, half-pixel centres, edges clamped
    (torch's ``bicubic``, align_corners=False, and OpenCV's INTER_CUBIC use a = -0.75)."""
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(src).astype(np.intp)
    frac = src - base
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    for offset in (-1, 0, 1, 2):
        d = np.abs(frac - offset)
        weight = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
        np.add.at(matrix, (rows, np.clip(base + offset, 0, size_in - 1)), weight)
    return matrix.astype(np.float32)


def resize(cam: np.ndarray, size: tuple[int, int], upsampling: str) -> np.ndarray:
    """float32 ``[h, w]`` map in [0, 1] to ``size``, bilinear (npcam's) or bicubic (clipped to [0, 1])."""
    if upsampling == "bilinear":
        return interpolation_matrix(cam.shape[0], size[0]) @ cam @ interpolation_matrix(cam.shape[1], size[1]).T
    out = cubic_matrix(cam.shape[0], size[0]) @ cam @ cubic_matrix(cam.shape[1], size[1]).T
    return np.clip(out, 0, 1)


def parse_candidate(text: str) -> tuple[list[tuple[str, bool]], float | str, str, str]:
    """``SCALES[:RULE[:UPSAMPLING[:ALIGN]]]`` to ([(setting, also mirrored)], rule, upsampling, alignment)."""
    parts = text.split(":") + [""] * 3
    scales = []
    for s in parts[0].split("+"):
        mirrored = s.endswith("f")
        scales.append((s[:-1] if mirrored else s, mirrored))
    rule = parse_threshold(parts[1]) if parts[1] else "mean"
    upsampling = parts[2] or "bilinear"
    alignment = parts[3] or "half"
    if upsampling not in ("bilinear", "bicubic"):
        raise ValueError(f"{text}: upsampling must be bilinear or bicubic")
    if alignment not in ("half", "same"):
        float(alignment)
    return scales, rule, upsampling, alignment


# The stride-2 convolutions of EfficientNet-Lite0/1/2, in order (kernel sizes); each pads as TensorFlow's
# "SAME" (pad_total = max((ceil(n/2) - 1) * 2 + k - n, 0), the smaller half first), as the ONNX trunk's Pad
# nodes compute from the input's shape.
LITE_STRIDED_KERNELS = (3, 3, 5, 3, 5)


def same_padding_centres(side: int, kernels=LITE_STRIDED_KERNELS) -> tuple[float, float]:
    """``(a, b)``: cell i of the last grid is centred on input coordinate ``a * i + b`` (continuous: pixel j
    spans [j, j + 1)), by composing each strided convolution's kernel centre and leading pad."""
    a, b, n = 1.0, 0.5, side
    for k in kernels:
        out = -(-n // 2)
        pad_begin = max((out - 1) * 2 + k - n, 0) // 2
        b += a * ((k - 1) / 2 - pad_begin)
        a *= 2
        n = out
    return a, b


def aligned_matrix(cells: int, size_out: int, input_side: int, alignment: str, mirrored: bool = False) -> np.ndarray:
    """Bilinear weights ``[size_out, cells]`` placing cell i at its centre on the input of ``input_side``.

    ``half``: npcam's convention, cells spread evenly over the input (half-pixel centres, what
    :func:`npcam.upsample.interpolation_matrix` does); ``same``: :func:`same_padding_centres`; a number:
    the convention shifted by that many input pixels (positive: right/down). ``mirrored``: the map was
    made from the mirrored input and mirrored back, so its cells sit where the mirror puts them.
    """
    if alignment == "half":
        return interpolation_matrix(cells, size_out)
    if alignment == "same":
        a, b = same_padding_centres(input_side)
    else:
        a = input_side / cells
        b = a / 2 + float(alignment)
    if mirrored:  # cell i of the mirrored input, at a*i + b there, is cell cells-1-i here
        b = input_side - a * (cells - 1) - b
    x = (np.arange(size_out) + 0.5) * (input_side / size_out)  # output pixel centres, in input coordinates
    src = np.clip((x - b) / a, 0, cells - 1)
    left = np.minimum(np.floor(src).astype(np.intp), cells - 1)
    right = np.minimum(left + 1, cells - 1)
    frac = src - left
    matrix = np.zeros((size_out, cells))
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, left), 1.0 - frac)
    np.add.at(matrix, (rows, right), frac)
    return matrix.astype(np.float32)


def combined(
    caches: dict, scales, row: int, method: int, size: tuple[int, int], upsampling: str, alignment: str = "half"
) -> np.ndarray:
    """The candidate's map of one row at ``size``: the mean of its settings' maps, each scaled and upsampled."""
    total = np.zeros(size, dtype=np.float32)
    count = 0
    height, width = caches["_sizes"][row]
    for setting, mirrored in scales:
        for name in (setting, setting + "F") if mirrored else (setting,):
            cam = normalize(caches[name]["maps"][row][method : method + 1])[0]
            if alignment == "half":
                total += resize(cam, size, upsampling)
            else:
                h_in, w_in = setting_input(setting, height, width)
                rows_m = aligned_matrix(cam.shape[0], size[0], h_in, alignment)
                cols_m = aligned_matrix(cam.shape[1], size[1], w_in, alignment, mirrored=name.endswith("F"))
                total += rows_m @ cam @ cols_m.T
            count += 1
    return total / count


def probabilities(caches: dict, scales) -> np.ndarray:
    """The candidate's class probabilities ``[N, K]``: the mean over its settings."""
    names = [n for s, m in scales for n in ((s, s + "F") if m else (s,))]
    return np.mean([softmax(caches[n]["logits"].astype(np.float64), axis=1) for n in names], axis=0)


# ---------------------------------------------------------------- MaxBoxAccV2


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes ``(x0, y0, x1, y1)`` (inclusive) of every 8-connected region of a bool ``[H, W]`` mask: int ``[n, 4]``.

    The runs of the mask and the pairs of touching runs are npcam.boxes'; the
    labels are propagated over the pairs with pointer jumping, all in NumPy.
    """
    rows, starts, ends = _runs(mask)
    if rows.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    i, j = _touching_runs(rows, starts, ends, mask.shape[1])
    label = np.arange(rows.size)
    while True:
        low = np.minimum(label[i], label[j])
        new = label.copy()
        np.minimum.at(new, i, low)
        np.minimum.at(new, j, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    roots, index = np.unique(label, return_inverse=True)
    n = roots.size
    x0 = np.full(n, np.iinfo(np.int64).max)
    y0 = x0.copy()
    x1 = np.full(n, -1)
    y1 = x1.copy()
    np.minimum.at(x0, index, starts)
    np.minimum.at(y0, index, rows)
    np.maximum.at(x1, index, ends - 1)
    np.maximum.at(y1, index, rows)
    return np.stack([x0, y0, x1, y1], axis=1)


def _cv2_component_boxes(mask: np.ndarray) -> np.ndarray:
    """:func:`component_boxes` by OpenCV, about 20x faster (the same boxes: checked in
    tests/test_localization_study.py)."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    x, y, w, h = stats[1:, 0], stats[1:, 1], stats[1:, 2], stats[1:, 3]
    return np.stack([x, y, x + w - 1, y + h - 1], axis=1).astype(np.int64)


def boxes_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive-pixel boxes ``[n, 4]`` against ``[g, 4]``: ``[n, g]``."""
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def best_iou_per_threshold(cam: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """For each of :data:`BOX_THRESHOLDS`, the best IoU of any component's box with any ground-truth box:
    float ``[T]``. ``cam`` is float ``[FRAME, FRAME]``, ``gt`` int ``[g, 4]`` in the frame."""
    low, high = float(cam.min()), float(cam.max())
    if not high > low:
        return np.zeros(len(BOX_THRESHOLDS))
    scaled = (cam - low) / (high - low)
    best = np.zeros(len(BOX_THRESHOLDS))
    boxes_of = component_boxes if cv2 is None else _cv2_component_boxes
    for k, t in enumerate(BOX_THRESHOLDS):
        boxes = boxes_of(scaled > t)
        if len(boxes):
            best[k] = boxes_iou(boxes, gt).max()
    return best


def frame_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Ground-truth boxes in the photo's pixels to the 224 x 224 frame (truncated, as Choe et al.'s code)."""
    sx, sy = FRAME / width, FRAME / height
    return np.array([[int(x0 * sx), int(y0 * sy), int(x1 * sx), int(y1 * sy)] for x0, y0, x1, y1 in boxes])


def max_box_acc_v2(best: np.ndarray) -> float:
    """MaxBoxAccV2 from the best IoUs ``[N, T]`` of N photos at T thresholds."""
    return float(np.mean([(best >= d).mean(axis=0).max() for d in IOU_LEVELS]))


# ---------------------------------------------------------------- report


def score(caches: dict, rows, candidate: str, method: int) -> dict[str, np.ndarray]:
    """Per-photo outcomes of one candidate and method: ``gt_known`` bool [N], ``top1`` bool [N],
    ``best`` float [N, T] (for MaxBoxAccV2)."""
    scales, rule, upsampling, alignment = parse_candidate(candidate)
    labels = np.array([label for _, label, _ in rows])
    top1 = probabilities(caches, scales).argmax(axis=1) == labels
    found = np.zeros(len(rows), dtype=bool)
    best = np.zeros((len(rows), len(BOX_THRESHOLDS)))
    for r, (_, _, gt) in enumerate(rows):
        height, width = caches["_sizes"][r]
        full = combined(caches, scales, r, method, (height, width), upsampling, alignment)
        box = cam_box(full, rule)
        found[r] = box is not None and max(iou(box, g) for g in gt) >= 0.5
        frame = combined(caches, scales, r, method, (FRAME, FRAME), upsampling, alignment)
        best[r] = best_iou_per_threshold(frame, frame_boxes(gt, height, width))
    return {"gt_known": found, "top1": top1, "best": best}


def summary(outcome: dict[str, np.ndarray], picks: np.ndarray) -> dict[str, float]:
    o = {k: v[picks] for k, v in outcome.items()}
    return {
        "gt_known": float(o["gt_known"].mean()),
        "top1_loc": float((o["gt_known"] & o["top1"]).mean()),
        "maxboxacc_v2": max_box_acc_v2(o["best"]),
        "top1_cls": float(o["top1"].mean()),
    }


def bootstrap(outcome, baseline, members: np.ndarray, draws: int, rng) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each metric, and of its difference from ``baseline`` (paired), over photos."""
    samples: dict[str, list[float]] = {}
    for _ in range(draws):
        picks = rng.choice(members, size=members.size, replace=True)
        here = summary(outcome, picks)
        there = summary(baseline, picks) if baseline is not None else None
        for key, value in here.items():
            samples.setdefault(key, []).append(value)
            if there is not None:
                samples.setdefault("d_" + key, []).append(value - there[key])
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in samples.items()}


def load_caches(cache_dir: Path, candidates, rows) -> dict:
    names = {n for c in candidates for s, m in parse_candidate(c)[0] for n in ((s, s + "F") if m else (s,))}
    caches: dict = {}
    for name in sorted(names):
        with open(cache_dir / f"{name}.pkl", "rb") as f:
            caches[name] = pickle.load(f)
        if caches[name]["files"] != [str(p) for p, _, _ in rows]:
            raise ValueError(f"{cache_dir / name}.pkl: made from other rows")
    caches["_sizes"] = [npcam.open_image(path).size[::-1] for path, _, _ in rows]
    return caches


def time_cli(model: Path, photos: Path, option_sets: list[str], rounds: int) -> list[dict]:
    """Per-photo time of ``python -m npcam`` with each option set, as ``(T(dir) - T(first photo)) / (N - 1)``
    (the start-up cancels), interleaved round by round; medians over the rounds.

    Both wall time and CPU time (user + system, of the child processes) are measured: on a shared machine
    the wall time of each run depends on the other users' load, the CPU time much less.
    """
    files = sorted(p for p in photos.iterdir() if p.is_file())
    wall: dict[str, list[float]] = {o: [] for o in option_sets}
    cpu: dict[str, list[float]] = {o: [] for o in option_sets}
    loads = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            for options in option_sets:
                taken, used = [], []
                for target in (photos, files[0]):
                    command = [
                        sys.executable,
                        "-m",
                        "npcam",
                        str(target),
                        "-m",
                        str(model),
                        "-o",
                        out + "/",
                        *shlex.split(options),
                    ]
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    start = time.perf_counter()
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    taken.append(time.perf_counter() - start)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    used.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                wall[options].append((taken[0] - taken[1]) / (len(files) - 1))
                cpu[options].append((used[0] - used[1]) / (len(files) - 1))
            loads.append(os.getloadavg()[0])
    results = []
    base = option_sets[0]
    for options in option_sets:
        w, c = float(np.median(wall[options])), float(np.median(cpu[options]))
        w_ratio, c_ratio = w / float(np.median(wall[base])), c / float(np.median(cpu[base]))
        results.append(
            {
                "options": options,
                "wall_ms_per_photo": 1000 * w,
                "cpu_ms_per_photo": 1000 * c,
                "wall_ratio": w_ratio,
                "cpu_ratio": c_ratio,
                "wall": wall[options],
                "cpu": cpu[options],
            }
        )
        print(
            f"{options or '(defaults)':40s} wall {1000 * w:7.1f} ms/photo x{w_ratio:.2f}   "
            f"cpu {1000 * c:7.1f} ms/photo x{c_ratio:.2f}",
            flush=True,
        )
    print(f"{len(files)} photos, {rounds} rounds; load average during the runs: {min(loads):.1f}..{max(loads):.1f}")
    return results


def time_pipeline(model_dir: Path, photos: Path, option_sets: list[str], rounds: int) -> list[dict]:
    """Per-photo time of the CLI's pipeline (:func:`npcam.explain.explain_file`: decode, network, map,
    overlay, encode and write; ``--no-overlay``: the record alone) in this process, one photo at a time with one
    onnxruntime thread, as the CLI's folder runs do per image. The option sets take turns on each photo; each
    photo's time is its fastest of ``rounds`` (the run least disturbed by other users of the machine), and
    the total over the photos is compared."""
    from npcam.arguments import options_from
    from npcam.cli import parse_args
    from npcam.explain import explain_file
    from npcam.files import Job

    files = sorted(p for p in photos.iterdir() if p.is_file())
    model = npcam.load(model_dir, threads=1)
    sets = []
    for options in option_sets:
        args = parse_args([str(files[0]), *shlex.split(options)])
        sets.append((options, options_from(args, alpha=args.alpha).checked(model), not args.no_overlay))
    wall = np.full((len(sets), len(files), rounds), np.inf)
    cpu = np.full_like(wall, np.inf)
    loads = []
    with tempfile.TemporaryDirectory() as out:
        for r in range(rounds):
            for i, photo in enumerate(files):
                for k, (_, options, overlays) in enumerate(sets):
                    job = Job(photo, Path(out) / f"{photo.stem}_cam.jpg")
                    start, used = time.perf_counter(), time.process_time()
                    explain_file(model, options, frozenset(), job, overlays=overlays)
                    wall[k, i, r] = time.perf_counter() - start
                    cpu[k, i, r] = time.process_time() - used
            loads.append(os.getloadavg()[0])
    best_wall, best_cpu = wall.min(axis=2).sum(axis=1), cpu.min(axis=2).sum(axis=1)
    results = []
    for k, (options, _, _) in enumerate(sets):
        w, c = best_wall[k] / len(files), best_cpu[k] / len(files)
        results.append(
            {
                "options": options,
                "wall_ms_per_photo": 1000 * w,
                "cpu_ms_per_photo": 1000 * c,
                "wall_ratio": best_wall[k] / best_wall[0],
                "cpu_ratio": best_cpu[k] / best_cpu[0],
            }
        )
        print(
            f"{options or '(defaults)':40s} wall {1000 * w:7.1f} ms/photo x{best_wall[k] / best_wall[0]:.2f}   "
            f"cpu {1000 * c:7.1f} ms/photo x{best_cpu[k] / best_cpu[0]:.2f}",
            flush=True,
        )
    print(f"{len(files)} photos, best of {rounds}; load average during the runs: {min(loads):.1f}..{max(loads):.1f}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache")
    r = sub.add_parser("report")
    t = sub.add_parser("time", help="per-photo time of the CLI with each option set")
    t.add_argument("--model", type=Path, required=True)
    t.add_argument("--photos", type=Path, required=True, help="a directory of photos")
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument(
        "--set",
        dest="options",
        action="append",
        required=True,
        metavar="OPTIONS",
        help="an option set, as one string (--set= for the defaults, --set='--size 288'); repeated; "
        "the first is the base",
    )
    t.add_argument(
        "--in-process",
        action="store_true",
        help="time the pipeline per photo in this process, best of --rounds (steadier on a busy machine)",
    )
    t.add_argument("--json", type=Path)
    for q in (c, r):
        q.add_argument("manifest", type=Path)
        q.add_argument("root", type=Path)
        q.add_argument("--cache", type=Path, required=True, help="directory of the cached maps (one per model)")
        q.add_argument("--methods", default=",".join(METHODS))
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--size", type=int, nargs="+", required=True)
    c.add_argument(
        "--aspect",
        choices=("squash", "keep", "area"),
        default="squash",
        help="squash to S x S; keep the aspect, short side S; keep the aspect, area S x S",
    )
    c.add_argument("--flip", action="store_true", help="also cache the mirrored photos")
    r.add_argument("candidates", nargs="+")
    r.add_argument("--baseline", help="candidate the paired differences are taken from (default: the first)")
    r.add_argument("--boot", type=int, default=1000, help="bootstrap draws")
    r.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.command == "time":
        timer = time_pipeline if args.in_process else time_cli
        results = timer(args.model, args.photos, args.options, args.rounds)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    rows = read_manifest(args.manifest, args.root)
    methods = args.methods.split(",")
    if args.command == "cache":
        model = npcam.load(args.model)
        args.cache.mkdir(parents=True, exist_ok=True)
        suffix = {"squash": "", "keep": "k", "area": "a"}[args.aspect]
        for size in args.size:
            for mirror in ("", "F") if args.flip else ("",):
                name = f"{size}{suffix}{mirror}"
                if (args.cache / f"{name}.pkl").exists():  # cached before: the settings are deterministic
                    continue
                squash = args.cache / f"{size}{mirror}.pkl"
                reuse = None
                if suffix and squash.exists():  # square photos: the same input as the squash setting
                    with open(squash, "rb") as f:
                        reuse = pickle.load(f)
                    reuse.setdefault("inputs", [(size, size)] * len(rows))
                data = cache_setting(model, rows, name, methods, reuse)
                with open(args.cache / f"{name}.pkl", "wb") as f:
                    pickle.dump(data, f)
        return 0
    baseline_name = args.baseline or args.candidates[0]
    candidates = list(dict.fromkeys([baseline_name, *args.candidates]))
    caches = load_caches(args.cache, candidates, rows)
    cached_methods = caches[next(k for k in caches if not k.startswith("_"))]["methods"]
    groups = {"all": np.arange(len(rows))}
    for name in ("crop8", "squashed"):
        members = np.array([i for i, (path, _, _) in enumerate(rows) if subset_of(path) == name], dtype=np.intp)
        if 0 < members.size < len(rows):  # a subset that is all the rows, or none, is not reported again
            groups[name] = members
    rng = np.random.default_rng(0)
    results = []
    for method in methods:
        m = cached_methods.index(method)
        base = score(caches, rows, baseline_name, m)
        for candidate in candidates:
            outcome = base if candidate == baseline_name else score(caches, rows, candidate, m)
            for group, members in groups.items():
                stats = summary(outcome, members)
                ci = bootstrap(outcome, None if candidate == baseline_name else base, members, args.boot, rng)
                results.append(
                    {
                        "method": method,
                        "candidate": candidate,
                        "subset": group,
                        "n": int(members.size),
                        **stats,
                        "ci": ci,
                    }
                )
                d = (
                    ""
                    if candidate == baseline_name
                    else (
                        "  d_gt_known [{:+.3f}, {:+.3f}] d_maxboxacc_v2 [{:+.3f}, {:+.3f}]".format(
                            *ci["d_gt_known"], *ci["d_maxboxacc_v2"]
                        )
                    )
                )
                print(
                    f"{method:11s} {candidate:24s} {group:8s} n={members.size:3d} "
                    f"gt_known={stats['gt_known']:.3f} [{ci['gt_known'][0]:.3f}, {ci['gt_known'][1]:.3f}] "
                    f"top1_loc={stats['top1_loc']:.3f} maxboxacc_v2={stats['maxboxacc_v2']:.3f} "
                    f"[{ci['maxboxacc_v2'][0]:.3f}, {ci['maxboxacc_v2'][1]:.3f}] top1_cls={stats['top1_cls']:.3f}{d}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
