"""Where the batch is in each tensor of a head, followed from the head's input through its ops.

Attention in torch's ``nn.MultiheadAttention`` runs sequence first: it moves the batch axis (``[L, N, C]``),
merges it with the heads (``[L, N * heads, d]``, ``[N * heads, L, d]``) and with the tokens (``[L * N, C]``), and
writes these shapes as literal Reshape targets in a file exported with a fixed batch of 1 (``[17, 1, 3, 16]``,
``[17, 16]``). At batch 1 the batch is invisible in those numbers; it is visible in how the ops use the tensors:
a MatMul contracts its inner axes, a LayerNorm and a Softmax mix their axes, an Add with the residual stream
lines the two batches up. :func:`follow` places the batch in each tensor so that no op mixes the images of a
batch, and rewrites the ops' constant shapes so that the head runs at any batch (the batch's axis of a Reshape
target becomes -1). A Reshape keeps the order of the values, so the batch stays between the same values; where
that leaves more than one axis for it, each is tried in turn (a size-1 axis of its own first), and a choice that
makes an op mix the batch is undone.

The place of the batch in a tensor at batch 1 of shape ``S`` is :class:`Where`: axis ``k`` of ``S``, whose size
``S[k] = outer * inner`` becomes ``outer * N * inner`` at batch ``N`` (``outer`` and ``inner`` are 1 for an axis
of its own). A file with a dynamic batch axis also gives every tensor's shape at batch 2, which must agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from npcam.head import BIG, Op

# Steps of the search over the Reshapes' choices, per op: enough to undo a few wrong choices at each Reshape
# (a wrong one is found within a few ops, at the next product or normalization), never exponential.
STEPS_PER_OP = 64

_UNARY = {
    "Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Erf", "Gelu", "Sqrt", "Neg",
    "Elu", "Softplus", "Exp", "Log", "Abs",
}  # fmt: skip
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Where"}
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax", "ReduceMin"}
_BATCH_FIRST = {
    "Conv", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "BatchNormalization", "Resize",
}  # fmt: skip


class Lost(Exception):
    """The batch cannot be followed through an op (the message says which and why)."""


@dataclass(frozen=True)
class Where:
    """The batch in a tensor: axis ``axis``, its size ``outer * inner`` at batch 1, ``outer * N * inner`` at N."""

    axis: int
    outer: int = 1
    inner: int = 1


FIRST = Where(0)


def follow(
    ops: list[Op],
    arrays: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, ...]],
    starts: list[str],
    output: str,
    shapes2: dict[str, tuple[int, ...]] | None = None,
) -> list[Op]:
    """The ops with their constant shapes rewritten to run at any batch, the batch followed from ``starts``.

    Parameters
    ----------
    ops : the head's ops as they compute one image (Reshape targets and Expand shapes as at batch 1)
    arrays : the constants the ops read
    shapes : every computed tensor's shape at batch 1 (the inputs, the side inputs and each op's output)
    starts : the head's input and side inputs, each ``[N, ...]``
    output : the scores, which must come out ``[N, K]``
    shapes2 : the same at batch 2 when the model runs at other batches (None for a file of batch 1)

    Raises :class:`Lost` when no placement of the batch keeps the images apart, or the search gives up.
    """
    budget = STEPS_PER_OP * max(len(ops), 1)
    furthest, reason = -1, "no op"  # the furthest op a placement reached, and why it failed there
    # Depth-first over the Reshapes' choices: (next op, the batch's place so far, the ops rewritten so far).
    stack: list[tuple[int, dict[str, Where], list[Op]]] = [(0, {name: FIRST for name in starts}, [])]
    while stack:
        index, where, done = stack.pop()
        where, done = dict(where), list(done)
        while index < len(ops):
            budget -= 1
            if budget < 0:
                raise Lost(f"too many ways to place the batch in the head's Reshapes; the furthest failed {reason}")
            op = ops[index]
            try:
                choices = _step(op, arrays, shapes, where, shapes2)
            except Lost as e:
                if index > furthest:
                    furthest, reason = index, f"at {op.op} {op.output!r}: {e}"
                break
            (rewritten, place), *others = choices
            for other in reversed(others):  # tried if this one fails
                stack.append((index + 1, {**where, op.output: other[1]}, [*done, other[0]]))
            where[op.output] = place
            done.append(rewritten)
            index += 1
        else:
            if where.get(output) == FIRST:
                return done
            if len(ops) > furthest:
                furthest, reason = len(ops), f"the scores {output!r} come out with the batch at {where.get(output)}"
    raise Lost(reason)


def _step(op: Op, arrays, shapes, where: dict[str, Where], shapes2) -> list[tuple[Op, Where]]:
    """The op, rewritten for any batch, and the batch's place in its output; several for an ambiguous Reshape."""
    data = [n for n in op.inputs if n not in arrays]
    if not data:
        raise Lost("reads no value of the batch")
    if any(n not in where for n in data):
        raise Lost("reads a value whose batch is unknown")
    out = shapes[op.output]
    choices = _place(op, arrays, shapes, where, out)
    if shapes2 is not None:  # a model of dynamic batch: its batch-2 shapes say where the batch went
        choices = [(o, w) for o, w in choices if _doubled(out, w) == tuple(shapes2.get(op.output, ()))]
        if not choices:
            raise Lost(f"its output at batch 2 is {list(shapes2.get(op.output, ()))}, not the batch's")
    return choices


def _doubled(shape: tuple[int, ...], where: Where) -> tuple[int, ...]:
    return tuple(d * 2 if i == where.axis else d for i, d in enumerate(shape))


def _place(op: Op, arrays, shapes, where: dict[str, Where], out: tuple[int, ...]) -> list[tuple[Op, Where]]:
    name, at = op.op, op.attrs
    x = op.inputs[0]
    shape = shapes[x] if x not in arrays else arrays[x].shape
    w = where.get(x)
    if name in _UNARY:
        return [(op, w)]
    if name in _BROADCAST or name in ("QuantizeLinear", "DequantizeLinear"):
        if name in ("QuantizeLinear", "DequantizeLinear"):
            scale = [arrays[n] for n in op.inputs[1:] if n in arrays]
            if w is not None and any(s.size > 1 for s in scale) and int(at.get("axis", 1)) % len(shape) == w.axis:
                raise Lost("its scale is per value of the batch's axis")
            return [(op, w)]
        return [(op, _broadcast(op.inputs, arrays, shapes, where, out))]
    if name in ("Softmax", "LogSoftmax"):
        if int(at.get("axis", -1)) % len(shape) == w.axis:
            raise Lost("it normalizes over the batch's axis")
        return [(op, w)]
    if name == "LayerNormalization":
        if w.axis >= int(at.get("axis", -1)) % len(shape):
            raise Lost("it normalizes over the batch's axis")
        _constants_flat(op.inputs[1:], arrays, shapes, where, out, w)
        return [(op, w)]
    if name in _BATCH_FIRST:
        if w.axis != 0 or any(n in where for n in op.inputs[1:]):
            raise Lost("its input's batch is not on the first axis")
        return [(op, w)]
    if name == "Gemm":
        rows = 1 if at.get("transA", 0) else 0
        if w.axis != rows or any(n in where for n in op.inputs[1:2]):
            raise Lost("it multiplies along the batch's axis")
        if len(op.inputs) > 2 and op.inputs[2] in arrays:
            bias = arrays[op.inputs[2]].shape
            if len(bias) == 2 and bias[0] != 1:
                raise Lost("its bias differs between the rows of the batch")
        return [(op, replace(w, axis=0))]
    if name == "MatMul":
        return [(op, _matmul(op, arrays, shapes, where, out))]
    if name in _REDUCTIONS:
        axes = {int(a) % len(shape) for a in at.get("axes", range(len(shape)))}
        if w.axis in axes:
            raise Lost("it reduces over the batch's axis")
        keep = bool(at.get("keepdims", 1))
        return [(op, w if keep else replace(w, axis=w.axis - sum(a < w.axis for a in axes)))]
    if name == "Gather":
        axis = int(at.get("axis", 0)) % len(shape)
        if axis == w.axis:
            raise Lost("it gathers along the batch's axis")
        index = np.asarray(arrays[op.inputs[1]]) if op.inputs[1] in arrays else None
        if index is None:
            raise Lost("its indices are computed")
        return [(op, w if w.axis < axis else replace(w, axis=w.axis + index.ndim - 1))]
    if name == "Slice":
        return [_slice(op, shape, w)]
    if name == "Concat":
        axis = int(at["axis"]) % len(shape)
        if axis == w.axis:
            raise Lost("it joins along the batch's axis")
        _constants_flat(op.inputs, arrays, shapes, where, out, w, same=True)
        return [(op, w)]
    if name == "Pad":
        pads = list(at["pads"])
        axes = [int(a) % len(shape) for a in at.get("axes", range(len(shape)))]
        if w.axis in axes and (pads[axes.index(w.axis)] or pads[len(axes) + axes.index(w.axis)]):
            raise Lost("it pads the batch's axis")
        return [(op, w)]
    if name == "Expand":
        return [_expand(op, shape, w, out)]
    if name == "Flatten":
        axis = int(at.get("axis", 1)) % (len(shape) + 1)
        before = math.prod(shape[: w.axis]) * w.outer
        if w.axis < axis:
            return [(op, Where(0, before, w.inner * math.prod(shape[w.axis + 1 : axis])))]
        return [(op, Where(1, before // math.prod(shape[:axis]), w.inner * math.prod(shape[w.axis + 1 :])))]
    if name == "Squeeze":
        axes = {int(a) % len(shape) for a in at["axes"]}
        if w.axis in axes:
            raise Lost("it squeezes the batch's axis")
        return [(op, replace(w, axis=w.axis - sum(a < w.axis for a in axes)))]
    if name == "Unsqueeze":
        rank = len(shape) + len(at["axes"])
        added = {int(a) % rank for a in at["axes"]}
        kept = [i for i in range(rank) if i not in added]
        return [(op, replace(w, axis=kept[w.axis]))]
    if name == "Transpose":
        return [(op, replace(w, axis=[int(p) for p in at["perm"]].index(w.axis)))]
    if name == "Reshape":
        return _reshape(op, shape, w, out)
    raise Lost("npcam does not know how it treats the batch")


def _broadcast(inputs, arrays, shapes, where: dict[str, Where], out: tuple[int, ...]) -> Where:
    """An elementwise op's batch: the same place in every computed input; constants broadcast along it."""
    placed = set()
    for name in inputs:
        if name in arrays:
            continue
        shape, w = shapes[name], where[name]
        axis = w.axis + len(out) - len(shape)
        if shape[w.axis] != out[axis]:
            raise Lost("it broadcasts the batch's axis against another size")
        placed.add(replace(w, axis=axis))
    if len(placed) != 1:
        raise Lost(f"its inputs have the batch in different places ({sorted(placed, key=str)})")
    w = placed.pop()
    _constants_flat(inputs, arrays, shapes, where, out, w)
    return w


def _constants_flat(inputs, arrays, shapes, where, out, w: Where, same: bool = False) -> None:
    """Constants must be 1 along the batch's axis, to broadcast over the batch (``same``: of the output's rank)."""
    for name in inputs:
        if name not in arrays:
            continue
        shape = arrays[name].shape
        axis = w.axis - (len(out) - len(shape))
        if (same and len(shape) != len(out)) or (axis >= 0 and shape[axis] != 1):
            raise Lost("a constant differs along the batch's axis")


def _matmul(op: Op, arrays, shapes, where: dict[str, Where], out: tuple[int, ...]) -> Where:
    """The batch of a product: on a leading axis of both, on A's rows, or on B's columns; never contracted."""
    placed = set()
    for side, name in enumerate(op.inputs[:2]):
        if name in arrays:
            continue
        shape, w = shapes[name], where[name]
        if len(shape) < 2:
            raise Lost("a vector times a matrix contracts its batch")
        contracted = len(shape) - 1 if side == 0 else len(shape) - 2
        if w.axis == contracted:
            raise Lost("it contracts the batch's axis")
        axis = w.axis + len(out) - len(shape)
        if w.axis < len(shape) - 2 and shape[w.axis] != out[axis]:
            raise Lost("it broadcasts the batch's axis against another size")
        placed.add(replace(w, axis=axis))
    if len(placed) != 1:
        raise Lost("its inputs have the batch in different places")
    w = placed.pop()
    if w.axis < len(out) - 2:  # a leading axis: a constant must broadcast along it
        for name in op.inputs[:2]:
            if name in arrays:
                shape = arrays[name].shape
                axis = w.axis - (len(out) - len(shape))
                if axis >= 0 and len(shape) > 2 and shape[axis] != 1:
                    raise Lost("a constant differs along the batch's axis")
    return w


def _slice(op: Op, shape: tuple[int, ...], w: Where) -> tuple[Op, Where]:
    """A Slice may take all of the batch's axis (its end then says so at any batch), and no part of it."""
    at = dict(op.attrs)
    starts, ends = list(at["starts"]), list(at["ends"])
    axes = [int(a) % len(shape) for a in at.get("axes", range(len(starts)))]
    steps = list(at.get("steps", [1] * len(starts)))
    for i, axis in enumerate(axes):
        if axis != w.axis:
            continue
        dim = shape[axis]
        start, end = int(starts[i]), int(ends[i])
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if int(steps[i]) != 1 or start > 0 or end < dim:
            raise Lost("it takes part of the batch's axis")
        starts[i], ends[i] = 0, BIG
    at.update(starts=starts, ends=ends)
    return replace(op, attrs=at), w


def _expand(op: Op, shape: tuple[int, ...], w: Where, out: tuple[int, ...]) -> tuple[Op, Where]:
    """An Expand keeps the input's batch: its shape says 1 there (a batch-1 shape would say the batch's size)."""
    target = [int(d) for d in op.attrs["shape"]]
    axis = w.axis + len(out) - len(shape)
    if shape[w.axis] != out[axis]:
        raise Lost("it broadcasts the batch's axis")
    position = axis - (len(out) - len(target))
    if position >= 0:
        target[position] = 1
    return replace(op, attrs={**op.attrs, "shape": target}), replace(w, axis=axis)


def _reshape(op: Op, shape: tuple[int, ...], w: Where, out: tuple[int, ...]) -> list[tuple[Op, Where]]:
    """Every axis of the Reshape's output the batch can be in: a Reshape keeps the values' order, so the batch
    stays after the same ``before`` values. An axis of size 1 that is the batch's own comes first."""
    before = math.prod(shape[: w.axis]) * w.outer
    choices = []
    for axis, size in enumerate(out):
        lead = math.prod(out[:axis])
        if lead > before:
            break
        if before % lead or size % (before // lead):
            continue
        outer = before // lead
        place = Where(axis, outer, size // outer)
        target = [-1 if i == axis else d for i, d in enumerate(out)]
        choices.append((replace(op, attrs={**op.attrs, "shape": target}), place))
    choices.sort(key=lambda c: (c[1].outer * c[1].inner != 1, c[1].axis))
    if not choices:
        raise Lost(f"no axis of {list(out)} can hold the batch")
    return choices
