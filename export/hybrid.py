"""A dynamic-range TFLite model (int8 weights, float activations) computed as TFLite's hybrid kernels do.

TFLite's converter writes such a model by default (``Optimize.DEFAULT`` without a representative dataset).
Its hybrid kernels quantize each op's float input on the fly, then multiply integers:

- CONV_2D and DEPTHWISE_CONV_2D with per-channel weights: each image's whole input to int8, asymmetric
  (``AsymmetricQuantizeFloats``: the range ``[min(x, 0), max(x, 0)]`` in 255 steps, the zero point rounded),
  ``int32`` sums of ``(q - zero point) * w``, then ``sum * (input scale * weight scale) + bias`` in float;
  per-tensor weights: symmetric (``max|x|`` in 127 steps, no zero point);
- FULLY_CONNECTED: the same for each row, asymmetric when the op says ``asymmetric_quantize_inputs``
  (tf2onnx then writes a DynamicQuantizeLinear before it), else symmetric.

tf2onnx keeps the int8 weights (DequantizeLinear) but runs the convolutions in float on the float input. This
module rewrites each hybrid convolution into the same integer arithmetic in ONNX ops: the per-image range
(ReduceMin, ReduceMax), the scale and zero point in double as TFLite computes them, the values in float32,
rounding half away from zero; then the integer sums, exact on every CPU: a float32 Conv of the integers where
they stay below 2**24 (fast, and exact whatever the summation order), else ``ConvInteger`` on uint8 values and
uint8 weights (int8 + 128, zero point 128), whose ``u8u8`` kernels sum exactly in int32 (export/unsigned.py
says why not ``u8s8``). For ConvInteger the padding is applied to the float input first, where a zero
quantizes to the zero point exactly, and the zero point's share of the sum is subtracted per image.

The fully connected layer is the head's, which npcam computes in NumPy and differentiates for Grad-CAM. Its
input gets TFLite's quantization one row at a time (tf2onnx's DynamicQuantizeLinear quantizes the whole batch
at once, and npcam's head has no such op) from QuantizeLinear and DequantizeLinear with a computed scale and
zero point, through which the gradient is the straight-through one. The self-check's bound
(:class:`DenseBound`) is derived from that quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .graph import attr, constant_of, unique

SHAPE_ONLY = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
POOLING = {"GlobalAveragePool", "ReduceMean"}
# Through which output each score kind passes a logit change d: |change| <= factor * max |d| (the max-norm
# Lipschitz constant: a softmax row's derivatives sum in absolute value to 2 p (1 - p) <= 1/2, a sigmoid's
# derivative is at most 1/4, a log-softmax row's sum to 2 (1 - p) <= 2).
OUTPUT_FACTOR = {"logits": 1.0, "probabilities": 0.5, "sigmoid": 0.25, "log_probabilities": 2.0}


@dataclass
class DenseBound:
    """The self-check's limit for a model whose last fully connected layer is hybrid, from its input quantization.

    TFLite quantizes that layer's input ``p`` (the pooled features, one row per image) with a step ``s``:
    ``(max(p, 0) - min(p, 0)) / 255`` asymmetric, ``max |p| / 127`` symmetric, and so does the bundle
    (:func:`_quantized_rows`). Each side rounds its own ``p`` to the nearest step (the zero point's rounding
    keeps the clipped ends within half a step too). The two ``p`` agree to float32 rounding (the convolutions
    compute TFLite's integers), so an element can land one step apart where it lies on a rounding boundary:
    the quantized inputs differ by at most ``s`` each, and logit ``k`` by at most ``s * sum_c |W[c, k]|``
    (``W`` the dequantized weights both use); the output by that times its factor (:data:`OUTPUT_FACTOR`).
    The self-check adds its float tolerance for the rest (float32 rounding).

    Attributes
    ----------
    weight_l1 : ``max_k sum_c |W[c, k]|`` of the dequantized weights, float
    asymmetric : the layer's input quantization (True: per-row asymmetric, 255 steps; False: symmetric, 127)
    factor : the output's factor (1 for logits)
    """

    weight_l1: float
    asymmetric: bool
    factor: float = 1.0

    @property
    def rule(self) -> str:
        kind = "asymmetric" if self.asymmetric else "symmetric"
        return f"one step of the fully connected layer's {kind} int8 input through its weights"

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        """The limit for each row of ``pooled`` (the head's input, float ``[N, C]``): float64 ``[N]``."""
        p = np.asarray(pooled, dtype=np.float64).reshape(len(pooled), -1)
        if self.asymmetric:
            step = (np.maximum(p.max(1), 0) - np.minimum(p.min(1), 0)) / 255
        else:
            step = np.abs(p).max(1) / 127
        return self.factor * step * self.weight_l1


@dataclass
class Hybrid:
    """What :func:`reproduce` found: the hybrid convolutions it rewrote, and the hybrid dense layer's bound."""

    convs: int
    dense: DenseBound | None

    def meta(self) -> dict:
        """bundle.json's ``source.dynamic_range``."""
        return {
            "hybrid_convolutions": self.convs,
            "fully_connected": None if self.dense is None else ("asymmetric" if self.dense.asymmetric else "symmetric"),
            "bound": "float tolerance" if self.dense is None else self.dense.rule,
        }


def reproduce(model: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, Hybrid]:
    """``model`` (tf2onnx's graph of a dynamic-range TFLite model) with its hybrid ops as TFLite computes them.

    Raises ExportError, in one line, for hybrid ops it cannot reproduce or bound: a hybrid MatMul anywhere but
    the classifier on the pooled features, or more than one; a convolution whose weights have a zero point.
    """
    graph = model.graph
    index = _Index(graph)
    dense = _dense(index, source)
    new_nodes: list[onnx.NodeProto] = []
    convs = 0
    for node in graph.node:
        if node.op_type == "Conv" and index.int8_weight(node.input[1]) is not None:
            new_nodes.extend(_hybrid_conv(node, index, source))
            convs += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(index.added)
    return model, Hybrid(convs, dense)


class _Index:
    """Producers, consumers and constants of a graph, and the initializers added to it."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.added: list[onnx.TensorProto] = []
        self.refresh()
        self.taken = {*self.initializers, *self.producers, *(i.name for i in graph.input)}

    def refresh(self) -> None:
        """Producers and consumers again, after nodes changed."""
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return constant_of(self.producers[name]) if name in self.producers else None

    def int8_weight(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
        """``(int8 values, scale, zero point, axis)`` when ``name`` is a DequantizeLinear of int8 constants."""
        node = self.producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        values = self.constant(node.input[0])
        if values is None or values.dtype != np.int8:
            return None
        scale = self.constant(node.input[1])
        zero = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
        return values, scale, zero, int(attr(node, "axis", 1))

    def name(self, base: str) -> str:
        name = unique(base, self.taken)
        self.taken.add(name)
        return name

    def const(self, value: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.added.append(numpy_helper.from_array(np.asarray(value), name))
        return name


# float32 holds every integer below 2**24 exactly: a convolution whose sums of integer products stay below
# it is computed exactly by any float32 kernel, in any order, with or without FMA.
EXACT_IN_FLOAT32 = 2**24


def _hybrid_conv(conv: onnx.NodeProto, index: _Index, source: str) -> list[onnx.NodeProto]:
    """The nodes that compute ``conv`` as TFLite's hybrid kernel does, ending in ``conv``'s output.

    The quantized input minus its zero point is an integer in ``[-255, 255]``. Where ``255 * sum |w|`` of every
    output channel stays below 2**24, onnxruntime's float32 Conv sums those integers exactly (every partial sum
    is an integer below 2**24) and fast, depthwise included; otherwise ConvInteger sums them in int32.
    """
    values, scale, zero, axis = index.int8_weight(conv.input[1])
    what = f"{source}: the hybrid convolution {conv.name or conv.output[0]!r}"
    if np.any(zero != 0) or (np.size(scale) > 1 and axis != 0):
        raise ExportError(f"{what} has int8 weights with a zero point or another axis than TFLite writes")
    if attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or values.ndim != 4:
        raise ExportError(f"{what} is not a 2-D convolution with explicit padding")
    channels = values.shape[0]
    scale = np.asarray(scale, np.float32)
    per_channel = scale.size > 1  # TFLite: per-channel weights take the asymmetric kernels, per-tensor symmetric
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bias = index.constant(conv.input[2])
        if bias is None:
            raise ExportError(f"{what} has a bias that is not a constant")
    p = conv.output[0]
    nodes: list[onnx.NodeProto] = []

    def op(kind: str, inputs: list[str], **attrs) -> str:
        out = index.name(f"{p}_hybrid_{kind}")
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def c(value, dtype) -> str:
        return index.const(np.asarray(value, dtype), f"{p}_hybrid_const")

    def round_away(x: str, dtype) -> str:
        """TfLiteRound, half away from zero: ONNX's Round (half to even), and ``x + sign(x) / 2`` on exact ties."""
        nearest = op("Round", [x])
        tie = op("Equal", [op("Abs", [op("Sub", [x, nearest])]), c(0.5, dtype)])
        return op("Where", [tie, op("Add", [x, op("Mul", [op("Sign", [x]), c(0.5, dtype)])]), nearest])

    x = conv.input[0]
    low = op("ReduceMin", [x], axes=[1, 2, 3], keepdims=1)  # [N,1,1,1]: one range per image
    high = op("ReduceMax", [x], axes=[1, 2, 3], keepdims=1)
    in_float = 255 * float(np.abs(values.astype(np.int64)).reshape(channels, -1).sum(1).max()) < EXACT_IN_FLOAT32
    pads = list(attr(conv, "pads", [0, 0, 0, 0]))
    if not in_float:  # the padding on the float input, where 0 quantizes to the zero point exactly
        x = op("Pad", [x, c([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64), c(0, np.float32)])
    if per_channel:
        # AsymmetricQuantizeFloats: the range, step and zero point in double, the values in float32
        rmin = op("Cast", [op("Min", [low, c(0, np.float32)])], to=TensorProto.DOUBLE)
        rmax = op("Cast", [op("Max", [high, c(0, np.float32)])], to=TensorProto.DOUBLE)
        span = op("Sub", [rmax, rmin])
        empty = op("Equal", [span, c(0, np.float64)])  # an all-zero input: TFLite's scale 1, offset 0
        step = op("Where", [empty, c(1, np.float64), op("Div", [span, c(255, np.float64)])])
        zero_point = op("Where", [empty, c(0, np.float64), op("Sub", [c(-128, np.float64), op("Div", [rmin, step])])])
        zero_point = op(
            "Cast",
            [op("Clip", [round_away(zero_point, np.float64), c(-128, np.float64), c(127, np.float64)])],
            to=TensorProto.FLOAT,
        )
        step32 = op("Cast", [step], to=TensorProto.FLOAT)
        inverse = op("Div", [c(1, np.float32), step32])
        value = op("Add", [zero_point, op("Mul", [x, inverse])])
        low_q, high_q = -128, 127
    else:
        # SymmetricQuantizeFloats: max |x| in 127 steps, in float32
        span = op("Max", [op("Abs", [low]), op("Abs", [high])])
        empty = op("Equal", [span, c(0, np.float32)])
        step32 = op("Where", [empty, c(1, np.float32), op("Div", [span, c(127, np.float32)])])
        inverse = op("Where", [empty, c(1, np.float32), op("Div", [c(127, np.float32), span])])
        value = op("Mul", [inverse, x])
        zero_point = c(0, np.float32)
        low_q, high_q = -127, 127
    quantized = op("Clip", [round_away(value, np.float32), c(low_q, np.float32), c(high_q, np.float32)])
    geometry = {
        "strides": list(attr(conv, "strides", [1, 1])), "dilations": list(attr(conv, "dilations", [1, 1])),
        "group": int(attr(conv, "group", 1)), "kernel_shape": list(values.shape[2:]),
    }  # fmt: skip
    if in_float:  # integers (q - zero point) times integer weights, summed exactly in float32; padding adds 0
        sums = op(
            "Conv",
            [op("Sub", [quantized, zero_point]), c(values.astype(np.float32), np.float32)],
            pads=pads,
            **geometry,
        )
    else:  # uint8 (q + 128) and weights + 128, zero point 128: onnxruntime's u8u8 kernels, exact in int32
        as_uint8 = op("Cast", [op("Add", [quantized, c(128, np.float32)])], to=TensorProto.UINT8)
        weights = c((values.astype(np.int16) + 128).astype(np.uint8), np.uint8)
        sums = op("ConvInteger", [as_uint8, weights, "", c(128, np.uint8)], **geometry)
        # sum (q + 128) w counts the zero point plus 128 once per weight: subtract it, per image and channel
        offset = op("Cast", [op("Add", [zero_point, c(128, np.float32)])], to=TensorProto.INT32)
        weight_sums = c(values.astype(np.int32).sum(axis=(1, 2, 3)).reshape(1, channels, 1, 1), np.int32)
        sums = op("Cast", [op("Sub", [sums, op("Mul", [offset, weight_sums])])], to=TensorProto.FLOAT)
    scales = op("Mul", [step32, c(scale.reshape(1, -1, 1, 1), np.float32)])  # input scale * weight scale
    result = op("Mul", [sums, scales])
    if bias is not None:
        result = op("Add", [result, c(np.asarray(bias, np.float32).reshape(1, channels, 1, 1), np.float32)])
    nodes.append(helper.make_node("Identity", [result], [conv.output[0]], name=index.name(f"{p}_hybrid")))
    return nodes


def _dense(index: _Index, source: str) -> DenseBound | None:
    """Find the hybrid fully connected layer (at most one: the classifier on the pooled features) and give it
    TFLite's quantization of its input, one row at a time (:func:`_quantized_rows`), in place of tf2onnx's
    DynamicQuantizeLinear -> DequantizeLinear pair (which quantizes the whole batch at once)."""
    graph = index.graph
    dense = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(index.int8_weight(i) for i in n.input)]
    if not dense:
        if any(n.op_type == "DynamicQuantizeLinear" for n in graph.node):
            raise ExportError(f"{source}: a DynamicQuantizeLinear that is not a fully connected layer's input")
        return None
    if len(dense) > 1 or dense[0].op_type != "MatMul" or index.int8_weight(dense[0].input[0]) is not None:
        raise ExportError(
            f"{source}: {len(dense)} fully connected layers with int8 weights; npcam reproduces a dynamic-range model "
            "whose only int8 fully connected layer is the classifier on the pooled features"
        )
    (matmul,) = dense
    rows = matmul.input[0]
    pair = index.producers.get(rows)
    asymmetric = pair is not None and pair.op_type == "DequantizeLinear" and pair.input[0] in index.producers
    asymmetric = asymmetric and index.producers[pair.input[0]].op_type == "DynamicQuantizeLinear"
    if asymmetric:  # tf2onnx's pair: DynamicQuantizeLinear(x) -> DequantizeLinear
        dynamic = index.producers[pair.input[0]]
        if list(pair.input) != list(dynamic.output) or len(index.consumers.get(pair.output[0], [])) != 1:
            raise ExportError(
                f"{source}: a DynamicQuantizeLinear that tf2onnx did not write for a fully connected layer"
            )
        rows = dynamic.input[0]
    if any(n.op_type == "DynamicQuantizeLinear" and not (asymmetric and n is dynamic) for n in graph.node):
        raise ExportError(f"{source}: a DynamicQuantizeLinear that is not the fully connected layer's input")
    node = index.producers.get(rows)
    while node is not None and node.op_type in SHAPE_ONLY:
        node = index.producers.get(node.input[0])
    if node is None or node.op_type not in POOLING:
        raise ExportError(
            f"{source}: the int8 fully connected layer {matmul.name!r} does not read the pooled features; npcam "
            "reproduces a dynamic-range model whose only int8 fully connected layer is the classifier on them"
        )
    new, quantized = _quantized_rows(rows, asymmetric, index)
    kept = [n for n in graph.node if not (asymmetric and (n is pair or n is dynamic))]
    at = next(i for i, n in enumerate(kept) if n is matmul)
    matmul.input[0] = quantized
    del graph.node[:]
    graph.node.extend(kept[:at] + new + kept[at:])
    index.refresh()
    values, scale, zero, axis = index.int8_weight(matmul.input[1])
    shape = [1] * values.ndim
    shape[axis % values.ndim] = -1
    zero = np.asarray(zero, np.float64).reshape(shape if zero.size > 1 else ())
    weight = (values.astype(np.float64) - zero) * np.asarray(scale, np.float64).reshape(shape if scale.size > 1 else ())
    return DenseBound(float(np.abs(weight).sum(axis=0).max()), asymmetric)  # weight [C, K]


def _quantized_rows(rows: str, asymmetric: bool, index: _Index) -> tuple[list[onnx.NodeProto], str]:
    """The nodes that quantize and dequantize each row of ``rows`` (float ``[N, C]``) as TFLite's hybrid fully
    connected kernel does: asymmetric, the range ``[min(x, 0), max(x, 0)]`` in 255 steps (as uint8: TFLite's
    int8 + 128, zero point ``-min / step`` rounded); symmetric, ``max |x|`` in 127 steps around 128.

    Only ops npcam's head computes and differentiates: the step and zero point reach QuantizeLinear and
    DequantizeLinear as their scale and zero point, which get no gradient, so Grad-CAM's gradient through the
    pair is the straight-through one (the dequantized weights), as for an int8 model's head. It rounds half to
    even where TFLite rounds half away from zero: they differ only on exact ties.
    """
    nodes: list[onnx.NodeProto] = []

    def op(kind: str, inputs: list[str], **attrs) -> str:
        out = index.name(f"{rows}_row_{kind}")
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def c(value, dtype) -> str:
        return index.const(np.asarray(value, dtype), f"{rows}_row_const")

    tiny = c(np.finfo(np.float32).tiny, np.float32)  # an all-zero row: any step quantizes it to its zero point
    if asymmetric:
        low = op("Min", [op("ReduceMin", [rows], axes=[-1], keepdims=0), c(0, np.float32)])  # [N]
        high = op("Max", [op("ReduceMax", [rows], axes=[-1], keepdims=0), c(0, np.float32)])
        step = op("Max", [op("Div", [op("Sub", [high, low]), c(255, np.float32)]), tiny])
        zero = op("QuantizeLinear", [op("Div", [op("Neg", [low]), step]), c(1, np.float32), c(0, np.uint8)])
    else:
        step = op(
            "Max", [op("Div", [op("ReduceMax", [op("Abs", [rows])], axes=[-1], keepdims=0), c(127, np.float32)]), tiny]
        )
        zero = op(
            "QuantizeLinear",
            [op("Add", [op("Mul", [step, c(0, np.float32)]), c(128, np.float32)]), c(1, np.float32), c(0, np.uint8)],
        )
    quantized = op("QuantizeLinear", [rows, step, zero], axis=0)
    return nodes, op("DequantizeLinear", [quantized, step, zero], axis=0)
