"""Where to cut beyond global average pooling: the layer the maps are made of, per family, or the one named.

:func:`find_cut` tries, in order:

1. the last global average pooling with a self-contained head (:func:`export.head_finder.find_head`): a
   *pooled* head, as before this module (maps do not move);
2. a mean over the tokens of a ``[N, L, C]`` tensor with a self-contained head (a mean-pooled ViT): also a
   *pooled* head, the tokens laid on their grid by the trunk, so that an affine head after the mean is CAM;
3. the input of the global pooling of any kind that reaches the scores from the deepest map (global max
   pooling, avg + max concat pooling, a pooling whose head also reads tensors from before it): a *spatial* head;
4. the output of the last transformer block's first LayerNorm (the LayerNorm before the last attention
   Softmax, pytorch-grad-cam's ``blocks[-1].norm1``): a *token* head, its block's residual stream a side input;
5. the input of a Flatten of each image's whole ``[N, C, h, w]`` map (VGG's classifier): a *spatial* head.

A named layer (``--layer``) is cut at as it is. Any trunk tensor the head reads (a residual stream, a skip
connection) becomes a *side input*, constant for the gradient, as a forward hook at the layer makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from . import head_finder
from .errors import ExportError
from .graph import GraphIndex, Values, attr

# How many tokens may come before the patch tokens (CLS, distillation, registers).
MAX_PREFIX = 8


@dataclass
class Cut:
    """Where the model is split.

    Attributes
    ----------
    layer : the tensor the maps are made of (the trunk's ``features`` before any adapter)
    layout : ``"pooled"``, ``"spatial"`` or ``"tokens"`` (of the head's input)
    start : the head's input tensor: the pooling's output (pooled), else ``layer``
    start_shape : its shape, -1 for the batch
    nodes, kinds : the head's nodes in graph order, and what each tensor depends on (head_finder.kinds)
    sides : trunk tensors the head reads, and their shapes (-1 for the batch)
    pool : the pooling node (pooled heads), else None
    trunk_layout : how the trunk writes ``features``: "NCHW", "NHWC" (transposed) or "tokens" (laid on the grid)
    grid, prefix : tokens: the patch grid ``(gh, gw)`` and the tokens before it; the pooled token model's grid
    """

    layer: str
    layout: str
    start: str
    start_shape: list[int]
    nodes: list[onnx.NodeProto]
    kinds: dict
    sides: dict[str, list[int]] = field(default_factory=dict)
    pool: onnx.NodeProto | None = None
    trunk_layout: str = "NCHW"
    grid: tuple[int, int] | None = None
    prefix: int = 0
    fallback: str = ""  # a default cut beyond GAP: why there is no GAP cut, said too if this one fails


def find_cut(g: GraphIndex, scores: str, values: Values, layer: str | None = None) -> Cut:
    """The cut at ``layer`` (an ONNX tensor name), or at the family's default layer; refuses in one line."""
    if layer is not None:
        return _named(g, scores, values, layer)
    try:
        pool, nodes, found = head_finder.find_head(g, scores, values)
        return _pooled(g, pool, nodes, found, values)
    except ExportError as e:
        gap_reason = str(e)
        if "--input-size" in gap_reason:  # a global average pooling at the model's real size: say so
            raise
    reasons = []
    for candidate, family in default_layers(g, scores, values):
        try:
            cut = _token_mean(g, scores, values, candidate) if family == "token_mean" else cut_at(
                g, scores, values, candidate
            )
            cut.fallback = gap_reason
            return cut
        except ExportError as e:
            reasons.append(f"at {candidate!r} ({family}): {e}")
    if not reasons:
        raise ExportError(
            f"{gap_reason}; nor is there a spatial map or a token tensor in front of the scores to explain (a "
            "global max or concat pooling, a Flatten of the whole map, a transformer's blocks)"
        )
    raise ExportError("cannot cut " + "; ".join(reasons[:2]))


def _pooled(g: GraphIndex, pool, nodes, found, values: Values) -> Cut:
    shape = head_finder.pooled_shape(pool, g, values)
    trunk_layout = head_finder.pool_layout(pool, g)
    return Cut(pool.input[0], "pooled", pool.output[0], shape, nodes, found, pool=pool, trunk_layout=trunk_layout)


def _named(g: GraphIndex, scores: str, values: Values, layer: str) -> Cut:
    if layer not in g.producers:
        known = "an initializer, not a layer" if layer in g.constants else "no tensor of that name in the model"
        raise ExportError(f"--layer {layer!r}: {known}")
    try:  # the default GAP cut, named: keep its closed forms
        pool, nodes, found = head_finder.find_head(g, scores, values)
        if pool.input[0] == layer:
            return _pooled(g, pool, nodes, found, values)
    except ExportError:
        pass
    try:
        return cut_at(g, scores, values, layer)
    except ExportError as e:
        raise ExportError(f"--layer {layer!r}: {e}") from None


def default_layers(g: GraphIndex, scores: str, values: Values) -> list[tuple[str, str]]:
    """Candidate layers in the order tried, each ``(tensor, family)``, nearest the scores first in a family."""
    needed = g.ancestors([scores])
    needed_ids = {id(n) for n in needed}
    found: list[tuple[str, str]] = []
    for node in reversed(needed):  # token means
        shape = values.shape(node.input[0]) if node.input else None
        if node.op_type == "ReduceMean" and shape is not None and len(shape) == 3:
            if _axes3(node, g) == [1]:
                found.append((node.input[0], "token_mean"))
    pools = [n for n in needed if _is_any_global_pool(n, g, values)]
    # The deepest map first (a skip's earlier map is pooled too, sometimes later in graph order).
    for node in sorted(pools, key=lambda n: -g.position.get(id(g.producers.get(n.input[0])), -1)):
        found.append((channels_first(g, node.input[0]), "pooling"))
    softmaxes = [n for n in needed if n.op_type == "Softmax"]
    for node in reversed(needed):  # the last block's first LayerNorm: before the last attention Softmax
        shape = values.shape(node.input[0]) if node.input else None
        if node.op_type == "LayerNormalization" and shape is not None and len(shape) == 3:
            after = _descendants(g, node.output[0], needed_ids)
            if any(id(s) in after for s in softmaxes):
                found.append((node.output[0], "transformer"))
                break
    for node in reversed(needed):  # a Flatten of each image's whole map
        shape = values.shape(node.input[0]) if node.input else None
        out = values.shape(node.output[0]) if node.output else None
        whole = shape is not None and len(shape) == 4 and out == [1, shape[1] * shape[2] * shape[3]]
        if whole and node.op_type in ("Flatten", "Reshape"):
            found.append((channels_first(g, node.input[0]), "flatten"))
    unique: dict[str, str] = {}
    for name, family in found:
        unique.setdefault(name, family)
    return list(unique.items())


def nhwc_source(g: GraphIndex, name: str) -> str | None:
    """The ``[N, C, h, w]`` tensor that ``name`` is the channels-last transpose of (perm 0,2,3,1), or None.

    Converters from channels-last frameworks (tf2onnx for Keras and TFLite) run convolutions in NCHW and
    transpose back to NHWC after them, so a Keras Flatten or pooling reads an NHWC tensor.
    """
    node = g.producers.get(name)
    if node is not None and node.op_type == "Transpose" and list(attr(node, "perm", [])) == [0, 2, 3, 1]:
        return node.input[0]
    return None


def channels_first(g: GraphIndex, name: str) -> str:
    """``name``, or the NCHW tensor it transposes to channels-last: the map is explained channels first, and
    the Transpose joins the head."""
    return nhwc_source(g, name) or name


def _axes3(node: onnx.NodeProto, g: GraphIndex) -> list[int] | None:
    """A reduction's axes normalized for a rank-3 input."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        constant = g.constant(node.input[1])
        axes = None if constant is None else constant.astype(int).ravel().tolist()
    return sorted(a % 3 for a in axes) if axes is not None else None


def _is_any_global_pool(node: onnx.NodeProto, g: GraphIndex, values: Values) -> bool:
    """A pooling of each channel over the whole ``[N, C, h, w]`` map: average or max, in any of its ONNX forms."""
    shape = values.shape(node.input[0]) if node.input else None
    if shape is None or len(shape) != 4:
        return False
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return True
    if node.op_type in ("ReduceMean", "ReduceMax"):  # over h, w: of NCHW, or of a channels-last transpose
        axes = head_finder.reduce_axes(node, g)
        return axes == [2, 3] or (axes == [1, 2] and nhwc_source(g, node.input[0]) is not None)
    if node.op_type in ("AveragePool", "MaxPool"):
        return list(attr(node, "kernel_shape", [])) == shape[2:] and not any(attr(node, "pads", [0]))
    return False


def _descendants(g: GraphIndex, name: str, within: set[int]) -> set[int]:
    """ids of the nodes that read ``name``, directly or not, among ``within``."""
    seen: set[int] = set()
    todo = [name]
    while todo:
        for node in g.consumers.get(todo.pop(), []):
            if id(node) in within and id(node) not in seen:
                seen.add(id(node))
                todo += [o for o in node.output if o]
    return seen


def cut_at(g: GraphIndex, scores: str, values: Values, layer: str) -> Cut:
    """The head from ``layer`` (and the trunk tensors it reads, as side inputs) to the scores."""
    if layer not in g.producers:
        raise ExportError(f"{layer!r} is the model's input: there is no trunk before it to explain")
    shape = values.shape(layer)
    if shape is None:
        raise ExportError(f"cannot tell the shape of {layer!r}")
    if len(shape) not in (3, 4):
        raise ExportError(f"{layer!r} has shape {shape}: neither a map [N,C,h,w] nor tokens [N,L,C]")
    if len(shape) == 4 and nhwc_source(g, layer) is not None:
        raise ExportError(f"{layer!r} is channels-last (a transpose of {nhwc_source(g, layer)!r}): name that one")
    found = head_finder.kinds(g, layer)
    if found.get(scores) not in ("data", "mixed"):
        raise ExportError(f"the scores do not depend on {layer!r}")
    sides = side_inputs(g, scores, [layer], found)
    found = head_finder.kinds(g, layer, sides)
    nodes = nodes_between(g, scores, [layer, *sides], found)
    side_shapes = {}
    for name in sides:
        side_shape = values.shape(name)
        if side_shape is None:
            raise ExportError(f"cannot tell the shape of the side input {name!r}")
        side_shapes[name] = [-1, *side_shape[1:]]
    start_shape = [-1, *shape[1:]]
    if len(shape) == 4:
        return Cut(layer, "spatial", layer, start_shape, nodes, found, side_shapes)
    grid, prefix = token_grid(shape[1], values.size)
    return Cut(layer, "tokens", layer, start_shape, nodes, found, side_shapes, grid=grid, prefix=prefix)


def _token_mean(g: GraphIndex, scores: str, values: Values, layer: str) -> Cut:
    """A mean over the tokens of ``layer`` ``[N, L, C]`` with a head that reads nothing else: a pooled head."""
    shape = values.shape(layer)
    grid, prefix = token_grid(shape[1], values.size)
    if prefix:
        raise ExportError(f"the mean over {layer!r} includes {prefix} tokens that are not on the patch grid")
    means = [n for n in g.consumers.get(layer, []) if n.op_type == "ReduceMean" and _axes3(n, g) == [1]]
    reason = "no mean over its tokens"
    for mean in means:
        found = head_finder.kinds(g, mean.output[0])
        try:
            nodes = head_finder.head_nodes(g, mean, scores, found)
        except ExportError as e:
            reason = str(e)
            continue
        keep = bool(attr(mean, "keepdims", 1))
        start_shape = [-1, 1, shape[2]] if keep else [-1, shape[2]]
        return Cut(
            layer, "pooled", mean.output[0], start_shape, nodes, found, pool=mean, trunk_layout="tokens", grid=grid
        )
    raise ExportError(reason)


def side_inputs(g: GraphIndex, scores: str, layers: Sequence[str], found: dict) -> list[str]:
    """The trunk tensors (independent of ``layers``) whose values the head reads, in graph order."""
    sides: dict[str, None] = {}
    seen: set[str] = set()
    todo = [scores]
    while todo:
        name = todo.pop()
        if name in seen or name in layers or not name or name in g.constants:
            continue
        seen.add(name)
        kind = found.get(name)
        if kind is None:
            sides[name] = None
            continue
        node = g.producers.get(name)
        if node is None:
            continue
        if node.op_type == "Shape":
            continue  # shapes are folded; the tensor's values are not read
        if kind in ("data", "mixed"):
            todo += g.inputs(node)
    if not sides:
        return []
    order = {name: g.position[id(g.producers[name])] if name in g.producers else -1 for name in sides}
    return sorted(sides, key=order.get)


def nodes_between(g: GraphIndex, scores: str, starts: list[str], found: dict) -> list[onnx.NodeProto]:
    """The nodes the scores need from ``starts`` on, in graph order (Shape nodes of trunk tensors included)."""
    stop = set(starts)
    needed: dict[int, onnx.NodeProto] = {}
    todo = [scores]
    while todo:
        name = todo.pop()
        if name in stop or name in g.initializers or not name:
            continue
        node = g.producers.get(name)
        if node is None or id(node) in needed:
            continue
        if found.get(name) not in ("data", "shape", "const"):
            raise ExportError(f"the head reads {name!r} ({node.op_type} {node.name!r}), which it cannot take apart")
        needed[id(node)] = node
        todo += [i for i in g.inputs(node) if node.op_type != "Shape" or found.get(i) in ("data", "shape", "const")]
    return g.in_order(needed.values())


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """The patch grid ``(gh, gw)`` and prefix of ``tokens`` tokens from an image of ``size`` ``(H, W)``.

    The fewest prefix tokens for which the rest tile the image in square patches of a whole number of pixels.
    """
    height, width = size
    for prefix in range(min(MAX_PREFIX, tokens - 1) + 1):
        patches = tokens - prefix
        for gh in range(1, patches + 1):
            if patches % gh:
                continue
            gw = patches // gh
            if height % gh == 0 and width % gw == 0 and height // gh == width // gw:
                return (gh, gw), prefix
    raise ExportError(
        f"cannot lay {tokens} tokens on a patch grid of the {height}x{width} input (with up to {MAX_PREFIX} "
        "tokens before the patches)"
    )
