"""``npcam evaluate`` on a detector: the tiny detector of tests/tiny_detector.py (no torch; pyarrow).

- Each detection's metrics against slow implementations of their definitions written here (loops over pixels
  and candidates): its match (the annotated box of its class of best IoU, counted in pixels), the pointing game
  and the energy in the matched box, the energy in its own box, Average Drop, deletion and insertion on D-RISE's similarity computed from the raw output of
  the whole network as one ONNX graph (not npcam's head), ROAD on that similarity; the box-shaped baseline.
- The bootstrap over photos (a photo's detections are drawn together).
- End to end with COCO annotations (a class mapped by name, one by a mapping file, one by none), a photo without
  detections, one without annotations, ``--no-road`` (ROAD's imputations are most of the time; the per-detection
  test has them); resuming; bad options. VOC XML gives the same objects as COCO.
The detector's report in Chromium: test_report.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tiny_detector as td
from conftest import synthetic_image
from PIL import Image

import npcam
from npcam import annotations, evaluate, metrics
from npcam.explain import Options
from npcam.summary import summarize_detections
from npcam.upsample import upsample

pytest.importorskip("pyarrow.parquet", reason="npcam evaluate needs the dataset extra (pyarrow)")
import pyarrow.dataset as pds  # noqa: E402

pytestmark = pytest.mark.slow  # Ray and pyarrow, as test_evaluate.py

TOP, CONF, IOU = 2, 0.97, 0.3  # a few confident detections of the tiny detector, and none on a flat grey photo
METHODS = ("hirescam", "gradcam")
# The bundle's raw output agrees with the whole ONNX graph's within 1e-4 (test_detect_runtime's RAW_TOL, in
# pixels for the boxes). A box edge moved by d changes an IoU by at most 2 d / s, s the boxes' smaller side
# (>= 2 px here, asserted): 4 edges, 4e-4 at most; the similarity's cosine moves far less (class scores in
# [0, 1] moved by ~1e-7). Deletion, insertion and ROAD average similarities; Average Drop divides by s ~ 1.
METRIC_TOL = 1e-3
POINTING_TOLERANCE = 15  # pixels: the pointing game's (Zhang et al. 2016)


@pytest.fixture(scope="module")
def reference():
    """The whole network as one ONNX graph: float32 ``[1, 3, H, W]`` -> its raw output ``[1, 4 + C, N]``, float64."""
    session = ort.InferenceSession(td.whole_onnx(td.weights()), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["output0"], {"image": x[None].astype(np.float32)})[0].astype(np.float64)


# Slow implementations of the definitions (docs/methods.md, "For detectors").


def slow_candidates(raw: np.ndarray) -> list[tuple[tuple[float, float, float, float], np.ndarray]]:
    """Each candidate's box (x0, y0, x1, y1, input pixels) and class scores, from ``[1, 4 + C, N]``."""
    out = []
    for j in range(raw.shape[2]):
        cx, cy, w, h = raw[0, :4, j]
        out.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), raw[0, 4:, j]))
    return out


def slow_iou(a, b) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def slow_similarity(raw: np.ndarray, box, vector: np.ndarray) -> float:
    """D-RISE: max over the candidates of IoU(box, box_j) * cos(vector, p_j) * o_j; this model has no objectness,
    so o_j is the candidate's best class score (docs/methods.md, D-RISE)."""
    best = 0.0
    for other, p in slow_candidates(raw):
        norms = math.sqrt(float(vector @ vector)) * math.sqrt(float(p @ p))
        cosine = float(vector @ p) / norms if norms > 0 else 0.0
        best = max(best, slow_iou(box, other) * cosine * float(max(p)))
    return best


def slow_peak(cam: np.ndarray):
    best, where = 0.0, None
    for i in range(cam.shape[0]):
        for j in range(cam.shape[1]):
            if cam[i, j] > best:
                best, where = cam[i, j], (j, i)
    return where


def slow_pointing(cam: np.ndarray, boxes) -> bool:
    point = slow_peak(cam)
    if point is None:
        return False
    x, y = point
    nearest = min(math.hypot(x - bx, y - by) for x0, y0, x1, y1 in boxes
                  for by in range(y0, y1 + 1) for bx in range(x0, x1 + 1))  # fmt: skip
    return nearest < POINTING_TOLERANCE


def slow_energy(cam: np.ndarray, inside) -> float:
    """The share of the map's sum at the pixels ``inside(i, j)`` says."""
    total = sum(float(v) for v in cam.ravel())
    if not total > 0:
        return 0.0
    return sum(float(cam[i, j]) for i in range(cam.shape[0]) for j in range(cam.shape[1]) if inside(i, j)) / total


def in_boxes(boxes):
    return lambda i, j: any(x0 <= j <= x1 and y0 <= i <= y1 for x0, y0, x1, y1 in boxes)


def touches(box):
    """The pixels a continuous box touches: pixel (i, j), the square [j, j + 1) x [i, i + 1), overlaps it."""
    x0, y0, x1, y1 = box
    return lambda i, j: j + 1 > x0 and j < x1 and i + 1 > y0 and i < y1


def slow_match(box, class_index: int, objects) -> tuple[float | None, tuple | None]:
    """The annotated box of the detection's class whose pixels have the largest IoU with the pixels its box touches
    (the first of equals), and that IoU; the box only at IoU >= 0.5 (docs/methods.md, "For detectors")."""
    touched = touches(box)
    best, where = None, None
    for c, (x0, y0, x1, y1) in objects:
        if c != class_index:
            continue
        inter = union = 0
        for i in range(min(y0, math.floor(box[1])), max(y1, math.ceil(box[3])) + 1):
            for j in range(min(x0, math.floor(box[0])), max(x1, math.ceil(box[2])) + 1):
                a, b = touched(i, j), x0 <= j <= x1 and y0 <= i <= y1
                inter, union = inter + (a and b), union + (a or b)
        if best is None or inter / union > best:
            best, where = inter / union, (x0, y0, x1, y1)
    return best, (where if best is not None and best >= 0.5 else None)


def slow_tent(box, shape) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            tx = 1 - abs(j + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
            ty = 1 - abs(i + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
            out[i, j] = max(tx, 0) * max(ty, 0)
    return out / out.max()


def slow_faithfulness(x: np.ndarray, at_input: np.ndarray, score) -> dict:
    """Average Drop and the deletion and insertion AUC of one map at the input's size (20 steps, zeros)."""
    s = score(x)
    masked = score(x * at_input[None])
    positions = at_input.size
    order = sorted(range(positions), key=lambda p: (-at_input.ravel()[p], p))  # highest first, ties in raster order
    step = math.ceil(positions / 20)
    counts = [*range(0, positions, step), positions]
    deletion, insertion = [], []
    for count in counts:
        first = np.zeros(positions, dtype=bool)
        first[order[:count]] = True
        first = first.reshape(at_input.shape)[None]
        deletion.append(score(np.where(first, 0, x).astype(np.float32)))
        insertion.append(score(np.where(first, x, 0).astype(np.float32)))
    fractions = np.array(counts) / positions
    area = lambda ys: sum((fractions[k + 1] - fractions[k]) * (ys[k] + ys[k + 1]) / 2 for k in range(len(ys) - 1))  # noqa: E731
    return {"drop": max(0.0, s - masked) / (s + 1e-7), "deletion": area(deletion), "insertion": area(insertion)}


# The photo of the per-detection test, and its annotations


def one_photo(folder: Path) -> Path:
    path = folder / "p.png"
    Image.fromarray(synthetic_image(90, 120, seed=0)).save(path)  # wider than the input: letterboxed top and bottom
    return path


def checked(detector) -> Options:
    return Options(top=TOP, conf=CONF, iou=IOU).checked(detector)


def item(photo: Path, objects) -> dict:
    return {"image": str(photo), "index": 0, "label": -1, "boxes": "[]", "error": "",
            "objects": "" if objects is None else json.dumps([[c, *b] for c, b in objects])}  # fmt: skip


def test_the_box_baseline_is_the_boxs_tent():
    for box in [(3.0, 4.0, 17.0, 12.0), (0.0, 0.0, 30.0, 20.0), (10.3, 2.7, 25.9, 19.1)]:
        np.testing.assert_allclose(evaluate.box_baseline(box, (20, 30)), slow_tent(box, (20, 30)), atol=1e-6)
    thin = evaluate.box_baseline((5.1, 3.2, 5.3, 9.0), (20, 30))  # no pixel centre inside: its centre's pixel
    assert thin.max() == 1 and np.argwhere(thin > 0).tolist() == [[6, 5]]


def test_each_detections_metrics_are_their_definitions(detector, reference, tmp_path):
    photo = one_photo(tmp_path)
    options = checked(detector)
    first = npcam.explain(detector, str(photo), options, pixels=False)
    prediction, detections = first.prediction, [first.prediction.detections[i] for i in first.detections]
    assert len(detections) == TOP and all(d.class_index == 0 for d in detections)
    # Ground truth: a cat box inside detection 0's box, one shifted from detection 1's, one elsewhere; a dog box on
    # detection 1 (it fits better, but is of another class), and a kite box.
    x0, y0, x1, y1 = (round(v) for v in detections[0].box)
    u0, v0, u1, v1 = (round(v) for v in detections[1].box)
    cat = [(x0 + 2, y0 + 2, x1 - 2, y1 - 2), (u0 + 4, v0 + 2, u1 + 3, v1 + 3), (100, 70, 118, 88)]
    dog = [(u0, v0, u1, v1)]
    objects = [(0, b) for b in cat] + [(1, b) for b in dog] + [(2, (0, 0, 5, 5))]
    # The premises: detection j matches cat box j, and the dog box fits detection 1 better than its cat box
    matches = [slow_match(d.box, 0, objects) for d in detections]
    assert [m[1] for m in matches] == cat[:2]
    assert slow_match(detections[1].box, 1, objects)[0] > matches[1][0]
    settings = evaluate.Settings(options, METHODS)
    rows = evaluate.photo_rows(settings, detector, item(photo, objects))
    names = [*METHODS, evaluate.BASELINE]
    assert [(r["method"], r["detection"]) for r in rows] == [(m, j) for j in range(TOP) for m in names]

    x = prediction.input[0]
    place = prediction.placement
    raw = reference(x)
    candidates = slow_candidates(raw)
    maps = {m: detector.cam(prediction, detection=first.detections, method=m) for m in METHODS}
    scale = np.array([place.scale_x, place.scale_y] * 2)
    maps[evaluate.BASELINE] = np.stack([slow_tent(np.asarray(d.box) * scale, place.size) for d in detections])
    assert {row["pointing"] for row in rows} == {True, False}  # hits and misses both checked
    other_boxes_differ = set()  # which rows would score otherwise against every cat box, or with the dog box
    for row in rows:
        j, method = row["detection"], row["method"]
        detection = detections[j]
        assert row["detection_box"] == list(detection.box) and row["detection_class"] == detection.class_index
        assert row["detection_label"] == "cat" and row["detection_score"] == pytest.approx(detection.score)
        assert row["annotated"] is True and row["match"] == list(cat[j])
        assert row["match_iou"] == pytest.approx(matches[j][0], abs=1e-12)
        if method == evaluate.BASELINE:  # sampled at the photo's pixels
            full = slow_tent(detection.box, prediction.size)
        else:
            full = upsample(maps[method][j].astype(np.float32), prediction.size)
        assert row["pointing"] == slow_pointing(full, [cat[j]]), (method, j)
        assert row["energy"] == pytest.approx(slow_energy(full, in_boxes([cat[j]])), abs=1e-6)
        if slow_pointing(full, cat) != row["pointing"]:
            other_boxes_differ.add("pointing")
        if abs(slow_energy(full, in_boxes(cat)) - row["energy"]) > 0.01:
            other_boxes_differ.add("energy")
        if j == 1 and abs(slow_energy(full, in_boxes(dog)) - row["energy"]) > 0.01:
            other_boxes_differ.add("dog")
        assert row["energy_box"] == pytest.approx(slow_energy(full, touches(detection.box)), abs=1e-6)
        if method == evaluate.BASELINE:
            assert row["energy_box"] == pytest.approx(1.0, abs=1e-12)  # its support is the box
        # Faithfulness: the map at the input (the letterbox's pad 0), D-RISE's similarity of the reference network
        box, vector = candidates[detection.candidate]
        assert min(box[2] - box[0], box[3] - box[1]) >= 2  # the tolerance's premise
        at_input = np.zeros(x.shape[1:])
        at_input[place.top : place.top + place.size[0], place.left : place.left + place.size[1]] = maps[method][j]
        one = lambda v, box=box, vector=vector: slow_similarity(reference(v), box, vector)  # noqa: E731
        want = slow_faithfulness(x, at_input, one)
        for key in ("drop", "deletion", "insertion"):
            assert row[key] == pytest.approx(want[key], abs=METRIC_TOL), (method, j, key)
        assert isinstance(row["increase"], bool)
        # ROAD: npcam's imputation (test_metrics.py checks it), scored by the reference similarity, drawn as a
        # run draws (the generator seeded by --seed, the input and the map); on detection 0's maps (18 imputations
        # a map: the slow part)
        assert len(row["road_morf"]) == len(row["road_lerf"]) == 9
        if j != 0:
            continue
        low = maps[method][j].astype(np.float32)
        seed = int.from_bytes(hashlib.blake2b(x.tobytes() + low.tobytes(), digest_size=8).digest(), "little")
        similarity = lambda v, one=one: np.array([one(i) for i in v])  # noqa: E731
        morf, lerf = metrics.road(x, at_input[None], similarity, rng=np.random.default_rng([0, seed]))
        np.testing.assert_allclose(row["road_morf"], morf[0], atol=METRIC_TOL, err_msg=f"{method} {j}")
        np.testing.assert_allclose(row["road_lerf"], lerf[0], atol=METRIC_TOL, err_msg=f"{method} {j}")
    assert other_boxes_differ == {"pointing", "energy", "dog"}  # the match matters to these rows


def test_detections_matched_to_no_box_are_not_counted(detector, tmp_path):
    photo = one_photo(tmp_path)
    options = checked(detector)
    first = npcam.explain(detector, str(photo), options, pixels=False)
    detections = [first.prediction.detections[i] for i in first.detections]
    x0, y0, x1, y1 = (round(v) for v in detections[0].box)
    quarter = (x0, y0, (x0 + x1) // 2, (y0 + y1) // 2)  # a cat box overlapping detection 0 too little
    settings = evaluate.Settings(options, ("hirescam",), road_percents=())
    for objects, annotated in (([(0, quarter), (1, (0, 0, 50, 50))], True), ([], True), (None, False)):
        rows = evaluate.photo_rows(settings, detector, item(photo, objects))
        assert len(rows) == 2 * TOP
        for row in rows:
            best = slow_match(detections[row["detection"]].box, 0, objects or [])[0]
            assert row["annotated"] is annotated and row.get("match") is None
            assert (row.get("match_iou") is None) == (best is None)
            if best is not None:
                assert row["match_iou"] == pytest.approx(best, abs=1e-12)
            assert row.get("pointing") is None and row.get("energy") is None  # not counted: no box matched
            assert 0 <= row["energy_box"] <= 1 and row["deletion"] is not None and row.get("road_morf") is None
        if objects:  # the premise: detection 0's best IoU is below the match's 0.5, yet not 0
            assert 0.1 < rows[0]["match_iou"] < 0.5


def test_a_photo_without_detections_has_a_row_per_method(detector, tmp_path):
    photo = tmp_path / "flat.png"
    Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(photo)
    rows = evaluate.photo_rows(evaluate.Settings(checked(detector), METHODS), detector, item(photo, []))
    assert [r["method"] for r in rows] == [*METHODS, evaluate.BASELINE]
    assert all(r.get("detection") is None and r["error"] is None and r["annotated"] for r in rows)


def test_a_run_without_detections_says_so(detector_bundle, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(photos / "flat.png")
    args = [str(photos), "-m", str(detector_bundle), "--out", str(tmp_path / "rows"), "--conf", str(CONF), "--methods",
            "hirescam", "--no-road", "--bootstrap", "20"]  # fmt: skip
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "1 photos (0 annotated), 0 detections evaluated" in out and "No metric has a value: no photo had a" in out
    assert "| method" not in out and (tmp_path / "rows.html").exists()


def test_the_bootstrap_draws_photos_with_their_detections():
    """Photo a: 3 detections that hit; photo b: 1 that misses and 1 matched to no box. The estimate is over the
    matched detections (3/4); a resample of photos gives 1 (a, a), 0 (b, b) or 3/4 (a, b), never what resampling
    single detections would (1/2...)."""

    def row(photo, j, hit):
        return {"image": photo, "method": "m", "error": None, "detection": j, "annotated": True, "pointing": hit,
                "energy_box": float(bool(hit)), "deletion_curve": [1.0, 0.0], "insertion_curve": [0.0, 1.0], "ms": 1.0,
                "road_morf": [0.2, 0.4] if hit else [0.6, 0.8], "road_lerf": [0.9, 0.9]}  # fmt: skip

    rows = [row("a", j, True) for j in range(3)] + [row("b", 0, False), row("b", 1, None)]
    rows.append({"image": "c", "method": "m", "error": None, "annotated": False})  # no detection: no weight
    summary = summarize_detections(rows, ["m"], ["a", "b", "c"], resamples=200, seed=1)
    estimate, low, high = summary.values["m"]["pointing"]
    assert estimate == 0.75 and summary.detections == 5 and summary.matched == 4 and summary.photos == 3
    assert {low, high} <= {0.0, 0.75, 1.0} and low < high
    # ROAD: each detection's mean over the percents, then the mean over every detection (matched or not)
    assert summary.values["m"]["energy_box"][0] == pytest.approx(3 / 5)
    assert summary.values["m"]["road_morf"][0] == pytest.approx((3 * 0.3 + 2 * 0.7) / 5)
    assert summary.values["m"]["road"][0] == pytest.approx((3 * (0.9 - 0.3) + 2 * (0.9 - 0.7)) / 10)
    assert summary.curves["m"]["road_morf"] == pytest.approx([(3 * 0.2 + 2 * 0.6) / 5, (3 * 0.4 + 2 * 0.8) / 5])


# End to end, with COCO annotations


def write_coco(path: Path, boxes: dict) -> Path:
    """``boxes``: photo name -> [(category name, (x0, y0, x1, y1) inclusive)]; COCO's [x, y, w, h] covers them."""
    categories = {"cat": 1, "kite": 3, "puppy": 5, "unicorn": 99}
    images, found = [], []
    for i, (name, objects) in enumerate(boxes.items()):
        images.append({"id": 10 + i, "file_name": name})
        for category, (x0, y0, x1, y1) in objects:
            found.append({"image_id": 10 + i, "category_id": categories[category],
                          "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": found,
                                "categories": [{"id": v, "name": k} for k, v in categories.items()]}))  # fmt: skip
    return path


ANNOTATED = {  # for the readers' test
    "a.png": [("cat", (10, 20, 60, 70)), ("cat", (70, 5, 110, 40)), ("unicorn", (0, 0, 9, 9))],
    "b.png": [("puppy", (5, 5, 60, 60))],
    "sub/c.png": [("cat", (0, 30, 89, 119)), ("kite", (20, 20, 40, 40))],
    "flat.png": [],
}
MAPPING = {"puppy": "dog"}  # the run's --classes


def annotate(detector, photos: Path) -> dict:
    """The run's annotations, made from its detections so that some match and some do not: on a.png a cat box
    inside detection 0, another elsewhere and a unicorn (no class of the model); on b.png a puppy (a dog by the
    mapping file: no detection here is one); on sub/c.png a cat box on a quarter of detection 1 (too little to
    match) and a kite; on flat.png nothing (nothing is detected there either); d.png is not annotated."""

    def box(name, j):
        return tuple(round(v) for v in detector.predict(str(photos / name), thresholds=checked(detector).thresholds)
                     .detections[j].box)  # fmt: skip

    x0, y0, x1, y1 = box("a.png", 0)
    u0, v0, u1, v1 = box("sub/c.png", 1)
    return {
        "a.png": [("cat", (x0 + 1, y0 + 1, x1 - 1, y1 - 1)), ("cat", (70, 5, 110, 40)), ("unicorn", (0, 0, 9, 9))],
        "b.png": [("puppy", (5, 5, 60, 60))],
        "sub/c.png": [("cat", (u0, v0, (u0 + u1) // 2, (v0 + v1) // 2)), ("kite", (20, 20, 40, 40))],
        "flat.png": [],
    }


def model_objects(annotated: list) -> list:
    """Annotated (category, box) as the model's (class, box), the categories of no class left out."""
    names = [MAPPING.get(category, category) for category, _ in annotated]
    return [(td.LABELS.index(n), box) for n, (_, box) in zip(names, annotated) if n in td.LABELS]


@pytest.fixture(scope="module")
def run(detector_bundle, detector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    photos = folder / "photos"
    (photos / "sub").mkdir(parents=True)
    sizes = {"a.png": (90, 120, 0), "b.png": (100, 120, 1), "sub/c.png": (120, 90, 3), "d.png": (80, 100, 2)}
    for name, (h, w, seed) in sizes.items():
        Image.fromarray(synthetic_image(h, w, seed=seed)).save(photos / name)
    Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(photos / "flat.png")
    annotated = annotate(detector, photos)
    coco = write_coco(folder / "coco.json", annotated)
    (folder / "map.json").write_text(json.dumps(MAPPING))
    args = [str(photos), "-m", str(detector_bundle), "--out", str(folder / "rows"), "--annotations", str(coco), "--classes",
            str(folder / "map.json"), "--top", str(TOP), "--conf", str(CONF), "--iou", str(IOU), "--methods",
            ",".join(METHODS), "--bootstrap", "50", "--samples", "2", "--no-road"]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = evaluate.main(args)
    return code, stdout.getvalue(), stderr.getvalue(), folder, photos, args, annotated


def test_a_run_gives_a_row_per_photo_method_and_detection(run, detector):
    code, stdout, stderr, folder, photos, _, annotated = run
    assert code == 0, stderr
    assert "warning: annotated class 'unicorn' maps to no class of the model" in stderr
    rows = pds.dataset(str(folder / "rows"), format="parquet").to_table().to_pylist()
    names = [*METHODS, evaluate.BASELINE]
    outcomes = set()
    for name in ("a.png", "b.png", "sub/c.png", "d.png", "flat.png"):
        mine = sorted((r for r in rows if r["image"] == str(photos / name)), key=lambda r: (r["detection"] or 0,
                      names.index(r["method"])))  # fmt: skip
        prediction = detector.predict(str(photos / name), thresholds=checked(detector).thresholds)
        want = prediction.detections[:TOP]
        if name == "flat.png":
            assert not want and [(r["method"], r["detection"]) for r in mine] == [(m, None) for m in names]
            continue
        assert len(want) == TOP and [(r["method"], r["detection"]) for r in mine] == [
            (m, j) for j in range(TOP) for m in names
        ]  # fmt: skip
        objects = model_objects(annotated[name]) if name in annotated else None
        for r in mine:
            d = want[r["detection"]]
            assert r["detection_box"] == list(d.box) and (r["detection_class"], r["detection_label"]) == (
                d.class_index, d.label)  # fmt: skip
            assert r["annotated"] == (name in annotated)
            best, matched = (None, None) if objects is None else slow_match(d.box, d.class_index, objects)
            assert r["match_iou"] == (None if best is None else pytest.approx(best, abs=1e-12)), (name, r["method"])
            assert r["match"] == (None if matched is None else list(matched))
            assert (r["pointing"] is None) == (r["energy"] is None) == (matched is None)
            outcomes.add("matched" if matched else "short" if best is not None else "no box")
            assert 0 <= r["energy_box"] <= 1 and 0 <= r["deletion"] <= 1 and isinstance(r["increase"], bool)
            assert r["road_morf"] is None and r["road_lerf"] is None  # --no-road
            if r["method"] == evaluate.BASELINE:
                assert r["energy_box"] == pytest.approx(1.0, abs=1e-12)
    assert outcomes == {"matched", "short", "no box"}  # the premise: each case is there


def test_the_table_is_over_detections(run):
    code, stdout, _, folder, photos, _, _ = run
    rows = pds.dataset(str(folder / "rows"), format="parquet").to_table().to_pylist()
    matched = sum(r["match"] is not None for r in rows if r["method"] == METHODS[0])
    assert stdout.startswith(f"tiny_detector: 5 photos (4 annotated), 8 detections evaluated ({matched} matched to an "
                             "annotated box of their class at IoU ≥ 0.5)")  # fmt: skip
    header = next(line for line in stdout.splitlines() if line.startswith("| method"))
    for name in ("Pointing game ↑", "Energy pointing ↑", "Energy in own box ↑", "Average Drop ↓",
                 "Increase in Confidence ↑", "Deletion AUC ↓", "Insertion AUC ↑"):  # fmt: skip
        assert name in header
    for name in ("MaxBoxAccV2", "GT-known", "ROAD"):  # a classifier's; --no-road
        assert name not in header
    table = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| `")}
    assert list(table) == ["`hirescam`", "`gradcam`", "`box` (baseline)"]
    columns = [c.strip().rsplit(" ", 1)[0] for c in header.split("|")[2:-1]]
    for method in (*METHODS, evaluate.BASELINE):
        cells = [c.strip().strip("*") for c in table[next(k for k in table if f"`{method}`" in k)].split("|")[2:-1]]
        mine = [r for r in rows if r["method"] == method and r["detection"] is not None]
        hits = [r["pointing"] for r in mine if r["pointing"] is not None]
        assert len(mine) == 8 and len(hits) == matched
        # the estimates are means over the detections (not over photos)
        assert cells[columns.index("Pointing game")].startswith(f"{100 * np.mean(hits):.1f} (")
        assert cells[columns.index("Energy in own box")].startswith(f"{np.mean([r['energy_box'] for r in mine]):.3f} (")
        assert cells[columns.index("Deletion AUC")].startswith(f"{np.mean([r['deletion'] for r in mine]):.3f} (")
    assert "**" not in table["`box` (baseline)"]  # never marked best
    page = (folder / "rows.html").read_text()
    assert page.count("<tr data-photo=") == 2 * TOP and "(baseline)" in page


def test_the_same_command_resumes_and_other_settings_are_refused(run, capsys):
    _, _, _, folder, _, args, _ = run
    assert evaluate.main(args) == 0
    captured = capsys.readouterr()
    assert "5 photos: 5 already in" in captured.err and "| `box` (baseline) |" in captured.out
    assert evaluate.main([*args, "--top", "3"]) == 2  # the last --top counts
    assert "holds results made with other options" in capsys.readouterr().err


def test_bad_options_are_one_line_and_exit_2(run, detector_bundle, tiny_bundle, tmp_path, capsys):
    photos = run[4]
    for model_dir, extra, message in (
        (detector_bundle, ["--threshold", "0.2"], "--threshold 0.2: a detector's evaluation boxes no map"),
        (tiny_bundle, ["--top", "2"], "--top 2: this model is a classifier"),
        (tiny_bundle, ["--conf", "0.5"], "--conf 0.5: this model is a classifier"),
    ):
        code = evaluate.main([str(photos), "-m", str(model_dir), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("npcam evaluate: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_voc_xml_gives_the_objects_coco_gives(tmp_path):
    labels = td.LABELS
    coco = annotations.read(write_coco(tmp_path / "coco.json", ANNOTATED), labels, None)
    folder = tmp_path / "xml"
    folder.mkdir()
    for name, objects in ANNOTATED.items():
        parts = "".join(f"<object><name>{category}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                        f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox></object>"
                        for category, (x0, y0, x1, y1) in objects)  # fmt: skip
        (folder / f"{Path(name).stem}.xml").write_text(f"<annotation>{parts}</annotation>")
    voc = annotations.read(folder, labels, None)
    for name in ANNOTATED:
        assert voc.by_stem[Path(name).stem].objects == coco.by_path[name].objects, name
    assert coco.by_path["a.png"].objects == ((0, (10, 20, 60, 70)), (0, (70, 5, 110, 40)))  # the unicorn left out
    assert coco.by_path["sub/c.png"].objects == ((0, (0, 30, 89, 119)), (2, (20, 20, 40, 40)))
