"""Issue 27, export: detectors through ``npcam-export``, checked against the torch modules they came from.

The nets are tests/detectors.py (YOLOv8-like with a DFL head and a PAN neck, YOLOv5-like with objectness, a GFL
per-stride model and its NanoDet-style joined output; 96x128 px, seeded random weights). Each goes through the
torch route and the ONNX route (the TorchScript and the dynamo exporters, at a fixed and at a dynamic size), and:

- the bundle's raw outputs equal the module's, and its layers the module's hooked outputs;
- its detections are a decode and a class-aware NMS written here (``reference_detections``) of the module's raw
  output;
- each detection's maps, for the five gradient methods, at each layer and combined, equal those made here from
  torch autograd with forward hooks at the same modules;
- what cannot be read is refused in one line.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import detectors
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, made_once, record, synthetic_image

import npcam
from export.api import run_onnx, run_torch
from export.detector import Options
from npcam import methods
from npcam.cam import normalize

ROUTES = ("torch", "torchscript", "torchscript-dynamic", "dynamo", "dynamo-dynamic")
DYNAMO = ("dynamo", "dynamo-dynamic")
NETS = ("yolov8", "yolov5", "gfl")
CASES = [
    pytest.param(name, route, marks=[pytest.mark.slow] if route in DYNAMO else [])
    for name in NETS
    for route in ROUTES
] + [pytest.param(name, route) for name in ("nanodet", "yolov5_inplace") for route in ("torch", "torchscript")]
GRADIENT_METHODS = ("gradcam", "hirescam", "xgradcam", "layercam", "gradcampp")
# float32 in torch and onnxruntime, the head in float64 on the same float32 layers: raw outputs differ by float32
# rounding through the network (~1e-6 relative); 1e-4 is far below a wrong op or stride (a pixel, a class).
RAW_TOL = 1e-4
LAYER_TOL = 1e-4  # relative to the layer's largest value: onnxruntime's kernels against torch's
MAP_TOL = 1e-4  # maps in [0, 1], as the issue asks: the head's exact gradient against torch autograd's float32 one
CONF, IOU, MAX_DET = 0.25, 0.7, 300  # the YOLO tools' defaults, which npcam's detections use


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Each (net, route) exported once, on demand: ``exported(name, route) -> (npcam.Model, torch module)``."""
    cache = {}

    def get(name: str, route: str):
        if (name, route) not in cache:

            def make(directory):
                out = directory / f"{name}_{route}"
                if route == "torch":
                    return run_torch(f"detectors:{name}", out, input_size=detectors.SIZE)
                return run_onnx(onnx_file(name, route, directory), out, input_size=detectors.SIZE)

            out = made_once(tmp_path_factory, f"detectors_{name}_{route}", make)
            net = getattr(detectors, name)()
            if name == "yolov5_inplace":  # the same weights and function: torch cannot differentiate the write
                net = detectors.yolov5()  # into the sigmoid's output (sigmoid's backward reads it)
            cache[name, route] = npcam.load(out), net
        return cache[name, route]

    return get


def onnx_file(name: str, route: str, directory, size=detectors.SIZE):
    """The net as an ONNX file, written by the TorchScript or the dynamo exporter, at a fixed or a dynamic size."""
    path = directory / f"{name}_{route}.onnx"
    if path.exists():
        return path
    net = getattr(detectors, name)()
    x = torch.zeros(1, 3, *size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if route == "torchscript":
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"])
        elif route == "torchscript-dynamic":
            axes = {"images": {0: "batch", 2: "height", 3: "width"}}
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                              dynamic_axes=axes)  # fmt: skip
        elif route == "dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["images"], verbose=False)
        else:
            h, w = torch.export.Dim("h", min=2, max=40), torch.export.Dim("w", min=2, max=40)
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["images"], verbose=False,
                              dynamic_shapes={"x": {2: 32 * h, 3: 32 * w}})  # fmt: skip
    return path


def photo(seed: int = 0) -> np.ndarray:
    return synthetic_image(150, 130, seed=seed)  # taller than the input: a letterbox pads left and right


def torch_outputs(net, x: np.ndarray) -> list[torch.Tensor]:
    with torch.no_grad():
        out = net(torch.from_numpy(x))
    return list(out) if isinstance(out, tuple) else [out]


def flat(name: str, outputs: list[torch.Tensor]) -> np.ndarray:
    """The module's raw outputs in the bundle's order, written from the nets' own layouts: ``[T]``."""
    values = [o.detach().double().numpy()[0] for o in outputs]
    if name.startswith("yolo"):
        return values[0].ravel()
    if name == "gfl":  # scores.s, boxes.s for each stride
        half = len(values) // 2
        return np.concatenate([v.ravel() for pair in zip(values[:half], values[half:]) for v in pair])
    joined, parts, start = values[0], [], 0  # nanodet: the strides' cells in turn, classes then bins
    for s in (8, 16, 32, 64):
        n = -(-detectors.SIZE[0] // s) * -(-detectors.SIZE[1] // s)
        parts += [joined[start : start + n, : detectors.CLASSES].ravel(), joined[start : start + n, detectors.CLASSES :].ravel()]
        start += n
    return np.concatenate(parts)


# The reference decode and NMS, written from the families' definitions


def reference_candidates(name: str, outputs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's box ``[N, 4]`` (x0, y0, x1, y1, input pixels) and ranked class scores ``[N, C]``."""
    values = [o.detach().double().numpy()[0] for o in outputs]
    if name.startswith("yolo"):
        v = values[0].T if name == "yolov8" else values[0]  # [N, 4 + C] or [N, 5 + C]
        boxes = np.concatenate([v[:, :2] - v[:, 2:4] / 2, v[:, :2] + v[:, 2:4] / 2], axis=1)
        scores = v[:, 4:] if name == "yolov8" else v[:, 5:] * v[:, 4:5]
        return boxes, scores
    if name == "gfl":
        half = len(values) // 2
        per_stride, offset = list(zip(values[:half], values[half:])), 0.5
    else:
        joined, per_stride, start, offset = values[0], [], 0, 0.0
        for s in (8, 16, 32, 64):
            n = -(-detectors.SIZE[0] // s) * -(-detectors.SIZE[1] // s)
            per_stride.append((joined[start : start + n, : detectors.CLASSES], joined[start : start + n, detectors.CLASSES :]))
            start += n
    boxes, scores = [], []
    for s, (cls, box) in zip((8, 16, 32, 64), per_stride):
        w = -(-detectors.SIZE[1] // s)
        cell = np.arange(len(cls))
        centre = np.stack([(cell % w + offset) * s, (cell // w + offset) * s], axis=1)
        logits = box.reshape(len(cls), 4, -1)
        p = np.exp(logits - logits.max(axis=2, keepdims=True))
        distance = (p / p.sum(axis=2, keepdims=True)) @ np.arange(logits.shape[2]) * s  # left, top, right, bottom
        boxes.append(np.concatenate([centre - distance[:, :2], centre + distance[:, 2:]], axis=1))
        scores.append(cls)
    return np.concatenate(boxes), np.concatenate(scores)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def reference_detections(boxes: np.ndarray, scores: np.ndarray):
    """Each candidate's best class; those scoring at least CONF, best first, each suppressing the later ones of its
    class that overlap it by more than IOU; at most MAX_DET. ``[(candidate, class, score, box)]``."""
    best, score = scores.argmax(axis=1), scores.max(axis=1)
    kept = []
    for a in sorted(np.flatnonzero(score >= CONF), key=lambda a: -score[a]):
        if all(best[b] != best[a] or iou(boxes[a], boxes[b]) <= IOU for b, _, _, _ in kept):
            kept.append((int(a), int(best[a]), float(score[a]), boxes[a]))
        if len(kept) == MAX_DET:
            break
    return kept


def expected_detections(pred, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray):
    """:func:`reference_detections` as the runtime reports them: each box in the photo's pixels, and those the
    letterbox leaves empty in the photo dropped. ``[(candidate, class, score, photo box)]``."""
    expected = []
    for a, c, score, box in reference_detections(boxes, scores):
        photo_box = pred.placement.to_photo(box[None], image.shape[:2])[0]
        if photo_box[2] > photo_box[0] and photo_box[3] > photo_box[1]:
            expected.append((a, c, score, photo_box))
    return expected


def score_of(name: str, outputs: list[torch.Tensor], candidate: int, cls: int) -> torch.Tensor:
    """A detection's score in the module's own output: its class score, times the objectness (YOLOv5)."""
    if name == "yolov8":
        return outputs[0][0, 4 + cls, candidate]
    if name.startswith("yolov5"):
        return outputs[0][0, candidate, 5 + cls] * outputs[0][0, candidate, 4]
    if name == "nanodet":
        return outputs[0][0, candidate, cls]
    for scores in outputs[: len(outputs) // 2]:  # gfl: the stride whose cells hold it
        if candidate < scores.shape[1]:
            return scores[0, candidate, cls]
        candidate -= scores.shape[1]
    raise IndexError(candidate)


def hooked(net, modules: list[str], x: np.ndarray, replace: list[np.ndarray] | None = None):
    """Run the module with forward hooks at ``modules``: their outputs, and (with ``replace``) each replaced by a leaf
    holding the given value, so that autograd's gradient at it is the score's through the rest of the network with
    the other layers held (what the bundle's head computes). Returns the outputs and the hooked tensors."""
    kept, handles = [], []
    named = dict(net.named_modules())
    for i, path in enumerate(modules):

        def hook(module, inputs, output, i=i):
            if replace is None:
                kept.append(output.detach())
                return None
            leaf = torch.tensor(replace[i][None], dtype=output.dtype, requires_grad=True)
            kept.append(leaf)
            return leaf

        handles.append(named[path].register_forward_hook(hook))
    try:
        with torch.enable_grad():
            outputs = net(torch.from_numpy(x))
    finally:
        for handle in handles:
            handle.remove()
    return (list(outputs) if isinstance(outputs, tuple) else [outputs]), kept


def reference_maps(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """A layer's map for one target, ``[h, w]`` in [0, 1], from its activations ``a`` and gradient ``g`` ``[C, h, w]``
    as pytorch-grad-cam defines each method (Grad-CAM++ without its eps, as npcam documents)."""
    if method == "gradcam":
        raw = np.einsum("c,chw->hw", g.mean(axis=(1, 2)), a)
    elif method == "hirescam":
        raw = (g * a).sum(axis=0)
    elif method == "xgradcam":
        raw = np.einsum("c,chw->hw", (g * a).sum(axis=(1, 2)) / (a.sum(axis=(1, 2)) + 1e-7), a)
    elif method == "layercam":
        raw = (np.maximum(g, 0) * a).sum(axis=0)
    else:
        g2, g3 = g**2, g**3
        denominator = 2 * g2 + a.sum(axis=(1, 2))[:, None, None] * g3
        alpha = np.divide(g2, denominator, out=np.zeros_like(g), where=(g != 0) & (denominator != 0))
        raw = np.einsum("c,chw->hw", (np.maximum(g, 0) * alpha).sum(axis=(1, 2)), a)
    raw = np.maximum(raw, 0)
    return raw / raw.max() if raw.max() > 0 else raw


def combined(maps: list[np.ndarray], size) -> np.ndarray:
    """Layers' maps upsampled to ``size`` (bilinear, half-pixel centres: torch's), averaged, scaled to [0, 1]."""
    up = [F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
          for m in maps]  # fmt: skip
    mean = np.mean(up, axis=0)
    return mean / mean.max() if mean.max() > 0 else mean


# The tests


@pytest.mark.parametrize("name, route", CASES)
def test_raw_outputs_layers_and_detections_match_the_module(exported, name, route):
    model, net = exported(name, route)
    paths = detectors.LAYERS[name]
    assert len(model.head.inputs) == len(paths)
    if route == "torch":
        assert model.bundle.layer == ", ".join(paths)  # the head's inputs, recorded as module paths
    letterboxed = name.startswith("yolo")
    assert (model.bundle.letterbox is not None) == letterboxed
    for seed in range(2):
        image = photo(seed)
        pred = model.predict(image)
        outputs = torch_outputs(net, pred.input)
        want = flat(name, outputs)
        np.testing.assert_allclose(pred.logits, want, rtol=RAW_TOL, atol=RAW_TOL)
        record(f"detector {name} {route}: raw outputs (abs)", np.abs(pred.logits - want).max())
        _, layers = hooked(net, paths, pred.input)
        for got, value in zip(pred.grids, layers):
            want_layer = value.numpy()[0]
            error = np.abs(got - want_layer).max() / np.abs(want_layer).max()
            assert error <= LAYER_TOL, (name, route, error)
        boxes, scores = reference_candidates(name, outputs)
        expected = expected_detections(pred, image, boxes, scores)
        assert len(expected) >= 2, "the test nets should find a few boxes"
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in expected]
        for d, (_, c, score, box) in zip(pred.detections, expected):
            assert d.label == f"class {c}" and abs(d.score - score) <= RAW_TOL
            np.testing.assert_allclose(d.box, box, atol=1e-3)


@pytest.mark.parametrize("name, route", CASES)
def test_gradient_maps_match_torch_autograd(exported, name, route):
    """Five methods, three detections, each layer's map and the combined one, against torch with hooks that hold
    the bundle's own layer values (so that only the head's gradient is compared, not the trunks' rounding)."""
    model, net = exported(name, route)
    pred = model.predict(photo(1))
    chosen = list(range(min(3, len(pred.detections))))
    assert len(chosen) >= 2
    probes = model.probes(pred, chosen)
    paths = detectors.LAYERS[name]
    grads = []
    for i in chosen:
        d = pred.detections[i]
        outputs, leaves = hooked(net, paths, pred.input, replace=list(pred.grids))
        score_of(name, outputs, d.candidate, d.class_index).backward()
        # A layer the score does not reach (another stride's, in separate outputs) gets no gradient: zeros.
        grads.append([np.zeros(leaf.shape[1:]) if leaf.grad is None else leaf.grad.numpy()[0].astype(np.float64)
                      for leaf in leaves])  # fmt: skip
    size = tuple(pred.input.shape[2:])
    worst = 0.0
    for method in GRADIENT_METHODS:
        chosen_method = methods.METHODS[method]
        got_layers = [normalize(chosen_method.raw_maps(probe)) for probe in probes]  # [k, h, w] each
        got = methods.maps(chosen_method, probes, size)
        for j in range(len(chosen)):
            want_layers = [reference_maps(method, a.astype(np.float64), grads[j][i]) for i, a in enumerate(pred.grids)]
            for got_layer, want_layer in zip(got_layers, want_layers):
                worst = max(worst, np.abs(got_layer[j] - want_layer).max())
            worst = max(worst, np.abs(got[j] - combined(want_layers, size)).max())
    record(f"detector {name} {route}: gradient maps vs torch autograd", worst)
    assert worst <= MAP_TOL, (name, route, worst)


def test_layer_reaches_into_the_neck(tmp_path):
    """``--layer`` at the backbone's last map: the head runs the neck (nearest upsampling, concatenation with
    the earlier maps as side inputs) and Detect; its Grad-CAM equals torch's at the same hook."""
    out = run_torch("detectors:yolov8", tmp_path / "b5", input_size=detectors.SIZE, layer=["backbone.b5"])
    model, net = npcam.load(out), detectors.yolov8()
    assert model.bundle.layer == "backbone.b5" and len(model.head.sides) == 2
    assert "Resize" in {op.op for op in model.head.ops}
    pred = model.predict(photo(2))
    outputs = torch_outputs(net, pred.input)
    np.testing.assert_allclose(pred.logits, flat("yolov8", outputs), rtol=RAW_TOL, atol=RAW_TOL)
    probe = model.probes(pred, [0])[0]
    d = pred.detections[0]
    outputs, leaves = hooked(net, ["backbone.b5"], pred.input, replace=[pred.features])
    score_of("yolov8", outputs, d.candidate, d.class_index).backward()
    want = reference_maps("gradcam", pred.features.astype(np.float64), leaves[0].grad.numpy()[0].astype(np.float64))
    got = normalize(methods.METHODS["gradcam"].raw_maps(probe))[0]
    record("detector yolov8 --layer backbone.b5: Grad-CAM vs torch autograd", np.abs(got - want).max())
    assert np.abs(got - want).max() <= MAP_TOL


def test_flags_set_the_preprocessing_the_decode_and_the_labels(tmp_path):
    path = onnx_file("gfl", "torchscript", tmp_path)
    out = run_onnx(path, tmp_path / "gfl", detect=Options(letterbox=0, grid_offset=0.0))
    meta = npcam.load(out).bundle.meta
    assert meta["letterbox"] == [0, 0, 0] and meta["detect"]["offset"] == 0.0 and meta["mean"] == [0.485, 0.456, 0.406]
    model = onnx.load(path)  # a file that names its classes as ultralytics does
    model.metadata_props.add(key="names", value="{0: 'kite', 1: 'drone', 2: 'gull'}")
    onnx.save(model, tmp_path / "named.onnx")
    out = run_onnx(tmp_path / "named.onnx", tmp_path / "named", detect=Options(stretch=True, bins=8))
    loaded = npcam.load(out)
    assert list(loaded.labels) == ["kite", "drone", "gull"] and loaded.bundle.letterbox is None


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def cli_here(*args) -> subprocess.CompletedProcess:
    """``python -m export ARGS`` run by its ``main`` in this process, as :func:`cli` reports it: the exit code, and
    on stderr what a process would print there: Python's prints, the warnings a fresh interpreter shows (each
    once; deprecations hidden), and the native libraries' own writes to file descriptor 2 (onnxruntime's log).

    A new interpreter costs more than most refusals (measured ~1.5 s of CPU each, for importing onnx, onnxruntime
    and numpy); each test that uses this still runs one refusal through :func:`cli`, a real process."""
    import contextlib
    import io
    import os
    import tempfile

    from export.__main__ import main

    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as native, warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for kind in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", kind)
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's refusals
                    code = e.code if isinstance(e.code, int) else 1
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        native.seek(0)
        text = native.read().decode(errors="replace")
    text += stderr.getvalue()
    text += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess([sys.executable, "-m", "export", *argv], code, stdout.getvalue(), text)


def refused_in_one_line(result, *words) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_refusals_name_the_missing_piece(tmp_path):
    gfl = onnx_file("gfl", "torchscript", tmp_path)
    out = tmp_path / "out"
    refused_in_one_line(cli("onnx", gfl, "--out", out, "--strides", "8,16,32"), "--strides 8,16,32", "do not fit")
    refused_in_one_line(cli_here("onnx", gfl, "--out", out, "--layer", "nowhere"), "--layer 'nowhere'", "no tensor")
    refused_in_one_line(cli_here("onnx", gfl, "--out", out, "--int8", tmp_path), "--int8", "detector")
    # Per-stride pairs both as wide as a box's distributions, neither of probabilities: which is the box?
    widths = tmp_path / "widths.onnx"
    _rewidth(gfl, widths)
    refused_in_one_line(cli_here("onnx", widths, "--out", out), "--bins")
    # A segmentation model, and a classifier said to be a detector (graphs that end in NMS: test_detect_nms.py).
    segment = onnx.load(onnx_file("yolov8", "torchscript", tmp_path))
    segment.metadata_props.add(key="task", value="segment")
    onnx.save(segment, tmp_path / "segment.onnx")
    refused_in_one_line(cli_here("onnx", tmp_path / "segment.onnx", "--out", out), "'segment'")
    named = onnx.load(onnx_file("yolov8", "torchscript", tmp_path))  # 80 names for 3 classes: a seg model's mark
    named.metadata_props.add(key="names", value=str({i: f"c{i}" for i in range(80)}))
    onnx.save(named, tmp_path / "named80.onnx")
    refused_in_one_line(cli_here("onnx", tmp_path / "named80.onnx", "--out", out), "names 80 classes", "hold 3")
    post = tmp_path / "post.onnx"  # a file that says it detects, with post-processed outputs (YOLOv10's [1, 300, 6])
    _post_processed(onnx_file("yolov8", "torchscript", tmp_path), post)
    refused_in_one_line(cli_here("onnx", post, "--out", out), "not a detector's that npcam reads")
    classifier = tmp_path / "classifier.onnx"
    _classifier(classifier)
    refused_in_one_line(cli_here("onnx", classifier, "--out", out, "--task", "detect"), "not a detector's")
    assert not out.exists()


def _rewidth(source, target):
    """The GFL file with its class outputs made as wide as the box ones: 32 sums of the 3 sigmoids (above 1)."""
    from onnx import helper, numpy_helper

    model = onnx.load(source)
    graph = model.graph
    for output in list(graph.output[:4]):
        name = output.name
        producer = next(n for n in graph.node if name in n.output)
        producer.output[0] = name + "_narrow"
        weight = numpy_helper.from_array(np.ones((detectors.CLASSES, 32), np.float32), name + "_w")
        graph.initializer.append(weight)
        graph.node.append(helper.make_node("MatMul", [name + "_narrow", name + "_w"], [name]))
        output.type.tensor_type.shape.dim[2].dim_value = 32
    onnx.save(model, target)


def _with_nms(source, target):
    from onnx import TensorProto, helper

    model = onnx.load(source)
    graph = model.graph
    out = graph.output[0].name
    graph.node.extend([
        helper.make_node("Slice", [out, "s0", "s4", "ax"], ["boxes_t"]),
        helper.make_node("Transpose", ["boxes_t"], ["boxes"], perm=[0, 2, 1]),
        helper.make_node("Slice", [out, "s4", "s7", "ax"], ["scores"]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["selected"]),
    ])  # fmt: skip
    for name, value in (("s0", [0]), ("s4", [4]), ("s7", [7]), ("ax", [1])):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    graph.output.append(helper.make_tensor_value_info("selected", TensorProto.INT64, None))
    onnx.save(model, target)


def _post_processed(source, target):
    """The YOLOv8 file ending in its first 100 candidates, candidates first ([1, 100, 7]), and calling itself a
    detector in its metadata as ultralytics does."""
    from onnx import TensorProto, helper

    model = onnx.load(source)
    graph = model.graph
    out = graph.output[0].name
    graph.node.extend([
        helper.make_node("Transpose", [out], ["candidates"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["candidates", "start", "stop", "axis"], ["kept"]),
    ])  # fmt: skip
    for name, value in (("start", [0]), ("stop", [100]), ("axis", [1])):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("kept", TensorProto.FLOAT, [1, 100, 7]))
    model.metadata_props.add(key="task", value="detect")
    onnx.save(model, target)


def _classifier(target):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[4, 4]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 4, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), target)


def test_softmax_before_opset_13_normalizes_over_every_trailing_axis():
    """Opset 11's Softmax(axis=1) on [N, 4, 3, 5] normalizes over the 60 values after the batch (a converter's DFL
    may be written so): the head reshapes around a last-axis softmax, and matches onnxruntime's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.graph import Values, index
    from export.head_finder import kinds
    from export.head_ops import head_ops
    from npcam.head import GraphHead

    for op in ("Softmax", "LogSoftmax"):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["image"], ["x"]), helper.make_node(op, ["x"], ["y"], axis=1)], "g",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4, 3, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
        model.ir_version = 7
        g = index(model)
        found = kinds(g, "x")
        ops, arrays, shape, out = head_ops(g, model, "x", [-1, 4, 3, 5], [model.graph.node[1]], found, "y",
                                           Values(model, "image", "NCHW", (3, 5), 4))  # fmt: skip
        x = np.random.default_rng(0).standard_normal((1, 4, 3, 5)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"image": x})[0]
        got = GraphHead(ops, arrays, shape, "x", out).forward_float64(np.maximum(x, 0))
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_an_inplace_decode_exports_with_scatternd(tmp_path):
    """The premise of the yolov5_inplace cases: torch writes the in-place decode as ScatterND, which npcam's head
    runs as a concat (what they check)."""
    model = onnx.load(onnx_file("yolov5_inplace", "torchscript", tmp_path))
    assert sum(n.op_type == "ScatterND" for n in model.graph.node) == 2 * 3  # xy and wh at each stride
