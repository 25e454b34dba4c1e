"""What an op of the head engine is: one :class:`Rule` holding its forward, its vector-Jacobian product and its
output shape together, and the helpers the rules share.

The conventions every rule follows:

- ``forward(args, attrs) -> y`` runs on arrays whose first axis is the batch.
- ``backward(args, attrs, y, dy, variable) -> [dx or None]`` gives one cotangent per input (None for constants
  and for inputs that ``variable`` says do not depend on the head's input). The forward ran on a batch of 1,
  and ``dy`` has one more, leading, axis than ``y``: k explained targets, ``dy[i]`` the cotangent for target
  i. The forward values broadcast against it. (The batch axis of 1 may move: attention reshapes and
  transposes it.)
- ``shape(shapes, attrs) -> shape`` is the output's shape from the inputs' for a batch of 1, computed without
  running anything (a hostile head is refused before it allocates); ValueError when they do not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]

# The largest tensor a head may compute, in values for one image (512 MiB in float64). Real heads stay far
# below (a 21,843-class layer on 2,048 channels holds 45 M values); this only bounds what a hostile head.json
# could make a load allocate.
MAX_VALUES = 2**26


@dataclass(frozen=True)
class Rule:
    """An op of the head engine (see the module's docstring for the three functions' contracts)."""

    forward: Callable
    backward: Callable
    shape: Callable[[list[Shape], dict], Shape]


def within_budget(what: str, shape: Sequence[int]) -> None:
    """Refuse (ValueError) a tensor of more than :data:`MAX_VALUES` values."""
    values = math.prod(shape)
    if values > MAX_VALUES:
        raise ValueError(f"{what} would hold {values:,} values for one image, over the limit of {MAX_VALUES:,}")


def sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a cotangent ``g`` ``[k, *out]`` down to ``[k, *shape]``, undoing NumPy broadcasting of ``shape``."""
    lead = g.ndim - 1 - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(1, 1 + lead)))
    axes = tuple(i + 1 for i, d in enumerate(shape) if d == 1 and g.shape[i + 1] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def batch_first(dy: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """The cotangent with its target axis in place of y's batch axis of 1 (``[k, *y.shape[1:]]``), or None when
    y's first axis is not a batch of 1. Products then run as one matrix product over the k rows."""
    return dy.reshape(dy.shape[0], *y.shape[1:]) if y.ndim and y.shape[0] == 1 else None


def like_input(a, dy):
    """Reshape the cotangent to the op's input shape, behind its target axis (the VJP of any reshape)."""
    return [dy.reshape(dy.shape[0], *a[0].shape)] + [None] * (len(a) - 1)


def target_axis(axis: int, ndim: int) -> int:
    """An axis of a forward value, as an axis of its cotangent (which has a leading target axis)."""
    return int(axis) % ndim + 1


def same_shape(s: list[Shape], at: dict) -> Shape:
    """The shape rule of an op whose output has its first input's shape."""
    return s[0]


def broadcast_shape(s: list[Shape], at: dict) -> Shape:
    """The shape rule of an op whose inputs broadcast together, as NumPy's do."""
    return tuple(np.broadcast_shapes(*s))


def elementwise(f, df) -> Rule:
    """A pointwise op ``y = f(x, attrs)`` with ``dy/dx = df(x, y, attrs)``."""
    return Rule(
        lambda a, at: f(a[0], at),
        lambda a, at, y, dy, v: [dy * df(a[0], y, at)],
        same_shape,
    )


def binary(f, dfa, dfb) -> Rule:
    """A broadcasting op ``y = f(a, b)`` with partial derivatives ``dfa(a, b)`` and ``dfb(a, b)``."""
    return Rule(
        lambda a, at: f(a[0], a[1]),
        lambda a, at, y, dy, v: [
            sum_to(dy * dfa(a[0], a[1]), a[0].shape) if v[0] else None,
            sum_to(dy * dfb(a[0], a[1]), a[1].shape) if v[1] else None,
        ],
        broadcast_shape,
    )
