"""``npcam evaluate``: which method suits this model and these photos? Every method on every metric, with a report.

    npcam evaluate PHOTOS --model DIR --out DEST [--annotations FILE|DIR] [--methods all|a,b,…]

Each photo is explained once per method through the one pipeline
(:func:`npcam.explain`, then :meth:`npcam.Model.cam` for each method) and
scored by the plain metric functions of :mod:`npcam.localization` (against
the photo's annotated class and boxes, :mod:`npcam.annotations`) and
:mod:`npcam.metrics` (on the top-1 class, every photo). The rows, one per
photo and method, go to Parquet in DEST through the engine of
:mod:`npcam.dataset` (resumable, Ray with ``--address``); then a Markdown table
with bootstrap confidence intervals goes to stdout and a self-contained HTML
report (:mod:`npcam.report`) beside DEST. The metrics' definitions are in
docs/methods.md, the command in docs/dataset-and-serve.md.

A detector (``task: detect``) is evaluated per detection: its best ``--top``
kept detections, each explained by every method and by a box-shaped baseline
(:func:`box_baseline`), one row per photo, method and detection; localization
against the annotated box the detection is matched to (:func:`npcam.localization.match`) and
inside its own box, faithfulness on its D-RISE similarity
(:meth:`npcam.targets.DetectionScores.probabilities`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from . import localization as loc
from . import metrics
from .annotations import Annotation, Annotations
from .boxes import DEFAULT_THRESHOLD
from .cancel import Cancelled
from .errors import NpcamError
from .explain import Explanation, Options, explain
from .methods import METHODS, allows, resolve
from .summary import BOOTSTRAP, describe_run, markdown, spread, summarize, summarize_detections
from .upsample import upsample
from .version import __version__

PROG = "npcam evaluate"
SAMPLES = 8  # photos in the report's grid
TOP = 3  # a detector's detections evaluated per photo (its best), by default
BASELINE = "box"  # a detector's box-shaped baseline: scored as a method, named so in the rows


@dataclass(frozen=True)
class Settings:
    """What a run computes (all of it is in the Parquet files' stamp: a resumed run must match it).

    ``options`` come from :meth:`Options.checked` (the box ``threshold``, the input ``size`` and
    ``keep_aspect``, ``max_pixels``; a detector's ``top``, ``conf``, ``iou``, ``max_det``); ``methods`` are
    method names.
    """

    options: Options
    methods: tuple[str, ...]
    steps: int = metrics.STEPS
    road_percents: tuple[int, ...] = metrics.ROAD_PERCENTS  # () : no ROAD (--no-road)
    road_noise: float = metrics.ROAD_NOISE
    seed: int = 0


def arrow_schema(task: str = "classify"):
    """The rows' schema: one row per photo and method (a detector's: per photo, method and detection,
    :func:`detection_schema`), or ``{image, error}`` for a photo that failed."""
    import pyarrow as pa

    if task == "detect":
        return detection_schema()
    floats = pa.list_(pa.float32())
    return pa.schema(
        [
            ("image", pa.string()),
            ("method", pa.string()),
            ("error", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("label", pa.int64()),  # the annotated class (None: not annotated)
            ("top1", pa.int64()),
            ("top1_score", pa.float64()),
            ("correct", pa.bool_()),  # top-1 == label
            ("boxes", pa.list_(pa.list_(pa.int64()))),  # the annotated boxes of the label
            ("box", pa.list_(pa.int64())),  # the label's map's box at the box rule in use
            ("gt_known", pa.bool_()),
            ("top1_loc", pa.bool_()),
            ("box_ious", floats),  # MaxBoxAccV2's term at each threshold
            ("pointing", pa.bool_()),
            ("energy", pa.float64()),
            ("drop", pa.float64()),
            ("increase", pa.bool_()),
            ("deletion", pa.float64()),
            ("insertion", pa.float64()),
            ("deletion_curve", floats),
            ("insertion_curve", floats),
            ("road_morf", floats),
            ("road_lerf", floats),
            ("ms", pa.float64()),  # the method's time for its maps of this photo
            ("lowres", pa.struct([("shape", pa.list_(pa.int64())), ("values", pa.list_(pa.float16()))])),
        ]
    )


def detection_schema():
    """A detector's rows: one per photo, method (or :data:`BASELINE`) and evaluated detection; one per method with
    ``detection`` null for a photo with no detection; ``{image, error}`` for a photo that failed."""
    import pyarrow as pa

    floats = pa.list_(pa.float32())
    return pa.schema(
        [
            ("image", pa.string()),
            ("method", pa.string()),
            ("error", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("detection", pa.int64()),  # its place among the photo's kept detections, best first
            ("detection_box", pa.list_(pa.float64())),  # x0, y0, x1, y1 in the photo's pixels
            ("detection_class", pa.int64()),
            ("detection_label", pa.string()),
            ("detection_score", pa.float64()),
            ("annotated", pa.bool_()),  # the photo has annotations
            ("match_iou", pa.float64()),  # its best IoU with an annotated box of its class (None: no such box)
            ("match", pa.list_(pa.int64())),  # that box, if the IoU is at least loc.MATCH_IOU (None: unmatched)
            ("pointing", pa.bool_()),  # against the matched box (None: unmatched)
            ("energy", pa.float64()),  # in the matched box (None: unmatched)
            ("energy_box", pa.float64()),  # in its own box
            ("drop", pa.float64()),
            ("increase", pa.bool_()),
            ("deletion", pa.float64()),
            ("insertion", pa.float64()),
            ("deletion_curve", floats),
            ("insertion_curve", floats),
            ("road_morf", floats),
            ("road_lerf", floats),
            ("ms", pa.float64()),  # the method's time for the maps of all of this photo's evaluated detections
            ("lowres", pa.struct([("shape", pa.list_(pa.int64())), ("values", pa.list_(pa.float16()))])),
        ]
    )


def photo_rows(settings: Settings, model, item: dict, should_stop=None) -> list[dict]:
    """One photo's rows, one per method (a detector's: per method and detection), or its one error row. The
    engine's work (:func:`npcam.engine.run_items`).

    ``item`` is ``{image, index, label, boxes, objects, error}``: ``label`` -1 for none, ``boxes`` JSON,
    ``objects`` JSON ``[[class, x0, y0, x1, y1], ...]`` (a detector's ground truth; "" for a photo not
    annotated), ``error`` an annotation's error or "". :class:`npcam.cancel.Cancelled` passes through
    (``should_stop``).
    """
    from .dataset import read_bytes
    from .record import error

    photo = item["image"]
    if item.get("error"):
        return [error(photo, item["error"])]
    label = int(item["label"]) if int(item["label"]) >= 0 else None
    truth = [tuple(b) for b in json.loads(item["boxes"] or "[]")]
    try:
        first = explain(model, read_bytes(photo), replace(settings.options, method=model.default_method),
                        name=photo, pixels=False, should_stop=should_stop)  # fmt: skip
        if first.detections is not None:
            objects = None if not item.get("objects") else [(int(c), tuple(b)) for c, *b in json.loads(item["objects"])]
            return _score_detections(settings, model, photo, first, objects, should_stop)
        return _score_photo(settings, model, photo, first, label, truth, should_stop)
    except NpcamError as e:
        return [error(photo, str(e))]
    except (OSError, MemoryError) as e:
        return [error(photo, f"{photo}: {type(e).__name__}: {e}")]


def _score_photo(settings, model, photo, first: Explanation, label, truth, should_stop) -> list[dict]:
    from .record import lowres

    prediction = first.prediction
    top1 = prediction.top1
    classes = [label, top1] if label is not None and label != top1 else [top1]
    x = prediction.input[0]
    height, width = prediction.size
    original = float(model.probabilities(prediction.logits.astype(np.float64))[top1])
    score = _stoppable(metrics.probability(model, top1), should_stop)
    rows, faithful = [], {}  # faithful: the top-1 maps' digests -> their methods (equal maps, measured once)
    for method in settings.methods:
        started = time.perf_counter()
        maps = model.cam(prediction, classes, method=method, should_stop=should_stop)
        ms = (time.perf_counter() - started) * 1000
        explanation = Explanation(photo, prediction, method, classes, maps, first.layer)
        row = {"image": photo, "method": method, "error": None, "width": width, "height": height, "label": label,
               "top1": top1, "top1_score": float(prediction.probs[top1]), "ms": ms,
               "lowres": lowres(maps[0])}  # fmt: skip
        if label is not None:
            row["correct"] = top1 == label
        if label is not None and truth:
            row.update(_localize(explanation, truth, settings.options.threshold, top1 == label))
        top_map = maps[classes.index(top1)]
        faithful.setdefault(hashlib.blake2b(top_map.tobytes(), digest_size=16).digest(), (top_map, []))[1].append(row)
        rows.append(row)
    unique = [m for m, _ in faithful.values()]
    full = np.stack([upsample(m, x.shape[1:]) for m in unique])
    _faithfulness(settings, x, full, score, original, faithful)
    return rows


def _localize(explanation: Explanation, truth: list, threshold, correct: bool) -> dict:
    """The localization terms of the label's map (map 0) against its boxes, at the photo's size."""
    full = explanation.full(0)
    box = explanation.box(0, threshold)
    gt_known = loc.best_iou(box, truth) >= loc.IOU
    return {
        "boxes": [list(b) for b in truth],
        "box": list(box) if box else None,
        "gt_known": gt_known,
        "top1_loc": gt_known and correct,
        "box_ious": loc.box_ious(full, truth).astype(np.float32).tolist(),
        "pointing": loc.pointing_hit(full, truth),
        "energy": loc.energy_in_boxes(full, truth),
    }


def box_baseline(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """A detector's box-shaped baseline map: the box's tent, ``(1 - |2 (x - cx) / w|) (1 - |2 (y - cy) / h|)``
    at each pixel's centre ``(x, y)`` inside the box, 0 outside.

    Its support is the box, its peak the box's centre (the pointing game's centre baseline, on the box), and it
    ranks pixels from the centre outward (deletion, insertion, ROAD). ``box`` is ``(x0, y0, x1, y1)`` in the
    map's pixel coordinates (pixel ``(i, j)`` spans ``[j, j + 1) x [i, i + 1)``); a box too thin to hold a pixel
    centre gets the pixel holding its centre.

    Returns
    -------
    float32 ``[h, w]`` in [0, 1], its max 1
    """
    height, width = shape
    x0, y0, x1, y1 = (float(v) for v in box)

    def tent(low: float, high: float, n: int) -> np.ndarray:
        centres = np.arange(n) + 0.5
        half = max(high - low, 1e-12) / 2
        return np.clip(1 - np.abs(centres - (low + high) / 2) / half, 0, None)

    out = np.outer(tent(y0, y1, height), tent(x0, x1, width))
    if not out.max() > 0:  # thinner than a pixel: the pixel of its centre
        row = min(max(int((y0 + y1) / 2), 0), height - 1)
        col = min(max(int((x0 + x1) / 2), 0), width - 1)
        out[row, col] = 1.0
    return (out / out.max()).astype(np.float32)


def _score_detections(settings, model, photo, first: Explanation, objects, should_stop) -> list[dict]:
    """A detector's rows: every method's and the baseline's map of each evaluated detection, scored.

    ``objects`` is the photo's annotated ``(class, box)`` pairs, or None for a photo not annotated.
    """
    from .explain import _coarse
    from .record import lowres

    prediction, chosen = first.prediction, first.detections
    height, width = prediction.size
    names = [*settings.methods, BASELINE]
    if not chosen:  # nothing detected: a row per method says the photo is done
        return [{"image": photo, "method": m, "error": None, "width": width, "height": height,
                 "annotated": objects is not None} for m in names]  # fmt: skip
    found = [prediction.detections[i] for i in chosen]
    place = prediction.placement
    maps, ms = {}, {}
    for method in settings.methods:
        started = time.perf_counter()
        maps[method] = model.cam(prediction, detection=chosen, method=method, should_stop=should_stop)
        ms[method] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    scale = np.array([place.scale_x, place.scale_y] * 2)  # photo pixels -> the photo's part of the input
    maps[BASELINE] = np.stack([box_baseline(np.asarray(d.box) * scale, place.size) for d in found])
    ms[BASELINE] = (time.perf_counter() - started) * 1000
    target = model.target(chosen, prediction)
    x = prediction.input[0]
    originals = target.probabilities(model.scores(prediction.input))[0]  # each detection's similarity, unperturbed
    explained = {m: Explanation(photo, prediction, m, first.classes, maps[m], first.layer, chosen) for m in names}
    rows = []
    for j, detection in enumerate(found):
        best, matched = (None, None) if objects is None else loc.match(detection.box, detection.class_index, objects)
        own = loc.pixel_box(detection.box)
        faithful: dict[bytes, tuple[np.ndarray, list[dict]]] = {}
        for method in names:
            # The baseline at the photo's pixels is its tent sampled there (exactly inside the box), not upsampled
            full = box_baseline(detection.box, prediction.size) if method == BASELINE else explained[method].full(j)
            row = {"image": photo, "method": method, "error": None, "width": width, "height": height,
                   "detection": chosen[j], "detection_box": [float(v) for v in detection.box],
                   "detection_class": detection.class_index, "detection_label": detection.label,
                   "detection_score": float(detection.score), "annotated": objects is not None,
                   "match_iou": best, "energy_box": loc.energy_in_boxes(full, [own]), "ms": ms[method],
                   "lowres": lowres(_coarse(explained[method], j))}  # fmt: skip
            if matched is not None:
                row.update(match=list(matched), pointing=loc.pointing_hit(full, [matched]),
                           energy=loc.energy_in_boxes(full, [matched]))  # fmt: skip
            low = maps[method][j]
            faithful.setdefault(hashlib.blake2b(low.tobytes(), digest_size=16).digest(), (low, []))[1].append(row)
            rows.append(row)
        # The maps cover the photo's part of the input; a letterbox's pad is the least relevant (0).
        at_input = np.zeros((len(faithful), *x.shape[1:]), np.float32)
        for i, (low, _) in enumerate(faithful.values()):
            at_input[i, place.top : place.top + low.shape[0], place.left : place.left + low.shape[1]] = low
        score = _stoppable(metrics.target_probability(model, target, j), should_stop)
        _faithfulness(settings, x, at_input, score, float(originals[j]), faithful)
    return rows


def _faithfulness(settings, x: np.ndarray, full: np.ndarray, score, original: float, faithful: dict) -> None:
    """Average Drop and Increase, deletion, insertion and ROAD of each distinct map (``full`` at the input's size,
    the maps of ``faithful``: digest -> (map, rows)), into its rows."""
    drop, increase = metrics.confidence_change(x, full, score, original)
    curves = metrics.deletion_insertion(x, full, score, settings.steps, original)
    deletion, insertion = curves.areas()
    for i, (lowmap, members) in enumerate(faithful.values()):
        for row in members:
            row.update(drop=float(drop[i]), increase=bool(increase[i]), deletion=float(deletion[i]),
                       insertion=float(insertion[i]), deletion_curve=curves.deletion[i].tolist(),
                       insertion_curve=curves.insertion[i].tolist())  # fmt: skip
        if not settings.road_percents:  # --no-road
            continue
        # The ROAD noise and tie order are drawn from the input and the map, so a resumed run draws the same.
        seed = int.from_bytes(hashlib.blake2b(x.tobytes() + lowmap.tobytes(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([settings.seed, seed])
        morf, lerf = metrics.road(x, full[i : i + 1], score, settings.road_percents, settings.road_noise, rng)
        for row in members:
            row.update(road_morf=morf[0].tolist(), road_lerf=lerf[0].tolist())


def _stoppable(score: metrics.Score, should_stop) -> metrics.Score:
    """``score``, checking ``should_stop`` before each batch: Ctrl-C reaches a photo between its passes."""

    def checked(inputs: np.ndarray) -> np.ndarray:
        if should_stop is not None and should_stop():
            raise Cancelled
        return score(inputs)

    return checked


# The summary: per method and metric, the estimate over the photos and a bootstrap interval.


# The command line


def method_names(text: str, head_kind: str) -> tuple[str, ...]:
    """``all`` (every method this head takes), or comma-separated names, resolved and checked."""
    if text.strip().lower() == "all":
        return tuple(name for name, m in METHODS.items() if allows(m, head_kind))
    names = [resolve(name.strip(), head_kind).name for name in text.split(",") if name.strip()]
    if not names:
        raise NpcamError("methods: name at least one method, or 'all'")
    return tuple(dict.fromkeys(names))


def cpu_name() -> str:
    """This machine's CPU model, for the report (``platform`` where /proc/cpuinfo says nothing)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def read_rows(dest: str, photos: list[str], task: str = "classify") -> list[dict]:
    """The rows of ``photos`` that ``dest`` holds (a ``task``'s schema, :func:`arrow_schema`), in the order of
    ``photos`` (the files' order is the order photos finished in), a photo's rows in their written order."""
    import pyarrow.dataset as pds

    from .engine import filesystem_and_path

    filesystem, root = filesystem_and_path(dest)
    table = pds.dataset(root, filesystem=filesystem, format="parquet", schema=arrow_schema(task)).to_table()
    place = {photo: i for i, photo in enumerate(photos)}
    return sorted((row for row in table.to_pylist() if row["image"] in place), key=lambda row: place[row["image"]])


def annotations_digest(annotations: Annotations, detector: bool) -> str:
    """What the stamp records of the annotations: a digest of what the run reads of them (a classifier: each
    photo's class and boxes; a detector: its objects too)."""

    def fields(entry: Annotation) -> dict:
        return {k: v for k, v in asdict(entry).items() if detector or k != "objects"}

    everything = [sorted(annotations.by_path.items()), sorted(annotations.by_stem.items())]
    return hashlib.sha256(json.dumps(everything, default=fields).encode()).hexdigest()[:16]


def default_report(dest: str) -> str:
    """The report's default path: ``DEST.html`` beside a local DEST; for a URI, its last part in this folder."""
    return dest.rstrip("/") + ".html" if "://" not in dest else dest.rstrip("/").rsplit("/", 1)[-1] + ".html"


def run(args: argparse.Namespace) -> int:
    from . import annotations as annotation_files
    from .dataset import list_images
    from .engine import done_images, make_stamp, require_extra, run_items
    from .model import Model
    from .report import write_report

    require_extra(PROG)
    model = Model(args.model, threads=1)
    task = model.bundle.task
    detector = task == "detect"
    if not detector and args.top is not None:
        raise NpcamError(f"top={args.top}: this model is a classifier; only a detector's detections are chosen so")
    if detector and args.threshold != DEFAULT_THRESHOLD:
        raise NpcamError(f"threshold={args.threshold}: a detector's evaluation boxes no map (GT-known Loc is a "
                         "classifier's); the box rule does not apply")  # fmt: skip
    chosen = {"top": args.top or TOP} if detector else {}
    options = Options(threshold=args.threshold, keep_aspect=args.keep_aspect, size=args.size,
                      max_pixels=args.max_pixels, conf=args.conf, iou=args.iou, max_det=args.max_det,
                      **chosen).checked(model)  # fmt: skip
    road = {} if args.road else {"road_percents": ()}
    settings = Settings(options, method_names(args.methods, model.head.kind), seed=args.seed, **road)
    photos = spread(list_images(args.src), args.limit)
    if not photos:
        raise NpcamError(f"{args.src}: no photos")
    root = args.src if os.path.isdir(args.src) else None
    found: list[Annotation | None] = [None] * len(photos)
    digest = None
    if args.annotations:
        annotations: Annotations = annotation_files.read(args.annotations, model.labels, args.classes)
        for warning in annotations.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        found, unmatched = annotations.match(photos, root)
        if unmatched and args.limit is None:
            print(f"{PROG}: {len(unmatched)} annotated photo(s) are not among the photos (e.g. {unmatched[0]})",
                  file=sys.stderr)  # fmt: skip
        digest = annotations_digest(annotations, detector)
    settings_stamp = {**asdict(settings), "options": {k: v for k, v in asdict(options).items() if k != "max_pixels"},
                      "annotations": digest}  # fmt: skip
    stamp = make_stamp(model, settings_stamp)
    done = done_images(args.out, stamp)
    items = []
    for photo, given in zip(photos, found):
        if photo in done:
            continue
        entry = given or Annotation()
        objects = json.dumps([[c, *b] for c, b in entry.objects]) if given is not None and detector else ""
        items.append({"image": photo, "index": len(items), "label": -1 if entry.label is None else entry.label,
                      "boxes": json.dumps([list(b) for b in entry.boxes]), "objects": objects,
                      "error": entry.error or ""})  # fmt: skip
    started = time.monotonic()
    outcome = run_items(model, items, args.out, stamp, partial(photo_rows, settings), partial(arrow_schema, task),
                        args.address, args.actors, args.batch_size, args.rows_per_file, args.connect_timeout,
                        args.driver_threads, PROG, "photos")  # fmt: skip
    print(f"{len(photos)} photos: {len(photos) - len(items)} already in {args.out}, {outcome['explained']} evaluated "
          f"now ({outcome['errors']} failed) in {time.monotonic() - started:.1f} s", file=sys.stderr)  # fmt: skip
    rows = read_rows(args.out, photos, task)
    if detector:
        summary = summarize_detections(rows, [*settings.methods, BASELINE], photos, args.bootstrap, args.seed,
                                       BASELINE)  # fmt: skip
    else:
        summary = summarize(rows, list(settings.methods), photos, args.bootstrap, args.seed)
    for message in summary.errors:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    if not summary.photos:
        raise NpcamError("no photo could be evaluated")
    print(describe_run(summary, model.bundle.arch))
    print()
    print(markdown(summary))
    report = args.report or default_report(args.out)
    context = {"command": shlex.join(["npcam", "evaluate", *args.argv]),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(),
               "npcam": __version__, "arch": model.bundle.arch, "threshold": str(options.threshold)}  # fmt: skip
    if detector:
        context["selection"] = (f"the best {options.top} detections a photo, of those scoring at least {options.conf} "
                                f"after NMS at IoU {options.iou} (at most {options.max_det})")  # fmt: skip
    write_report(report, summary, rows, context, args.samples)
    print(f"{PROG}: report -> {report}", file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None):
    from .arguments import (
        OneLineParser,
        add_detection_options,
        add_input_options,
        add_ray_options,
        add_threshold_option,
        between,
        count,
        methods_help,
    )
    from .engine import CONNECT_TIMEOUT
    from .explain import MAX_TOP
    from .image import MAX_PIXELS

    p = OneLineParser(
        prog=PROG,
        description="Measure every explanation method on a folder of photos: localization against annotated boxes, "
        "faithfulness for every photo (a detector's: for each of its best detections, and a box-shaped baseline). "
        "Rows go to Parquet in DEST (re-runs resume), a table with 95% intervals to stdout, an HTML report beside "
        "DEST. Needs the dataset extra (pyarrow; Ray for --address).",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="PHOTOS", help="a folder of photos (searched recursively), a glob or a list file")
    p.add_argument("--model", "-m", required=True, help="model bundle directory")
    p.add_argument("--out", required=True, metavar="DEST", help="Parquet directory (local or URI); re-runs resume")
    p.add_argument("--annotations", metavar="FILE|DIR",
                   help="boxes and classes: a CSV (file, class, bboxes_xyxy), a COCO JSON, or VOC/ILSVRC XML "
                   "(a folder or one file); paths in a CSV or COCO file are relative to PHOTOS")  # fmt: skip
    p.add_argument("--classes", metavar="MAP", help="annotated class names to the model's classes: a JSON object, "
                   "or a text file whose line i names class i (e.g. LOC_synset_mapping.txt)")  # fmt: skip
    p.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    add_threshold_option(p)
    p.add_argument("--top", type=count(1, MAX_TOP), metavar="K",
                   help=f"a detector: evaluate each photo's K best detections (default {TOP})")  # fmt: skip
    add_detection_options(p)
    add_input_options(p)
    p.add_argument("--max-pixels", type=between(1), default=MAX_PIXELS,
                   help=f"refuse larger images (default {MAX_PIXELS:,})")  # fmt: skip
    p.add_argument("--no-road", dest="road", action="store_false",
                   help="skip ROAD (its 18 imputations a map are most of a run's time at large inputs)")  # fmt: skip
    p.add_argument("--limit", type=between(1), metavar="N", help="only N photos, spread evenly over the list")
    p.add_argument("--bootstrap", type=between(10), default=BOOTSTRAP, metavar="B",
                   help=f"bootstrap resamples for the intervals (default {BOOTSTRAP})")  # fmt: skip
    p.add_argument("--seed", type=between(0), default=0, help="seed of ROAD's noise and of the bootstrap (default 0)")
    p.add_argument("--samples", type=between(0), default=SAMPLES, metavar="K",
                   help=f"photos in the report's grid of photos x methods (default {SAMPLES})")  # fmt: skip
    p.add_argument("--report", metavar="HTML", help="the report's path (default: DEST.html)")
    add_ray_options(p, CONNECT_TIMEOUT, batch_size=1, rows_per_file=100)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the report
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    from .arguments import flag_words

    args = parse_args(argv)
    # SIGTERM (a batch system's stop, `kill`) ends the run as Ctrl-C does: the photos finished are written.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except NpcamError as e:
        print(f"{PROG}: error: {flag_words(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the photos finished are saved: run the same command again to finish",
              file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
