"""Detectors at run time, without torch (fast tier): a tiny YOLO-style detector of two maps (tests/tiny_detector.py).

- The bundle's raw output against the same network as one ONNX graph in onnxruntime.
- Its detections against a decode and a class-aware NMS written here, from the raw output of that graph.
- The letterbox: where the photo lies in the input, and boxes brought back to the photo.
- A detection's gradient at both maps against central differences of its score through the head.
- Grad-CAM of a detection against the maps computed here from those gradients, combined across the two layers.
- The bad cases: no detection, NaN scores, too many candidates.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tiny_detector as td
from conftest import synthetic_image

import npcam
from npcam.cam import normalize, weighted_maps
from npcam.detect import Candidates, Thresholds, pairwise_iou, select
from npcam.image import letterbox_placement
from npcam.upsample import upsample

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

# float32 networks (onnxruntime) against the head's float64: a few float32 roundings of values up to ~100 px.
RAW_TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    session = ort.InferenceSession(td.whole_onnx(td.weights()), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["output0"], {"image": x})[0]


def photo(seed=0) -> np.ndarray:
    return synthetic_image(150, 130, seed=seed)  # taller than wide: the letterbox pads left and right


def reference_detections(raw: np.ndarray, conf: float, iou: float, max_det: int):
    """Decode ``[1, 4 + C, N]`` (centre, size, class scores) and suppress, one class at a time, the slow way."""
    values = raw[0].T.astype(np.float64)  # [N, 4 + C]
    boxes = np.concatenate([values[:, :2] - values[:, 2:4] / 2, values[:, :2] + values[:, 2:4] / 2], axis=1)
    best = values[:, 4:].argmax(axis=1)
    score = values[:, 4:].max(axis=1)
    order = sorted(np.flatnonzero(score >= conf), key=lambda a: -score[a])
    kept = []
    for a in order:
        same = [b for b in kept if best[b] == best[a]]
        if all(pairwise_iou(boxes[a : a + 1], boxes[b : b + 1])[0, 0] <= iou for b in same):
            kept.append(a)
        if len(kept) == max_det:
            break
    return [(int(a), int(best[a]), float(score[a]), boxes[a]) for a in kept]


def test_the_raw_output_is_the_whole_graphs(detector, reference):
    pred = detector.predict(photo())
    want = reference(pred.input)
    np.testing.assert_allclose(pred.logits.reshape(want.shape), want, rtol=RAW_TOL, atol=RAW_TOL)
    assert len(pred.grids) == 2 and [g.shape for g in pred.grids] == [(td.WIDTH, 8, 12), (td.WIDTH, 4, 6)]


def test_the_detections_are_a_reference_decode_and_nms(detector, reference):
    for seed in range(3):
        image = photo(seed)
        pred = detector.predict(image)
        place = letterbox_placement(*image.shape[:2], td.SIZE)
        want = []
        for a, c, score, box in reference_detections(reference(pred.input), 0.25, 0.7, 300):
            photo_box = (box - np.array([place.left, place.top] * 2)) / np.array([place.scale_x, place.scale_y] * 2)
            photo_box = photo_box.clip(0, [image.shape[1], image.shape[0]] * 2)
            if photo_box[2] > photo_box[0] and photo_box[3] > photo_box[1]:  # not wholly in the letterbox's pad
                want.append((a, c, score, photo_box))
        assert len(want) >= 2, "the test detector should find a few boxes"
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in want]
        for d, (_, c, score, box) in zip(pred.detections, want):
            assert d.label == td.LABELS[c] and d.score == pytest.approx(score, abs=RAW_TOL)
            np.testing.assert_allclose(d.box, box, atol=1e-3)


def test_the_letterbox_keeps_the_aspect_and_pads_with_its_colour(detector):
    image = photo()  # 150 x 130: scaled by 64/150 to 64 x 55, centred in 96
    place = letterbox_placement(150, 130, td.SIZE)
    assert place.size == (64, 55) and (place.top, place.left) == (0, 20)
    x = detector.preprocess(image)
    assert np.all(x[0, :, :, :20] == np.float32(114 / 255)) and np.all(x[0, :, :, 75:] == np.float32(114 / 255))
    box = np.array([[10.0, 20.0, 100.0, 140.0]])
    inside = box * np.array([place.scale_x, place.scale_y] * 2) + np.array([place.left, place.top] * 2)
    np.testing.assert_allclose(place.to_photo(inside, (150, 130)), box, atol=1e-9)
    with pytest.raises(npcam.NpcamError, match="letterboxes"):
        detector.predict(image, keep_aspect=True)


def test_a_detections_gradient_is_its_scores_derivative(detector):
    pred = detector.predict(photo())
    probes = detector.probes(pred, [0, 1])
    target = probes[0].target
    head = detector.head

    def scores(inputs):
        return target.scores(head.forward_float64(inputs))

    step = 1e-4
    rng = np.random.default_rng(0)
    for layer, (name, value) in enumerate(pred.head_input.items()):
        gradient = probes[layer].gradient()  # [k, C, h, w]
        for i in rng.choice(value.size, 25, replace=False):
            up = {k: v.astype(np.float64) for k, v in pred.head_input.items()}
            down = {k: v.copy() for k, v in up.items()}
            up[name].flat[i] += step
            down[name].flat[i] -= step
            want = (scores(up) - scores(down))[0] / (2 * step)
            # central differences of a smooth function in float64: error ~ step^2 * f''' ~ 1e-8
            np.testing.assert_allclose(gradient.reshape(2, -1)[:, i], want, rtol=1e-5, atol=1e-8)
    # A YOLO candidate belongs to one stride: its score has no gradient at the other map.
    on = [bool(probe.gradient()[0].any()) for probe in probes]
    assert sorted(on) == [False, True]


def test_gradcam_of_a_detection_combines_its_layers(detector):
    pred = detector.predict(photo())
    got = detector.cam(pred, detection=0, method="gradcam")
    place = pred.placement
    layers = []
    for probe in detector.probes(pred, 0):
        weights = probe.gradient().mean(axis=(2, 3))
        layers.append(upsample(normalize(weighted_maps(probe.features, weights)), td.SIZE))
    want = normalize(np.mean(layers, axis=0))
    # the photo's part of the input, scaled to its own max (the pad's values are not shown)
    want = normalize(want[:, place.top : place.top + place.size[0], place.left : place.left + place.size[1]])[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == place.size
    full = detector.cam(pred, detection=0, method="gradcam", size=pred.size)
    assert full.shape == pred.size


def test_the_similarity_of_an_unchanged_output_is_the_detections_confidence(detector):
    pred = detector.predict(photo())
    target = detector.target(list(range(len(pred.detections))), pred)
    # IoU 1 and cosine 1 with itself, times its confidence (no objectness: its best class score, its score); on
    # this photo no other candidate beats that (one could: a better-scoring neighbour of another class).
    scores = [d.score for d in pred.detections]
    np.testing.assert_allclose(target.probabilities(pred.logits[None])[0], scores, atol=1e-6)
    # Scaling every class score down keeps every cosine; the similarity falls with the confidence.
    weak = pred.logits.copy()
    weak[detector.bundle.decoder.class_index] = 0.01 * weak[detector.bundle.decoder.class_index]
    np.testing.assert_allclose(target.probabilities(weak[None])[0], 0.01 * np.array(scores), rtol=1e-5)
    np.testing.assert_allclose(target.scores(pred.logits[None])[0], [d.score for d in pred.detections], atol=1e-6)


def test_no_detection_is_an_empty_list_and_explaining_one_says_so(detector):
    pred = detector.predict(photo(), thresholds=Thresholds(conf=1.1))
    assert pred.detections == []
    with pytest.raises(npcam.NpcamError, match="no detection to explain") as e:
        detector.cam(pred)
    assert "\n" not in str(e.value)
    pred = detector.predict(photo())
    with pytest.raises(npcam.NpcamError, match="no detection 99"):
        detector.cam(pred, detection=99)


def test_nms_drops_nan_and_keeps_at_most_max_det():
    rng = np.random.default_rng(1)
    boxes = rng.uniform(0, 100, (500, 2))
    boxes = np.concatenate([boxes, boxes + rng.uniform(1, 30, (500, 2))], axis=1)
    scores = rng.uniform(0, 1, (500, 4))
    scores[:50, 0] = np.nan
    boxes[50:60] = np.inf
    kept = select(Candidates(boxes, scores, None), conf=0.2, iou=0.5, max_det=7)
    assert len(kept) == 7 and all(a >= 60 for a, _, _ in kept)
    assert [s for _, _, s in kept] == sorted((s for _, _, s in kept), reverse=True)
    assert select(Candidates(np.zeros((0, 4)), np.zeros((0, 4)), None)) == []
