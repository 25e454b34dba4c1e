"""Resize, nearest and linear, as ONNX defines it (opset 11 on): a detector's neck upsamples with it.

Each resized axis is a fixed linear map of that axis alone: an ``[out, in]`` matrix whose rows hold one 1 (nearest)
or the two weights of the neighbours (linear). So the forward is one product per resized axis (nearest: an index),
the vector-Jacobian product the same products with the matrices transposed, and the op is exact.

Attributes are ONNX's, with its constant inputs folded (as every rule of the head takes them): ``scales`` (floats)
or ``sizes`` (ints), one per axis, or one per ``axes``; ``mode`` ``"nearest"`` (default) or ``"linear"``;
``coordinate_transformation_mode`` (default ``"half_pixel"``); ``nearest_mode`` (default
``"round_prefer_floor"``). The batch axis is never resized. ``cubic`` mode, ``tf_crop_and_resize``, an antialiased
downscale and a ``keep_aspect_ratio_policy`` other than ``stretch`` are refused (ValueError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .rule import Rule, Shape, within_budget

MODES = ("nearest", "linear")
TRANSFORMS = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
)
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _text(value, default: str) -> str:
    value = default if value is None else value
    return value.decode() if isinstance(value, bytes) else str(value)


def _axes_plan(shape: Sequence[int], at: dict) -> list[tuple[int, int, float]]:
    """``(axis, output length, scale)`` for each axis that changes; ValueError for what is not supported."""
    mode = _text(at.get("mode"), "nearest")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: npcam resizes with {' or '.join(MODES)}")
    transform = _text(at.get("coordinate_transformation_mode"), "half_pixel")
    if transform not in TRANSFORMS:
        raise ValueError(f"coordinate_transformation_mode {transform!r} is not one of {', '.join(TRANSFORMS)}")
    if mode == "nearest" and _text(at.get("nearest_mode"), "round_prefer_floor") not in NEAREST:
        raise ValueError(f"nearest_mode {at['nearest_mode']!r} is not one of {', '.join(NEAREST)}")
    if _text(at.get("keep_aspect_ratio_policy"), "stretch") != "stretch":
        raise ValueError("keep_aspect_ratio_policy other than 'stretch'")
    if ("scales" in at) == ("sizes" in at):
        raise ValueError("needs scales or sizes (one of them)")
    rank = len(shape)
    axes = [int(a) % rank for a in at.get("axes", range(rank))]
    given = [float(v) for v in at["scales"]] if "scales" in at else [int(v) for v in at["sizes"]]
    if len(given) != len(axes) or len(set(axes)) != len(axes):
        raise ValueError(f"{len(given)} {'scales' if 'scales' in at else 'sizes'} for the axes {axes}")
    plan = []
    for axis, value in zip(axes, given):
        length = shape[axis]
        if "scales" in at:
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"scale {value} must be positive")
            out, scale = int(math.floor(length * value)), value
        else:
            out = value
            scale = out / length if length else 0.0
        if axis == 0:
            if out != length and not ("sizes" in at and value == 1):  # a batch-1 file's sizes name the batch as 1
                raise ValueError("it resizes the batch axis")
            continue
        if out < 1:
            raise ValueError(f"axis {axis} of length {length} would become {out}")
        if at.get("antialias", 0) and scale < 1:
            raise ValueError("an antialiased downscale")
        if out != length or scale != 1:
            plan.append((axis, out, scale))
    return plan


def source_coordinates(length: int, out: int, scale: float, transform: str) -> np.ndarray:
    """Where each of the ``out`` output positions samples the input axis of ``length``, in input coordinates
    (ONNX's coordinate transformation): float64 ``[out]``."""
    r = np.arange(out, dtype=np.float64)
    if transform == "half_pixel":
        return (r + 0.5) / scale - 0.5
    if transform == "half_pixel_symmetric":
        adjustment = out / (scale * length)
        return length / 2 * (1 - adjustment) + (r + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (r + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if transform == "align_corners":
        return r * (length - 1) / (out - 1) if out > 1 else np.zeros(out)
    if transform == "asymmetric":
        return r / scale
    return (r + 0.5) / scale  # tf_half_pixel_for_nn


def nearest_indices(x: np.ndarray, length: int, rounding: str) -> np.ndarray:
    """The input index each output position takes: ``x`` rounded by ONNX's ``nearest_mode``, clamped to the axis."""
    if rounding == "round_prefer_floor":
        index = np.ceil(x - 0.5)
    elif rounding == "round_prefer_ceil":
        index = np.floor(x + 0.5)
    elif rounding == "floor":
        index = np.floor(x)
    else:
        index = np.ceil(x)
    return np.clip(index, 0, length - 1).astype(np.intp)


def resize_matrix(length: int, out: int, scale: float, at: dict) -> np.ndarray:
    """The map of one axis, float64 ``[out, length]``: row i holds the weights output position i gives the input.

    Linear: the two neighbours of the source coordinate, weighted by distance, indices clamped to the axis (ONNX's
    reference pads the axis with its edge values; onnxruntime clamps the coordinate: the same weights)."""
    x = source_coordinates(length, out, scale, _text(at.get("coordinate_transformation_mode"), "half_pixel"))
    matrix = np.zeros((out, length))
    rows = np.arange(out)
    if _text(at.get("mode"), "nearest") == "nearest":
        matrix[rows, nearest_indices(x, length, _text(at.get("nearest_mode"), "round_prefer_floor"))] = 1.0
        return matrix
    low = np.floor(x)
    t = x - low
    np.add.at(matrix, (rows, np.clip(low, 0, length - 1).astype(np.intp)), 1 - t)
    np.add.at(matrix, (rows, np.clip(low + 1, 0, length - 1).astype(np.intp)), t)
    return matrix


def _along(m: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """``m`` ``[out, in]`` applied to axis ``axis`` of ``x``."""
    return np.moveaxis(np.tensordot(m.astype(x.dtype, copy=False), x, axes=([1], [axis])), 0, axis)


def _forward(a, at):
    x = a[0]
    nearest = _text(at.get("mode"), "nearest") == "nearest"
    for axis, out, scale in _axes_plan(x.shape, at):
        if nearest:  # an index: exact, and an infinite value stays where it is
            coords = source_coordinates(
                x.shape[axis], out, scale, _text(at.get("coordinate_transformation_mode"), "half_pixel")
            )
            rounding = _text(at.get("nearest_mode"), "round_prefer_floor")
            x = np.take(x, nearest_indices(coords, x.shape[axis], rounding), axis=axis)
        else:
            x = _along(resize_matrix(x.shape[axis], out, scale, at), x, axis)
    return x


def _backward(a, at, y, dy, v):
    shape = a[0].shape
    for axis, out, scale in _axes_plan(shape, at):  # each axis's map acts alone: their transposes commute
        dy = _along(resize_matrix(shape[axis], out, scale, at).T, dy, axis + 1)
    return [dy] + [None] * (len(a) - 1)


def _shape(s: list[Shape], at: dict) -> Shape:
    x = list(s[0])
    if len(x) < 2:
        raise ValueError(f"cannot resize {x}")
    for axis, out, _ in _axes_plan(x, at):
        within_budget(f"its axis {axis} map", (out, x[axis]))
        x[axis] = out
    return tuple(x)


RULES: dict[str, Rule] = {"Resize": Rule(_forward, _backward, _shape)}
