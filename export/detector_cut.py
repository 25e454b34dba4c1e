"""Where a detector's head begins: the cut at its detection head's inputs, one map per stride.

:func:`head_inputs` applies the rule (its docstring; docs/export.md "Detectors") on the graph of values
(:func:`value_graph`: what depends on the image's values), walking up from each stride's exits through
their dominators. :mod:`export.detector` runs it between recognizing the outputs and building the head.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper

from . import decodes
from .errors import ExportError
from .graph import GraphIndex, Values, session

# Ops whose output depends on their input's shape only: no value flows through them.
SHAPE_OPS = ("Shape", "Size")


def head_inputs(g: GraphIndex, image: str, outputs: Sequence[str], values: Values, size: tuple[int, int]) -> list[str]:
    """The detection head's inputs, one map per stride, finest first: where the YOLO CAM tools hook.

    The rule, on the graph of values (what depends on the image's values; shapes read with Shape are not values):

    1. A *map* is a tensor ``[1, C, h, w]`` on the grid of a stride ``s`` of the input (``h``, ``w`` the input's
       sides divided by ``s``). The outputs are reached from the maps through the *exits*: the maps read by a node
       after which no map follows (the flattening of each stride's branch before the strides are joined). The
       exits are grouped by stride.
    2. For each stride, walk up from its exits through their dominators (the tensors every path from the image to
       them passes through), one step at a time, all strides together.
    3. Stop at the first step where one stride's dominator also feeds another stride's exits (the neck's map,
       shared with the next scale): there, each stride's dominator is the head's input for that stride.

    On YOLOv8/v11 this gives the three maps Detect reads, on YOLOv5 the maps its 1x1 convolutions read, on
    PP-PicoDet and NanoDet the maps their per-stride towers read. A head whose strides' branches have different
    depths, or with one stride, is refused in one line (name the maps with ``--layer``).
    """
    preds = value_graph(g, image)
    needed = ancestors(preds, outputs)
    order = [t for t in preds if t in needed]  # graph order: topological
    shapes = all_shapes(values, [t for t in order if t != image])
    stride_of = {t: grid_stride(shapes.get(t), size) for t in order}
    children: dict[str, set[str]] = {t: set() for t in order}
    for t in order:
        for p in preds[t]:
            children[p].add(t)
    below: dict[str, bool] = {}
    for t in reversed(order):
        below[t] = any(stride_of[c] or below[c] for c in children[t])
    tail = {t for t in order if not stride_of[t] and not below[t]}
    exits: dict[int, list[str]] = {}
    for t in order:
        if stride_of[t] and children[t] & tail:
            exits.setdefault(stride_of[t], []).append(t)
    if len(exits) < 2:
        found = f"one map (stride {next(iter(exits))})" if exits else "no map on a grid of the input"
        raise ExportError(f"the outputs come from {found}: name the maps to explain with --layer")
    position = {t: i for i, t in enumerate(order)}
    idom = dominators(order, preds, position, image)

    def meet(a: str, b: str) -> str:
        while a != b:
            while position[a] > position[b]:
                a = idom[a]
            while position[b] > position[a]:
                b = idom[b]
        return a

    chains = {}
    for s, found in sorted(exits.items()):
        top = found[0]
        for t in found[1:]:
            top = meet(top, t)
        chain = [top]
        while chain[-1] != image:
            chain.append(idom[chain[-1]])
        chains[s] = chain
    feeds = {s: ancestors(preds, found) for s, found in exits.items()}
    for depth in range(max(len(c) for c in chains.values())):
        at = {s: chain[depth] for s, chain in chains.items() if depth < len(chain)}
        if len(at) < len(chains):
            break
        if any(any(t in feeds[o] for o in feeds if o != s) for s, t in at.items()):
            chosen = [at[s] for s in sorted(at)]
            wrong = [t for s, t in at.items() if stride_of[t] != s or t == image]
            if wrong or len(set(chosen)) != len(chosen):
                break
            return chosen
    raise ExportError(
        "cannot tell where the detection head starts (its strides' branches differ): name the maps to explain "
        "with --layer, one per stride"
    )


def value_graph(g: GraphIndex, image: str) -> dict[str, list[str]]:
    """Every tensor whose values depend on the image's, in graph order, mapped to the tensors its value is computed
    from (a Shape's output depends on a shape only, so it and what follows from it alone are not here)."""
    preds: dict[str, list[str]] = {image: []}
    for node in g.graph.node:
        if node.op_type in SHAPE_OPS:
            continue
        reads = list(dict.fromkeys(i for i in g.inputs(node) if i in preds))
        if reads:
            for o in node.output:
                if o:
                    preds[o] = reads
    return preds


def ancestors(preds: dict[str, list[str]], names: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    todo = [n for n in names if n in preds]
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo += preds[t]
    return seen


def dominators(order: list[str], preds: dict[str, list[str]], position: dict[str, int], root: str) -> dict[str, str]:
    """The immediate dominator of each tensor of ``order`` (topological, ``root`` first): the nearest tensor that
    every path from ``root`` to it passes through. One pass suffices on a graph without cycles."""
    idom = {root: root}
    for t in order:
        if t == root:
            continue
        ps = [p for p in preds[t] if p in idom]
        d = ps[0]
        for p in ps[1:]:
            a, b = d, p
            while a != b:
                while position[a] > position[b]:
                    a = idom[a]
                while position[b] > position[a]:
                    b = idom[b]
            d = a
        idom[t] = d
    return idom


def grid_stride(shape, size: tuple[int, int]) -> int:
    """The stride whose grid ``shape`` ``[1, C, h, w]`` is on (each side the input's divided by it, rounded up or
    down), or 0."""
    if shape is None or len(shape) != 4 or shape[0] != 1:
        return 0
    h, w = shape[2], shape[3]
    for s in (2, *decodes.STRIDES, 256):
        if h in (size[0] // s, -(-size[0] // s)) and w in (size[1] // s, -(-size[1] // s)) and h * w > 1:
            return s
    return 0


def cell(shape, size: tuple[int, int]) -> int:
    """Input pixels per cell of a map ``[1, C, h, w]``, on the longer side."""
    side = int(size[1] >= size[0])
    return max(1, round(size[side] / shape[2 + side]))


def all_shapes(values: Values, names: list[str]) -> dict[str, list[int]]:
    """The shapes of ``names`` for one image: from shape inference, the rest from one onnxruntime run."""
    known = values.shapes()
    missing = [n for n in names if n not in known]
    found = {n: known[n] for n in names if n in known}
    if missing:
        probe = copy.deepcopy(values.fixed_size_copy())
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in missing if n not in have)
        try:
            results = session(probe).run(missing, {values.image: values.input_array(1)})
            found.update({n: list(np.asarray(r).shape) for n, r in zip(missing, results)})
        except Exception:  # a tensor of another type: ask one at a time
            found.update({n: values.shape(n) for n in missing})
    return found
