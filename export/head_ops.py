"""From the head's ONNX nodes to npcam's head ops (:class:`npcam.head.Op`), constants and shapes folded.

The head runs in onnx's reference evaluator on random pooled vectors of batch
1 and 2 (batch 1 only for a model of batch 1): what does not depend on the
pooled values becomes a constant array, and attributes that newer opsets give
as inputs become attributes. The ops first compute one image, with the shapes
it has; :mod:`export.batch_axis` then follows the batch through them and
rewrites those shapes to run at any batch. The reference evaluator gets
QuantizeLinear and DequantizeLinear of every opset (:class:`QuantizeLinear`),
computed as npcam's head computes them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from npcam.head import OPS, Op, dequantize, quantize

from . import batch_axis, head_finder
from .errors import ExportError
from .graph import GraphIndex, Values, attr, first_line, is_noop

# Ops converted into others: Split into Slices, ScatterND (a block write) into Slices and a Concat.
REWRITTEN = {"Split", "ScatterND"}
# Reductions whose axes come as an attribute, or as a second input from opset 13 (ReduceSum) or 18 (the rest).
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax", "ReduceMin"}


def head_ops(
    g: GraphIndex,
    model: onnx.ModelProto,
    start: str,
    start_shape: list[int],
    nodes: list[onnx.NodeProto],
    kinds: dict,
    scores: str,
    values: Values,
    sides: dict[str, list[int]] | None = None,
) -> tuple[list[Op], dict[str, np.ndarray], list[int], str]:
    """Turn the head's nodes into :class:`npcam.head.Op` s, folding constants and shape arithmetic.

    The head runs in onnx's reference evaluator on random pooled vectors of
    batch 1 and 2: what does not depend on the pooled values is folded into
    constant arrays (a shape that follows the batch size may only be a
    Reshape's or an Expand's), and the batch is followed through the ops
    (:func:`export.batch_axis.follow`). ``start`` is the head's input (the pooled tensor, or the layer cut at) of shape
    ``start_shape`` (-1 for the batch), ``sides`` the trunk tensors it also reads, with their shapes. Returns
    the ops, their arrays, the input's shape and the name of the scores.
    """
    pooled_name, pooled_shape, sides = start, start_shape, sides or {}
    outer = {name: values.shape(name) for name in head_finder.outer_shapes(nodes, kinds)}
    if None in outer.values():
        raise ExportError(f"cannot tell the shape of {', '.join(k for k, v in outer.items() if v is None)}")
    for node in nodes:
        if kinds.get(node.output[0]) == "data" and not (node.op_type in OPS or node.op_type in REWRITTEN or is_noop(node)):
            raise ExportError(
                f"the head uses the op {node.op_type} ({node.name!r}), which npcam's "
                f"NumPy head does not implement (it has {', '.join(sorted(OPS))})"
            )
    try:
        evaluator = ReferenceEvaluator(
            subgraph(model, nodes, pooled_name, pooled_shape, scores, {**outer, **sides}),
            new_ops=[QuantizeLinear, DequantizeLinear],
        )
    except Exception as e:  # the reference evaluator lacks some op or version
        raise ExportError(f"cannot evaluate the head's shape arithmetic ({first_line(e)})") from None
    runs = []
    for batch in (1,) if values.one_image else (1, 2):
        rng = np.random.default_rng(batch)
        pooled = rng.standard_normal((batch, *pooled_shape[1:])).astype(np.float32)
        feed = {pooled_name: pooled, **{k: np.zeros((batch, *v[1:]), np.float32) for k, v in outer.items()}}
        feed.update({k: rng.standard_normal((batch, *v[1:])).astype(np.float32) for k, v in sides.items()})
        try:
            runs.append({**feed, **evaluator.run(None, feed, intermediate=True)})
        except Exception as e:  # the reference evaluator raises whatever the op's code raises
            raise ExportError(f"the head does not run on a batch of {batch} pooled vectors ({first_line(e)})") from None
    if values.one_image:
        runs.append(runs[0])  # nothing to tell apart: a batch-sized 1 in a shape is taken as the batch
    arrays, alias, names = {}, {}, {}

    def ref(name: str) -> str:
        """The name an op reads: a computed tensor, or an array holding a folded constant (one per tensor)."""
        name = alias.get(name, name)
        if kinds.get(name) == "data":
            return name
        if name not in names:
            value = np.asarray(runs[0][name])
            if not np.array_equal(value, np.asarray(runs[1][name])):
                raise ExportError(f"the head uses {name!r}, a value that changes with the batch size, as a constant")
            names[name] = f"c{len(arrays)}"
            arrays[names[name]] = value
        return names[name]

    ops = []
    for node in nodes:
        if kinds.get(node.output[0]) != "data":
            continue  # folded: constants and shape arithmetic
        if is_noop(node):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            continue
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        converted = convert(node, ref, runs, kinds, opset)
        ops += converted if isinstance(converted, list) else [converted]
    scores = alias.get(scores, scores)
    try:  # the shapes as one image has them, rewritten where the batch is
        ops = _batched(ops, arrays, runs, [pooled_name, *sides], scores, values.one_image)
    except batch_axis.Lost as e:
        raise ExportError(f"npcam cannot keep the images of a batch apart in the head ({e})") from None
    if not ops:  # the classes are the pooled channels (a conv classifier before the pooling, as in SqueezeNet)
        ops, scores = [Op("Flatten", (pooled_name,), "scores", {"axis": 1})], "scores"
    return ops, arrays, pooled_shape, scores


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


def subgraph(model, nodes, pooled_name, pooled_shape, scores, outer) -> onnx.ModelProto:
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


def convert(node: onnx.NodeProto, ref, runs, kinds: dict | None = None, opset: int = 17) -> Op | list[Op]:
    """One head node as an npcam Op (or a few), as it computes one image; attributes given as inputs in newer
    opsets become attributes. Shapes are as at batch 1 (a Reshape's target is its output's shape), for
    :func:`export.batch_axis.follow` to rewrite where the batch is."""
    op, out = node.op_type, node.output[0]
    inputs = [i for i in node.input]
    if op == "Reshape":
        return Op(op, (ref(inputs[0]),), out, {"shape": list(np.asarray(runs[0][out]).shape)})
    if op == "Expand":
        return Op(op, (ref(inputs[0]),), out, {"shape": np.asarray(runs[0][inputs[1]]).astype(int).tolist()})

    def kinds_of(names) -> set:
        return {(kinds or {}).get(name) for name in names if name}

    def constant(i: int):
        return np.asarray(runs[0][inputs[i]]) if i < len(inputs) and inputs[i] else None

    if op == "Gemm":
        attrs = {k: attr(node, k, d) for k, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))}
        return Op(op, tuple(ref(i) for i in inputs if i), out, attrs)
    if op == "Flatten":
        return Op(op, (ref(inputs[0]),), out, {"axis": int(attr(node, "axis", 1))})
    if op in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes")
        if axes is None:
            axes = constant(1).astype(int).ravel().tolist()
        rank = len(np.asarray(runs[0][inputs[0]]).shape) + (len(axes) if op == "Unsqueeze" else 0)
        axes = [a % rank for a in axes]
        # An axis 0 that is not the batch (attention moves it: [L, N, C]) is checked by the batch test of the head.
        return Op(op, (ref(inputs[0]),), out, {"axes": axes})
    if op == "Transpose":
        perm = attr(node, "perm")
        perm = list(perm) if perm is not None else list(range(np.asarray(runs[0][inputs[0]]).ndim))[::-1]
        return Op(op, (ref(inputs[0]),), out, {"perm": perm})
    if op == "Slice" and len(inputs) > 1:  # starts, ends, axes, steps: inputs from opset 10
        names = ("starts", "ends", "axes", "steps")
        attrs = {k: constant(i).astype(int).ravel().tolist() for i, k in enumerate(names, 1) if constant(i) is not None}
        return Op(op, (ref(inputs[0]),), out, attrs)
    if op == "Split":
        return _split_as_slices(node, inputs, runs, ref)
    if op == "Pad" and len(inputs) > 1:
        attrs = {"mode": _plain(attr(node, "mode", b"constant")), "pads": constant(1).astype(int).ravel().tolist()}
        if constant(3) is not None:
            attrs["axes"] = constant(3).astype(int).ravel().tolist()
        if constant(2) is not None and float(constant(2).reshape(-1)[0]) != 0:
            raise ExportError(f"the head's Pad {node.name!r} pads with a value other than 0")
        return Op(op, (ref(inputs[0]),), out, attrs)
    if op == "Clip":
        low, high = attr(node, "min"), attr(node, "max")
        low = float(constant(1)) if low is None and constant(1) is not None else low
        high = float(constant(2)) if high is None and constant(2) is not None else high
        attrs = {k: v for k, v in (("min", low), ("max", high)) if v is not None}
        return Op(op, (ref(inputs[0]),), out, attrs)
    if op in REDUCTIONS:
        rank = len(np.asarray(runs[0][inputs[0]]).shape)
        axes = attr(node, "axes")
        if axes is None:
            axes = constant(1).astype(int).ravel().tolist() if constant(1) is not None else []
        if not axes and not attr(node, "noop_with_empty_axes", 0):
            axes = list(range(rank))
        axes = [a % rank for a in axes]
        return Op(op, (ref(inputs[0]),), out, {"axes": axes, "keepdims": int(attr(node, "keepdims", 1))})
    if op == "Conv":
        if kinds_of(inputs[1:]) & {"data", "mixed"}:
            raise ExportError(f"the head's Conv {node.name!r} computes its weights; npcam's head needs constant ones")
        names = ("strides", "pads", "dilations", "group", "auto_pad", "kernel_shape")
        attrs = {k: _plain(attr(node, k)) for k in names if attr(node, k) is not None}
        return Op(op, tuple(ref(i) for i in inputs if i), out, attrs)
    if op == "Resize":
        return _resize(node, inputs, runs, ref)
    if op == "ScatterND":
        return _scatter_as_concat(node, inputs, runs, ref)
    if op == "Pow":
        return Op(op, (ref(inputs[0]), ref(inputs[1])), out, {})
    attrs = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
    if op in ("Softmax", "LogSoftmax") and opset < 13:
        return _softmax_before_13(node, inputs, runs, ref)
    if op == "BatchNormalization":
        attrs = {"epsilon": attrs.get("epsilon", 1e-5)}
    if op == "LayerNormalization":
        attrs = {"axis": attrs.get("axis", -1), "epsilon": attrs.get("epsilon", 1e-5)}
    return Op(op, tuple(ref(i) for i in inputs if i), out, attrs)


def _batched(ops: list[Op], arrays, runs, starts: list[str], scores: str, one_image: bool) -> list[Op]:
    """The ops of one image rewritten to run at any batch (:func:`export.batch_axis.follow`), from the tensors'
    shapes at batch 1 and, for a model of dynamic batch, at batch 2. Raises :class:`export.batch_axis.Lost`."""
    shapes = _with_made_tensors(ops, arrays, {name: np.asarray(value).shape for name, value in runs[0].items()})
    shapes2 = None
    if not one_image:
        shapes2 = _with_made_tensors(ops, arrays, {name: np.asarray(value).shape for name, value in runs[1].items()})
    try:
        return batch_axis.follow(ops, arrays, shapes, starts, scores, shapes2)
    except batch_axis.Lost:
        if shapes2 is None:
            raise
    # A file that runs at batch 2 but mixes its images there (PP-PicoDet's heads reshape to a literal batch of 1):
    # what it computes for one image is what the head must compute, so the batch is followed as in a batch-1 file.
    return batch_axis.follow(ops, arrays, shapes, starts, scores, None)


def _with_made_tensors(ops: list[Op], arrays, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with those of the tensors that no node of the file computes, made by a conversion that writes one
    node as several ops (a Split's slices, a ScatterND's concat), from the ops' shape rules."""
    shapes = dict(shapes)
    for op in ops:
        if op.output not in shapes:
            given = [shapes[n] if n in shapes else np.asarray(arrays[n]).shape for n in op.inputs]
            shapes[op.output] = tuple(OPS[op.op].shape(given, op.attrs))
    return shapes


def _softmax_before_13(node: onnx.NodeProto, inputs: list[str], runs, ref) -> Op | list[Op]:
    """Softmax and LogSoftmax before opset 13 normalize over every axis from ``axis`` on (default 1) together: the
    input reshaped to keep the axes before it, normalized over the last, and reshaped back."""
    shape = np.asarray(runs[0][inputs[0]]).shape
    axis = int(attr(node, "axis", 1)) % len(shape)
    if axis == len(shape) - 1:
        return Op(node.op_type, (ref(inputs[0]),), node.output[0], {"axis": -1})
    flat = f"{node.output[0]}_npcam_flat"
    normalized = f"{node.output[0]}_npcam_normalized"
    return [
        Op("Reshape", (ref(inputs[0]),), flat, {"shape": [0] * axis + [-1]}),
        Op(node.op_type, (flat,), normalized, {"axis": -1}),
        Op("Reshape", (normalized,), node.output[0], {"shape": [0, *shape[1:]]}),
    ]


def _scatter_as_concat(node: onnx.NodeProto, inputs: list[str], runs, ref) -> list[Op]:
    """ScatterND writing one block along one axis (torch's export of ``y[..., 0:2] = v``, as YOLOv5 before 6.0 wrote
    its decode): the data before and after the block, the updates in it, joined along that axis.

    The constant indices must list every position of the block, row-major (so the updates are the block itself);
    anything else is refused."""
    data, indices = np.asarray(runs[0][inputs[0]]), np.asarray(runs[0][inputs[1]]).astype(np.int64)
    reduction = _plain(attr(node, "reduction", "none"))
    if reduction != "none" or indices.ndim < 1 or indices.shape[-1] > data.ndim:
        raise ExportError(f"the head's ScatterND {node.name!r} is not a plain block write, which npcam runs as a concat")
    depth = indices.shape[-1]
    ranges = [np.unique(indices[..., k]) for k in range(depth)]
    block = [(int(r[0]), int(r[-1]) + 1) for r in ranges]
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in block], indexing="ij"), axis=-1).reshape(-1, depth)
    partial = [k for k, (a, b) in enumerate(block) if (a, b) != (0, data.shape[k])]
    if not np.array_equal(indices.reshape(-1, depth), grid) or len(partial) > 1 or partial == [0]:
        raise ExportError(f"the head's ScatterND {node.name!r} is not a block along one axis, which npcam runs as a concat")
    out = node.output[0]
    if not partial:  # the whole tensor: the updates
        return [Op("Reshape", (ref(inputs[2]),), out, {"shape": [0, *data.shape[1:]]})]
    axis = partial[0]
    a, b = block[axis]
    shape = [*data.shape[:axis], b - a, *data.shape[axis + 1 :]]
    parts, ops = [], [Op("Reshape", (ref(inputs[2]),), f"{out}_npcam_block", {"shape": [0, *shape[1:]]})]
    source = ref(inputs[0])
    if a > 0:
        ops.append(Op("Slice", (source,), f"{out}_npcam_before", {"starts": [0], "ends": [a], "axes": [axis]}))
        parts.append(f"{out}_npcam_before")
    parts.append(f"{out}_npcam_block")
    if b < data.shape[axis]:
        ops.append(Op("Slice", (source,), f"{out}_npcam_after", {"starts": [b], "ends": [data.shape[axis]], "axes": [axis]}))
        parts.append(f"{out}_npcam_after")
    return [*ops, Op("Concat", tuple(parts), out, {"axis": axis})]


def _resize(node: onnx.NodeProto, inputs: list[str], runs, ref) -> Op:
    """Resize with its constant scales or sizes as attributes (opset 10: X and scales; 11 on: X, roi, scales,
    sizes), the output's own size checked against what the rule computes."""
    x = np.asarray(runs[0][inputs[0]])
    attrs = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
    given = [np.asarray(runs[0][name]) if i < len(inputs) and name else None for i, name in enumerate(inputs)]
    scales_at = 1 if len(inputs) == 2 else 2  # opset 10 has no roi
    scales = given[scales_at] if scales_at < len(given) else None
    sizes = given[3] if len(given) > 3 else None
    if scales is not None and scales.size:
        attrs["scales"] = [float(v) for v in scales.ravel()]
    elif sizes is not None and sizes.size:
        attrs["sizes"] = [int(v) for v in sizes.ravel()]
    if len(inputs) == 2:  # opset 10: asymmetric coordinates, nearest rounded down
        attrs.setdefault("coordinate_transformation_mode", "asymmetric")
        attrs.setdefault("nearest_mode", "floor")
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise ExportError(f"the head's Resize {node.name!r} crops (tf_crop_and_resize), which npcam does not run")
    for unused in ("cubic_coeff_a", "exclude_outside", "extrapolation_value"):
        attrs.pop(unused, None)
    op = Op("Resize", (ref(inputs[0]),), node.output[0], attrs)
    try:
        shape = OPS["Resize"].shape([x.shape], attrs)
    except ValueError as e:
        raise ExportError(f"the head's Resize {node.name!r} cannot run in npcam ({e})") from None
    if tuple(shape) != np.asarray(runs[0][node.output[0]]).shape:
        raise ExportError(f"the head's Resize {node.name!r} gives {list(np.asarray(runs[0][node.output[0]]).shape)}, "
                          f"npcam's rule {list(shape)}")  # fmt: skip
    return op


def _split_as_slices(node: onnx.NodeProto, inputs: list[str], runs, ref) -> list[Op]:
    """A Split as one Slice per output (npcam's ops have one output each)."""
    x = np.asarray(runs[0][inputs[0]])
    axis = int(attr(node, "axis", 0)) % x.ndim
    sizes = [np.asarray(runs[0][o]).shape[axis] for o in node.output]
    source = ref(inputs[0])
    ops, begin = [], 0
    for name, size in zip(node.output, sizes):
        if name:
            ops.append(Op("Slice", (source,), name, {"starts": [begin], "ends": [begin + size], "axes": [axis]}))
        begin += size
    return ops


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
