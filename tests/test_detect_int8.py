"""Issue 27, int8 detectors (the usual edge model): an int8 QDQ ONNX YOLOv8-like detector and full-integer int8
TFLite SSD-like detectors, exported as bundles that compute the model's integers on every CPU.

The files are made here: tests/detectors.py's YOLOv8-like net exported to ONNX and quantized by onnxruntime's
``quantize_static`` (QDQ, int8 activations, per-channel int8 weights; its final Concat left in float, as
detectors are usually quantized, else boxes in pixels and scores in [0, 1] would share one step and every score
would round to 0), and tests/test_detect_ssd_tflite.py's Keras twins of the SSD nets converted by TensorFlow's
converter with full-integer quantization (a representative dataset; int8 input and outputs, and float ones).

References: the QDQ graph in onnxruntime with its graph optimizations off (each DequantizeLinear, float op and
QuantizeLinear as written, so no integer kernel runs: export.qdq.reference_session), and LiteRT's interpreter on
the ``.tflite`` file.

The bound, derived from the quantization steps (export.qdq.output_steps, DETECT_STEPS): the bundle's trunk sums
the integers exactly (uint8, export/unsigned.py) and requantizes in float32; onnxruntime's reference sums
dequantized values in float32, TFLite requantizes with a fixed-point multiplier. All round to the nearest
integer, so a tensor can be one step apart only where its exact value lies next to a rounding boundary. Each raw
output value is the dequantized integer of its last QuantizeLinear: within one step of its own rounding and one
inherited from the tensors it is computed from, ``2 s`` with ``s`` the step of the tensor it is read from (boxes
and class scores each their own), plus float32 rounding of ``(q - z) s``.

Gradients: the head's QuantizeLinear/DequantizeLinear pairs pass the gradient through (npcam/head/ops/quantize.py,
as for int8 classifiers). The reference is independent of npcam's head engine: the QDQ head graph, from the
bundle's layers to the raw outputs, with each activation pair replaced by ``x + c`` (``c`` its rounding at the
bundle's maps, a constant) and each weight by its dequantized value, run in float64 by onnx's reference evaluator:
a smooth function equal to the int8 head at those maps whose derivative is the straight-through one. Its central
differences along random directions must equal npcam's gradient's dot products with them.

On this suite's CPU (AVX2, no VNNI) the original QDQ file in onnxruntime's default session (fused ``u8s8``
kernels, which saturate) is beyond the bound, so the comparison can fail; under qemu's Haswell (AVX2, no VNNI)
the bundle's maps must equal this machine's exactly.
"""

from __future__ import annotations

import copy
import sys
import warnings

import detectors
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import ssd_detectors
import torch
from conftest import made_once, record
from onnx import TensorProto, helper, numpy_helper
from test_detect_export import cli, cli_here, expected_detections, photo, reference_candidates, refused_in_one_line
from test_detect_ssd import reference_candidates as ssd_reference_candidates
from test_int8_onnx import saturating_cpu

import npcam
from export.qdq import DETECT_STEPS

STEPS_FLOAT = 1e-4  # export.build.DETECT_TOLERANCE: float32 rounding of the dequantized values, far below a step
DIRECTIONS = 3  # random directions per detection for the gradient's central differences
# central differences in float64 of a smooth function: truncation (eps^2 f''') and rounding (1e-16 |f| / eps), at
# eps = 1e-4 of the maps' scale, both far below 1e-6 of the dot product's scale (sum |g| |u|)
GRADIENT_TOL = 1e-6


# The files


def yolo_int8(directory) -> tuple:
    """The YOLOv8-like net as a float ONNX file and its int8 QDQ quantization; returns (float path, int8 path)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path, int8_path = directory / "yolov8.onnx", directory / "yolov8_int8.onnx"
    net = detectors.yolov8()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, *detectors.SIZE),), str(float_path), dynamo=False, opset_version=17,
                          input_names=["images"])  # fmt: skip
    model = onnx.load(str(float_path))
    last = next(n.name for n in model.graph.node if model.graph.output[0].name in n.output)

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(5)
            self.inputs = iter([{"images": rng.random((1, 3, *detectors.SIZE), np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.inputs, None)

    quantize_static(str(float_path), str(int8_path), Images(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_exclude=[last])  # fmt: skip
    return float_path, int8_path


def ssd_int8(convention: str, io: str, directory):
    """The Keras twin of the SSD net, full-integer quantized; ``io`` "int8" (int8 input and outputs) or "float"."""
    tf = pytest.importorskip("tensorflow")
    from test_detect_ssd_tflite import keras_twin

    path = directory / f"ssd_{convention}_{io}.tflite"
    model = keras_twin(getattr(ssd_detectors, f"ssd_{convention}")())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        rng = np.random.default_rng(3)
        for _ in range(8):
            yield [rng.uniform(-1, 1, (1, *ssd_detectors.SIZE, 3)).astype(np.float32)]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io == "int8":
        converter.inference_input_type = converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each file exported once, on demand: ``exported(case) -> (npcam.Model, file)``; cases ``yolov8``,
    ``ssd_mediapipe_int8``, ``ssd_tf_int8``, ``ssd_mediapipe_float`` (int8 inside, float I/O)."""
    cache = {}

    def get(case: str):
        if case not in cache:

            def make(directory):
                out = directory / case
                if case == "yolov8":
                    _, path = yolo_int8(directory)
                    result = cli_here("onnx", path, "--out", out)
                else:
                    _, convention, io = case.split("_")
                    path = ssd_int8(convention, io, directory)
                    anchors = directory / f"{convention}_anchors.npy"
                    np.save(anchors, ssd_detectors.anchors(convention))
                    flags = ["--anchors", anchors, "--anchor-decode", convention]
                    scores = ["--scores", "softmax"] if convention == "tf" else []
                    result = cli_here("tflite", path, "--out", out, *flags, *scores)
                assert result.returncode == 0, result.stderr
                (directory / "source.txt").write_text(path.name)  # the file exported, for the reuser
                return out

            out = made_once(tmp_path_factory, f"int8_detectors_{case}", make)
            cache[case] = npcam.load(out), out.parent / (out.parent / "source.txt").read_text()
        return cache[case]

    return get


# The references


def reference_session(model: onnx.ModelProto, optimized: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def yolo_steps(model: onnx.ModelProto) -> np.ndarray:
    """Each row's step of the YOLO output ``[1, 4 + C, N]``: the float Concat joins the boxes' DequantizeLinear
    (row 0-3) and the class scores' (rows 4-): ``[4 + C, 1]``."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    concat = producers[model.graph.output[0].name]
    assert concat.op_type == "Concat"
    parts = [producers[name] for name in concat.input]
    assert [p.op_type for p in parts] == ["DequantizeLinear"] * 2
    return np.concatenate([np.full((4, 1), float(inits[parts[0].input[1]])),
                           np.full((detectors.CLASSES, 1), float(inits[parts[1].input[1]]))])  # fmt: skip


def interpreter_outputs(path, x_nchw: np.ndarray) -> list[np.ndarray]:
    """LiteRT's outputs for one NCHW input (quantized as its input says), dequantized, in its order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    x = x_nchw.transpose(0, 2, 3, 1).astype(np.float32)
    if inp["dtype"] == np.int8:
        (scale,), (zero,) = inp["quantization_parameters"]["scales"], inp["quantization_parameters"]["zero_points"]
        x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    outputs = []
    for o in interpreter.get_output_details():
        y = interpreter.get_tensor(o["index"]).astype(np.float64)
        if o["dtype"] == np.int8:
            (scale,), (zero,) = o["quantization_parameters"]["scales"], o["quantization_parameters"]["zero_points"]
            y = (y - zero) * scale
        outputs.append(y)
    return outputs


def output_scales(path) -> list[float]:
    """Each output's quantization step (an int8 output's own, a float output's DequantizeLinear's)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    steps = []
    for o in interpreter.get_output_details():
        if o["dtype"] == np.int8:
            steps.append(float(o["quantization_parameters"]["scales"][0]))
        else:  # float output: the scale of the int8 tensor its Dequantize op reads
            details = {t["index"]: t for t in interpreter.get_tensor_details()}
            op = next(op for op in interpreter._get_ops_details() if o["index"] in op["outputs"])
            steps.append(float(details[op["inputs"][0]]["quantization_parameters"]["scales"][0]))
    return steps


# Raw outputs and detections


def test_int8_yolo_raw_outputs_and_detections_match_the_qdq_graph(exported):
    model, path = exported("yolov8")
    qdq = onnx.load(str(path))
    assert model.bundle.meta["source"]["int8"]["uint8_tensors"] > 0
    trunk = onnx.load(str(model.bundle.path / "trunk.onnx"))
    assert not [i.name for i in trunk.graph.initializer if i.data_type == TensorProto.INT8]  # all uint8 now
    bound = DETECT_STEPS * yolo_steps(qdq) + STEPS_FLOAT
    reference, default = reference_session(qdq), reference_session(qdq, optimized=True)
    worst = default_worst = 0.0
    detections = 0
    for seed in range(3):
        image = photo(seed)
        pred = model.predict(image)
        want = reference.run(None, {"images": pred.input})[0].astype(np.float64)  # [1, 4 + C, N]
        got = pred.logits.reshape(want.shape)
        worst = max(worst, float((np.abs(got - want)[0] / bound).max()))
        default_out = default.run(None, {"images": pred.input})[0].astype(np.float64)
        default_worst = max(default_worst, float((np.abs(default_out - want)[0] / bound).max()))
        boxes, scores = reference_candidates("yolov8", [torch.from_numpy(want)])
        expected = expected_detections(pred, image, boxes, scores)
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in expected]
        for d, (_, _, _, box) in zip(pred.detections, expected):
            np.testing.assert_allclose(d.box, box, atol=1e-3)
        detections += len(expected)
    assert detections >= 3  # the comparison is not of empty lists
    assert record("int8 detector yolov8 QDQ: raw outputs vs the QDQ graph, of the bound", worst) <= 1
    record("int8 detector yolov8 QDQ: the file in onnxruntime's default session vs the QDQ graph, of the bound",
           default_worst)  # fmt: skip
    if saturating_cpu():  # u8s8 kernels saturate here: without npcam's uint8 trunk the test could fail
        assert default_worst > 1


@pytest.mark.parametrize("case", ["ssd_mediapipe_int8", "ssd_tf_int8", "ssd_mediapipe_float"])
def test_int8_tflite_ssd_raw_outputs_and_detections_match_the_interpreter(exported, case):
    model, path = exported(case)
    convention = case.split("_")[1]
    values = ssd_detectors.CONVENTIONS[convention][0]
    steps = output_scales(path)
    worst, detections = 0.0, 0
    for seed in range(3):
        image = photo(seed)
        pred = model.predict(image)
        found = interpreter_outputs(path, pred.input)
        k = next(i for i, o in enumerate(found) if o.shape[2] == values)
        boxes_out, scores_out = found[k], found[1 - k]
        want = np.concatenate([boxes_out[0].ravel(), scores_out[0].ravel()])
        bound = DETECT_STEPS * np.concatenate([np.full(boxes_out.size, steps[k]), np.full(scores_out.size, steps[1 - k])])
        worst = max(worst, float((np.abs(pred.logits.ravel() - want) / (bound + STEPS_FLOAT)).max()))
        boxes, scores = ssd_reference_candidates(convention, [torch.from_numpy(boxes_out), torch.from_numpy(scores_out)])
        expected = expected_detections(pred, image, boxes, scores)
        assert [(d.candidate, d.class_index) for d in pred.detections] == [(a, c) for a, c, _, _ in expected]
        for d, (_, _, _, box) in zip(pred.detections, expected):
            np.testing.assert_allclose(d.box, box, atol=1e-3)
        detections += len(expected)
    assert detections >= 3
    assert record(f"int8 detector {case} TFLite: raw outputs vs LiteRT, of the bound", worst) <= 1


# Gradients


def straight_through_head(model: onnx.ModelProto, layers: dict[str, np.ndarray], outputs: list[str]):
    """The head of the QDQ graph ``model`` from ``layers`` (``{tensor: value [1, C, h, w]}``) to ``outputs``, as a
    float64 function of the layers' values: each activation QuantizeLinear -> DequantizeLinear pair replaced by
    ``x + c``, ``c`` its rounding at ``layers`` (a constant; the integers carried as floats through the ops that
    move them), each dequantized constant by its value."""
    from onnx.reference import ReferenceEvaluator
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in [*model.graph.value_info, *model.graph.output]}
    model.graph.value_info.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape))
                                  for k, v in layers.items() if k not in known)  # fmt: skip
    head = Extractor(model).extract_model(list(layers), outputs)
    graph = head.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    quantizes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    probe = copy.deepcopy(head)
    have = {o.name for o in probe.graph.output}
    wanted = dict.fromkeys(name for n in quantizes for name in (n.input[0], n.output[0]))
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted if name not in have)
    session = reference_session(probe)
    names = [o.name for o in session.get_outputs()]
    at = dict(zip(names, session.run(None, {k: v.astype(np.float32) for k, v in layers.items()})))
    nodes, constants = [], {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":  # q = x / s + (q - x / s at the maps): the integers, as floats
            scale = inits[node.input[1]].astype(np.float64)
            assert scale.size == 1, "per-axis activation scales"
            x, q = node.input[0], node.output[0]
            constants[f"{q}_scale"] = scale.reshape(())
            constants[f"{q}_rounding"] = at[q].astype(np.float64) - at[x].astype(np.float64) / scale.reshape(())
            nodes += [helper.make_node("Div", [x, f"{q}_scale"], [f"{q}_unrounded"]),
                      helper.make_node("Add", [f"{q}_unrounded", f"{q}_rounding"], [q])]  # fmt: skip
        elif node.op_type == "DequantizeLinear" and node.input[0] not in inits:  # (q - z) s on those floats
            scale = inits[node.input[1]].astype(np.float64).reshape(())
            zero = inits[node.input[2]].astype(np.float64).reshape(()) if len(node.input) > 2 and node.input[2] else 0.0
            y = node.output[0]
            constants[f"{y}_scale"], constants[f"{y}_zero"] = scale, np.array(zero)
            nodes += [helper.make_node("Sub", [node.input[0], f"{y}_zero"], [f"{y}_centred"]),
                      helper.make_node("Mul", [f"{y}_centred", f"{y}_scale"], [y])]  # fmt: skip
        elif node.op_type == "DequantizeLinear":  # a weight or bias
            q, scale = inits[node.input[0]].astype(np.float64), inits[node.input[1]].astype(np.float64)
            zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
                zero = zero.reshape(shape) if np.ndim(zero) else zero
            constants[node.output[0]] = (q - zero) * scale
        elif node.op_type == "Constant" and inits[node.output[0]].dtype == np.float32:
            constants[node.output[0]] = inits[node.output[0]].astype(np.float64)
        else:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.DOUBLE
            nodes.append(node)
    for name, value in inits.items():
        if name not in constants and value.dtype == np.float32:
            constants[name] = value.astype(np.float64)
    kept = [i for i in graph.initializer if i.name not in constants]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(v, k) for k, v in constants.items()])
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    evaluator = ReferenceEvaluator(head)

    def run(values: dict[str, np.ndarray]) -> list[np.ndarray]:
        return evaluator.run(None, {k: v.astype(np.float64) for k, v in values.items()})

    return run


def tensors_holding(model: onnx.ModelProto, feed: dict[str, np.ndarray], grids: list[np.ndarray]) -> list[str]:
    """The DequantizeLinear outputs of ``model`` that hold ``grids`` (``[C, h, w]``) exactly on ``feed``: the
    bundle's layers in a graph whose tensor names differ from the exporter's (tf2onnx numbers its tensors with
    process-wide counters)."""
    candidates = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    probe = copy.deepcopy(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in candidates)
    session = reference_session(probe)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    found = []
    for grid in grids:
        same = [name for name in candidates if values[name].shape == (1, *grid.shape) and np.array_equal(values[name][0], grid)]
        assert same, "no tensor of the converted graph holds the bundle's layer"
        found.append(same[0])
    return found


def check_gradients(model: npcam.Model, qdq: onnx.ModelProto, outputs: list[str], image, score,
                    names=None) -> float:  # fmt: skip
    """npcam's gradient of each of the first detections at the bundle's layers, against central differences of
    :func:`straight_through_head` along random directions; returns the worst error relative to ``sum |g| |u|``.
    ``score(outputs, detection)``: the detection's score from the raw outputs, as the model's package ranks it.
    ``names``: the layers' tensors in ``qdq`` (default: the bundle's), or a function of the prediction giving them."""
    pred = model.predict(image)
    chosen = list(range(min(2, len(pred.detections))))
    assert chosen
    if names is None:
        names = [name.strip() for name in model.bundle.meta["layer"].split(",")]
    elif callable(names):
        names = names(pred)
    layers = {name: grid[None].astype(np.float64) for name, grid in zip(names, pred.grids)}
    head = straight_through_head(qdq, layers, outputs)
    probes = model.probes(pred, chosen)
    rng = np.random.default_rng(0)
    worst = 0.0
    for j, i in enumerate(chosen):
        gradients = [probe.gradient()[j] for probe in probes]
        for _ in range(DIRECTIONS):
            directions = {k: rng.standard_normal(v.shape) for k, v in layers.items()}
            eps = 1e-4 * max(np.abs(v).max() for v in layers.values())
            up = score(head({k: v + eps * directions[k] for k, v in layers.items()}), pred.detections[i])
            down = score(head({k: v - eps * directions[k] for k, v in layers.items()}), pred.detections[i])
            numeric = (up - down) / (2 * eps)
            exact = sum(float((g * directions[k][0]).sum()) for g, k in zip(gradients, layers))
            scale = sum(float(np.abs(g * directions[k][0]).sum()) for g, k in zip(gradients, layers))
            assert scale > 0
            worst = max(worst, abs(numeric - exact) / scale)
    return worst


def test_int8_yolo_gradients_are_the_straight_through_ones(exported):
    model, path = exported("yolov8")
    qdq = onnx.load(str(path))

    def score(outputs, detection):
        return float(outputs[0][0, 4 + detection.class_index, detection.candidate])

    worst = check_gradients(model, qdq, [qdq.graph.output[0].name], photo(1), score)
    assert record("int8 detector yolov8 QDQ: gradient vs straight-through central differences", worst) <= GRADIENT_TOL


def test_int8_tflite_ssd_gradients_are_the_straight_through_ones(exported):
    """On the float-I/O file (tf2onnx's graph of it is the bundle's before the uint8 rewrite, its outputs float)."""
    pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    model, path = exported("ssd_mediapipe_float")
    converted, _ = tf2onnx.convert.from_tflite(str(path), opset=17)
    outputs = [o.name for o in converted.graph.output]
    values = ssd_detectors.CONVENTIONS["mediapipe"][0]

    def score(found, detection):
        logits = next(o for o in found if o.shape[2] != values)
        return float(1 / (1 + np.exp(-logits[0, detection.candidate, detection.class_index])))

    input_name = converted.graph.input[0].name

    def names(pred):
        return tensors_holding(converted, {input_name: pred.input.transpose(0, 2, 3, 1).copy()}, pred.grids)

    worst = check_gradients(model, converted, outputs, photo(1), score, names)
    assert record("int8 detector ssd_mediapipe TFLite: gradient vs straight-through central differences",
                  worst) <= GRADIENT_TOL  # fmt: skip


# Refusals


def test_int8_detector_with_float_output_after_quantization_is_refused(tmp_path):
    """A raw output computed in float after its last quantization has no step to bound it: one line, nothing written."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path, _ = yolo_int8(tmp_path)
    model = onnx.load(str(float_path))
    decode = [n.name for n in model.graph.node if n.name.startswith("/detect/") and n.op_type in ("Mul", "Concat")
              and "cv" not in n.name]  # fmt: skip

    class Images(CalibrationDataReader):
        def __init__(self):
            self.inputs = iter([{"images": np.random.default_rng(5).random((1, 3, *detectors.SIZE), np.float32)}])

        def get_next(self):
            return next(self.inputs, None)

    path = tmp_path / "float_tail.onnx"
    quantize_static(str(float_path), str(path), Images(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=decode)  # fmt: skip
    out = tmp_path / "out"
    refused_in_one_line(cli("onnx", path, "--out", out), "an int8 detector", "after its last quantization")
    assert not out.exists()


# Other CPUs

RUN = """
import sys, numpy as np, npcam
x = np.load(sys.argv[1])["x"]
out = {}
for b, path in enumerate(sys.argv[3:]):
    if path.endswith(".onnx"):  # the original file, in onnxruntime's default session on that CPU
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        out[f"file{b}"] = session.run(None, {session.get_inputs()[0].name: x})[0]
        continue
    model = npcam.load(path)
    layers, sides = model.trunk(x)
    for k, grid in enumerate(layers if isinstance(layers, (list, tuple)) else layers.values()):
        out[f"maps{b}_{k}"] = np.asarray(grid)
    out[f"raw{b}"] = model.head.forward_float64(layers, sides)
np.savez(sys.argv[2], **out)
"""


def test_int8_detectors_compute_the_same_under_an_emulated_haswell(exported, tmp_path):
    """The bundles' maps and raw outputs under qemu's Haswell (AVX2 without VNNI, whose u8s8 kernels saturate)
    identical to this machine's: uint8 products are summed exactly in int32 on every CPU and requantized by the
    same float32 multiply and rounding. The QDQ file itself in onnxruntime's default session there: beyond the
    bound of its QDQ graph's outputs (its u8s8 kernels saturate), so the comparison can fail."""
    from test_aarch64 import OTHER_CPUS, emulated, run_script

    arch, cpu = OTHER_CPUS["x86-64 AVX2, no VNNI or AVX-512 (qemu Haswell)"]
    command, env = emulated(arch, cpu)
    for case in ("yolov8", "ssd_tf_int8"):
        model, path = exported(case)
        x = model.predict(photo(0)).input
        inputs = tmp_path / f"{case}_inputs.npz"
        np.savez(inputs, x=x)
        runs = {}
        for name, cmd, extra in (("here", [sys.executable], {}), ("haswell", command, env)):
            runs[name] = tmp_path / f"{case}_{name}.npz"
            paths = [str(model.bundle.path), *([str(path)] if case == "yolov8" and name == "haswell" else [])]
            run_script(cmd, extra, RUN, [str(inputs), str(runs[name]), *paths], f"{case} {name}")
        here, there = dict(np.load(runs["here"])), dict(np.load(runs["haswell"]))
        file_there = there.pop("file1", None)
        assert set(here) == set(there) and len(here) >= 3  # the maps, one per stride, and the raw output
        worst = max(float(np.abs(here[k] - there[k]).max()) for k in here)
        assert record(f"int8 detector {case} under qemu Haswell: maps and raw outputs vs this CPU, abs", worst) == 0
        if file_there is not None:
            qdq = onnx.load(str(path))
            want = reference_session(qdq).run(None, {"images": x})[0].astype(np.float64)
            bound = DETECT_STEPS * yolo_steps(qdq) + STEPS_FLOAT
            off = float((np.abs(file_there - want)[0] / bound).max())
            assert record("int8 detector yolov8: the QDQ file under qemu Haswell vs its QDQ graph, of the bound", off) > 1
