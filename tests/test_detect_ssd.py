"""Issue 27, shape 3: SSD-style raw outputs decoded against anchors outside the model (``--anchors``), checked
against the torch modules they came from.

The nets are tests/ssd_detectors.py (MediaPipe-like: pixel offsets and linear sizes against unit anchors, two
keypoints after the box, sigmoid logits; TF Object Detection API-like: (ty, tx, th, tw) over (10, 10, 5, 5),
exponential sizes, a background column and a softmax; 96x128 px, seeded random weights). Each goes through the
torch route and the ONNX route (the TorchScript and the dynamo exporters, at a fixed and at a dynamic size), and:

- the bundle's raw outputs equal the module's, and its layers the module's hooked outputs;
- its detections are a decode (written here from the two conventions' definitions) and the class-aware NMS of
  tests/test_detect_export.py of the module's raw outputs;
- each detection's maps, for the five gradient methods, at each layer and combined, equal those made from torch
  autograd with forward hooks at the same modules;
- what is missing (the anchors, their convention) is refused in one line.
"""

from __future__ import annotations

import warnings

import detectors
import numpy as np
import pytest
import ssd_detectors
import torch
from conftest import made_once, record
from test_detect_export import (
    GRADIENT_METHODS,
    LAYER_TOL,
    MAP_TOL,
    RAW_TOL,
    cli,
    cli_here,
    combined,
    expected_detections,
    hooked,
    photo,
    reference_maps,
    refused_in_one_line,
    torch_outputs,
)
from test_detect_export import onnx_file as yolo_file

import npcam
from export.api import run_onnx, run_torch
from export.detector import Options
from npcam import methods
from npcam.cam import normalize

ROUTES = ("torch", "torchscript", "torchscript-dynamic", "dynamo", "dynamo-dynamic")
DYNAMO = ("dynamo", "dynamo-dynamic")
CONVENTIONS = ("mediapipe", "tf")
CASES = [
    pytest.param(convention, route, marks=[pytest.mark.slow] if route in DYNAMO else [])
    for convention in CONVENTIONS
    for route in ROUTES
]


def options(convention: str, anchors_file) -> Options:
    # The TF-like net's class values are logits through a softmax: a sigmoid cannot be told from it by the values.
    return Options(anchors=str(anchors_file), anchor_decode=convention, scores="softmax" if convention == "tf" else None)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Each (convention, route) exported once, on demand: ``exported(convention, route) -> (npcam.Model, module)``."""
    cache = {}

    def get(convention: str, route: str):
        if (convention, route) not in cache:

            def make(directory):
                anchors_file = directory / f"{convention}_anchors.npy"
                np.save(anchors_file, ssd_detectors.anchors(convention))
                out = directory / f"{convention}_{route}"
                chosen = options(convention, anchors_file)
                if route == "torch":
                    return run_torch(f"ssd_detectors:ssd_{convention}", out, input_size=ssd_detectors.SIZE, detect=chosen)
                path = onnx_file(convention, route, directory)
                return run_onnx(path, out, input_size=ssd_detectors.SIZE, detect=chosen)

            out = made_once(tmp_path_factory, f"ssd_{convention}_{route}", make)
            cache[convention, route] = npcam.load(out), getattr(ssd_detectors, f"ssd_{convention}")()
        return cache[convention, route]

    return get


def onnx_file(convention: str, route: str, directory):
    """The net as an ONNX file, written by the TorchScript or the dynamo exporter, at a fixed or a dynamic size."""
    path = directory / f"ssd_{convention}_{route}.onnx"
    if path.exists():
        return path
    net = getattr(ssd_detectors, f"ssd_{convention}")()
    x = torch.zeros(1, 3, *ssd_detectors.SIZE)
    names = {"input_names": ["images"], "output_names": ["regressors", "classificators"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if route == "torchscript":
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, **names)
        elif route == "torchscript-dynamic":
            axes = {"images": {0: "batch", 2: "height", 3: "width"}}
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
        elif route == "dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False, **names)
        else:
            h, w = torch.export.Dim("h", min=2, max=40), torch.export.Dim("w", min=2, max=40)
            torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes={"x": {2: 32 * h, 3: 32 * w}}, **names)  # fmt: skip
    return path


# The reference decode, written from the two conventions' definitions


def reference_candidates(convention: str, outputs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's box ``[N, 4]`` (x0, y0, x1, y1, input pixels) and class scores ``[N, C]``."""
    raw, logits = (o.detach().double().numpy()[0] for o in outputs)
    anchor = ssd_detectors.anchors(convention).astype(np.float64)
    ax, ay, aw, ah = anchor.T
    height, width = ssd_detectors.SIZE
    if convention == "mediapipe":
        # MediaPipe's TensorsToDetections: x_scale = w_scale = input width, y_scale = h_scale = input height,
        # reverse_output_order (x before y), sizes linear against the anchor's (1 with fixed_anchor_size).
        cx = raw[:, 0] / width * aw + ax
        cy = raw[:, 1] / height * ah + ay
        w, h = raw[:, 2] / width * aw, raw[:, 3] / height * ah
        scores = 1 / (1 + np.exp(-logits))
    else:
        # The TF OD API's faster_rcnn_box_coder: (ty, tx, th, tw) over scales (10, 10, 5, 5), exponential sizes;
        # the class predictions' column 0 is background, dropped after the softmax.
        ty, tx, th, tw = (raw[:, :4] / [10.0, 10.0, 5.0, 5.0]).T
        cy, cx = ty * ah + ay, tx * aw + ax
        h, w = np.exp(th) * ah, np.exp(tw) * aw
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = (e / e.sum(axis=1, keepdims=True))[:, 1:]
    boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], axis=1)
    return boxes, scores


def score_of(convention: str, outputs: list[torch.Tensor], candidate: int, cls: int) -> torch.Tensor:
    """A detection's score in the module's own output, through the convention's activation."""
    logits = outputs[1][0, candidate]
    if convention == "mediapipe":
        return torch.sigmoid(logits[cls])
    return torch.softmax(logits, 0)[1 + cls]


# The tests


@pytest.mark.parametrize("convention, route", CASES)
def test_raw_outputs_layers_and_detections_match_the_module(exported, convention, route):
    model, net = exported(convention, route)
    assert len(model.head.inputs) == len(ssd_detectors.LAYERS)
    assert model.bundle.letterbox is None and model.bundle.meta["mean"] == [0.5] * 3  # stretched, [-1, 1]
    if route == "torch":
        assert model.bundle.layer == ", ".join(ssd_detectors.LAYERS)
    raw_error = 0.0
    for seed in range(2):
        image = photo(seed)
        pred = model.predict(image)
        outputs = torch_outputs(net, pred.input)
        want = np.concatenate([o.double().numpy()[0].ravel() for o in outputs])
        np.testing.assert_allclose(pred.logits, want, rtol=RAW_TOL, atol=RAW_TOL)
        raw_error = max(raw_error, np.abs(pred.logits - want).max())
        _, layers = hooked(net, ssd_detectors.LAYERS, pred.input)
        for got, value in zip(pred.grids, layers):
            want_layer = value.numpy()[0]
            assert np.abs(got - want_layer).max() / np.abs(want_layer).max() <= LAYER_TOL
        boxes, scores = reference_candidates(convention, outputs)
        expected = expected_detections(pred, image, boxes, scores)
        assert len(expected) >= 2, "the test nets should find a few boxes"
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in expected]
        for d, (_, _, score, box) in zip(pred.detections, expected):
            assert abs(d.score - score) <= RAW_TOL
            np.testing.assert_allclose(d.box, box, atol=1e-3)
    record(f"detector ssd {convention} {route}: raw outputs (abs)", raw_error)


@pytest.mark.parametrize("convention, route", CASES)
def test_gradient_maps_match_torch_autograd(exported, convention, route):
    """Five methods, three detections, each layer's map and the combined one, against torch with hooks that hold
    the bundle's own layer values."""
    model, net = exported(convention, route)
    pred = model.predict(photo(1))
    chosen = list(range(min(3, len(pred.detections))))
    assert len(chosen) >= 2
    probes = model.probes(pred, chosen)
    grads = []
    for i in chosen:
        d = pred.detections[i]
        outputs, leaves = hooked(net, ssd_detectors.LAYERS, pred.input, replace=list(pred.grids))
        score_of(convention, outputs, d.candidate, d.class_index).backward()
        grads.append([np.zeros(leaf.shape[1:]) if leaf.grad is None else leaf.grad.numpy()[0].astype(np.float64)
                      for leaf in leaves])  # fmt: skip
    size = tuple(pred.input.shape[2:])
    worst = 0.0
    for method in GRADIENT_METHODS:
        chosen_method = methods.METHODS[method]
        got_layers = [normalize(chosen_method.raw_maps(probe)) for probe in probes]
        got = methods.maps(chosen_method, probes, size)
        for j in range(len(chosen)):
            want_layers = [reference_maps(method, a.astype(np.float64), grads[j][i]) for i, a in enumerate(pred.grids)]
            for got_layer, want_layer in zip(got_layers, want_layers):
                worst = max(worst, np.abs(got_layer[j] - want_layer).max())
            worst = max(worst, np.abs(got[j] - combined(want_layers, size)).max())
    record(f"detector ssd {convention} {route}: gradient maps vs torch autograd", worst)
    assert worst <= MAP_TOL, (convention, route, worst)


def test_flags_override_the_convention(tmp_path):
    """--box-scales, --box-order, --background and --scores change the decode written, and the written decode
    still matches the module (the self-check decodes both with it): the MediaPipe-like net read with the TF
    ordering and a background column is another, consistent, decode."""
    anchors_file = tmp_path / "anchors.npy"
    np.save(anchors_file, ssd_detectors.anchors("mediapipe"))
    path = onnx_file("mediapipe", "torchscript", tmp_path)
    chosen = Options(anchors=str(anchors_file), anchor_decode="mediapipe", box_scales=(64.0, 48.0, 64.0, 48.0),
                     box_order="yxhw", background=1, scores="softmax")  # fmt: skip
    spec = npcam.load(run_onnx(path, tmp_path / "b", input_size=ssd_detectors.SIZE, detect=chosen)).bundle.meta["detect"]
    assert spec["scales"] == [64.0, 48.0, 64.0, 48.0] and spec["order"] == "yxhw" and spec["sizes"] == "linear"
    assert spec["background"] == 1 and spec["classes"] == 1 and spec["scores"] == "softmax"
    assert [o["tensor"] for o in spec["outputs"]] == ["regressors", "classificators"]
    # MediaPipe's default scales are the input's sides, in the regressors' order.
    chosen = Options(anchors=str(anchors_file), anchor_decode="mediapipe", box_order="yxhw")
    spec = npcam.load(run_onnx(path, tmp_path / "c", input_size=ssd_detectors.SIZE, detect=chosen)).bundle.meta["detect"]
    assert spec["scales"] == [96.0, 128.0, 96.0, 128.0] and "background" not in spec


def test_refusals_name_the_missing_piece(tmp_path):
    path = onnx_file("tf", "torchscript", tmp_path)
    out = tmp_path / "out"
    refused_in_one_line(cli("onnx", path, "--out", out), "look like an SSD", "--anchors anchors.npy")
    good = tmp_path / "anchors.npy"
    np.save(good, ssd_detectors.anchors("tf"))
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", good), "--anchor-decode mediapipe")
    short = tmp_path / "short.npy"
    np.save(short, ssd_detectors.anchors("tf")[:100])
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", short, "--anchor-decode", "tf"),
                        "short.npy", "100 anchors", "504 candidates")  # fmt: skip
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, ssd_detectors.anchors("tf") * 128)
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", pixels, "--anchor-decode", "tf"),
                        "pixels.npy", "0-1 scale")  # fmt: skip
    bad = tmp_path / "bad.npy"
    bad.write_text("not an array")
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", bad, "--anchor-decode", "tf"),
                        "bad.npy", "not a .npy")  # fmt: skip
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((504, 5)))
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", wide, "--anchor-decode", "tf"), "[N, 4]")
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", good, "--anchor-decode", "tf",
                            "--box-output", "nowhere"), "--box-output 'nowhere'")  # fmt: skip
    refused_in_one_line(cli_here("onnx", path, "--out", out, "--anchors", good, "--anchor-decode", "tf",
                            "--background", "9"), "--background 9", "6 columns")  # fmt: skip
    yolo = yolo_file("yolov8", "torchscript", tmp_path)  # --anchors on outputs that are not an SSD's
    refused_in_one_line(cli_here("onnx", yolo, "--out", out, "--anchors", good, "--anchor-decode", "tf"),
                        "--anchors given", "not SSD-style")  # fmt: skip
    assert detectors.SIZE == ssd_detectors.SIZE and not out.exists()
