"""Where to cut: the model's image input and scores, its last global pooling, and the head's nodes.

The cut goes at the input of the *last global average pooling*: the one whose
output reaches the scores only through nodes that depend on nothing but the
pooled vector and constants (poolings inside squeeze-excitation blocks feed
back into the trunk, so they are not it). A global pooling is a
GlobalAveragePool, a ReduceMean over the two spatial axes (NCHW or NHWC), or
an AveragePool whose kernel covers the whole map. A ReduceMean that also
reduces the batch axis (BatchNorm statistics, ``axes=[0,2,3]``) is not one.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import TensorProto

from .errors import ExportError
from .graph import GraphIndex, Values, attr, dims, is_noop

POOLS = ("GlobalAveragePool", "ReduceMean", "AveragePool")


# The model's input and output


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The model's one image input, float32 ``[N,C,H,W]`` or ``[N,H,W,C]`` with C 3 or 1."""
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); npcam needs one image input"
        )
    image = inputs[0]
    shape = dims(image)
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError(f"input {image.name!r} is not float32; npcam feeds normalized float32 images")
    if len(shape) != 4 or (shape[1] not in (1, 3) and shape[3] not in (1, 3)):
        raise ExportError(
            f"input {image.name!r} has shape {shape}; npcam needs an image [N,3,H,W] or [N,H,W,3] (or 1 grey channel)"
        )
    return image


def scores(g: GraphIndex, name: str | None) -> tuple[str, str, float]:
    """The tensor holding the class scores, what the model outputs, and the step of its output's quantization.

    A final Softmax or Sigmoid is set aside (through Identity, Dropout and
    float Cast nodes after it), and so is a QuantizeLinear -> DequantizeLinear
    pair after it (onnxruntime's quantizer writes one): the original's
    probabilities are then on a grid of that step.
    """
    names = [o.name for o in g.graph.output]
    if name is None:
        if len(names) != 1:
            raise ExportError(f"the model has {len(names)} outputs ({', '.join(names)}); name one with --output")
        name = names[0]
    elif name not in names:
        raise ExportError(f"the model has no output {name!r} (it has {', '.join(names)})")
    node = g.producers.get(name)
    while node is not None and is_noop(node):
        name, node = node.input[0], g.producers.get(node.input[0])
    step = 0.0
    pair = (
        g.match_parents(node, ["QuantizeLinear"]) if node is not None and node.op_type == "DequantizeLinear" else None
    )
    if pair:
        scale = g.constants.get(node.input[1])
        before = g.producers.get(pair[0].input[0])
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


# Poolings


def reduce_axes(node: onnx.NodeProto, g: GraphIndex) -> list[int]:
    """A reduction's axes (attribute, or a constant input from opset 18), normalized for a rank-4 input."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        constant = g.constant(node.input[1])
        axes = None if constant is None else constant.astype(int).ravel().tolist()
    return sorted(a % 4 for a in axes) if axes is not None else [0, 1, 2, 3]


def is_global_pool(node: onnx.NodeProto, g: GraphIndex, values: Values) -> bool:
    """Whether ``node`` averages each channel over the whole map (and nothing else)."""
    if node.op_type not in POOLS:
        return False
    shape = values.shape(node.input[0]) if node.input else None
    if node.op_type == "GlobalAveragePool":
        return shape is None or len(shape) == 4
    if node.op_type == "ReduceMean":
        if shape is not None and len(shape) != 4:
            return False
        return reduce_axes(node, g) in ([2, 3], [1, 2])  # never the batch axis: BatchNorm statistics are not poolings
    pads = attr(node, "pads", [0, 0, 0, 0])
    return shape is not None and len(shape) == 4 and list(attr(node, "kernel_shape")) == shape[2:] and not any(pads)


def pool_layout(pool: onnx.NodeProto, g: GraphIndex) -> str:
    """The layout of the map the pooling reads: NHWC for a ReduceMean over axes 1 and 2."""
    return "NHWC" if pool.op_type == "ReduceMean" and reduce_axes(pool, g) == [1, 2] else "NCHW"


def pooled_shape(pool: onnx.NodeProto, g: GraphIndex, values: Values) -> list[int]:
    """The pooled tensor's shape, with -1 for the batch."""
    shape = values.shape(pool.input[0])
    if shape is None:
        raise ExportError(f"cannot tell the shape of the pooling's input {pool.input[0]!r}")
    n, a, b, c = shape
    keep = bool(attr(pool, "keepdims", 1)) if pool.op_type == "ReduceMean" else True
    if pool_layout(pool, g) == "NHWC":
        return [-1, 1, 1, c] if keep else [-1, c]
    return [-1, a, 1, 1] if keep else [-1, a]


# The head


def find_head(g: GraphIndex, scores_name: str, values: Values) -> tuple[onnx.NodeProto, list[onnx.NodeProto], dict]:
    """The last global pooling whose output reaches the scores through a self-contained head.

    Returns the pooling node, the head's nodes in graph order, and each head
    tensor's kind (see :func:`kinds`).
    """
    pools = [n for n in g.graph.node if is_global_pool(n, g, values)]
    if not pools:
        raise ExportError(
            "no global average pooling found: CAM and Grad-CAM need a head on globally pooled features "
            "(a VGG-style Flatten + FC over the whole map is not supported)" + no_pool_hint(g, values)
        )
    reason = ""
    for pool in reversed(pools):
        try:
            found = kinds(g, pool.output[0])
            return pool, head_nodes(g, pool, scores_name, found), found
        except ExportError as e:
            reason = str(e)
    raise ExportError(reason)


def no_pool_hint(g: GraphIndex, values: Values) -> str:
    """Why no pooling was found, where it can be told: the integer pooling of a QOperator-format int8 model,
    or the last AveragePool, with ``--input-size`` only when another input size makes it cover the whole map."""
    if any(n.op_type == "QLinearGlobalAveragePool" for n in g.graph.node):
        return (
            "; this int8 model pools with QLinearGlobalAveragePool (the QOperator format): quantize it in the "
            "QDQ format (onnxruntime's QuantFormat.QDQ), which npcam reads, or export the float model"
        )
    pools = [n for n in g.graph.node if n.op_type == "AveragePool"]
    shape = values.shape(pools[-1].input[0]) if pools else None
    if shape is None or len(shape) != 4:
        return ""
    pool, kernel, (h, w) = pools[-1], list(attr(pools[-1], "kernel_shape")), shape[2:]
    what = f"; its last AveragePool ({kernel[0]}x{kernel[1]} over the {h}x{w} map at {_side(values.size)} px)"
    size = global_size(pool, kernel, (h, w), values)
    if size is not None:
        return (
            f"{what} covers the whole map at {_side(size)} px: "
            f"give the model's input size with --input-size {_side(size)}"
        )
    fixed = all(isinstance(d, int) and d > 0 for d in _spatial(values))
    why = "the model's input size is fixed" if fixed else "no input size makes it cover the whole map"
    return f"{what} is a local pooling, not a global one ({why})"


def global_size(pool: onnx.NodeProto, kernel: list[int], hw: tuple[int, int], values: Values) -> tuple[int, int] | None:
    """The input ``(height, width)`` (each >= 8) at which ``pool`` covers the whole map, checked on the model.

    The map scales with the input (``size / map`` pixels per cell, per side), so
    the candidate is ``size * kernel / map``; it counts only if the model's
    shapes there say so. A model whose input size is fixed has no other size.
    Returns None when there is no such size.
    """
    if any(attr(pool, "pads", [0])):
        return None
    if all(isinstance(d, int) and d > 0 for d in _spatial(values)):
        return None
    size = []
    for side, k, cells in zip(values.size, kernel, hw):
        candidate, rest = divmod(side * k, cells)
        if rest or candidate < 8:
            return None
        size.append(candidate)
    size = (size[0], size[1])
    if size == tuple(values.size):
        return None
    other = Values(values.model, values.image, values.layout, size, values.channels)
    shape = other.shape(pool.input[0])
    return size if shape is not None and list(shape[2:]) == kernel else None


def _spatial(values: Values) -> list:
    shape = dims(next(i for i in values.model.graph.input if i.name == values.image))
    return shape[2:] if values.layout == "NCHW" else shape[1:3]


def kinds(g: GraphIndex, pooled: str, sides: Sequence[str] = ()) -> dict[str, str]:
    """What each tensor depends on, given the pooled tensor (or the layer cut at): one forward sweep in graph order.

    ``data``: the pooled values (and the ``sides``, trunk tensors the head reads as inputs); ``shape``: only
    tensor shapes (Shape nodes) of such tensors, and constants; ``const``: constants only; ``mixed``: the
    pooled values and tensors from before the pooling. Tensors of the trunk
    get no entry. A node's captured reads (If branches) count as its inputs.
    """
    found = {name: "const" for name in g.constants}
    starts = {pooled, *sides}
    found.update((name, "data") for name in starts)
    for node in g.graph.node:
        if node.op_type == "Constant":
            continue
        reads = [found.get(i) for i in g.inputs(node)]
        if node.op_type == "Shape":  # of any tensor, the trunk's too (``x.view(x.size(0), -1)``)
            kind = "const" if reads[0] == "const" else "shape"
        elif "data" in reads or "mixed" in reads:
            kind = "data" if None not in reads else "mixed"
        elif None in reads:
            kind = None
        else:
            kind = "shape" if "shape" in reads else "const"
        if kind is not None:  # the starts stay data, even where one is computed from another (a detector's maps)
            found.update((o, kind) for o in node.output if o and o not in starts)
    return found


def head_nodes(g: GraphIndex, pool: onnx.NodeProto, scores_name: str, found: dict) -> list[onnx.NodeProto]:
    """The nodes the scores need after the pooling, in graph order; they must read nothing from before it."""
    if found.get(scores_name) != "data":
        raise ExportError(
            f"the scores are computed from tensors before the last global pooling ({pool.op_type} {pool.name!r}), "
            "not from the pooled features alone"
        )
    needed: dict[int, onnx.NodeProto] = {}
    todo = [scores_name]
    while todo:
        name = todo.pop()
        if name == pool.output[0] or name in g.initializers or not name:
            continue
        node = g.producers[name]
        if id(node) in needed:
            continue
        if found.get(name) not in ("data", "shape", "const"):
            node = _trunk_source(node, g, found)
            raise ExportError(
                f"the head reads {node.output[0]!r} ({node.op_type} {node.name!r}), which is computed from before "
                f"the last global pooling ({pool.op_type} {pool.name!r}); npcam needs a head that depends only on "
                "the pooled features"
            )
        needed[id(node)] = node
        todo += [i for i in g.inputs(node) if node.op_type != "Shape" or found.get(i) in ("data", "shape", "const")]
    return g.in_order(needed.values())


def outer_shapes(nodes: list[onnx.NodeProto], found: dict) -> list[str]:
    """Tensors from before the pooling whose shape (never their values) the head reads."""
    return sorted({n.input[0] for n in nodes if n.op_type == "Shape" and found.get(n.input[0]) is None})


def _trunk_source(node: onnx.NodeProto, g: GraphIndex, found: dict) -> onnx.NodeProto:
    """Where a head node that mixes in trunk tensors gets them: the first producer of a pure trunk tensor."""
    while found.get(node.output[0]) == "mixed":
        inputs = [i for i in g.inputs(node) if i in g.producers]
        source = next((i for i in inputs if found.get(i) is None), None)
        source = source or next((i for i in inputs if found.get(i) == "mixed"), None)
        if source is None:
            break
        node = g.producers[source]
    return node


def _side(size: tuple[int, int]) -> str:
    """An input size as the options take it: ``S`` for a square, else ``HxW``."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"
