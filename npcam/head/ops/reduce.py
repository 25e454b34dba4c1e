"""Reductions over attribute axes: ReduceMean, ReduceSum, ReduceL2, ReduceMax, ReduceMin."""

from __future__ import annotations

import math

import numpy as np

from .rule import Rule, Shape


def _reduce_axes(x, at):
    return tuple(int(ax) % x.ndim for ax in at.get("axes", range(x.ndim)))


def _reduce(f, df):
    """A reduction ``y = f(x, axes)`` over ``attrs["axes"]``, with ``dy/dx = df(x, y)`` (y kept 1 on those axes)."""

    def forward(a, at):
        return f(a[0], _reduce_axes(a[0], at), bool(at.get("keepdims", 1)))

    def backward(a, at, y, dy, v):
        x = a[0]
        axes = _reduce_axes(x, at)
        if not at.get("keepdims", 1):
            dy, y = np.expand_dims(dy, tuple(ax + 1 for ax in axes)), np.expand_dims(y, axes)
        return [np.broadcast_to(dy * df(x, y, axes), (dy.shape[0], *x.shape)).copy()]

    return Rule(forward, backward, _reduce_shape)


def _l2_gradient(x, y, axes):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(y > 0, x / y, 0.0)  # the norm's subgradient 0 at 0, as torch's


def _extreme_gradient(x, y, axes):
    """ReduceMax/Min: the gradient goes to the extreme value, shared evenly by ties (as torch.amax's)."""
    hit = (x == y).astype(x.dtype)
    return hit / hit.sum(axis=axes, keepdims=True)


def _reduce_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    axes = {int(ax) % len(x) for ax in at.get("axes", range(len(x)))} if x else set()
    keep = bool(at.get("keepdims", 1))
    return tuple(1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes)


RULES: dict[str, Rule] = {
    "ReduceMean": _reduce(
        lambda x, axes, keep: x.mean(axis=axes, keepdims=keep),
        lambda x, y, axes: 1.0 / math.prod(x.shape[ax] for ax in axes),
    ),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(axis=axes, keepdims=keep), lambda x, y, axes: 1.0),
    "ReduceL2": _reduce(lambda x, axes, keep: np.sqrt((x**2).sum(axis=axes, keepdims=keep)), _l2_gradient),
    "ReduceMax": _reduce(lambda x, axes, keep: x.max(axis=axes, keepdims=keep), _extreme_gradient),
    "ReduceMin": _reduce(lambda x, axes, keep: x.min(axis=axes, keepdims=keep), _extreme_gradient),
}
