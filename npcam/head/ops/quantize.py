"""QuantizeLinear and DequantizeLinear (QDQ models, as onnxruntime's quantizer writes them).

The forward is exact. The gradient is the straight-through one: a QuantizeLinear -> DequantizeLinear pair passes
it unchanged, so Grad-CAM explains the float head that the int8 one approximates. Rounding's own derivative is
zero almost everywhere, and a clipped value (a logit outside the calibrated range) has none at all: either would
leave empty maps.
"""

from __future__ import annotations

import math

import numpy as np

from .rule import Rule, Shape


def _per_axis(value: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """A per-tensor (scalar) or per-axis (1-D) scale or zero point, broadcastable against ``x``."""
    value = np.asarray(value)
    if value.ndim == 0 or value.size == 1:
        return value.reshape(())
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return value.reshape(shape)


def _integer_range(zero_point) -> tuple[int, int]:
    info = np.iinfo(zero_point.dtype if zero_point is not None and zero_point.dtype.kind in "iu" else np.uint8)
    return int(info.min), int(info.max)


def quantize(x, scale, zero_point=None, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear: ``clip(round_half_even(x / scale) + zero_point)`` to the zero point's integer type,
    returned as float64 (the integers, exactly)."""
    low, high = _integer_range(zero_point)
    zp = 0.0 if zero_point is None else _per_axis(zero_point, x, axis).astype(np.float64)
    return np.clip(np.rint(x / _per_axis(scale, x, axis)) + zp, low, high)


def dequantize(q, scale, zero_point=None, axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale``."""
    q = np.asarray(q, dtype=np.float64)
    zp = 0.0 if zero_point is None else _per_axis(zero_point, q, axis).astype(np.float64)
    return (q - zp) * _per_axis(scale, q, axis)


def _quantize_backward(a, at, y, dy, v):
    return [dy / _per_axis(a[1], a[0], at.get("axis", 1))] + [None] * (len(a) - 1)


def _dequantize_backward(a, at, y, dy, v):
    return [dy * _per_axis(a[1], a[0], at.get("axis", 1))] + [None] * (len(a) - 1)


def _qdq_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    axis = int(at.get("axis", 1))
    out = x
    for p in s[1:3]:
        if math.prod(p) > 1:
            if not x:
                raise ValueError("a per-axis scale needs an input with axes")
            per_axis = [1] * len(x)
            per_axis[axis % len(x)] = math.prod(p)
            out = tuple(np.broadcast_shapes(out, tuple(per_axis)))
    return out


RULES: dict[str, Rule] = {
    "QuantizeLinear": Rule(lambda a, at: quantize(*a, axis=at.get("axis", 1)), _quantize_backward, _qdq_shape),
    "DequantizeLinear": Rule(lambda a, at: dequantize(*a, axis=at.get("axis", 1)), _dequantize_backward, _qdq_shape),
}
