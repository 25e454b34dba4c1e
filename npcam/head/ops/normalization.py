"""Normalizations: BatchNormalization (inference mode), LayerNormalization, Softmax and LogSoftmax on any axis."""

from __future__ import annotations

import math

import numpy as np

from .rule import Rule, Shape, broadcast_shape, same_shape, target_axis


def _bn_scale(a, at):
    """Per-channel (axis 1) scale and shift of inference-mode BatchNormalization, broadcastable."""
    x, gamma, beta, mean, var = a
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = gamma / np.sqrt(var + at.get("epsilon", 1e-5))
    return scale.reshape(shape), (beta - mean * scale).reshape(shape)


def _bn_forward(a, at):
    scale, shift = _bn_scale(a, at)
    return a[0] * scale + shift


def _bn_backward(a, at, y, dy, v):
    return [dy * _bn_scale(a, at)[0]] + [None] * 4


def _ln_axes(x, at):
    axis = at.get("axis", -1) % x.ndim
    return tuple(range(axis, x.ndim))


def _ln_parts(a, at):
    x = a[0]
    axes = _ln_axes(x, at)
    centred = x - x.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt((centred**2).mean(axis=axes, keepdims=True) + at.get("epsilon", 1e-5))
    return centred * inv_std, inv_std, axes


def _ln_forward(a, at):
    xhat = _ln_parts(a, at)[0]
    y = xhat * a[1]
    return y + a[2] if len(a) > 2 else y


def _ln_backward(a, at, y, dy, v):
    xhat, inv_std, axes = _ln_parts(a, at)
    axes = tuple(ax + 1 for ax in axes)  # on the cotangent, behind its target axis
    g = dy * a[1]
    dx = inv_std * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return [dx] + [None] * (len(a) - 1)


# Softmax and LogSoftmax on any axis (opset 13: the axis alone, default -1).


def _softmax(x, at):
    e = np.exp(x - x.max(axis=at.get("axis", -1), keepdims=True))
    return e / e.sum(axis=at.get("axis", -1), keepdims=True)


def _log_softmax(x, at):
    axis = at.get("axis", -1)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _softmax_backward(a, at, y, dy, v):
    axis = target_axis(at.get("axis", -1), y.ndim)
    return [y * (dy - (dy * y).sum(axis=axis, keepdims=True))]


def _log_softmax_backward(a, at, y, dy, v):
    axis = target_axis(at.get("axis", -1), y.ndim)
    return [dy - np.exp(y) * dy.sum(axis=axis, keepdims=True)]


def _bn_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if len(x) < 2 or len(s) != 5:
        raise ValueError("needs an input of 2 or more dimensions and 4 parameters")
    params = math.prod(np.broadcast_shapes(*s[1:]))
    return tuple(np.broadcast_shapes(x, (1, params) + (1,) * (len(x) - 2)))


def _softmax_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if not x or not -len(x) <= int(at.get("axis", -1)) < len(x):
        raise ValueError(f"axis {at.get('axis', -1)} is not an axis of {list(x)}")
    return same_shape(s, at)


RULES: dict[str, Rule] = {
    "BatchNormalization": Rule(_bn_forward, _bn_backward, _bn_shape),
    "LayerNormalization": Rule(_ln_forward, _ln_backward, broadcast_shape),
    "Softmax": Rule(lambda a, at: _softmax(a[0], at), _softmax_backward, _softmax_shape),
    "LogSoftmax": Rule(lambda a, at: _log_softmax(a[0], at), _log_softmax_backward, _softmax_shape),
}
