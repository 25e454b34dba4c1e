"""A detector through the front-ends' pipeline, without torch (fast tier): the CLI, the record, the overlay.

On the tiny two-stride detector of tests/tiny_detector.py (random weights: its boxes are not about the photo,
which does not matter here). Every expectation comes from the library's own pieces (``model.predict`` with the
same thresholds, ``model.cam``, ``npcam.overlay``), so that the CLI is checked against what it must run:

- the ``--json`` record (detections, the map explained, ``--save-cam``), ``--detection``, ``--top``;
- ``--conf``, ``--iou`` and ``--max-det`` against ``predict`` with those thresholds, and the cap;
- the overlay: the map's overlay except on the boxes and labels, each box in its class's colour, the
  explained one thicker; a photo with no detection: an empty list, exit 0, and the photo as its overlay;
- one-line errors: a bad ``--detection``, options of the other kind of model; nothing half-written;
- NaN, infinite and degenerate candidates, and boxes outside the photo.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_detector as td
from conftest import cli_runner, synthetic_image
from PIL import Image

import npcam
from npcam import record as records
from npcam.detect import Candidates, Thresholds, select
from npcam.render import class_colour, draw_detections_into

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

# A handful of detections of two classes on photo() (the tiny detector keeps ~80 at the YOLO defaults).
FEW = ("--conf", "0.5", "--iou", "0.3", "--max-det", "5")
THRESHOLDS = Thresholds(conf=0.5, iou=0.3, max_det=5)
SIZE = (120, 160)  # the photo's height, width


@pytest.fixture
def detector_cli(detector_bundle, capsys, tmp_path, monkeypatch):
    return cli_runner(detector_bundle, capsys, tmp_path, monkeypatch)


def photo(tmp_path, name="photo.png", size=SIZE, seed=0):
    """A PNG (lossless, so that overlays compare pixel for pixel)."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(*size, seed=seed)).save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_json_record_lists_the_detections_and_the_map_explained(detector_cli, tmp_path, detector):
    image = photo(tmp_path)
    code, out, err = detector_cli(image, *FEW, "--json", "--save-cam", "-o", f"{tmp_path}/out/")
    assert code == 0, err
    record = json.loads(out)
    pred = detector.predict(image, thresholds=THRESHOLDS)
    assert len(pred.detections) == 5
    assert "top5" not in record and (record["width"], record["height"]) == (160, 120)
    assert [(d["class"], d["label"]) for d in record["detections"]] == [
        (d.class_index, d.label) for d in pred.detections
    ]
    for entry, want in zip(record["detections"], pred.detections):
        assert set(entry) == {"box", "class", "label", "score"}
        assert entry["score"] == pytest.approx(want.score, abs=1e-12)
        np.testing.assert_allclose(entry["box"], want.box, atol=0.005)  # in the photo's pixels, to 0.01 px
    output, cam = tmp_path / "out" / "photo_cam.jpg", tmp_path / "out" / "photo_cam.npy"
    first = {"detection": 0, **record["detections"][0], "output": str(output), "cam": str(cam)}
    assert record["maps"] == [first] and {k: record[k] for k in first} == first
    assert Image.open(output).size == (160, 120)
    saved = np.load(cam, allow_pickle=False)
    assert saved.dtype == np.float32 and saved.shape == SIZE
    np.testing.assert_allclose(saved, detector.cam(pred, detection=0, size=SIZE), atol=1e-6)


def test_detection_k_explains_that_one(detector_cli, tmp_path, detector):
    image = photo(tmp_path)
    # HiResCAM: the tiny detector's 1x1 head gives every candidate of a class and stride the same Grad-CAM map
    # (its weights are spatial means), HiResCAM's is the candidate's own cell's
    code, out, err = detector_cli(image, *FEW, "--detection", "3", "--json", "--save-cam", "--method", "hirescam")
    assert code == 0, err
    record = json.loads(out)
    assert [m["detection"] for m in record["maps"]] == [3] and record["output"] == "photo_cam.jpg"
    pred = detector.predict(image, thresholds=THRESHOLDS)
    saved = np.load(tmp_path / "photo_cam.npy")
    np.testing.assert_allclose(saved, detector.cam(pred, detection=3, size=SIZE, method="hirescam"), atol=1e-6)
    # not the best one's map: the option reached the pipeline
    assert not np.allclose(saved, detector.cam(pred, detection=0, size=SIZE, method="hirescam"), atol=1e-3)


def test_top_k_writes_one_overlay_per_detection_and_a_rerun_skips_them(detector_cli, tmp_path):
    photo(tmp_path)
    code, out, err = detector_cli("photo.png", *FEW, "--top", "3", "--json", "--save-cam")
    assert code == 0, err
    record = json.loads(out)
    assert [m["detection"] for m in record["maps"]] == [0, 1, 2]
    for i, m in enumerate(record["maps"]):
        assert m["output"] == f"photo_cam_det{i}.jpg" and m["cam"] == f"photo_cam_det{i}.npy"
        assert (tmp_path / m["output"]).is_file() and (tmp_path / m["cam"]).is_file()
    code, out, err = detector_cli(".", *FEW, "--top", "3", "--json")  # the folder now holds the overlays too
    assert code == 0 and "skipped 3 image(s) npcam wrote" in err and len(out.splitlines()) == 1


def test_more_detections_asked_for_than_there_are_explains_those_there_are(detector_cli, tmp_path):
    code, out, err = detector_cli(photo(tmp_path), "--max-det", "2", "--top", "4", "--json")
    assert code == 0, err
    assert [m["detection"] for m in json.loads(out)["maps"]] == [0, 1]
    assert sorted(p.name for p in tmp_path.glob("*_cam*")) == ["photo_cam_det0.jpg", "photo_cam_det1.jpg"]


@pytest.mark.parametrize(
    "conf, iou, max_det",
    [(0.25, 0.7, 300), (0.9, 0.7, 300), (0.5, 0.1, 300), (0.5, 0.3, 3), (0.0, 1.0, 7)],
    ids=["yolo-defaults", "conf", "iou", "max-det", "every-candidate-capped"],
)
def test_conf_iou_and_max_det_are_the_thresholds_of_predict(detector_cli, tmp_path, detector, conf, iou, max_det):
    image = photo(tmp_path)
    code, out, err = detector_cli(image, "--conf", conf, "--iou", iou, "--max-det", max_det, "--json", "--no-overlay")
    assert code == 0, err
    want = detector.predict(image, thresholds=Thresholds(conf, iou, max_det)).detections
    assert [(d["class"], d["score"]) for d in json.loads(out)["detections"]] == [(d.class_index, d.score) for d in want]
    if conf == 0.0:  # every one of the candidates is above the threshold: max_det caps them
        assert len(want) == max_det < td.candidates()
    if (conf, iou, max_det) == (0.25, 0.7, 300):  # the defaults, as the YOLO tools have them
        code, default, _ = detector_cli(image, "--json", "--no-overlay")
        assert json.loads(default)["detections"] == json.loads(out)["detections"]


def test_a_photo_with_no_detection_is_an_empty_list_exit_0_and_the_photo_as_its_overlay(detector_cli, tmp_path):
    image = photo(tmp_path)
    code, out, err = detector_cli(image, "--conf", "1", "--json", "--save-cam", "-o", tmp_path / "overlay.png")
    assert code == 0 and err == ""
    record = json.loads(out)
    assert record["detections"] == [] and record["maps"] == [] and record["output"] == str(tmp_path / "overlay.png")
    assert "class" not in record and "cam" not in record
    np.testing.assert_array_equal(pixels(tmp_path / "overlay.png"), pixels(image))  # no map, no box
    assert not list(tmp_path.glob("*.npy"))  # no map to save
    code, out, err = detector_cli(image, "--conf", "1", "--top", "3")
    assert code == 0 and "0 detections -> photo_cam.jpg" in out and (tmp_path / "photo_cam.jpg").is_file()


def test_a_bad_detection_index_is_one_line_and_writes_nothing(detector_cli, tmp_path):
    image = photo(tmp_path / "in")
    code, out, err = detector_cli(image, *FEW, "--detection", "5", "--save-cam", "--json", "-o", f"{tmp_path}/out/")
    assert code == 1
    assert err == f"npcam: error: {image}: no detection 5: this image has 5 (0 to 4)\n"
    assert json.loads(out) == {"image": str(image), "error": f"{image}: no detection 5: this image has 5 (0 to 4)"}
    assert not (tmp_path / "out").exists()
    code, _, err = detector_cli(image, "--conf", "1", "--detection", "0")
    assert code == 1 and err.endswith("no detection 0: this image has none\n") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "cat"], "this model is a detector: it explains detections (--detection K, --top K), not classes"),
        (["-o", "x.unknown"], "cannot tell an image format"),
        (["--keep-aspect"], "this model letterboxes its input, so it always keeps the aspect"),
    ],
)
def test_usage_errors_on_a_detector_are_one_line(detector_cli, tmp_path, args, message):
    code, _, err = detector_cli(photo(tmp_path), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--conf", "1.5"], "argument --conf: must be a number between 0 and 1, not '1.5'"),
        (["--iou", "nan"], "argument --iou: must be a number between 0 and 1, not 'nan'"),
        (["--max-det", "0"], "argument --max-det: must be between 1 and 30000, not 0"),
        (["--detection", "-1"], "argument --detection: must be at least 0, not -1"),
        (["--detection", "1", "--top", "2"], "argument --top: not allowed with argument --detection"),
    ],
)
def test_argument_errors_say_what_is_valid(detector_cli, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        detector_cli(photo(tmp_path), *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_classifier_refuses_the_detectors_options_in_one_line(tiny_bundle, capsys, tmp_path, monkeypatch):
    run = cli_runner(tiny_bundle, capsys, tmp_path, monkeypatch)
    code, _, err = run(photo(tmp_path), "--detection", "1")
    assert (
        code == 2 and err == "npcam: error: --detection 1: this model is a classifier; only a detector has detections\n"
    )
    code, _, err = run(photo(tmp_path), "--conf", "0.5", "--max-det", "9")
    assert code == 2 and "--conf 0.5, --max-det=9: this model is a classifier" in err


@pytest.mark.parametrize(
    "options, message",
    [
        (npcam.Options(classes=(1,)), "this model is a detector: it explains detections (detection=K, top=K)"),
        (npcam.Options(detection=1, top=2), "detection and top cannot both be given"),
        (npcam.Options(detection=-1), "detection must be at least 0, not -1"),
        (npcam.Options(conf=float("nan")), "conf must be between 0 and 1, not nan"),
        (npcam.Options(iou=-0.1), "iou must be between 0 and 1, not -0.1"),
        (npcam.Options(max_det=0), "max_det must be between 1 and 30000, not 0"),
    ],
)
def test_options_are_checked_once_for_a_detector(detector, options, message):
    with pytest.raises(npcam.NpcamError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        options.checked(detector)


def boxes_of(pred, scale=(1.0, 1.0)) -> np.ndarray:
    return np.array([d.box for d in pred.detections]) * np.array([scale[1], scale[0]] * 2)


def test_the_overlay_is_the_maps_with_every_box_and_label_the_explained_one_thicker(detector_cli, tmp_path, detector):
    image = photo(tmp_path)
    code, _, err = detector_cli(image, *FEW, "--detection", "1", "-o", tmp_path / "overlay.png")
    assert code == 0, err
    got = pixels(tmp_path / "overlay.png")
    pred = detector.predict(image, thresholds=THRESHOLDS)
    plain = npcam.overlay(pred.image, detector.cam(pred, detection=1, size=SIZE), 0.5)
    # boxes=False: the map's overlay exactly (the pipeline's one-pass overlay is the library's, pixel for pixel)
    options = npcam.Options(detection=1, conf=0.5, iou=0.3, max_det=5, boxes=False).checked(detector)
    np.testing.assert_array_equal(npcam.draw(npcam.explain(detector, image, options), 0, options), plain)
    # Every pixel that differs from it is on a box's outline or in a label above (or inside) a box.
    boxes = boxes_of(pred)
    x0, y0 = np.floor(boxes[:, 0]).astype(int), np.floor(boxes[:, 1]).astype(int)
    x1, y1 = np.ceil(boxes[:, 2]).astype(int) - 1, np.ceil(boxes[:, 3]).astype(int) - 1
    thin = 2  # npcam.render: max(2, short side / 300) pixels, the explained box 2 * thin + 1, each with a black edge
    allowed = np.zeros(SIZE, bool)
    for a, b, c, d in zip(x0, y0, x1, y1):
        allowed[b : d + 1, a : c + 1] = True  # the box
        allowed[b + 2 * thin + 2 : d - 2 * thin - 1, a + 2 * thin + 2 : c - 2 * thin - 1] = False  # inside, no line
    for a, b in zip(x0, y0):  # a label: "cat 0.98" in 12 px text, above the box or inside it at the top edge
        allowed[max(0, b - 16) : b + 16, max(0, a - 60) : a + 60] = True
    changed = (got != plain).any(axis=2)
    assert changed.any() and not (changed & ~allowed).any()
    # The explained box's left edge, half-way down, is its class's colour 2 * thin + 1 pixels deep, then black;
    # another box's is thin pixels deep.
    colour = class_colour(pred.detections[1].class_index)
    middle = (y0[1] + y1[1]) // 2
    np.testing.assert_array_equal(got[middle, x0[1] : x0[1] + 5], [colour] * 5)
    np.testing.assert_array_equal(got[middle, x0[1] + 5], [0, 0, 0])
    for j in range(len(boxes)):
        others = [k for k in range(len(boxes)) if k != j]
        row = (y0[j] + y1[j]) // 2
        if any(x0[k] - 3 <= x0[j] <= x1[k] + 3 and y0[k] - 25 <= row <= y1[k] + 3 for k in others):
            continue  # another box or label is drawn there
        np.testing.assert_array_equal(got[row, x0[j] : x0[j] + 2], [class_colour(pred.detections[j].class_index)] * 2)
        np.testing.assert_array_equal(got[row, x0[j] + 2], [0, 0, 0])


def test_boxes_follow_a_smaller_overlay(detector_cli, tmp_path, detector):
    image = photo(tmp_path, size=(240, 320))
    code, _, err = detector_cli(image, *FEW, "--max-side", "160", "-o", tmp_path / "small.png")
    assert code == 0, err
    got = pixels(tmp_path / "small.png")
    assert got.shape == (120, 160, 3)
    pred = detector.predict(image, thresholds=THRESHOLDS)
    box = boxes_of(pred, scale=(0.5, 0.5))[0]
    row = int((np.floor(box[1]) + np.ceil(box[3]) - 1) // 2)
    np.testing.assert_array_equal(got[row, int(np.floor(box[0]))], class_colour(pred.detections[0].class_index))


def test_each_class_has_its_colour_and_the_explained_box_is_drawn_thicker_and_last():
    picture = np.full((200, 300, 3), 90, np.uint8)
    boxes = np.array([[20.0, 40, 120, 150], [100, 60, 250, 180], [150.5, 10.2, 290.7, 100.9]])
    draw_detections_into(picture, boxes, [0, 1, 0], ["cat 0.90", "dog 0.80", "cat 0.70"], emphasized=0)
    colours = [class_colour(c) for c in (0, 1, 2, 3)]
    assert len(set(colours)) == 4  # neighbouring classes differ
    thin = 2
    np.testing.assert_array_equal(picture[100, 20 : 20 + 2 * thin + 1], [colours[0]] * 5)  # the explained: 5 deep
    np.testing.assert_array_equal(picture[120, 100 : 100 + thin], [colours[1]] * 2)  # another: 2 deep, black edge
    np.testing.assert_array_equal(picture[120, 100 + thin], [0, 0, 0])
    np.testing.assert_array_equal(picture[60, 115:120], [colours[0]] * 5)  # drawn last: over the dog box top edge
    np.testing.assert_array_equal(picture[50, 150], colours[0])  # 150.5 starts in column 150, clipped edges
    np.testing.assert_array_equal(picture[50, 290], colours[0])  # 290.7 ends in column 290
    # "cat 0.90" above the explained box: a patch of its colour ending on the box's top, with the text on it
    rows, cols = np.nonzero((picture[:40, :100] == colours[0]).all(axis=2))
    assert rows.max() == 39 and 39 - rows.min() >= 9 and cols.min() == 20 and cols.max() - 20 >= 30
    patch = picture[rows.min() : 40, 20 : cols.max() + 1]
    ink = np.abs(patch.astype(int) - colours[0]).sum(axis=2) > 150  # the text: white or black, as it shows best
    assert (patch == colours[0]).all(axis=2).mean() > 0.5 and ink.sum() > 20
    assert (picture[150:190, 0:15] == 90).all() and (picture[100, 130:140] == 90).all()  # outside: untouched


def test_drawing_boxes_on_an_rgbx_buffer_keeps_its_fourth_channel():
    rgbx = np.full((50, 60, 4), 255, np.uint8)
    rgbx[..., :3] = 90
    draw_detections_into(rgbx, np.array([[-10.0, 5.2, 30.7, 80.0], [20, 20, 20, 40]]), [0, 1], ["cat 0.9", "x"], 0)
    assert (rgbx[..., 3] == 255).all() and (rgbx[..., :3] != 90).any()
    np.testing.assert_array_equal(rgbx[20, 0], [*class_colour(0), 255])  # clipped to the picture's left edge


def test_nan_infinite_degenerate_and_outside_candidates_are_handled(detector, monkeypatch):
    """Candidates crafted in the raw output: NaN and infinite scores, infinite, empty and inverted boxes, and boxes
    in the letterbox's pad or beyond the input. Only the sound ones are detections, inside the photo."""
    n = td.candidates()
    raw = np.zeros((4 + td.CLASSES, n), np.float32)  # [cx, cy, w, h, class scores] per candidate (channels first)
    raw[:4] = [[48], [32], [10], [10]]
    raw[4:] = 0.01
    cases = {
        0: ([48, 32, 20, 20], [0.9, 0.1, 0.1]),  # sound
        1: ([48, 32, 20, 20], [np.nan, 0.95, 0.1]),  # NaN class score: its best class is no number
        2: ([48, 32, 20, 20], [np.inf, 0.1, 0.1]),  # infinite score
        3: ([48, 32, np.inf, 20], [0.99, 0.1, 0.1]),  # infinite box
        4: ([48, 32, 0, 20], [0.98, 0.1, 0.1]),  # no width
        5: ([48, 32, -5, 20], [0.97, 0.1, 0.1]),  # inverted
        6: ([5, 32, 6, 20], [0.96, 0.1, 0.1]),  # wholly in the letterbox's left pad (the photo is 150 x 130)
        7: ([200, 32, 30, 20], [0.95, 0.1, 0.1]),  # beyond the input
        8: ([90, 60, 40, 40], [0.1, 0.8, 0.1]),  # sound, crosses the photo's right and bottom edges
    }
    for a, (box, scores) in cases.items():
        raw[:4, a], raw[4:, a] = box, scores
    monkeypatch.setattr(detector, "head_scores", lambda x, sides=None: np.tile(raw.reshape(1, -1), (len(x), 1)))
    # one image alone: the head's values are kept for the gradient (Prediction.head_trace), read from its trace
    monkeypatch.setattr(detector.head, "trace", lambda x, sides=None: {detector.head.output: raw.reshape(1, -1)})
    pred = detector.predict(synthetic_image(150, 130), thresholds=Thresholds(conf=0.5))
    assert [d.candidate for d in pred.detections] == [0, 8]
    for d in pred.detections:
        x0, y0, x1, y1 = d.box
        assert np.isfinite(d.box).all() and 0 <= x0 < x1 <= 130 and 0 <= y0 < y1 <= 150
    assert pred.detections[1].box[2] == 130  # clipped to the photo


def test_a_box_of_no_area_takes_no_place_among_max_det():
    boxes = np.array([[0, 0, 0, 10], [5, 5, 5, 5], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    scores = np.array([[0.99], [0.98], [0.9], [0.8]])
    assert [a for a, _, _ in select(Candidates(boxes, scores, None), conf=0.5, max_det=2)] == [2, 3]


def test_thousands_of_candidates_above_the_threshold_are_capped_by_max_det():
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 1000, (20000, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (20000, 2))], axis=1)
    kept = select(Candidates(boxes, rng.uniform(0.5, 1, (20000, 3)), None), conf=0.25, iou=0.7, max_det=300)
    assert len(kept) == 300 and [s for _, _, s in kept] == sorted((s for _, _, s in kept), reverse=True)


def test_a_detectors_record_as_rows_one_per_detection(detector, tmp_path):
    image = photo(tmp_path)
    options = npcam.Options(top=2, conf=0.5, iou=0.3, max_det=5, lowres=True).checked(detector)
    record = npcam.describe(npcam.explain(detector, image, options), options)
    rows = records.rows(record)
    assert [r["detection"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["explained"] for r in rows] == [True, True, False, False, False]
    for row, entry in zip(rows, record["detections"]):
        assert {k: row[k] for k in entry} == entry and row["image"] == str(image) and row["width"] == 160
    # lowres: the map on the finest layer's grid (stride 8) over the photo's part of the input
    assert rows[0]["lowres"]["shape"] == [8, 11] and "lowres" not in rows[2]
    nothing = npcam.Options(conf=1.0).checked(detector)
    empty = npcam.describe(npcam.explain(detector, image, nothing), nothing)
    assert records.rows(empty) == [{**{k: empty[k] for k in records.IMAGE_KEYS}, "detection": None,
                                    "explained": False, "output": None}]  # fmt: skip
