"""Split any ONNX image classifier into npcam's trunk and head (needs onnx, not torch).

The cut goes at the input of the *last global average pooling*: the one whose
output reaches the scores only through nodes that depend on nothing but the
pooled vector and constants (poolings inside squeeze-excitation blocks feed
back into the trunk, so they are not it). A global pooling is a
GlobalAveragePool, a ReduceMean over the two spatial axes (NCHW or NHWC), or
an AveragePool whose kernel covers the whole map.

- The **trunk** is everything the pooling's input needs, with npcam's contract
  added around it: input ``image`` float32 ``[N,3,H,W]`` RGB (Transpose nodes
  for NHWC models, a channel flip for BGR ones) and output ``features``
  ``[N,C,h,w]``. Batch, height and width are made dynamic where the trunk runs
  that way.
- The **head** is the rest, up to the scores before any final Softmax (or
  Sigmoid: a multi-label model). Shape
  arithmetic (``Shape -> Slice -> Concat -> Reshape``) is evaluated here, so
  the head is a short list of ops on the pooled vector (:class:`npcam.head.GraphHead`).
  If every op is affine (Gemm, MatMul, Add, BatchNormalization, Flatten, ...),
  the head is folded into one ``W p + b`` (:class:`npcam.head.AffineHead`), and
  the bundle gets the paper's CAM.

Anything else is refused with one line saying why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from npcam.head import OPS, AffineHead, GraphHead, Op, dequantize, quantize

from .errors import ExportError
from .sizes import native_size

# A grey model sees the luma of npcam's RGB input (ITU-R BT.601, as Pillow's convert("L")).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Ops that leave a tensor as it is at inference.
NOOPS = {"Identity", "Dropout"}
# Head ops that keep the head affine, so that it folds into W p + b.
AFFINE = {"Gemm", "MatMul", "Add", "Sub", "BatchNormalization", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
          "Transpose", "Conv", "Neg", "ReduceMean", "ReduceSum", "Expand"}  # fmt: skip
# Reductions whose axes come as an attribute, or as a second input from opset 13 (ReduceSum) or 18 (the rest).
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceL2"}
# Mul and Div keep it affine when one side is a constant.
SCALING = {"Mul", "Div"}


@dataclass
class Split:
    """A classifier split at its last global pooling.

    Attributes
    ----------
    trunk : the trunk as an ONNX model in npcam's contract
    head : the head, affine (folded) or a graph of ops
    input_size : the input ``(height, width)`` the model was made for
    fixed_size : True when the trunk only runs at ``input_size``
    stride : input pixels per feature cell
    output : what the model's output is: "logits", "probabilities", "log_probabilities" or "sigmoid"
    layout : the original input layout, "NCHW" or "NHWC"
    channels : the original input's channels: 3, or 1 for a grey model (the trunk takes the luma of RGB)
    output_step : the step of the original's quantized probabilities (0: not quantized)
    """

    trunk: onnx.ModelProto
    head: AffineHead | GraphHead
    input_size: tuple[int, int]
    fixed_size: bool
    stride: int
    output: str
    layout: str
    channels: int = 3
    output_step: float = 0.0


def split(
    model: onnx.ModelProto,
    input_size: int | tuple[int, int] | None = None,
    bgr: bool = False,
    output: str | None = None,
) -> Split:
    """Split ``model`` (an image classifier) into a trunk and a head; raises :class:`ExportError` with the reason."""
    graph = model.graph
    image = _image_input(graph)
    layout = "NCHW" if _dims(image)[1] in (1, 3) else "NHWC"
    channels = _dims(image)[1 if layout == "NCHW" else 3]
    if channels == 1 and bgr:
        raise ExportError("--bgr does not apply: the model takes one (grey) channel")
    static_hw = _dims(image)[2:] if layout == "NCHW" else _dims(image)[1:3]
    size = native_size(static_hw, input_size)  # (height, width)
    scores_name, output_kind, output_step = _scores(graph, output)
    values = _Values(model, image.name, layout, size, channels)
    pool, head_nodes, kinds = _find_head(graph, scores_name, values)
    ops, arrays, pooled_shape, scores_name = _head_ops(model, pool, head_nodes, kinds, scores_name, values)
    trunk = _trunk(model, image.name, pool.input[0], layout, bgr, values.pool_layout(pool), channels)
    # An AveragePool's kernel covers the whole map at this size only: elsewhere the model computes something else.
    features, fixed_size = _check_trunk(trunk, size, pooled_shape, any_size=pool.op_type != "AveragePool")
    head = _fold(GraphHead(ops, arrays, pooled_shape, pool.output[0], scores_name))
    stride = _stride(size, features)
    return Split(trunk, head, size, fixed_size, stride, output_kind, layout, channels, output_step)


# The model's input and output


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); npcam needs one image input"
        )
    image = inputs[0]
    dims = _dims(image)
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError(f"input {image.name!r} is not float32; npcam feeds normalized float32 images")
    if len(dims) != 4 or (dims[1] not in (1, 3) and dims[3] not in (1, 3)):
        raise ExportError(
            f"input {image.name!r} has shape {dims}; npcam needs an image [N,3,H,W] or [N,H,W,3] (or 1 grey channel)"
        )
    return image


def _scores(graph: onnx.GraphProto, name: str | None) -> tuple[str, str, float]:
    """The tensor holding the class scores, what the model outputs, and the step of its output's quantization.

    A final Softmax or Sigmoid is set aside, and so is a QuantizeLinear -> DequantizeLinear pair after it
    (onnxruntime's quantizer writes one): the original's probabilities are then on a grid of that step.
    """
    names = [o.name for o in graph.output]
    if name is None:
        if len(names) != 1:
            raise ExportError(f"the model has {len(names)} outputs ({', '.join(names)}); name one with --output")
        name = names[0]
    elif name not in names:
        raise ExportError(f"the model has no output {name!r} (it has {', '.join(names)})")
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(name)
    while node is not None and node.op_type in NOOPS:
        name, node = node.input[0], producers.get(node.input[0])
    step = 0.0
    quantizer = producers.get(node.input[0]) if node is not None and node.op_type == "DequantizeLinear" else None
    if quantizer is not None and quantizer.op_type == "QuantizeLinear":
        scale = _constant_values(graph).get(node.input[1])
        before = producers.get(quantizer.input[0])
        if scale is not None and scale.size == 1 and before is not None:
            node, step = before, float(scale.reshape(()))
    kinds = {
        "Softmax": "probabilities",
        "LogSoftmax": "log_probabilities",
        "Sigmoid": "sigmoid",
    }  # sigmoid: multi-label
    if node is not None and node.op_type in kinds:
        return node.input[0], kinds[node.op_type], step
    return name, "logits", 0.0


# Evaluating parts of the graph


class _Values:
    """Concrete values of the model's tensors, found by running it (onnx's reference evaluator).

    Used for shapes (the pooling's input) and to fold the head's shape
    arithmetic. Runs at the chosen input size with batch 1 and 2.
    """

    def __init__(self, model: onnx.ModelProto, image: str, layout: str, size: tuple[int, int], channels: int = 3):
        self.model, self.image, self.layout, self.size, self.channels = model, image, layout, size, channels
        self._shapes: dict[str, list[int]] | None = None
        input_dims = _dims(next(i for i in model.graph.input if i.name == image))
        self.one_image = input_dims[0] == 1  # made for batch 1: its shape constants may say 1 for the batch

    def input_array(self, batch: int, seed: int = 0) -> np.ndarray:
        c, (h, w) = self.channels, self.size
        shape = (batch, c, h, w) if self.layout == "NCHW" else (batch, h, w, c)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def shapes(self) -> dict[str, list[int]]:
        """Static shapes of every tensor at batch 1, by ONNX shape inference on a fixed-size copy."""
        if self._shapes is None:
            fixed = self._fixed_size_copy()
            try:
                inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
            except Exception:  # shape inference is best-effort; unknown shapes stay unknown
                inferred = fixed
            self._shapes = {}
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                dims = _dims(v)
                if dims and all(isinstance(d, int) and d > 0 for d in dims):
                    self._shapes[v.name] = dims
        return self._shapes

    def shape(self, name: str) -> list[int] | None:
        """One tensor's shape at batch 1: from shape inference, else by running the model in onnxruntime."""
        if name not in self.shapes():
            fixed = self._fixed_size_copy()
            fixed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            try:
                value = _session(fixed).run([name], {self.image: self.input_array(1)})[0]
            except Exception:
                return None
            self._shapes[name] = list(value.shape)
        return self._shapes[name]

    def _fixed_size_copy(self) -> onnx.ModelProto:
        fixed = copy.deepcopy(self.model)
        image = next(i for i in fixed.graph.input if i.name == self.image)
        c, (h, w) = self.channels, self.size
        dims = [1, c, h, w] if self.layout == "NCHW" else [1, h, w, c]
        for d, v in zip(image.type.tensor_type.shape.dim, dims):
            d.Clear()
            d.dim_value = v
        del fixed.graph.value_info[:]
        return fixed

    def pool_layout(self, pool: onnx.NodeProto) -> str:
        if pool.op_type == "ReduceMean" and sorted(_reduce_axes(pool, self)) == [1, 2]:
            return "NHWC"
        return "NCHW"


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                values[node.output[0]] = np.array(helper.get_attribute_value(attr))
            elif attr.name in ("value_floats", "value_ints"):
                values[node.output[0]] = np.array(helper.get_attribute_value(attr))
    return values


def _reduce_axes(node: onnx.NodeProto, values: _Values) -> list[int]:
    """ReduceMean's axes (attribute, or a constant input from opset 18), normalized for a rank-4 input."""
    axes = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        constant = _constant_values(values.model.graph).get(node.input[1])
        axes = None if constant is None else constant.astype(int).ravel().tolist()
    return [a % 4 for a in axes] if axes is not None else [0, 1, 2, 3]


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


# Finding the head


def _is_global_pool(node: onnx.NodeProto, values: _Values) -> bool:
    shape = values.shape(node.input[0]) if node.input else None
    if node.op_type == "GlobalAveragePool":
        return shape is None or len(shape) == 4
    if node.op_type == "ReduceMean":
        if shape is not None and len(shape) != 4:
            return False
        return sorted(_reduce_axes(node, values)) in ([2, 3], [1, 2])
    if node.op_type == "AveragePool":
        pads = _attr(node, "pads", [0, 0, 0, 0])
        return (
            shape is not None and len(shape) == 4 and list(_attr(node, "kernel_shape")) == shape[2:] and not any(pads)
        )
    return False


def _find_head(
    graph: onnx.GraphProto, scores: str, values: _Values
) -> tuple[onnx.NodeProto, list[onnx.NodeProto], dict]:
    """The last global pooling whose output reaches the scores through a self-contained head.

    Returns the pooling node, the head's nodes in graph order, and each head
    tensor's kind (see :func:`_kinds`).
    """
    pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean", "AveragePool")]
    pools = [n for n in pools if _is_global_pool(n, values)]
    if not pools:
        raise ExportError(
            "no global average pooling found: CAM and Grad-CAM need a head on globally pooled features "
            "(a VGG-style Flatten + FC over the whole map is not supported)" + _no_pool_hint(graph, values)
        )
    reason = ""
    for pool in reversed(pools):
        try:
            kinds = _kinds(graph, pool.output[0])
            return pool, _head_nodes(graph, pool, scores, kinds), kinds
        except ExportError as e:
            reason = str(e)
    raise ExportError(reason)


def _no_pool_hint(graph: onnx.GraphProto, values: _Values) -> str:
    """Why no pooling was found, where it can be told: an AveragePool that tiles the map (kernel = stride) but
    covers all of it only at another input size, or the integer pooling of a QOperator-format int8 model."""
    if any(n.op_type == "QLinearGlobalAveragePool" for n in graph.node):
        return (
            "; this int8 model pools with QLinearGlobalAveragePool (the QOperator format): quantize it in the "
            "QDQ format (onnxruntime's QuantFormat.QDQ), which npcam reads, or export the float model"
        )
    pools = [n for n in graph.node if n.op_type == "AveragePool"]
    shape = values.shape(pools[-1].input[0]) if pools else None
    kernel = list(_attr(pools[-1], "kernel_shape")) if pools else []
    if shape is None or len(shape) != 4 or list(_attr(pools[-1], "strides", [1, 1])) != kernel:
        return ""
    return (
        f"; its last AveragePool has a {kernel[0]}x{kernel[1]} kernel, but its input is {shape[2]}x{shape[3]} "
        f"at {values.size[0]}x{values.size[1]} px: give the model's input size with --input-size"
    )


def _kinds(graph: onnx.GraphProto, pooled: str) -> dict[str, str]:
    """What each tensor depends on, given the pooled tensor: one forward sweep in graph order.

    ``data``: the pooled values; ``shape``: only tensor shapes (Shape nodes) of
    such tensors, and constants; ``const``: constants only; ``mixed``: the
    pooled values and tensors from before the pooling. Tensors of the trunk
    get no entry.
    """
    kinds = {name: "const" for name in _constant_values(graph)}
    kinds[pooled] = "data"
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        found = [kinds.get(i) for i in node.input if i]
        if node.op_type == "Shape":  # of any tensor, the trunk's too (``x.view(x.size(0), -1)``)
            kind = "const" if found[0] == "const" else "shape"
        elif "data" in found or "mixed" in found:
            kind = "data" if None not in found else "mixed"
        elif None in found:
            kind = None
        else:
            kind = "shape" if "shape" in found else "const"
        if kind is not None:
            kinds.update((o, kind) for o in node.output if o)
    return kinds


def _head_nodes(graph: onnx.GraphProto, pool: onnx.NodeProto, scores: str, kinds: dict) -> list[onnx.NodeProto]:
    """The nodes the scores need after the pooling, in graph order; they must read nothing from before it."""
    if kinds.get(scores) != "data":
        raise ExportError(
            f"the scores are computed from tensors before the last global pooling ({pool.op_type} {pool.name!r}), "
            "not from the pooled features alone"
        )
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    needed: dict[int, onnx.NodeProto] = {}
    todo = [scores]
    while todo:
        name = todo.pop()
        if name == pool.output[0] or name in initializers or not name:
            continue
        node = producers[name]
        if id(node) in needed:
            continue
        if kinds.get(name) not in ("data", "shape", "const"):
            node = _trunk_source(node, producers, kinds)
            raise ExportError(
                f"the head reads {node.output[0]!r} ({node.op_type} {node.name!r}), which is computed from before "
                f"the last global pooling ({pool.op_type} {pool.name!r}); npcam needs a head that depends only on "
                "the pooled features"
            )
        needed[id(node)] = node
        todo += [i for i in node.input if node.op_type != "Shape" or kinds.get(i) in ("data", "shape", "const")]
    return [n for n in graph.node if id(n) in needed]


def _outer_shapes(nodes: list[onnx.NodeProto], kinds: dict) -> list[str]:
    """Tensors from before the pooling whose shape (never their values) the head reads."""
    return sorted({n.input[0] for n in nodes if n.op_type == "Shape" and kinds.get(n.input[0]) is None})


def _trunk_source(node: onnx.NodeProto, producers: dict, kinds: dict) -> onnx.NodeProto:
    """Where a head node that mixes in trunk tensors gets them: the first producer of a pure trunk tensor."""
    while kinds.get(node.output[0]) == "mixed":
        inputs = [i for i in node.input if i in producers]
        source = next((i for i in inputs if kinds.get(i) is None), None)
        source = source or next((i for i in inputs if kinds.get(i) == "mixed"), None)
        if source is None:
            break
        node = producers[source]
    return node


# From ONNX nodes to npcam's head ops


def _head_ops(
    model: onnx.ModelProto, pool: onnx.NodeProto, nodes: list[onnx.NodeProto], kinds: dict, scores: str, values: _Values
) -> tuple[list[Op], dict[str, np.ndarray], list[int], str]:
    """Turn the head's nodes into :class:`npcam.head.Op` s, folding constants and shape arithmetic.

    The head runs in onnx's reference evaluator on random pooled vectors of
    batch 1 and 2: what does not depend on the pooled values is folded into
    constant arrays (a shape that follows the batch size may only be a
    Reshape's target). Returns the ops, their arrays, the pooled tensor's
    shape and the name of the scores.
    """
    pooled_name = pool.output[0]
    pooled_shape = _pooled_shape(pool, values)
    outer = {name: values.shape(name) for name in _outer_shapes(nodes, kinds)}
    if None in outer.values():
        raise ExportError(f"cannot tell the shape of {', '.join(k for k, v in outer.items() if v is None)}")
    for node in nodes:
        if kinds.get(node.output[0]) == "data" and not (node.op_type in OPS or _is_noop(node)):
            raise ExportError(
                f"the head after the last global pooling uses the op {node.op_type} ({node.name!r}), which npcam's "
                f"NumPy head does not implement (it has {', '.join(sorted(OPS))})"
            )
    try:
        evaluator = ReferenceEvaluator(
            _subgraph(model, nodes, pooled_name, pooled_shape, scores, outer),
            new_ops=[QuantizeLinear, DequantizeLinear],
        )
    except Exception as e:  # the reference evaluator lacks some op or version
        raise ExportError(f"cannot evaluate the head's shape arithmetic ({_first_line(e)})") from None
    runs = []
    for batch in (1,) if values.one_image else (1, 2):
        pooled = np.random.default_rng(batch).standard_normal((batch, *pooled_shape[1:])).astype(np.float32)
        feed = {pooled_name: pooled, **{k: np.zeros((batch, *v[1:]), np.float32) for k, v in outer.items()}}
        try:
            runs.append({**feed, **evaluator.run(None, feed, intermediate=True)})
        except Exception as e:  # the reference evaluator raises whatever the op's code raises
            raise ExportError(
                f"the head does not run on a batch of {batch} pooled vectors ({_first_line(e)})"
            ) from None
    if values.one_image:
        runs.append(runs[0])  # nothing to tell apart: a batch-sized 1 in a shape is taken as the batch
    ops, arrays, alias = [], {}, {}

    def ref(name: str) -> str:
        """The name an op reads: a computed tensor, or a new array holding a folded constant."""
        name = alias.get(name, name)
        if kinds.get(name) == "data":
            return name
        value = np.asarray(runs[0][name])
        if not np.array_equal(value, np.asarray(runs[1][name])):
            raise ExportError(f"the head uses {name!r}, a value that changes with the batch size, as a constant")
        arrays[f"c{len(arrays)}"] = value
        return f"c{len(arrays) - 1}"

    for node in nodes:
        if kinds.get(node.output[0]) != "data":
            continue  # folded: constants and shape arithmetic
        if _is_noop(node):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            continue
        ops.append(_convert(node, ref, runs))
    scores = alias.get(scores, scores)
    if not ops:  # the classes are the pooled channels (a conv classifier before the pooling, as in SqueezeNet)
        ops, scores = [Op("Flatten", (pooled_name,), "scores", {"axis": 1})], "scores"
    return ops, arrays, pooled_shape, scores


def _is_noop(node: onnx.NodeProto) -> bool:
    """Identity, Dropout, and Casts to float: nothing at inference, in float64."""
    return node.op_type in NOOPS or (
        node.op_type == "Cast" and _attr(node, "to") in (TensorProto.FLOAT, TensorProto.DOUBLE)
    )


class QuantizeLinear(OpRun):  # named as the op: the reference evaluator keys new ops by class name
    """QuantizeLinear of every opset for the reference evaluator (it has only some versions), as npcam's head."""

    op_domain = ""

    def _run(self, x, scale, zero_point=None, axis=1, **unused):
        q = quantize(x, scale, zero_point, axis)
        return (q.astype(zero_point.dtype if zero_point is not None else np.uint8),)


class DequantizeLinear(OpRun):
    op_domain = ""

    def _run(self, q, scale, zero_point=None, axis=1, **unused):
        return (dequantize(q, scale, zero_point, axis).astype(np.asarray(scale).dtype),)


def _pooled_shape(pool: onnx.NodeProto, values: _Values) -> list[int]:
    shape = values.shape(pool.input[0])
    if shape is None:
        raise ExportError(f"cannot tell the shape of the pooling's input {pool.input[0]!r}")
    n, a, b, c = shape
    keep = bool(_attr(pool, "keepdims", 1)) if pool.op_type == "ReduceMean" else True
    if values.pool_layout(pool) == "NHWC":
        return [-1, 1, 1, c] if keep else [-1, c]
    return [-1, a, 1, 1] if keep else [-1, a]


def _subgraph(model, nodes, pooled_name, pooled_shape, scores, outer) -> onnx.ModelProto:
    """A model from the pooled tensor to the scores, with the constants it needs, for the reference evaluator.

    ``outer`` maps the trunk tensors whose shapes the head reads to their shapes: they become inputs too.
    """
    needed = {i for n in nodes for i in n.input}
    initializers = [i for i in model.graph.initializer if i.name in needed]
    pooled = helper.make_tensor_value_info(pooled_name, TensorProto.FLOAT, ["N", *pooled_shape[1:]])
    shaped = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["N", *v[1:]]) for k, v in outer.items()]
    out = helper.make_tensor_value_info(scores, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "head", [pooled, *shaped], [out], initializers)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _convert(node: onnx.NodeProto, ref, runs) -> Op:
    """One head node as an npcam Op; attributes given as inputs in newer opsets become attributes."""
    op, out = node.op_type, node.output[0]
    inputs = [i for i in node.input]

    def constant(i: int):
        return np.asarray(runs[0][inputs[i]]) if i < len(inputs) and inputs[i] else None

    if op == "Gemm":
        attrs = {k: _attr(node, k, d) for k, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))}
        return Op(op, tuple(ref(i) for i in inputs if i), out, attrs)
    if op == "Reshape":
        target = np.asarray(runs[0][inputs[1]]).astype(int).tolist()
        batch2 = np.asarray(runs[1][inputs[1]]).astype(int).tolist()
        in_shape = np.asarray(runs[0][inputs[0]]).shape
        if target[1:] != batch2[1:] or target[0] not in (0, -1, 1) or batch2[0] not in (0, -1, 1, 2):
            raise ExportError(f"the head's Reshape {node.name!r} does not keep the batch dimension ({target})")
        rest = target[1:]
        if -1 not in rest and int(np.prod(rest)) != int(np.prod(in_shape[1:])):
            raise ExportError(f"the head's Reshape {node.name!r} mixes samples of a batch")
        return Op(op, (ref(inputs[0]),), out, {"shape": [0, *rest]})
    if op == "Flatten":
        if _attr(node, "axis", 1) != 1:
            raise ExportError(f"the head's Flatten {node.name!r} does not keep the batch dimension")
        return Op(op, (ref(inputs[0]),), out, {"axis": 1})
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr(node, "axes")
        if axes is None:
            axes = constant(1).astype(int).ravel().tolist()
        rank = len(np.asarray(runs[0][inputs[0]]).shape) + (len(axes) if op == "Unsqueeze" else 0)
        axes = [a % rank for a in axes]
        if 0 in axes:
            raise ExportError(f"the head's {op} {node.name!r} acts on the batch dimension")
        return Op(op, (ref(inputs[0]),), out, {"axes": axes})
    if op == "Transpose":
        perm = list(_attr(node, "perm"))
        if perm[0] != 0:
            raise ExportError(f"the head's Transpose {node.name!r} moves the batch dimension")
        return Op(op, (ref(inputs[0]),), out, {"perm": perm})
    if op == "Clip":
        low, high = _attr(node, "min"), _attr(node, "max")
        low = float(constant(1)) if low is None and constant(1) is not None else low
        high = float(constant(2)) if high is None and constant(2) is not None else high
        attrs = {k: v for k, v in (("min", low), ("max", high)) if v is not None}
        return Op(op, (ref(inputs[0]),), out, attrs)
    if op in REDUCTIONS:
        rank = len(np.asarray(runs[0][inputs[0]]).shape)
        axes = _attr(node, "axes")
        if axes is None:
            axes = constant(1).astype(int).ravel().tolist() if constant(1) is not None else []
        if not axes and not _attr(node, "noop_with_empty_axes", 0):
            axes = list(range(rank))
        axes = [a % rank for a in axes]
        if 0 in axes:
            raise ExportError(f"the head's {op} {node.name!r} reduces over the batch")
        return Op(op, (ref(inputs[0]),), out, {"axes": axes, "keepdims": int(_attr(node, "keepdims", 1))})
    if op == "Expand":
        shape = np.asarray(runs[0][inputs[1]]).astype(int).tolist()
        batch2 = np.asarray(runs[1][inputs[1]]).astype(int).tolist()
        if len(shape) < np.asarray(runs[0][out]).ndim:  # broadcast over trailing axes only
            return Op(op, (ref(inputs[0]),), out, {"shape": shape})
        if shape[1:] != batch2[1:] or (shape[0] != batch2[0] and (shape[0], batch2[0]) != (1, 2)):
            raise ExportError(f"the head's Expand {node.name!r} does not keep the batch dimension ({shape})")
        return Op(op, (ref(inputs[0]),), out, {"shape": [1, *shape[1:]]})  # 1: the input's own batch
    if op == "Conv":
        weight = constant(1)
        x_shape = np.asarray(runs[0][inputs[0]]).shape
        if (
            weight is None
            or weight.shape[2:] != (1, 1)
            or tuple(x_shape[2:]) != (1, 1)
            or _attr(node, "group", 1) != 1
            or any(_attr(node, "pads", [0]))
        ):
            raise ExportError(f"the head's Conv {node.name!r} is not a 1x1 convolution on the pooled 1x1 map")
        return Op(op, tuple(ref(i) for i in inputs if i), out, {})
    if op == "Pow":
        return Op(op, (ref(inputs[0]), ref(inputs[1])), out, {})
    attrs = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
    if op == "BatchNormalization":
        attrs = {"epsilon": attrs.get("epsilon", 1e-5)}
    if op == "LayerNormalization":
        attrs = {"axis": attrs.get("axis", -1), "epsilon": attrs.get("epsilon", 1e-5)}
    return Op(op, tuple(ref(i) for i in inputs if i), out, attrs)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fold(head: GraphHead) -> AffineHead | GraphHead:
    """An affine head as ``W p + b`` (exact: its value at 0 and on each basis vector, in float64)."""
    variables = {head.input} | {op.output for op in head.ops}
    for op in head.ops:
        varying = [name in variables for name in op.inputs]
        scaling = op.op == "Mul" and sum(varying) == 1 or op.op == "Div" and varying == [True, False]
        if not (op.op in AFFINE or scaling):
            return head
    channels = head.channels
    probe = np.vstack([np.zeros(channels), np.eye(channels)])
    values = head.forward_float64(probe)
    bias = values[0]
    return AffineHead((values[1:] - bias).T.astype(np.float32), bias.astype(np.float32))


# The trunk


def _trunk(
    model: onnx.ModelProto, image: str, features: str, layout: str, bgr: bool, pool_layout: str, channels: int = 3
) -> onnx.ModelProto:
    """The nodes the pooling's input needs, wrapped so that it reads ``image`` NCHW RGB and writes ``features`` NCHW.

    Identity nodes are rewired away (torch writes them to share equal
    constants, and the int8 quantizer wants constants as initializers), and
    every node gets a unique name (the quantizer keys on names).
    """
    if features == image:
        raise ExportError("the pooling reads the model input directly; there is no trunk")
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    needed, todo = {}, [features]
    while todo:
        node = producers.get(todo.pop())
        if node is None or id(node) in needed:
            continue
        needed[id(node)] = node
        todo += [i for i in node.input if i]
        for attr in node.attribute:  # subgraphs (If/Loop) read outer tensors too
            if attr.type == onnx.AttributeProto.GRAPH:
                todo += [i for n in attr.g.node for i in n.input]
    nodes = [copy.deepcopy(n) for n in graph.node if id(n) in needed]
    same = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Identity"}

    def source(name: str) -> str:
        while name in same:
            name = same[name]
        return name

    nodes = [n for n in nodes if n.op_type != "Identity"]
    features = source(features)
    if features == image:
        raise ExportError("the pooling reads the model input directly; there is no trunk")
    names = {o for n in nodes for o in n.output} | {i.name for i in graph.initializer} | {image}
    # Tensors that already bear the contract's names inside the model make way for them.
    clashes = {n: _unique(f"{n}_in_model", names) for n in ("image", "features") if n in names - {image, features}}
    adapters, extra = [], []
    inner = "image"
    if bgr:
        inner = _unique("npcam_rgb_to_bgr", names)
        # Gather along the channels: the same op in every opset (Slice takes its steps as inputs only from 10).
        order = _unique("npcam_bgr_order", names)
        adapters.append(helper.make_node("Gather", ["image", order], [inner], name=inner, axis=1))
        extra.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), order))
    if channels == 1:
        inner = _unique("npcam_luma", names)
        weights = _unique("npcam_luma_weights", names)
        adapters.append(helper.make_node("Conv", ["image", weights], [inner], name=inner))
        extra.append(numpy_helper.from_array(LUMA.reshape(1, 3, 1, 1), weights))
    if layout == "NHWC":
        nhwc = _unique("npcam_nchw_to_nhwc", names)
        adapters.append(helper.make_node("Transpose", [inner], [nhwc], name=nhwc, perm=[0, 2, 3, 1]))
        inner = nhwc
    out = "features" if pool_layout == "NCHW" else _unique("npcam_nhwc_features", names)
    rename = {**clashes, image: inner, features: out}
    for node in nodes:
        node.input[:] = [rename.get(source(i), source(i)) if i else i for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    if pool_layout == "NHWC":
        adapters.append(
            helper.make_node("Transpose", [out], ["features"], name="npcam_nhwc_to_nchw", perm=[0, 3, 1, 2])
        )
    used = {i for n in nodes + adapters for i in n.input}
    initializers = [copy.deepcopy(i) for i in graph.initializer if rename.get(i.name, i.name) in used] + extra
    for i in initializers:
        i.name = rename.get(i.name, i.name)
    taken: set[str] = set()
    for n, node in enumerate(nodes + adapters):
        if not node.name or node.name in taken:
            node.name = _unique(f"{node.op_type}_{n}", taken)
        taken.add(node.name)
    new_graph = helper.make_graph(
        adapters[: len(adapters) - (pool_layout == "NHWC")]
        + nodes
        + adapters[len(adapters) - (pool_layout == "NHWC") :],
        "npcam_trunk",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "C", "h", "w"])],
        initializers,
    )
    trunk = helper.make_model(new_graph, opset_imports=model.opset_import, producer_name="npcam export")
    trunk.ir_version = model.ir_version
    return trunk


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def set_input_dims(trunk: onnx.ModelProto, batch: int | str, height: int | str, width: int | str) -> None:
    """Set the trunk's ``image`` dimensions: numbers are fixed, strings are symbolic (dynamic)."""
    dims = trunk.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (batch, 3, height, width)):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v


def _stride(size: tuple[int, int], features: np.ndarray) -> int:
    """Input pixels per feature cell, from the longer side (more cells: the closer estimate)."""
    side = int(size[1] >= size[0])
    return max(1, round(size[side] / features.shape[2 + side]))


def _check_trunk(
    trunk: onnx.ModelProto, size: tuple[int, int], pooled_shape: list[int], any_size: bool = True
) -> tuple[np.ndarray, bool]:
    """Run the trunk at the native size, then find out whether it also takes other batches and sizes.

    Returns the native features and whether the size is fixed (always, unless
    ``any_size``). The batch stays fixed at 1 when a batch of 2 does not give
    the two single results.
    """
    channels = int(np.prod(pooled_shape[1:]))
    rng = np.random.default_rng(0)
    height, width = size
    x = rng.standard_normal((2, 3, height, width), dtype=np.float32)
    try:
        session = _session(trunk)
        single = [session.run(["features"], {"image": x[i : i + 1]})[0] for i in range(2)]
    except Exception as e:
        raise ExportError(f"the trunk cut from the model does not run ({_first_line(e)})") from None
    features = single[0]
    if features.ndim != 4 or features.shape[1] != channels:
        raise ExportError(
            f"the trunk gives features of shape {list(features.shape)}, the head expects {channels} channels"
        )
    try:
        both = session.run(["features"], {"image": x})[0]
        batch_ok = both.shape == (2, *features.shape[1:]) and np.allclose(
            both, np.concatenate(single), rtol=1e-4, atol=1e-5 * np.abs(features).max()
        )
    except Exception:
        batch_ok = False
    stride = _stride(size, features)
    dynamic = any_size
    for h, w in ((height + 2 * stride, width), (height, width + 3 * stride)) if any_size else ():
        try:
            out = session.run(["features"], {"image": rng.standard_normal((1, 3, h, w), dtype=np.float32)})[0]
            dynamic &= (
                out.shape[1] == channels and abs(out.shape[2] - h / stride) <= 1 and abs(out.shape[3] - w / stride) <= 1
            )
        except Exception:
            dynamic = False
    set_input_dims(trunk, "N" if batch_ok else 1, "H" if dynamic else height, "W" if dynamic else width)
    return features, not dynamic


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
