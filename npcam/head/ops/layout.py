"""Ops that only move values: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, and Expand (which repeats them)."""

from __future__ import annotations

import math

import numpy as np

from .rule import MAX_VALUES, Rule, Shape, like_input, sum_to


def _reshape_to(x: np.ndarray, shape) -> np.ndarray:
    """ONNX Reshape: a 0 copies the input's dimension, -1 is inferred."""
    shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def _expand_backward(a, at, y, dy, v):
    return [sum_to(dy, a[0].shape)]


def _flatten_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    axis = int(at.get("axis", 1))
    first = math.prod(x[:axis])
    if first == 0:
        raise ValueError(f"cannot flatten {list(x)} at axis {axis}")
    return (first, math.prod(x) // first)


def _reshape_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    wanted = [int(d) for d in at["shape"]]
    shape = [x[i] if d == 0 else d for i, d in enumerate(wanted)]  # IndexError: a 0 past the input's axes
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        raise ValueError(f"cannot reshape {list(x)} to {wanted}")
    known = math.prod(d for d in shape if d != -1)
    total = math.prod(x)
    if -1 in shape:
        if known == 0 or total % known:
            raise ValueError(f"cannot reshape {list(x)} to {wanted}")
        shape[shape.index(-1)] = total // known
    elif known != total:
        raise ValueError(f"cannot reshape {list(x)} to {wanted}")
    return tuple(shape)


def _squeeze_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    axes = {int(ax) % len(x) for ax in at["axes"]} if x else set()
    if any(x[ax] != 1 for ax in axes):
        raise ValueError(f"cannot squeeze axes {sorted(axes)} of {list(x)}")
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _unsqueeze_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    n = len(x) + len(at["axes"])
    axes = {int(ax) % n for ax in at["axes"]}
    if len(axes) != len(at["axes"]):
        raise ValueError(f"repeated axes {list(at['axes'])}")
    rest = iter(x)
    return tuple(1 if i in axes else next(rest) for i in range(n))


def _transpose_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    perm = [int(p) for p in at["perm"]]
    if sorted(perm) != list(range(len(x))):
        raise ValueError(f"perm {perm} is not a permutation of the {len(x)} axes")
    return tuple(x[p] for p in perm)


def _expand_shape(s: list[Shape], at: dict) -> Shape:
    shape = tuple(int(d) for d in at["shape"])
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {list(shape)} has a negative size")
    if math.prod(shape) > MAX_VALUES:  # the forward multiplies by np.ones(shape)
        raise ValueError(f"its shape would hold {math.prod(shape):,} values, over the limit of {MAX_VALUES:,}")
    return tuple(np.broadcast_shapes(s[0], shape))


RULES: dict[str, Rule] = {
    "Reshape": Rule(
        lambda a, at: _reshape_to(a[0], at["shape"]), lambda a, at, y, dy, v: like_input(a, dy), _reshape_shape
    ),
    "Flatten": Rule(
        lambda a, at: a[0].reshape(math.prod(a[0].shape[: at.get("axis", 1)]), -1),
        lambda a, at, y, dy, v: like_input(a, dy),
        _flatten_shape,
    ),
    "Squeeze": Rule(
        lambda a, at: np.squeeze(a[0], axis=tuple(at["axes"])),
        lambda a, at, y, dy, v: like_input(a, dy),
        _squeeze_shape,
    ),
    "Unsqueeze": Rule(
        lambda a, at: np.expand_dims(a[0], axis=tuple(at["axes"])),
        lambda a, at, y, dy, v: like_input(a, dy),
        _unsqueeze_shape,
    ),
    "Transpose": Rule(
        lambda a, at: np.transpose(a[0], at["perm"]),
        lambda a, at, y, dy, v: [np.transpose(dy, [0, *(int(p) + 1 for p in np.argsort(at["perm"]))])],
        _transpose_shape,
    ),
    "Expand": Rule(lambda a, at: a[0] * np.ones(at["shape"], dtype=a[0].dtype), _expand_backward, _expand_shape),
}
