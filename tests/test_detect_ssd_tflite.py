"""Issue 27, shape 3 as TFLite files: the SSD-like nets of tests/ssd_detectors.py rebuilt in Keras with the same
weights (BatchNorm folded), converted to float ``.tflite`` files by TensorFlow's converter, and exported with
``npcam-export tflite --anchors ... --anchor-decode ...``.

The bundle's raw outputs are checked against LiteRT's interpreter running the file (the independent reference for
this route), its detections against the reference decode and NMS of tests/test_detect_ssd.py on the interpreter's
outputs, and each detection's gradient maps against torch autograd on the torch net the file was made from (the
same weights: the interpreter has no gradient).
"""

from __future__ import annotations

import numpy as np
import pytest
import ssd_detectors
import torch
from conftest import made_once, record
from test_detect_export import (
    GRADIENT_METHODS,
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
from test_detect_ssd import reference_candidates, score_of

import npcam
from npcam import methods
from npcam.cam import normalize

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
litert = pytest.importorskip("ai_edge_litert.interpreter")


def folded(conv_bn) -> tuple[np.ndarray, np.ndarray]:
    """A tests/detectors.py Conv (convolution, BatchNorm) as one convolution's HWIO kernel and bias."""
    bn = conv_bn.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    kernel = conv_bn.conv.weight.detach().numpy() * scale[:, None, None, None]
    bias = bn.bias.detach().numpy() - bn.running_mean.numpy() * scale
    return kernel.transpose(2, 3, 1, 0), bias


def keras_twin(net: ssd_detectors.SSD):
    """The torch SSD as a Keras model ``[1, H, W, 3] -> (boxes, scores)`` with its weights: torch's symmetric padding
    written as ZeroPadding2D before a strided convolution ("same" pads a stride-1 3x3 convolution alike)."""
    keras = tf.keras

    def conv_bn(x, block):
        kernel, bias = folded(block)
        stride = block.conv.stride[0]
        if stride > 1:
            x = keras.layers.ZeroPadding2D(block.conv.padding[0])(x)
        layer = keras.layers.Conv2D(kernel.shape[3], kernel.shape[0], stride, "valid" if stride > 1 else "same",
                                    activation="silu")  # fmt: skip
        y = layer(x)
        layer.set_weights([kernel, bias])
        return y

    def plain(x, conv):
        layer = keras.layers.Conv2D(conv.out_channels, 3, 1, "same")
        y = layer(x)
        layer.set_weights([conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.detach().numpy()])
        return y

    image = keras.Input((*ssd_detectors.SIZE, 3), batch_size=1)
    x, maps = image, []
    for stage in (net.s8, net.s16, net.s32):
        for block in stage if isinstance(stage, torch.nn.Sequential) else [stage]:
            x = conv_bn(x, block)
        maps.append(x)
    boxes, scores = [], []
    for f, box, cls in zip(maps, net.box, net.cls):
        boxes.append(keras.layers.Reshape((-1, net.values))(plain(f, box)))
        scores.append(keras.layers.Reshape((-1, net.columns))(plain(f, cls)))
    outputs = [keras.layers.Concatenate(axis=1)(boxes), keras.layers.Concatenate(axis=1)(scores)]
    return keras.Model(image, outputs)


def tflite_file(convention: str, directory):
    path = directory / f"ssd_{convention}.tflite"
    if not path.exists():
        model = keras_twin(getattr(ssd_detectors, f"ssd_{convention}")())
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


@pytest.fixture(scope="module")
def tflite_files(tmp_path_factory):
    """:func:`tflite_file` made once for the run (a conversion takes seconds), for the tests that read it:
    ``tflite_files(convention) -> Path``."""
    files = {}

    def get(convention: str):
        if convention not in files:
            key = f"ssd_tflite_file_{convention}"
            files[convention] = made_once(tmp_path_factory, key, lambda d: tflite_file(convention, d))
        return files[convention]

    return get


def interpreter_outputs(path, x_nchw: np.ndarray) -> list[np.ndarray]:
    """LiteRT's outputs for one NCHW input, in its order."""
    interpreter = litert.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x_nchw.transpose(0, 2, 3, 1).astype(np.float32))
    interpreter.invoke()
    return [interpreter.get_tensor(o["index"]).astype(np.float64) for o in interpreter.get_output_details()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tflite_files):
    cache = {}

    def get(convention: str):
        if convention not in cache:

            def make(directory):
                anchors_file = directory / f"{convention}_anchors.npy"
                np.save(anchors_file, ssd_detectors.anchors(convention))
                path = tflite_files(convention)
                out = directory / convention
                flags = ["--anchors", anchors_file, "--anchor-decode", convention]
                if convention == "tf":
                    flags += ["--scores", "softmax"]
                result = cli_here("tflite", path, "--out", out, *flags)
                assert result.returncode == 0, result.stderr
                return out

            out = made_once(tmp_path_factory, f"ssd_tflite_{convention}", make)
            path = tflite_files(convention)
            cache[convention] = npcam.load(out), path, getattr(ssd_detectors, f"ssd_{convention}")()
        return cache[convention]

    return get


@pytest.mark.parametrize("convention", ["mediapipe", "tf"])
def test_tflite_raw_outputs_and_detections_match_the_interpreter(exported, convention):
    model, path, net = exported(convention)
    assert model.bundle.meta["source"]["kind"] == "tflite" and len(model.head.inputs) == 3
    values = ssd_detectors.CONVENTIONS[convention][0]
    worst = 0.0
    for seed in range(2):
        image = photo(seed)
        pred = model.predict(image)
        found = interpreter_outputs(path, pred.input)
        boxes_out = next(o for o in found if o.shape[2] == values)
        scores_out = next(o for o in found if o is not boxes_out)
        want = np.concatenate([boxes_out[0].ravel(), scores_out[0].ravel()])
        np.testing.assert_allclose(pred.logits, want, rtol=RAW_TOL, atol=RAW_TOL)
        worst = max(worst, np.abs(pred.logits - want).max())
        torch_raw = np.concatenate([o.double().numpy()[0].ravel() for o in torch_outputs(net, pred.input)])
        np.testing.assert_allclose(want, torch_raw, rtol=RAW_TOL, atol=RAW_TOL)  # the file is the torch net's twin
        boxes, scores = reference_candidates(convention, [torch.from_numpy(boxes_out), torch.from_numpy(scores_out)])
        expected = expected_detections(pred, image, boxes, scores)
        assert len(expected) >= 2
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in expected]
        for d, (_, _, _, box) in zip(pred.detections, expected):
            np.testing.assert_allclose(d.box, box, atol=1e-3)
    record(f"detector ssd {convention} tflite: raw outputs vs LiteRT (abs)", worst)


@pytest.mark.parametrize("convention", ["mediapipe", "tf"])
def test_tflite_gradient_maps_match_torch_autograd(exported, convention):
    model, _, net = exported(convention)
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
    record(f"detector ssd {convention} tflite: gradient maps vs torch autograd", worst)
    assert worst <= MAP_TOL, (convention, worst)


def test_tflite_refusals(tflite_files, tmp_path):
    path = tflite_files("tf")  # read, not changed
    out = tmp_path / "out"
    refused_in_one_line(cli("tflite", path, "--out", out), "look like an SSD", "--anchors anchors.npy")
    assert not out.exists()


def post_processed_file(path):
    """The TF-convention SSD net as a TFLite file ending in TFLite_Detection_PostProcess, as the TF Object Detection
    API writes it: the net in TensorFlow ops with its weights as constants (BatchNorm folded), the class logits
    through a softmax, and a function that implements the op (its body a stand-in) on the box encodings, the
    class predictions and a constant table of the net's anchors (y, x, h, w), with scales (10, 10, 5, 5);
    converted with custom ops allowed (a module given, so that the converter keeps the function to fuse)."""
    net = ssd_detectors.ssd_tf()
    table = ssd_detectors.anchors("tf")[:, [1, 0, 3, 2]].astype(np.float32)
    attrs = ['name: "TFLite_Detection_PostProcess"', 'attr { key: "max_detections" value { i: 10 } }',
             'attr { key: "max_classes_per_detection" value { i: 1 } }', 'attr { key: "use_regular_nms" value { b: false } }',
             'attr { key: "nms_score_threshold" value { f: 0.0 } }', 'attr { key: "nms_iou_threshold" value { f: 0.6 } }',
             'attr { key: "y_scale" value { f: 10.0 } }', 'attr { key: "x_scale" value { f: 10.0 } }',
             'attr { key: "h_scale" value { f: 5.0 } }', 'attr { key: "w_scale" value { f: 5.0 } }',
             f'attr {{ key: "num_classes" value {{ i: {net.columns - 1} }} }}']  # fmt: skip

    @tf.function(experimental_implements=" ".join(attrs))
    def post(boxes, scores, anchors):
        return tf.zeros((1, 10, 4)), tf.zeros((1, 10)), tf.zeros((1, 10)), tf.zeros((1,))

    def conv_bn(x, block):
        kernel, bias = folded(block)
        stride, pad = block.conv.stride[0], block.conv.padding[0]
        if stride > 1:
            x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        y = tf.nn.conv2d(x, tf.constant(kernel), stride, "VALID" if stride > 1 else "SAME") + bias
        return y * tf.sigmoid(y)

    def plain(x, conv):
        kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
        return tf.nn.conv2d(x, tf.constant(kernel), 1, "SAME") + conv.bias.detach().numpy()

    @tf.function(input_signature=[tf.TensorSpec((1, *ssd_detectors.SIZE, 3), tf.float32)])
    def detect(x):
        maps = []
        for stage in (net.s8, net.s16, net.s32):
            for block in stage if isinstance(stage, torch.nn.Sequential) else [stage]:
                x = conv_bn(x, block)
            maps.append(x)
        boxes = tf.concat([tf.reshape(plain(f, c), (1, -1, net.values)) for f, c in zip(maps, net.box)], 1)
        logits = tf.concat([tf.reshape(plain(f, c), (1, -1, net.columns)) for f, c in zip(maps, net.cls)], 1)
        return post(boxes, tf.nn.softmax(logits), tf.constant(table))

    module = tf.Module()
    module.detect = detect
    converter = tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()], module)
    converter.allow_custom_ops = True
    path.write_bytes(converter.convert())
    return path


def test_tflite_detection_postprocess_is_cut_before_with_its_anchors_and_scales(tmp_path):
    """A file ending in TFLite_Detection_PostProcess exports without --anchors: cut before the op, its anchors and
    scales read from the file. The bundle's raw outputs equal the op's inputs in LiteRT; its detections are the
    reference decode and NMS of the torch net's outputs; its best candidate's box is the op's first detection's."""
    path = post_processed_file(tmp_path / "post.tflite")
    out = tmp_path / "out"
    result = cli("tflite", path, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "cut before TFLite_Detection_PostProcess" in result.stderr and "10,10,5,5" in result.stderr
    model, net = npcam.load(out), ssd_detectors.ssd_tf()
    spec = model.bundle.meta["detect"]
    assert spec["scales"] == [10.0, 10.0, 5.0, 5.0] and spec["order"] == "yxhw" and spec["background"] == 0
    interpreter = litert.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    op = next(o for o in interpreter._get_ops_details() if o["op_name"] == "TFLite_Detection_PostProcess")
    height, width = ssd_detectors.SIZE
    worst, detections = 0.0, 0
    for seed in range(2):
        image = photo(seed)
        pred = model.predict(image)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pred.input.transpose(0, 2, 3, 1).copy())
        interpreter.invoke()
        boxes_in, scores_in = (interpreter.get_tensor(int(i)).astype(np.float64) for i in op["inputs"][:2])
        want = np.concatenate([boxes_in[0].ravel(), scores_in[0].ravel()])
        np.testing.assert_allclose(pred.logits, want, rtol=RAW_TOL, atol=RAW_TOL)
        worst = max(worst, float(np.abs(pred.logits - want).max()))
        boxes, scores = reference_candidates("tf", torch_outputs(net, pred.input))
        expected = expected_detections(pred, image, boxes, scores)
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in expected]
        detections += len(expected)
        # the op's own decode: its first detection (y0, x0, y1, x1 on the 0-1 scale) is the best candidate's box
        op_box = interpreter.get_tensor(int(op["outputs"][0]))[0, 0].astype(np.float64) * [height, width, height, width]
        best = int(np.argmax(scores.max(axis=1)))
        np.testing.assert_allclose(op_box[[1, 0, 3, 2]], boxes[best], atol=1e-3 * max(height, width))
    assert detections >= 2
    record("detector ssd tf tflite with TFLite_Detection_PostProcess: raw outputs vs the op's inputs (abs)", worst)


def test_tflite_detection_postprocess_without_anchors_is_refused(tmp_path, monkeypatch):
    """The op's anchors input that is not a constant table is refused in one line, and nothing is written."""
    from export import from_tflite

    path = post_processed_file(tmp_path / "post.tflite")
    out = tmp_path / "out"
    original = from_tflite._post_process

    def broken(model, interpreter):
        interpreter.get_tensor = lambda index: np.zeros(3)  # what a non-constant input would read as
        return original(model, interpreter)

    monkeypatch.setattr(from_tflite, "_post_process", broken)
    from export.errors import ExportError

    with pytest.raises(ExportError, match="are not a constant"):
        from_tflite.run_tflite(path, out)
    assert not out.exists()
