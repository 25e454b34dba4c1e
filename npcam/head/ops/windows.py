"""Pooling and convolution: the head's ops whose windows slide over the spatial axes.

Forward and vector-Jacobian product of MaxPool, AveragePool, GlobalMaxPool, GlobalAveragePool and Conv, over
any number of spatial axes (2 onwards), with ONNX's attributes (kernel_shape, strides, pads, dilations,
ceil_mode, count_include_pad, group, auto_pad). The windows are strided views of the padded input (no copy);
a convolution is one matrix product per group on them, and every adjoint adds the window cotangents back,
one kernel offset at a time. The cotangents carry a leading target axis, as in every rule (:mod:`.rule`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .rule import Rule, Shape, within_budget


@dataclass(frozen=True)
class Windows:
    """Where the sliding windows of a pool or a convolution fall on each spatial axis.

    ``pad_begin``: zeros (or -inf) before the input; ``length``: the padded extent the windows read (the input,
    the pads and, with ceil_mode, what the last window hangs over), ``out``: the number of windows.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pad_begin: tuple[int, ...]
    pad_end: tuple[int, ...]  # the explicit (or auto) end pads, without the ceil_mode overhang
    length: tuple[int, ...]
    out: tuple[int, ...]


def windows(spatial: Sequence[int], kernel: Sequence[int], at: dict, ceil: bool = False) -> Windows:
    n = len(spatial)
    kernel = tuple(int(k) for k in kernel)
    strides = tuple(int(s) for s in at.get("strides", [1] * n))
    dilations = tuple(int(d) for d in at.get("dilations", [1] * n))
    pads = [int(p) for p in at.get("pads", [0] * (2 * n))]
    if not len(kernel) == len(strides) == len(dilations) == n or len(pads) != 2 * n:
        raise ValueError(f"kernel, strides, dilations or pads do not fit {n} spatial axes")
    if min(kernel + strides + dilations) < 1 or min(pads) < 0:
        raise ValueError("kernel, strides and dilations must be positive, pads not negative")
    begin, end = pads[:n], pads[n:]
    auto = at.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto == "VALID":
        begin, end = [0] * n, [0] * n
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, s, span in zip(spatial, strides, spans):
            total = max((-(-size // s) - 1) * s + span - size, 0)
            first = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(first)
            end.append(total - first)
    elif auto != "NOTSET":
        raise ValueError(f"auto_pad {auto!r}")
    out, length = [], []
    for size, b, e, s, span in zip(spatial, begin, end, strides, spans):
        room = size + b + e - span
        if room < 0:
            raise ValueError(f"a window of {span} does not fit an axis of {size} padded by {b} and {e}")
        count = (-(-room // s) if ceil else room // s) + 1
        if ceil and (count - 1) * s >= size + b:  # no window starts in the end padding (torch's rule, ONNX's)
            count -= 1
        out.append(count)
        length.append((count - 1) * s + span)
    return Windows(kernel, strides, dilations, tuple(begin), tuple(end), tuple(length), tuple(out))


def window_view(x: np.ndarray, w: Windows, fill: float) -> np.ndarray:
    """``x [N, C, *spatial]`` padded with ``fill`` to the windows' extent, as a strided view
    ``[N, C, *out, *kernel]`` (no copy of the windows)."""
    n = len(w.kernel)
    widths = [(0, 0), (0, 0)]
    crop = [slice(None), slice(None)]
    for size, b, length in zip(x.shape[2:], w.pad_begin, w.length):
        after = length - b - size
        widths.append((b, max(after, 0)))
        crop.append(slice(0, size + min(after, 0)))  # windows that stop short of the input's end
    xp = np.pad(x[tuple(crop)], widths, constant_values=fill) if any(map(any, widths)) else x[tuple(crop)]
    spans = [(k - 1) * d + 1 for k, d in zip(w.kernel, w.dilations)]
    view = np.lib.stride_tricks.sliding_window_view(xp, spans, axis=tuple(range(2, 2 + n)))
    step = tuple(slice(None, None, s) for s in w.strides) + tuple(slice(None, None, d) for d in w.dilations)
    return view[(slice(None), slice(None), *step)]


def scatter_windows(dcols: np.ndarray, x_shape: Sequence[int], w: Windows) -> np.ndarray:
    """The adjoint of :func:`window_view`: add ``dcols [k, N, C, *out, *kernel]`` back onto ``[k, N, C, *spatial]``."""
    extent = [max(length, b + size) for length, b, size in zip(w.length, w.pad_begin, x_shape[2:])]
    dx = np.zeros((*dcols.shape[:3], *extent), dtype=dcols.dtype)
    for offset in itertools.product(*(range(k) for k in w.kernel)):
        region = tuple(
            slice(o * d, o * d + (count - 1) * s + 1, s)
            for o, d, s, count in zip(offset, w.dilations, w.strides, w.out)
        )
        dx[(slice(None), slice(None), slice(None), *region)] += dcols[(Ellipsis, *offset)]
    inner = tuple(slice(b, b + size) for b, size in zip(w.pad_begin, x_shape[2:]))
    return dx[(slice(None), slice(None), slice(None), *inner)]


def pool_windows(x_shape: Sequence[int], at: dict) -> Windows:
    return windows(x_shape[2:], at["kernel_shape"], at, bool(at.get("ceil_mode", 0)))


def max_pool_forward(a, at):
    x = a[0]
    w = pool_windows(x.shape, at)
    n = len(w.kernel)
    return window_view(x, w, -np.inf).max(axis=tuple(range(-n, 0)))


def average_counts(x_shape: Sequence[int], w: Windows, at: dict, dtype) -> np.ndarray:
    """How many values each window averages ``[1, 1, *out]``: the input's, or with count_include_pad the
    pads' too (but not what a ceil_mode window hangs past the end pad), as torch and onnxruntime count."""
    ones = np.ones((1, 1, *x_shape[2:]), dtype=dtype)
    if at.get("count_include_pad", 0):
        ones = np.pad(ones, [(0, 0), (0, 0), *zip(w.pad_begin, w.pad_end)], constant_values=1)
        w = dataclasses.replace(w, pad_begin=(0,) * len(w.kernel))
    return window_view(ones, w, 0.0).sum(axis=tuple(range(-len(w.kernel), 0)))


def average_pool_forward(a, at):
    x = a[0]
    w = pool_windows(x.shape, at)
    total = window_view(x, w, 0.0).sum(axis=tuple(range(-len(w.kernel), 0)))
    return total / average_counts(x.shape, w, at, x.dtype)


def average_pool_backward(a, at, y, dy, v):
    x = a[0]
    w = pool_windows(x.shape, at)
    n = len(w.kernel)
    share = dy / average_counts(x.shape, w, at, x.dtype)
    dcols = np.broadcast_to(share.reshape(*share.shape, *[1] * n), (*share.shape, *w.kernel))
    return [scatter_windows(dcols, x.shape, w)]


def max_pool_backward(a, at, y, dy, v):
    """The gradient goes to each window's maximum: its first, in row order, when values tie (torch's rule)."""
    x = a[0]
    w = pool_windows(x.shape, at)
    n = len(w.kernel)
    view = window_view(x, w, -np.inf)
    first = view.reshape(*view.shape[: 2 + n], -1).argmax(axis=-1)
    hits = (first[..., None] == np.arange(math.prod(w.kernel))).reshape(*first.shape, *w.kernel)
    return [scatter_windows(dy.reshape(*dy.shape, *[1] * n) * hits, x.shape, w)]


def global_max_forward(a, at):
    x = a[0]
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


def global_max_backward(a, at, y, dy, v):
    """To the first maximum of each channel, in row order, as torch's adaptive_max_pool2d(1) routes it."""
    x = a[0]
    flat = x.reshape(*x.shape[:2], -1)
    hits = (flat.argmax(axis=-1)[..., None] == np.arange(flat.shape[-1])).reshape(x.shape)
    return [dy * hits]


def global_average_forward(a, at):
    x = a[0]
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


def global_average_backward(a, at, y, dy, v):
    x = a[0]
    return [np.broadcast_to(dy / math.prod(x.shape[2:]), (dy.shape[0], *x.shape)).copy()]


# Conv: a 1x1 kernel on a 1x1 map (or a flat pooled vector) is a matrix product over channels; anything else
# (k x k, strides, pads, dilations, groups) goes through the windows as one matrix product per group.


def pointwise(x_shape: Sequence[int], w_shape: Sequence[int], at: dict) -> bool:
    return (
        all(d == 1 for d in x_shape[2:])
        and all(d == 1 for d in w_shape[2:])
        and int(at.get("group", 1)) == 1
        and not any(at.get("pads", ()))
        and at.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID")
    )


def conv_windows(x_shape: Sequence[int], w_shape: Sequence[int], at: dict) -> Windows:
    return windows(x_shape[2:], at.get("kernel_shape", w_shape[2:]), at)


def grouped_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a [B, g, P, K] @ b [g, K, M]`` -> ``[B, g, P, M]``, as one ``[B P, K] @ [K, M]`` product per group.

    NumPy's matmul broadcasts ``b`` over B without BLAS, one small product at a time in its own loop: 40x slower
    for a batch of 32 maps through a 1x1 convolution (a D-RISE or Ablation-CAM head pass) than the same work
    as one product.
    """
    batch, groups, positions, inner = a.shape
    rows = a.transpose(1, 0, 2, 3).reshape(groups, batch * positions, inner)
    out = np.matmul(rows, b)  # [g, B P, M]: equal stacks, each product in BLAS
    return out.reshape(groups, batch, positions, -1).transpose(1, 0, 2, 3)


def conv_forward(a, at):
    x, weight = a[0], a[1]
    if pointwise(x.shape, weight.shape, at):
        y = x.reshape(x.shape[0], -1) @ weight.reshape(weight.shape[0], -1).T
        if len(a) > 2:
            y = y + a[2]
        return y.reshape(x.shape[0], weight.shape[0], 1, 1)
    w = conv_windows(x.shape, weight.shape, at)
    groups, n = int(at.get("group", 1)), len(w.kernel)
    batch, channels, filters = x.shape[0], x.shape[1], weight.shape[0]
    view = window_view(x, w, 0.0)  # [N, C, *out, *kernel]
    view = view.reshape(batch, groups, channels // groups, *w.out, *w.kernel)
    # The im2col columns laid out [g, C/g * kernel, N * positions]: the copy then runs along the output's rows,
    # contiguous in the input at stride 1 (2-3x faster than gathering each position's few kernel taps), and
    # [g, M/g, C/g * kernel] @ columns is one BLAS product per group.
    order = (1, 2, *range(3 + n, 3 + 2 * n), 0, *range(3, 3 + n))
    cols = view.transpose(order).reshape(groups, (channels // groups) * math.prod(w.kernel), -1)
    kernels = weight.reshape(groups, filters // groups, -1)
    y = np.matmul(kernels, cols)  # [g, M/g, N * positions]
    y = y.reshape(filters, batch, *w.out).swapaxes(0, 1)
    if len(a) > 2:
        y = y + a[2].reshape(1, -1, *[1] * n)
    return y


def conv_backward(a, at, y, dy, v):
    if any(v[1:]):
        raise ValueError("Conv: the weights and bias must be constants")
    x, weight = a[0], a[1]
    k = dy.shape[0]
    if pointwise(x.shape, weight.shape, at):
        dx = dy.reshape(k, -1) @ weight.reshape(weight.shape[0], -1)
        return [dx.reshape(k, *x.shape)] + [None] * (len(a) - 1)
    w = conv_windows(x.shape, weight.shape, at)
    groups, n = int(at.get("group", 1)), len(w.kernel)
    batch, channels, filters = x.shape[0], x.shape[1], weight.shape[0]
    g = dy.reshape(k * batch, groups, filters // groups, -1).transpose(0, 1, 3, 2)  # [kN, g, positions, M/g]
    dcols = grouped_matmul(g, weight.reshape(groups, filters // groups, -1))  # [kN, g, positions, C/g * kernel]
    dcols = dcols.reshape(k * batch, groups, *w.out, channels // groups, *w.kernel)
    order = (0, 1, 2 + n, *range(2, 2 + n), *range(3 + n, 3 + 2 * n))
    dcols = dcols.transpose(order).reshape(k, batch, channels, *w.out, *w.kernel)
    return [scatter_windows(dcols, x.shape, w)] + [None] * (len(a) - 1)


def _within_windows_budget(x: Shape, win: Windows) -> None:
    """What a pool or a convolution allocates besides its output: the padded input (huge pads with a huge
    stride give a small output) and the windows' copy (a huge kernel)."""
    padded = [max(n, b + size + e) for n, b, size, e in zip(win.length, win.pad_begin, x[2:], win.pad_end)]
    within_budget("its padded input", (x[0], x[1], *padded))
    within_budget("its windows", (x[0], x[1], *win.out, *win.kernel))


def _spatial(x: Shape, what: str) -> None:
    if len(x) < 3:
        raise ValueError(f"{what} needs an input [N, C, spatial...], not {list(x)}")


def _conv_shape(s: list[Shape], at: dict) -> Shape:
    x, w = s[0], s[1]
    if len(x) < 1 or len(w) < 1:
        raise ValueError("needs an input and a weight")
    if pointwise(x, w, at):
        if math.prod(x[1:]) != math.prod(w[1:]):
            raise ValueError(f"input {list(x)} and weight {list(w)} do not fit a 1x1 convolution")
        if len(s) > 2 and math.prod(np.broadcast_shapes((x[0], w[0]), s[2])) != x[0] * w[0]:
            raise ValueError(f"bias {list(s[2])} does not fit {w[0]} channels")
        return (x[0], w[0], 1, 1)
    _spatial(x, "a convolution")
    groups = int(at.get("group", 1))
    if len(w) != len(x) or groups < 1 or x[1] != w[1] * groups or w[0] % groups:
        raise ValueError(f"input {list(x)} and weight {list(w)} do not fit a convolution in {groups} groups")
    if "kernel_shape" in at and tuple(int(k) for k in at["kernel_shape"]) != tuple(w[2:]):
        raise ValueError(f"kernel_shape {list(at['kernel_shape'])} is not the weight's {list(w[2:])}")
    if len(s) > 2 and tuple(s[2]) != (w[0],):
        raise ValueError(f"bias {list(s[2])} does not fit {w[0]} channels")
    win = conv_windows(x, w, at)
    _within_windows_budget(x, win)
    return (x[0], w[0], *win.out)


def _pool_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    _spatial(x, "a pool")
    win = pool_windows(x, at)
    _within_windows_budget(x, win)
    return (x[0], x[1], *win.out)


def _global_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    _spatial(x, "a global pool")
    return (x[0], x[1], *[1] * (len(x) - 2))


RULES: dict[str, Rule] = {
    "Conv": Rule(conv_forward, conv_backward, _conv_shape),
    "MaxPool": Rule(max_pool_forward, max_pool_backward, _pool_shape),
    "AveragePool": Rule(average_pool_forward, average_pool_backward, _pool_shape),
    "GlobalMaxPool": Rule(global_max_forward, global_max_backward, _global_shape),
    "GlobalAveragePool": Rule(global_average_forward, global_average_backward, _global_shape),
}
