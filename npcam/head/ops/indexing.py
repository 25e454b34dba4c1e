"""Indexing: Gather (constant indices), Slice, Concat, Pad (constant mode)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .rule import Rule, Shape, sum_to


def _gather_backward(a, at, y, dy, v):
    x, index = a
    axis = int(at.get("axis", 0)) % x.ndim
    index = np.asarray(index, dtype=np.intp) % x.shape[axis]
    dx = np.zeros((dy.shape[0], *x.shape), dtype=dy.dtype)
    # Scatter along the axis, the gathered axes of dy first as is the axis of dx. Repeated indices add up
    # (np.add.at, slow); distinct ones (a CLS token, q/k/v out of one tensor) are a plain assignment.
    gathered = list(range(axis + 1, axis + 1 + index.ndim))
    target, values = np.moveaxis(dx, axis + 1, 0), np.moveaxis(dy, gathered, list(range(index.ndim)))
    if np.unique(index).size == index.size:
        target[index] = values
    else:
        np.add.at(target, index, values)
    return [dx, None]


BIG = 2**62  # a Slice end at or past this is "to the end", as exporters write INT64_MAX


def _slices(shape: Sequence[int], at: dict) -> tuple[slice, ...]:
    """ONNX Slice's starts/ends/axes/steps as Python slices: negative values count from the end, then starts
    and ends clamp to [0, dim] (step > 0) or [0, dim-1] and [-1, dim-1] (step < 0), -1 being before the start."""
    starts, ends = list(at["starts"]), list(at["ends"])
    axes = list(at.get("axes", range(len(starts))))
    steps = list(at.get("steps", [1] * len(starts)))
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps differ in length")
    out = [slice(None)] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        start, end, axis, step = int(start), int(end), int(axis) % len(shape), int(step)
        if step == 0:
            raise ValueError("a step of 0")
        dim = shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        out[axis] = slice(start, end if end >= 0 else None, step)
    return tuple(out)


def _slice_forward(a, at):
    return a[0][_slices(a[0].shape, at)]


def _slice_backward(a, at, y, dy, v):
    dx = np.zeros((dy.shape[0], *a[0].shape), dtype=dy.dtype)
    dx[(slice(None), *_slices(a[0].shape, at))] = dy
    return [dx]


def _concat_forward(a, at):
    axis = int(at["axis"]) % a[0].ndim
    # A constant of batch 1 (a CLS token) joins a batch of N: broadcast every axis but the joined one.
    full = [max(x.shape[i] for x in a) for i in range(a[0].ndim)]
    return np.concatenate([np.broadcast_to(x, (*full[:axis], x.shape[axis], *full[axis + 1 :])) for x in a], axis=axis)


def _concat_backward(a, at, y, dy, v):
    axis = int(at["axis"]) % y.ndim
    cuts = np.cumsum([x.shape[axis] for x in a])[:-1]
    parts = np.split(dy, cuts, axis=axis + 1)
    return [sum_to(p, x.shape) if is_var else None for p, x, is_var in zip(parts, a, v)]


def _pad_regions(shape: Sequence[int], at: dict) -> tuple[list[tuple[int, int]], tuple[slice, ...], tuple[slice, ...]]:
    """ONNX Pad (constant mode) with ``pads`` [begins..., ends...] over ``axes`` (default all): the
    non-negative widths to pad by, the part of the input kept (negative pads crop) and where it lands."""
    if "pads" not in at:
        raise ValueError("its pads must be an attribute (ONNX's pads input, folded)")
    if at.get("mode", "constant") not in ("constant", b"constant"):
        raise ValueError(f"mode {at['mode']!r}: only constant padding is supported")
    axes = [int(ax) % len(shape) for ax in at.get("axes", range(len(shape)))]
    pads = [int(p) for p in at["pads"]]
    if len(pads) != 2 * len(axes):
        raise ValueError(f"{len(pads)} pads for {len(axes)} axes")
    begin, end = [0] * len(shape), [0] * len(shape)
    for ax, b, e in zip(axes, pads[: len(axes)], pads[len(axes) :]):
        begin[ax], end[ax] = b, e
    if any(size + b + e <= 0 or size + min(b, 0) + min(e, 0) <= 0 for size, b, e in zip(shape, begin, end)):
        raise ValueError(f"pads {pads} leave nothing of {list(shape)}")
    kept = tuple(slice(max(-b, 0), size - max(-e, 0)) for size, b, e in zip(shape, begin, end))
    placed = tuple(slice(max(b, 0), max(b, 0) + k.stop - k.start) for b, k in zip(begin, kept))
    return [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)], kept, placed


def _pad_forward(a, at):
    widths, kept, _ = _pad_regions(a[0].shape, at)
    return np.pad(a[0][kept], widths, constant_values=at.get("constant_value", 0.0))


def _pad_backward(a, at, y, dy, v):
    _, kept, placed = _pad_regions(a[0].shape, at)
    dx = np.zeros((dy.shape[0], *a[0].shape), dtype=dy.dtype)
    dx[(slice(None), *kept)] = dy[(slice(None), *placed)]
    return [dx]


def _gather_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if not x or not -len(x) <= int(at.get("axis", 0)) < len(x):
        raise ValueError(f"axis {at.get('axis', 0)} is not an axis of {list(x)}")
    axis = int(at.get("axis", 0)) % len(x)
    return (*x[:axis], *s[1], *x[axis + 1 :])


def _slice_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if not x:
        raise ValueError("cannot slice a scalar")
    out = tuple(len(range(x[i])[sl]) for i, sl in enumerate(_slices(x, at)))
    if 0 in out:
        raise ValueError(f"the slice of {list(x)} is empty")
    return out


def _pad_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if not x:
        raise ValueError("cannot pad a scalar")
    widths, kept, _ = _pad_regions(x, at)
    return tuple(k.stop - k.start + b + e for k, (b, e) in zip(kept, widths))


def _concat_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if not x or not -len(x) <= int(at["axis"]) < len(x):
        raise ValueError(f"axis {at['axis']} is not an axis of {list(x)}")
    axis = int(at["axis"]) % len(x)
    if any(len(t) != len(x) for t in s):
        raise ValueError(f"inputs of different ranks: {[list(t) for t in s]}")
    rest = [np.broadcast_shapes(*(t[:axis] + t[axis + 1 :] for t in s))]
    return (*rest[0][:axis], sum(t[axis] for t in s), *rest[0][axis:])


RULES: dict[str, Rule] = {
    "Gather": Rule(
        lambda a, at: np.take(a[0], np.asarray(a[1], dtype=np.intp), axis=int(at.get("axis", 0))),
        _gather_backward,
        _gather_shape,
    ),
    "Slice": Rule(_slice_forward, _slice_backward, _slice_shape),
    "Concat": Rule(_concat_forward, _concat_backward, _concat_shape),
    "Pad": Rule(_pad_forward, _pad_backward, _pad_shape),
}
