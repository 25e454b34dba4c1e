"""Pointwise ops: activations, arithmetic that broadcasts, and Where (with a constant condition)."""

from __future__ import annotations

import math

import numpy as np

from .erf import erf
from .rule import Rule, binary, broadcast_shape, elementwise, same_shape, sum_to


def _gelu(x, at):
    if at.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _dgelu(x, y, at):
    if at.get("approximate", "none") == "tanh":
        k = math.sqrt(2 / math.pi)
        t = np.tanh(k * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _hard_sigmoid(x, at):
    return np.clip(at.get("alpha", 0.2) * x + at.get("beta", 0.5), 0, 1)


def _clip_bounds(at):
    return at.get("min", -np.inf), at.get("max", np.inf)


def _pow_backward(a, at, y, dy, v):
    if v[1]:
        raise ValueError("Pow: the exponent must be a constant")
    return [dy * a[1] * a[0] ** (a[1] - 1), None]


def _prelu_backward(a, at, y, dy, v):
    if v[1]:
        raise ValueError("PRelu: the slope must be a constant")
    x, slope = a
    return [dy * np.where(x > 0, 1.0, slope), None]


def _where_backward(a, at, y, dy, v):
    if v[0]:
        raise ValueError("Where: the condition must be a constant")
    cond = a[0].astype(bool)
    return [
        None,
        sum_to(np.where(cond, dy, 0), a[1].shape) if v[1] else None,
        sum_to(np.where(cond, 0, dy), a[2].shape) if v[2] else None,
    ]


RULES: dict[str, Rule] = {
    "Add": binary(np.add, lambda a, b: 1.0, lambda a, b: 1.0),
    "Sub": binary(np.subtract, lambda a, b: 1.0, lambda a, b: -1.0),
    "Mul": binary(np.multiply, lambda a, b: b, lambda a, b: a),
    "Div": binary(np.divide, lambda a, b: 1.0 / b, lambda a, b: -a / b**2),
    "Pow": Rule(lambda a, at: a[0] ** a[1], _pow_backward, broadcast_shape),
    "Max": binary(np.maximum, lambda a, b: a >= b, lambda a, b: a < b),
    "Min": binary(np.minimum, lambda a, b: a <= b, lambda a, b: a > b),
    "PRelu": Rule(lambda a, at: np.where(a[0] > 0, a[0], a[1] * a[0]), _prelu_backward, broadcast_shape),
    "Where": Rule(lambda a, at: np.where(a[0].astype(bool), a[1], a[2]), _where_backward, broadcast_shape),
    "Relu": elementwise(lambda x, at: np.maximum(x, 0), lambda x, y, at: x > 0),
    "LeakyRelu": elementwise(
        lambda x, at: np.where(x > 0, x, at.get("alpha", 0.01) * x),
        lambda x, y, at: np.where(x > 0, 1.0, at.get("alpha", 0.01)),
    ),
    "Clip": elementwise(
        lambda x, at: np.clip(x, *_clip_bounds(at)),
        lambda x, y, at: (x > _clip_bounds(at)[0]) & (x < _clip_bounds(at)[1]),
    ),
    "HardSigmoid": elementwise(
        _hard_sigmoid,
        lambda x, y, at: at.get("alpha", 0.2) * ((y > 0) & (y < 1)),
    ),
    "HardSwish": elementwise(
        lambda x, at: x * np.clip(x / 6 + 0.5, 0, 1),
        # torch's rule: 0 below -3, x/3 + 1/2 up to 3, 1 above.
        lambda x, y, at: np.where(x < -3, 0.0, np.where(x <= 3, x / 3 + 0.5, 1.0)),
    ),
    "Sigmoid": elementwise(lambda x, at: 1 / (1 + np.exp(-x)), lambda x, y, at: y * (1 - y)),
    "Tanh": elementwise(lambda x, at: np.tanh(x), lambda x, y, at: 1 - y**2),
    "Erf": elementwise(lambda x, at: erf(x), lambda x, y, at: 2 / math.sqrt(math.pi) * np.exp(-(x**2))),
    "Gelu": elementwise(_gelu, _dgelu),
    "Sqrt": elementwise(lambda x, at: np.sqrt(x), lambda x, y, at: 0.5 / y),
    "Neg": elementwise(lambda x, at: -x, lambda x, y, at: -1.0),
    "Elu": elementwise(
        lambda x, at: np.where(x > 0, x, at.get("alpha", 1.0) * np.expm1(np.minimum(x, 0))),
        lambda x, y, at: np.where(x > 0, 1.0, y + at.get("alpha", 1.0)),
    ),
    "Softplus": elementwise(lambda x, at: np.logaddexp(0, x), lambda x, y, at: 1 / (1 + np.exp(-x))),
    "Exp": elementwise(lambda x, at: np.exp(x), lambda x, y, at: y),
    "Log": elementwise(lambda x, at: np.log(x), lambda x, y, at: 1 / x),
    "Abs": elementwise(lambda x, at: np.abs(x), lambda x, y, at: np.sign(x)),
}

# The one-input ops that act on each value alone (a token's values stay the token's: npcam.head.rewrite).
UNARY = frozenset(name for name, rule in RULES.items() if rule.shape is same_shape)
