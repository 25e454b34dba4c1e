"""``npcam-export tflite MODEL.tflite``: a TensorFlow Lite classifier, float, int8 or dynamic-range, or a float
detector, as a bundle.

tf2onnx converts the flatbuffer to ONNX (QuantizeLinear/DequantizeLinear pairs for an int8 model, per-channel
weights kept), and the ONNX route splits, writes and checks it (a detector: :mod:`export.detector`, when the file
has several outputs or the detector flags say so). An int8 graph is written with uint8 values
(export/unsigned.py: exact kernels on every CPU); a dynamic-range model's hybrid ops as TFLite computes them
(export/hybrid.py). The self-check runs the ``.tflite`` file in LiteRT's interpreter (``ai-edge-litert``) on
the same inputs. Needs the ``tflite`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from npcam.bundle import sha256_file

from . import qdq
from .converted import OPSET, check_file, export_converted, first_line, import_tensorflow, quiet
from .errors import ExportError
from .hybrid import reproduce as reproduce_hybrid
from .unsigned import unsigned_int8

if TYPE_CHECKING:
    from .detector import Options
    from .quantize import Int8

EXTRA = "tflite"
# TFLite's quantized input types, as numpy and ONNX types
QUANTIZED = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}
# TFLite's detection post-processing op (the SSD decode and NMS in one custom op)
POST_PROCESS = "TFLite_Detection_PostProcess"
# Ops that only reshape, between an int8 model's output quantization and its softmax
SHAPE_ONLY = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


def run_tflite(
    model: Path,
    out: Path | None = None,
    labels: Path | None = None,
    mean=None,
    std=None,
    input_size=None,
    int8: Path | Int8 | None = None,
    detect: Options | None = None,
) -> Path:
    """Export a ``.tflite`` image classifier or detector; returns the bundle directory. ``detect``: a detector's
    flags (:class:`export.detector.Options`); a file with several outputs, one of rank 3, is read as a detector."""
    check_file(model, (".tflite",), "TensorFlow Lite")
    interpreter = _interpreter(model)
    (inp,), outputs = interpreter.get_input_details(), interpreter.get_output_details()
    wanted = detect is not None and (detect.task == "detect" or detect.anchors is not None)
    several = len(outputs) > 1 and any(len(o["shape"]) == 3 for o in outputs)  # a detector's (else refused below)
    if (several or wanted) and (detect is None or detect.task != "classify"):
        return _run_tflite_detector(model, interpreter, out, labels, mean, std, input_size, int8, detect)
    if len(outputs) != 1:
        names = ", ".join(o["name"] for o in outputs)
        raise ExportError(f"{model}: the model has {len(outputs)} outputs ({names}); npcam needs one (class scores)")
    (outp,) = outputs
    _check_quantized(model, "input", inp)
    _check_quantized(model, "output", outp)
    if int8 is not None and inp["dtype"] in QUANTIZED:
        raise ExportError(f"{model}: the model is already int8; --int8 quantizes float models (export it without)")
    tf, tf2onnx = import_tensorflow(EXTRA)
    try:
        with quiet():
            converted, _ = tf2onnx.convert.from_tflite(str(model), opset=OPSET)
    except Exception as e:  # tf2onnx raises many types for ops it cannot map
        raise ExportError(f"{model}: tf2onnx cannot convert it ({first_line(e)}); nothing was written") from None
    types = {n.op_type for n in converted.graph.node}
    hybrid = None
    if "DequantizeLinear" in types and "QuantizeLinear" not in types:
        # only its weights are int8 (dynamic-range): TFLite's hybrid kernels quantize activations on the fly
        converted, hybrid = reproduce_hybrid(converted, str(model))
    converted = _float_io(converted, inp, outp)
    # int8 activations and weights as uint8 (+128, the same integers): onnxruntime's u8u8 kernels accumulate
    # exactly on every CPU, its u8s8 ones saturate on x86 without VNNI (export/unsigned.py)
    converted, _ = unsigned_int8(converted, str(model))
    bound = _int8_bound(converted)  # int8 I/O, or float I/O around int8 ops: TFLite's converter writes both
    versions = {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "ai-edge-litert": _litert_version()}
    return export_converted(
        model, "tflite", converted, _reference(model, inp, outp, builtin=hybrid is not None), versions,
        out, labels, mean, std, input_size, int8, bound, hybrid,
    )  # fmt: skip


def _run_tflite_detector(model: Path, interpreter, out, labels, mean, std, input_size, int8,
                         detect: Options | None) -> Path:  # fmt: skip
    """A float TFLite detector: converted by tf2onnx, split and written by the ONNX route's detector path, checked
    against LiteRT's interpreter on every raw output."""
    import dataclasses

    from . import api as route
    from .detector import Options

    (inp,), outputs = interpreter.get_input_details(), interpreter.get_output_details()
    post = None
    if POST_PROCESS in _op_names(interpreter):
        post = _post_process(model, interpreter)
        outputs = post["raw"]  # the box encodings and class predictions the op reads
    elif any(POST_PROCESS in o["name"] for o in outputs):
        raise ExportError(
            f"{model}: the graph ends in TFLite_Detection_PostProcess (its NMS), which LiteRT does not list as an op "
            "here; npcam explains the raw box and class outputs before it: convert the model without it"
        )
    for detail in (inp, *outputs):
        _check_quantized(model, "input" if detail is inp else "output", detail)
    if int8 is not None:
        raise ExportError("--int8 takes classifiers; export the detector in float")
    tf, tf2onnx = import_tensorflow(EXTRA)
    try:
        with quiet():
            converted, _ = tf2onnx.convert.from_tflite(str(model), opset=OPSET)
    except Exception as e:  # tf2onnx raises many types for ops it cannot map
        raise ExportError(f"{model}: tf2onnx cannot convert it ({first_line(e)}); nothing was written") from None
    unknown = sorted({n.op_type for n in converted.graph.node if not onnx.defs.has(n.op_type, n.domain or "")})
    if unknown:
        raise ExportError(f"{model}: tf2onnx has no ONNX equivalent for {', '.join(unknown)}; nothing was written")
    if post is not None:  # cut before tf2onnx's rendering of the op (its decode and NonMaxSuppression)
        from .detector import _pruned

        present = {o for n in converted.graph.node for o in n.output}
        missing = [o["name"] for o in outputs if o["name"] not in present]
        if missing:
            raise ExportError(f"{model}: tf2onnx's graph has no tensor {missing[0]!r}, the post-processing op's input")
        converted = _pruned(converted, [o["name"] for o in outputs])
    names = [o.name for o in converted.graph.output]
    if sorted(names) != sorted(o["name"] for o in outputs):
        raise ExportError(f"{model}: tf2onnx named the outputs {names}, LiteRT {[o['name'] for o in outputs]}")
    int8_model = qdq.is_int8(converted)
    if int8_model:  # full-integer: float I/O around its own Q/DQ, and uint8 values (exact kernels on every CPU)
        converted = _float_io(converted, inp, outputs)
        converted, shifted = unsigned_int8(converted, str(model))
    options = dataclasses.replace(detect or Options(), task="detect")
    if post is not None:  # what the op says, unless a flag says otherwise
        read = {"anchors": post["anchors"], "anchor_decode": "tf", "box_scales": post["scales"], "box_order": "yxhw",
                "box_output": post["raw"][0]["name"]}  # fmt: skip
        options = dataclasses.replace(options, **{k: v for k, v in read.items() if getattr(options, k) is None})
    found = route._split_detector(str(model), converted, input_size, False, options)
    if post is not None:
        found.decode.notes.insert(0, f"cut before {POST_PROCESS}: its {len(post['anchors'])} anchors and its scales "
                                     f"{','.join(f'{v:g}' for v in post['scales'])} (y, x, h, w)")  # fmt: skip
    digest = sha256_file(model)
    meta = {
        "arch": f"tflite:{model.stem}",
        "layer": ", ".join(found.layers),
        "source": {"kind": "tflite", "name": model.name, "sha256": digest, "channels": found.channels},
        "versions": {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "ai-edge-litert": _litert_version()},
    }
    steps = None
    if int8_model:
        tensors = list(dict.fromkeys(segment.tensor for segment in found.decode.segments))
        steps = route.int8_detector_steps(str(model), converted, found, tensors)
        meta["source"]["int8"] = {"uint8_tensors": shifted, "bound_steps": qdq.DETECT_STEPS}
    interpreter = _interpreter(model, preserve=post is not None)  # the op's inputs are intermediate tensors

    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        """LiteRT's raw outputs for npcam's NCHW RGB inputs, one image at a time: ``{name: [N, ...]}``."""
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if found.layout == "NHWC" else x
        results: dict[str, list[np.ndarray]] = {o["name"]: [] for o in outputs}
        for image in x.astype(np.float32):
            interpreter.set_tensor(inp["index"], _quantized(image[None], inp))
            interpreter.invoke()
            for o in outputs:
                results[o["name"]].append(_dequantized(interpreter.get_tensor(o["index"]), o))
        # an int8 output is the converted graph's DequantizeLinear of it (_float_io)
        return {name + ("_float" if int8_model and detail["dtype"] in QUANTIZED else ""): np.concatenate(results[name])
                for name, detail in ((o["name"], o) for o in outputs)}  # fmt: skip

    checked = route._fed_by_npcam(reference, found.channels)
    return route._export_detector(found, route._out(out, model.stem, digest, None), labels, mean, std, meta, checked,
                                  steps)  # fmt: skip


def _quantized(x: np.ndarray, detail: dict) -> np.ndarray:
    """A float input as the model takes it: quantized with its scale and zero point if it is int8/uint8."""
    if detail["dtype"] not in QUANTIZED:
        return x
    scale, zero = _quantization(detail)
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def _dequantized(y: np.ndarray, detail: dict) -> np.ndarray:
    """An output as real values, float64."""
    if detail["dtype"] not in QUANTIZED:
        return y.astype(np.float64)
    scale, zero = _quantization(detail)
    return (y.astype(np.float64) - zero) * scale


def _post_process(model: Path, interpreter) -> dict:
    """What a TFLite_Detection_PostProcess op holds: its raw inputs (box encodings, class predictions; LiteRT's
    tensor details), its anchors (the constant third input, ``[N, 4]`` y, x, h, w, normalized) as npcam's
    ``--anchors`` (centre x, centre y, w, h), and its scales (y, x, h, w) from its custom options, a flexbuffer map
    read through LiteRT's flatbuffer schema and the ``flatbuffers`` package (TensorFlow's dependency)."""
    ops = [op for op in interpreter._get_ops_details() if op.get("op_name") == POST_PROCESS]
    if len(ops) != 1 or len(ops[0]["inputs"]) != 3:
        raise ExportError(f"{model}: {len(ops)} {POST_PROCESS} ops, or not three inputs: npcam reads one")
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    boxes, scores, anchors = (details[int(i)] for i in ops[0]["inputs"])
    try:
        table = np.asarray(interpreter.get_tensor(anchors["index"]), np.float64)
    except ValueError:
        table = np.zeros((0, 0))
    if table.ndim != 2 or table.shape[1] != 4 or len(table) != boxes["shape"][1] or not np.isfinite(table).all():
        raise ExportError(f"{model}: the anchors of {POST_PROCESS} ({anchors['name']!r}, {list(table.shape)}) are not a "
                          f"constant [N, 4] table for its {boxes['shape'][1]} boxes")  # fmt: skip
    options = _custom_options(model, POST_PROCESS)
    keys = ("y_scale", "x_scale", "h_scale", "w_scale")
    if not all(isinstance(options.get(k), (int, float)) and options[k] > 0 for k in keys):
        raise ExportError(f"{model}: {POST_PROCESS}'s options lack positive {', '.join(keys)} ({sorted(options)})")
    return {"raw": [boxes, scores], "anchors": table[:, [1, 0, 3, 2]], "scales": tuple(float(options[k]) for k in keys)}


def _custom_options(model: Path, op_name: str) -> dict:
    """The custom options (a flexbuffer map) of the first op named ``op_name`` in the file's first subgraph."""
    try:
        import flatbuffers.flexbuffers as flexbuffers
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise ExportError(f"{model}: reading {op_name}'s options needs the flatbuffers package: pip install "
                          f"'npcam[{EXTRA}]'") from None  # fmt: skip
    try:
        tflite = schema.Model.GetRootAsModel(model.read_bytes(), 0)
        graph = tflite.Subgraphs(0)
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = tflite.OperatorCodes(op.OpcodeIndex()).CustomCode()
            if code is not None and code.decode() == op_name:
                value = flexbuffers.Loads(op.CustomOptionsAsNumpy().tobytes())
                return value if isinstance(value, dict) else {}
    except Exception as e:  # a damaged flatbuffer fails in many ways
        raise ExportError(f"{model}: cannot read {op_name}'s options ({first_line(e)})") from None
    raise ExportError(f"{model}: no {op_name} op in its first subgraph")


def _op_names(interpreter) -> set[str]:
    """The TFLite ops of the interpreter's graph (custom ops under their own names)."""
    try:
        return {str(op.get("op_name", "")) for op in interpreter._get_ops_details()}
    except Exception:  # a private API: without it, the outputs' names still tell the post-processing op
        return set()


def _interpreter(model: Path, preserve: bool = False):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ExportError(f"the tflite route needs LiteRT's interpreter: pip install 'npcam[{EXTRA}]'") from None
    try:
        with quiet():
            interpreter = Interpreter(model_path=str(model), experimental_preserve_all_tensors=preserve)
            interpreter.allocate_tensors()
    except Exception as e:  # LiteRT raises ValueError/RuntimeError for files it cannot read
        raise ExportError(f"{model}: not a TensorFlow Lite model LiteRT can run ({first_line(e)})") from None
    if len(interpreter.get_input_details()) != 1:
        raise ExportError(f"{model}: the model has {len(interpreter.get_input_details())} inputs; npcam needs one")
    return interpreter


def _litert_version() -> str:
    from importlib.metadata import version

    return version("ai-edge-litert")


def _check_quantized(model: Path, which: str, detail: dict) -> None:
    """Float32, or int8/uint8 with one scale (TFLite quantizes activations per tensor)."""
    if detail["dtype"] == np.float32:
        return
    scale = detail["quantization_parameters"]["scales"]
    if detail["dtype"] not in QUANTIZED or len(scale) != 1:
        raise ExportError(
            f"{model}: the {which} {detail['name']!r} is {np.dtype(detail['dtype']).name}"
            + ("" if detail["dtype"] not in QUANTIZED else f" with {len(scale)} scales")
            + "; npcam reads float32, or int8/uint8 quantized with one scale"
        )


def _quantization(detail: dict) -> tuple[float, int]:
    q = detail["quantization_parameters"]
    return float(q["scales"][0]), int(q["zero_points"][0])


def _float_io(converted: onnx.ModelProto, inp: dict, outp: dict | list[dict]) -> onnx.ModelProto:
    """A full-integer model takes and gives int8: put its own input QuantizeLinear and output DequantizeLinear
    into the graph, so that it takes float images (as npcam feeds) and gives real-valued scores."""
    graph = converted.graph
    (image,) = [i for i in graph.input if i.name not in {x.name for x in graph.initializer}]
    if inp["dtype"] in QUANTIZED:
        scale, zero = _quantization(inp)
        name = image.name
        image.name = f"{name}_float"
        image.type.tensor_type.elem_type = TensorProto.FLOAT
        graph.initializer.extend(_scale_zero("input_quantization", scale, zero, QUANTIZED[inp["dtype"]]))
        quantize = helper.make_node(
            "QuantizeLinear", [image.name, "input_quantization_scale", "input_quantization_zero"], [name]
        )
        graph.node.insert(0, quantize)
    details = outp if isinstance(outp, list) else [outp]
    for k, detail in enumerate(details):
        if detail["dtype"] not in QUANTIZED:
            continue
        scale, zero = _quantization(detail)
        result = graph.output[0] if len(details) == 1 else next(o for o in graph.output if o.name == detail["name"])
        name = result.name
        prefix = "output_quantization" + (f"_{k}" if k else "")
        graph.initializer.extend(_scale_zero(prefix, scale, zero, QUANTIZED[detail["dtype"]]))
        graph.node.append(
            helper.make_node("DequantizeLinear", [name, f"{prefix}_scale", f"{prefix}_zero"], [f"{name}_float"])
        )
        result.name = f"{name}_float"
        result.type.tensor_type.elem_type = TensorProto.FLOAT
    return converted


def _scale_zero(prefix: str, scale: float, zero: int, elem_type: int) -> list[onnx.TensorProto]:
    return [
        helper.make_tensor(f"{prefix}_scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor(f"{prefix}_zero", elem_type, [], [zero]),
    ]


def _int8_bound(converted: onnx.ModelProto) -> dict | None:
    """The self-check's limit for an int8 model's dequantized output, from its quantization steps (see docs);
    None for a model whose output is not quantized.

    Both runtimes compute the same int32 accumulations but round them back to int8 differently (TFLite: a
    fixed-point multiplier and two roundings; onnxruntime: one float rounding), so a small fraction of each
    int8 tensor is one step apart. Averaged over the feature map, that moves the int8 logits by at most one
    step, plus one of their own rounding: two logit steps ``2 s_z``. Logits output: ``2 s_out``.
    Softmax/Sigmoid output: npcam's unrounded probabilities vs TFLite's fixed-point ones rounded to
    ``s_out``: half a step of rounding, up to half a step of fixed-point approximation, and two logit steps
    through a softmax, whose slope is at most 1/2 (a sigmoid's 1/4): ``s_out + s_z``.
    """
    graph = converted.graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    node = producers.get(graph.output[0].name)  # a DequantizeLinear (the model's, or ours), then a QuantizeLinear
    while node is not None and node.op_type in SHAPE_ONLY:
        node = producers.get(node.input[0])
    scale = constants.get(node.input[1]) if node is not None and node.op_type == "DequantizeLinear" else None
    node = producers.get(node.input[0]) if scale is not None else None
    if node is None or node.op_type != "QuantizeLinear" or scale.size != 1:
        return None  # a float output: not an int8 model's (a float model, or int8 weights only)
    s_out = float(scale.reshape(()))
    node = producers.get(node.input[0])
    while node is not None and node.op_type in SHAPE_ONLY:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "Sigmoid"):
        return {"bound": 2 * s_out, "rule": "two steps of the int8 logits", "output_step": s_out}
    logits = producers.get(node.input[0])
    while logits is not None and logits.op_type in SHAPE_ONLY:
        logits = producers.get(logits.input[0])
    scale = constants.get(logits.input[1]) if logits is not None and logits.op_type == "DequantizeLinear" else None
    if scale is None or scale.size != 1:
        raise ExportError("cannot find the quantization step of the int8 logits before the softmax")
    s_z = float(scale.reshape(()))
    return {
        "bound": s_out + s_z,
        "rule": "one output step + two logit steps through the softmax",
        "output_step": s_out,
        "logit_step": s_z,
    }


def _reference(model: Path, inp: dict, outp: dict, builtin: bool = False):
    """The ``.tflite`` file in LiteRT's interpreter, fed float NHWC images (quantized as the model's input
    says for an int8 model), its output dequantized. A fixed-batch model runs one image at a time.

    ``builtin``: LiteRT's built-in kernels, without its default delegate (XNNPACK). For a dynamic-range model:
    the built-in hybrid kernels are what export.hybrid reproduces; XNNPACK computes per-tensor hybrid
    convolutions otherwise (docs/tflite-keras.md)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    signature = [int(d) for d in inp["shape_signature"]]
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin else OpResolverType.AUTO
    with quiet():
        interpreter = Interpreter(model_path=str(model), experimental_op_resolver_type=resolver)
    index, out_index = inp["index"], outp["index"]
    shape: list[int] = []

    def run_batch(x: np.ndarray) -> np.ndarray:
        nonlocal shape
        if list(x.shape) != shape:
            try:
                interpreter.resize_tensor_input(index, list(x.shape), strict=True)
                interpreter.allocate_tensors()
            except Exception as e:  # a fixed-size model (strict): the self-check then checks its own size only
                raise ValueError(f"the model does not run on {list(x.shape)} inputs ({e})") from None
            shape = list(x.shape)
        if inp["dtype"] in QUANTIZED:
            scale, zero = _quantization(inp)
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        y = interpreter.get_tensor(out_index)
        if outp["dtype"] in QUANTIZED:
            scale, zero = _quantization(outp)
            y = (y.astype(np.float64) - zero) * scale
        return y.astype(np.float64)

    def run(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        if signature[0] == -1 and len(x) > 1:
            try:
                return run_batch(x)
            except (ValueError, RuntimeError):  # a dynamic batch some op cannot prepare: one image at a time
                pass
        return np.concatenate([run_batch(x[i : i + 1]) for i in range(len(x))])

    return run
