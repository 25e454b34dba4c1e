"""An int8 ONNX classifier: its QOperator ops as QDQ, a reference that runs no integer kernel, and the bound.

onnxruntime's quantizer writes int8 models in two formats:

- QDQ: QuantizeLinear -> DequantizeLinear pairs around float ops. These define the model: each op computes in
  float on dequantized values and its output is quantized again. onnxruntime fuses each group into an integer
  kernel (QLinearConv, QGemm, QLinearAdd, ...).
- QOperator: the integer ops themselves (QLinearConv, QLinearMatMul; com.microsoft's QGemm, QLinearAdd,
  QLinearGlobalAveragePool, ...). :func:`as_qdq` writes each as DequantizeLinear -> the float op ->
  QuantizeLinear, which is how ONNX and onnxruntime define them. The rest of the exporter sees one format, and
  onnxruntime fuses the groups back into the same integer kernels.

With int8 weights onnxruntime multiplies in ``u8s8`` kernels, which saturate on x86 without VNNI; the exporter
therefore writes the trunk with uint8 weights and activations (:func:`export.unsigned.unsigned_int8`), whose
kernels are exact on every CPU. The self-check's reference (:func:`reference_session`) is the QDQ graph run by
onnxruntime with its graph optimizations off: every DequantizeLinear, float op and QuantizeLinear runs as
written, so no integer kernel runs and nothing saturates. It differs from the bundle only where a value lies
within float32 rounding of a rounding boundary (:func:`int8_bound`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .graph import attr, constant_of, unique
from .unsigned import MOVES

# QOperator op -> (the float op it quantizes, its (value, scale, zero point) input triples, the output's scale and
# zero point inputs). Each is DequantizeLinear on the triples -> the float op -> QuantizeLinear.
QOPERATOR: dict[str, tuple[str, tuple[tuple[int, int, int], ...], tuple[int, int]]] = {
    "QLinearConv": ("Conv", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearMatMul": ("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QGemm": ("Gemm", ((0, 1, 2), (3, 4, 5)), (7, 8)),  # without y_scale its output is float
    "QLinearAdd": ("Add", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearMul": ("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", ((0, 1, 2),), (3, 4)),
    "QLinearAveragePool": ("AveragePool", ((0, 1, 2),), (3, 4)),
    "QLinearLeakyRelu": ("LeakyRelu", ((0, 1, 2),), (3, 4)),
    "QLinearSigmoid": ("Sigmoid", ((0, 1, 2),), (3, 4)),
    "QLinearSoftmax": ("Softmax", ((0, 1, 2),), (3, 4)),
}  # fmt: skip
BIAS = {"QLinearConv": 8, "QGemm": 6}  # an int32 bias, on the scale of the product of the input scales
# Attributes that say how the QOperator op lays out its data, not what the float op computes
LAYOUT_ATTRIBUTES = {"channels_last", "opset"}
# Ops that compute with 8-bit integers and that npcam does not translate: onnxruntime runs them as they are
INTEGER_OP_PREFIXES = ("QLinear", "QGemm", "QAttention", "QOrdered", "QEmbed", "DynamicQuantize")
INTEGER_OP_SUFFIXES = ("Integer", "IntegerToFloat", "Integer16")
SHAPE_ONLY = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)


def is_int8(model: onnx.ModelProto) -> bool:
    """Whether ``model`` quantizes its activations to 8 bits: a QuantizeLinear to int8/uint8, or an integer op.

    A model whose only quantized tensors are weights (DequantizeLinear of constants, float activations) runs
    in float and is not one."""
    for node in model.graph.node:
        if _is_integer_op(node.op_type) or node.op_type == "DynamicQuantizeLinear":
            return True
        if node.op_type == "QuantizeLinear":
            zero = _initializer_type(model.graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero in (None, *EIGHT_BIT):  # no zero point: uint8
                return True
    return False


def as_qdq(model: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, int]:
    """``model`` with each QOperator op (:data:`QOPERATOR`, QLinearConcat) written as DequantizeLinear -> its
    float op -> QuantizeLinear, and a check that no op left computes with 8-bit integers.

    Parameters
    ----------
    model : an int8 model (:func:`is_int8`); modified in place and returned.
    source : the file's name, for error messages.

    Returns
    -------
    (model, count): ``count`` QOperator ops were rewritten (0 for a QDQ model).

    Raises
    ------
    ExportError : an integer op npcam does not translate; int8 weights read by anything but a DequantizeLinear;
        per-channel scales below opset 13 (whose DequantizeLinear has no axis); a scale that is not a constant.
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: v for n in graph.node if (v := constant_of(n)) is not None})
    taken = {*constants, *(o for n in graph.node for o in n.output), *(i.name for i in graph.input)}
    taken |= {n.name for n in graph.node}
    new_nodes: list[onnx.NodeProto] = []
    count = 0

    def name(base: str) -> str:
        fresh = unique(base, taken)
        taken.add(fresh)
        return fresh

    def constant(value: np.ndarray, base: str) -> str:
        fresh = name(base)
        graph.initializer.append(numpy_helper.from_array(value, fresh))
        constants[fresh] = value
        return fresh

    def scale_of(node: onnx.NodeProto, i: int) -> np.ndarray:
        value = constants.get(node.input[i]) if i < len(node.input) else None
        if value is None:
            raise ExportError(f"{source}: {node.op_type} {node.name!r} has a scale that is not a constant")
        return value.astype(np.float32)

    def dequantize(node: onnx.NodeProto, triple: tuple[int, int, int], axis: int | None) -> str:
        value, scale, zero = triple
        per_axis = scale_of(node, scale).size > 1
        if per_axis and (axis is None or opset < 13):
            why = "below opset 13, whose DequantizeLinear takes one scale" if axis is not None else "on an activation"
            raise ExportError(f"{source}: {node.op_type} {node.name!r} has per-channel scales {why}: quantize the "
                              "float model in the QDQ format (onnxruntime's QuantFormat.QDQ) instead")  # fmt: skip
        inputs = [node.input[value], node.input[scale]]
        if zero < len(node.input) and node.input[zero]:
            inputs.append(node.input[zero])
        out = name(f"{node.input[value]}_dequantized")
        options = {"axis": axis} if per_axis else {}
        new_nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=name(f"{out}_node"), **options))
        return out

    def weight_axis(node: onnx.NodeProto) -> int | None:
        """The axis of the weights' per-channel scales: the output channels of a Conv, the columns of B."""
        if node.op_type == "QLinearConv":
            return 0
        weights = constants.get(node.input[3])
        if weights is None:
            return None
        if node.op_type == "QGemm":
            return 0 if attr(node, "transB", 0) else 1
        return weights.ndim - 1  # QLinearMatMul: per column

    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.op_type not in QOPERATOR and node.op_type != "QLinearConcat":
            graph.node.append(node)
            continue
        count += 1
        if node.op_type == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) for each input
            triples = [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
            floats = [dequantize(node, t, None) for t in triples]
            op, output, attributes = "Concat", (0, 1), {"axis": attr(node, "axis")}
        else:
            op, triples, output = QOPERATOR[node.op_type]
            weights = node.op_type in BIAS or node.op_type == "QLinearMatMul"  # B may be per-channel
            floats = [
                dequantize(node, t, weight_axis(node) if k == 1 and weights else None) for k, t in enumerate(triples)
            ]
            attributes = {
                a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in LAYOUT_ATTRIBUTES
            }
            if attr(node, "channels_last", 0):
                raise ExportError(f"{source}: {node.op_type} {node.name!r} reads channels-last data, which npcam "
                                  "does not translate: quantize the float model in the QDQ format instead")  # fmt: skip
        if node.op_type in BIAS and BIAS[node.op_type] < len(node.input) and node.input[BIAS[node.op_type]]:
            floats.append(_bias(node, BIAS[node.op_type], scale_of, constants, constant, name, new_nodes, source))
        if node.op_type == "QGemm":
            attributes["beta"] = 1.0  # the bias was dequantized with alpha in its scale
        quantized = output[0] < len(node.input) and node.input[output[0]]
        result = name(f"{node.output[0]}_float") if quantized else node.output[0]
        new_nodes.append(helper.make_node(op, floats, [result], name=name(f"{node.name or op}_float"), **attributes))
        if quantized:
            inputs = [result, node.input[output[0]]]
            if output[1] < len(node.input) and node.input[output[1]]:
                inputs.append(node.input[output[1]])
            elif _integer_type(node, constants, triples) == TensorProto.INT8:
                # without a zero point QuantizeLinear gives uint8: the op's int8 output needs an int8 zero
                inputs.append(constant(np.array(0, np.int8), f"{node.output[0]}_zero_point"))
            new_nodes.append(helper.make_node("QuantizeLinear", inputs, [node.output[0]], name=name(f"{result}_q")))
        graph.node.extend(new_nodes)
        new_nodes.clear()
    if count and opset < 10:
        raise ExportError(f"{source}: an int8 model of opset {opset}; npcam reads int8 models of opset 10 or later")
    _check_integer_reads(model, constants, source)
    return model, count


def _bias(node, index: int, scale_of, constants: dict, constant, name, new_nodes: list, source: str) -> str:
    """The int32 bias of a QLinearConv or QGemm, dequantized with the scale of its sums: ``x_scale * w_scale``
    (times ``alpha`` for QGemm), per output channel when the weights' scales are."""
    bias = constants.get(node.input[index])
    if bias is None:
        raise ExportError(f"{source}: {node.op_type} {node.name!r} has a bias that is not a constant")
    scale = scale_of(node, 1) * scale_of(node, 4)  # float32, as onnxruntime multiplies them
    if node.op_type == "QGemm":
        scale = np.float32(attr(node, "alpha", 1.0)) * scale
    scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
    out = name(f"{node.input[index]}_dequantized")
    options = {"axis": bias.ndim - 1} if scale.size > 1 else {}
    scale_name = constant(scale.astype(np.float32), f"{node.input[index]}_scale")
    new_nodes.append(
        helper.make_node("DequantizeLinear", [node.input[index], scale_name], [out], name=name(out), **options)
    )
    return out


def _integer_type(node: onnx.NodeProto, constants: dict, triples) -> int | None:
    """The 8-bit type of a QOperator op's inputs, from their zero points (None when none is given)."""
    for _, _, zero in triples:
        if zero < len(node.input) and node.input[zero] in constants:
            return TensorProto.INT8 if constants[node.input[zero]].dtype == np.int8 else TensorProto.UINT8
    return None


def _is_integer_op(op_type: str) -> bool:
    return op_type.startswith(INTEGER_OP_PREFIXES) or op_type.endswith(INTEGER_OP_SUFFIXES)


def _initializer_type(graph: onnx.GraphProto, name: str) -> int | None:
    found = next((i.data_type for i in graph.initializer if i.name == name), None)
    if found is None:
        node = next((n for n in graph.node if name in n.output and n.op_type == "Constant"), None)
        value = constant_of(node) if node is not None else None
        found = helper.np_dtype_to_tensor_dtype(value.dtype) if value is not None else None
    return found


def _check_integer_reads(model: onnx.ModelProto, constants: dict, source: str) -> None:
    """Refuse what would still multiply 8-bit integers in a kernel of onnxruntime's choosing: an integer op not
    translated, or int8 constants (weights) read by anything but a DequantizeLinear, a QuantizeLinear's zero point
    or a move of values. The int8 activations are checked by :func:`export.unsigned.unsigned_int8`."""
    for node in model.graph.node:
        if _is_integer_op(node.op_type) or node.op_type == "DynamicQuantizeLinear":
            raise ExportError(
                f"{source}: its {node.op_type} ({node.domain or 'ai.onnx'}) {node.name!r} computes with 8-bit integers "
                "in an op npcam does not translate; npcam reads QDQ models and the QOperator ops "
                f"{', '.join([*QOPERATOR, 'QLinearConcat'])} (docs/export.md)"
            )
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        carried = MOVES.get(node.op_type, ())
        for i, name in enumerate(node.input):
            value = constants.get(name)
            if value is not None and value.dtype == np.int8 and not (carried is None or i in carried):
                raise ExportError(
                    f"{source}: its int8 constant {name!r} is read by {node.op_type} {node.name!r}, which computes "
                    "with its integers (npcam runs int8 weights through DequantizeLinear only)"
                )


def reference_session(model: onnx.ModelProto):
    """``model`` in onnxruntime with graph optimizations off: each DequantizeLinear, float op and QuantizeLinear
    runs on its own, so no integer kernel runs (none can saturate). Quiet, as :func:`export.graph.session`."""
    import onnxruntime as ort

    integer = sorted({n.op_type for n in model.graph.node if _is_integer_op(n.op_type)})
    if integer:  # as_qdq refuses these: the reference would run their integer kernels
        raise ExportError(f"the int8 reference would run integer kernels ({', '.join(integer)})")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def int8_bound(model: onnx.ModelProto, output: str | None = None) -> dict | None:
    """The self-check's limit for an int8 model's output (a QDQ graph), from its quantization steps; None for a
    model whose output (``output``, default the first) is not quantized (the float tolerance then applies).

    The bundle's trunk sums the integers exactly and requantizes them with a float32 multiplier; the reference
    sums the dequantized values in float32 and divides by the output scale. Both round half to even, so they
    give the same integers except where the exact value lies within float32 rounding of a rounding boundary:
    there a tensor is one step apart, in the few cells where that happens. The head then runs in float64
    (npcam.head.ops.quantize), the reference in float32: the same again. As for the int8 TFLite route
    (docs/tflite-keras.md), the global average pooling spreads the one-step cells of the features over the map,
    so the int8 logits differ by at most one step inherited from the pooled vector and one of their own rounding,
    ``2 s_z``. Logits output: ``2 s_out``. A Softmax (or Sigmoid, LogSoftmax) output: npcam gives the exact
    function of its logits, the reference rounds it to ``s_out`` (half a step), and two logit steps move a
    softmax by at most ``s_z`` (its max-norm slope is at most 1/2), a sigmoid by ``s_z / 2`` (1/4), a log-softmax
    by ``4 s_z`` (2): ``s_out / 2 + slope * 2 s_z``.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: v for n in graph.node if (v := constant_of(n)) is not None})

    def before(name: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        while node is not None and node.op_type in SHAPE_ONLY:
            node = producers.get(node.input[0])
        return node

    def step(node: onnx.NodeProto | None) -> float | None:
        """The scale of a DequantizeLinear of a QuantizeLinear's integers, or None."""
        if node is None or node.op_type != "DequantizeLinear":
            return None
        scale = constants.get(node.input[1])
        quantize = before(node.input[0])
        if scale is None or scale.size != 1 or quantize is None or quantize.op_type != "QuantizeLinear":
            return None
        return float(scale.reshape(()))

    last = before(output or graph.output[0].name)
    s_out = step(last)
    if s_out is None:
        return None
    function = before(before(last.input[0]).input[0])
    slopes = {"Softmax": 0.5, "Sigmoid": 0.25, "LogSoftmax": 2.0}
    if function is None or function.op_type not in slopes:
        return {"bound": 2 * s_out, "rule": "two steps of the int8 logits", "output_step": s_out}
    s_z = step(before(function.input[0]))
    if s_z is None:  # float logits: the output's own rounding, and a value on the other side of a boundary
        return {"bound": s_out, "rule": "one output step (the logits are float)", "output_step": s_out}
    slope = slopes[function.op_type]
    return {
        "bound": s_out / 2 + slope * 2 * s_z,
        "rule": f"half an output step + two logit steps through the {function.op_type} (slope {slope:g})",
        "output_step": s_out,
        "logit_step": s_z,
    }


# Ops through which a dequantized value reaches a detector's raw output unchanged (only moved or selected)
VALUE_MOVES = {**MOVES, "Concat": None}
# An int8 detector's self-check bound, in steps of the tensor each raw output value is read from
# (:func:`output_steps`): one of its own rounding (the reference lands on the other side of a rounding boundary:
# onnxruntime's float32 sum, or TFLite's fixed-point requantization, against the bundle's exact integers), and one
# inherited from the tensors it is computed from, as for an int8 classifier's logits (:func:`int8_bound`).
DETECT_STEPS = 2


def output_steps(model: onnx.ModelProto, outputs: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each value's quantization step in an int8 detector's raw ``outputs``: the scale of the DequantizeLinear it
    is read from, carried through the moves and joins between them (a Concat of box and class parts that have
    their own steps gives each part its own).

    The self-check's bound (docs/export.md, "Detectors"): the bundle's trunk sums the integers exactly and
    requantizes in float32, the reference runs each DequantizeLinear, float op and QuantizeLinear as written;
    both round half to even, so a tensor can be one step apart only where its exact value lies within float32
    rounding of a rounding boundary (TFLite's fixed-point requantization: of its second rounding). A raw output
    value, the dequantized integer of its last QuantizeLinear, is then within :data:`DETECT_STEPS` of its steps
    of the reference's.

    Parameters
    ----------
    model : the QDQ graph; not modified.
    outputs : the raw output tensors (a model's outputs, or tensors before its NMS).
    feed : an input for one run ``{name: array}`` (the steps do not depend on it).

    Returns
    -------
    ``{name: float32 array of the output's shape}``.

    Raises
    ------
    ExportError : a raw output computed in float after its last quantization (an op other than a move), or read
        from a DequantizeLinear with per-axis scales: then no step bounds it.
    """
    import copy

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: v for n in graph.node if (v := constant_of(n)) is not None})
    last: dict[str, float] = {}  # the DequantizeLinear outputs the raw outputs are read from -> their steps
    todo, seen = list(outputs), set()
    while todo:
        name = todo.pop()
        if name in seen or name in constants:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None:
            raise ExportError(f"the raw output {name!r} is the model's input, not a quantized tensor")
        if node.op_type == "DequantizeLinear":
            scale = constants.get(node.input[1])
            if scale is None or scale.size != 1:
                raise ExportError(f"the raw output is read from {node.name or name!r}, a DequantizeLinear with per-axis "
                                  "scales: npcam bounds int8 detectors whose outputs have one step per tensor")  # fmt: skip
            last[name] = float(scale.reshape(()))
            continue
        carried = VALUE_MOVES.get(node.op_type, ())
        if carried == ():
            raise ExportError(
                f"the raw output is computed in float by {node.op_type} {node.name!r} after its last quantization: "
                "no quantization step bounds it (quantize the model's last ops too)"
            )
        carried = range(len(node.input)) if carried is None else carried
        todo += [node.input[i] for i in carried if i < len(node.input) and node.input[i]]
    steps = copy.deepcopy(model)
    taken = {o for n in steps.graph.node for o in n.output} | set(constants) | {i.name for i in steps.graph.input}
    added = []
    for node in steps.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in last:
            name = node.output[0]
            value, zero, scale = unique(f"{name}_value", taken), unique(f"{name}_zero", taken), unique(f"{name}_step", taken)
            taken.update((value, zero, scale))
            node.output[0] = value
            steps.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), zero),
                                            numpy_helper.from_array(np.array(last[name], np.float32), scale)])  # fmt: skip
            # value * 0 + step: the value's shape, each element its step
            added += [helper.make_node("Mul", [value, zero], [f"{value}_times_zero"]),
                      helper.make_node("Add", [f"{value}_times_zero", scale], [name])]  # fmt: skip
    steps.graph.node.extend(added)
    nodes = list(steps.graph.node)
    order = _topological(nodes)
    del steps.graph.node[:]
    steps.graph.node.extend(order)
    del steps.graph.output[:]
    steps.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in outputs)
    session = reference_session(steps)
    return dict(zip(outputs, session.run(list(outputs), feed)))


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each node follows the producers of its inputs."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, ready = stack.pop()
            if i in done:
                continue
            if ready:
                done.add(i)
                order.append(nodes[i])
                continue
            stack.append((i, True))
            stack += [(producer[x], False) for x in nodes[i].input if x in producer and producer[x] not in done]
    return order
