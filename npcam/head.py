"""The classifier head: from the pooled feature vector to the class scores, in NumPy.

Every network npcam explains pools its last conv features globally,
``p = mean_xy A[:, x, y]``, and then scores the classes with a head ``y = f(p)``.

- :class:`AffineHead`: ``f(p) = W p + b``. This is where CAM is defined
  (Zhou et al. 2016): the map ``W_c . A`` averages to the score.
- :class:`GraphHead`: any small function of ``p`` (a 1x1 conv and HardSwish
  as in MobileNetV3, LayerNorm as in ConvNeXt, an MLP), kept as a list of ONNX-like
  ops. npcam evaluates it and its exact gradient here, in float64: since the
  pooling spreads ``df/dp_k`` evenly over positions, that gradient is all
  Grad-CAM needs (Selvaraju et al. 2017), with no autograd framework.

Both have ``forward(pooled) -> scores`` and ``gradient(pooled, classes) -> d score / d pooled``.
The graph format is written by the exporter (``head.json`` + ``head.npz``) and
documented in docs/formats.md ("The head graph").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# The largest tensor a head may compute, in values for one image (512 MiB in float64). Real heads stay far
# below (a 21,843-class layer on 2,048 channels holds 45 M values); this only bounds what a hostile head.json
# could make a load allocate.
MAX_VALUES = 2**26


class AffineHead:
    """``scores = pooled @ weight.T + bias``: one linear layer after global average pooling.

    Parameters
    ----------
    weight : float32 ``[K, C]``
    bias : float32 ``[K]``
    """

    kind = "affine"

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        self.weight = weight
        self.bias = bias

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    @property
    def classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, pooled: np.ndarray) -> np.ndarray:
        """float32 ``[N, C]`` to float32 ``[N, K]``."""
        return pooled @ self.weight.T + self.bias

    def gradient(self, pooled: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """``d scores[c] / d pooled`` for each class: the FC rows, float64 ``[k, C]`` (``pooled`` is unused)."""
        return self.weight[np.asarray(classes, dtype=np.intp)].astype(np.float64)


@dataclass(frozen=True)
class Op:
    """One node of a graph head: ``output = op(*inputs, **attrs)``.

    An input names either an earlier op's output (or the head's input) or a
    constant array of the head.
    """

    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict = field(default_factory=dict)


class GraphHead:
    """A head given as a list of ops on the pooled vector, evaluated in float64.

    Parameters
    ----------
    ops : the nodes in an order where each input is computed before it is used
    arrays : the constants the ops name
    input_shape : the pooled tensor's layout with -1 for the batch, e.g.
        ``[-1, C, 1, 1]`` after GlobalAveragePool, ``[-1, C]`` after a flat mean
    input, output : names of the pooled tensor and of the scores
    """

    kind = "graph"

    def __init__(
        self,
        ops: Sequence[Op],
        arrays: dict[str, np.ndarray],
        input_shape: Sequence[int],
        input: str = "pooled",
        output: str = "scores",
    ):
        self.ops = list(ops)
        self.arrays = {k: np.asarray(v, dtype=np.float64) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input = input
        self.output = output
        for op in self.ops:
            if op.op not in OPS:
                raise ValueError(f"unsupported op {op.op} in the head")
        # Shapes first, statically: a hostile head (an Expand to billions of values) is refused before
        # the zero forward below would allocate it.
        self.shapes = infer_shapes(self.ops, self.arrays, self.input_shape, self.input)
        self.classes = int(self.forward(np.zeros((1, self.channels))).shape[1])

    @property
    def channels(self) -> int:
        return math.prod(self.input_shape[1:])

    def _run(self, pooled: np.ndarray) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {self.input: pooled.astype(np.float64).reshape(-1, *self.input_shape[1:])}
        for op in self.ops:
            args = [values[n] if n in values else self.arrays[n] for n in op.inputs]
            values[op.output] = OPS[op.op].forward(args, op.attrs)
        return values

    def forward(self, pooled: np.ndarray) -> np.ndarray:
        """float ``[N, C]`` to float32 ``[N, K]``."""
        return self.forward_float64(pooled).astype(np.float32)

    def forward_float64(self, pooled: np.ndarray) -> np.ndarray:
        """float ``[N, C]`` to float64 ``[N, K]``, as computed."""
        scores = self._run(pooled)[self.output]
        return scores.reshape(scores.shape[0], -1)

    def gradient(self, pooled: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """``d scores[c] / d pooled`` at this image's pooled vector, by reverse mode: float64 ``[k, C]``.

        One backward pass for all classes: the cotangent carries one row per class.
        """
        values = self._run(pooled.reshape(1, -1))
        classes = np.asarray(classes, dtype=np.intp)
        scores = values[self.output]
        seed = np.zeros((len(classes), scores.reshape(1, -1).shape[1]))
        seed[np.arange(len(classes)), classes] = 1.0
        grads: dict[str, np.ndarray] = {self.output: seed.reshape(len(classes), *scores.shape[1:])}
        for op in reversed(self.ops):
            dy = grads.pop(op.output, None)
            if dy is None:
                continue  # this op does not reach the scores
            args = [values[n] if n in values else self.arrays[n] for n in op.inputs]
            variable = [n in values for n in op.inputs]
            for name, is_var, g in zip(
                op.inputs, variable, OPS[op.op].backward(args, op.attrs, values[op.output], dy, variable)
            ):
                if is_var and g is not None:
                    grads[name] = grads[name] + g if name in grads else g
        return grads[self.input].reshape(len(classes), -1)


# The ops: forward on float64 arrays (batch first), and the vector-Jacobian product.
# backward(args, attrs, y, dy, variable) returns one gradient per input (None for constants);
# dy has a batch of k (one row per class) where the forward ran on a batch of 1.


@dataclass(frozen=True)
class _Rule:
    """An op: ``forward(args, attrs) -> y`` and ``backward(args, attrs, y, dy, variable) -> [dx or None]``."""

    forward: Callable
    backward: Callable


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``g`` down to ``shape`` (keeping ``g``'s batch), undoing NumPy broadcasting."""
    target = (g.shape[0], *shape[1:]) if len(shape) == g.ndim else shape
    while g.ndim > len(target):
        g = g.sum(axis=0)
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, target)) if b == 1 and a != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _elementwise(f, df):
    """A pointwise op ``y = f(x)`` with ``dy/dx = df(x, y)``."""
    return _Rule(
        lambda a, at: f(a[0], at),
        lambda a, at, y, dy, v: [dy * df(a[0], y, at)],
    )


def _binary(f, dfa, dfb):
    return _Rule(
        lambda a, at: f(a[0], a[1]),
        lambda a, at, y, dy, v: [
            _unbroadcast(dy * dfa(a[0], a[1]), a[0].shape) if v[0] else None,
            _unbroadcast(dy * dfb(a[0], a[1]), a[1].shape) if v[1] else None,
        ],
    )


def _gemm_forward(a, at):
    x = a[0].T if at.get("transA", 0) else a[0]
    w = a[1].T if at.get("transB", 0) else a[1]
    y = at.get("alpha", 1.0) * (x @ w)
    return y + at.get("beta", 1.0) * a[2] if len(a) > 2 else y


def _gemm_backward(a, at, y, dy, v):
    if at.get("transA", 0) or v[1:] != [False] * (len(a) - 1):
        raise ValueError("Gemm: only the first input may depend on the pooled vector, untransposed")
    w = a[1].T if at.get("transB", 0) else a[1]
    return [at.get("alpha", 1.0) * dy @ w.T] + [None] * (len(a) - 1)


def _pow_backward(a, at, y, dy, v):
    if v[1]:
        raise ValueError("Pow: the exponent must be a constant")
    return [dy * a[1] * a[0] ** (a[1] - 1), None]


def _matmul_backward(a, at, y, dy, v):
    if v[1] or a[1].ndim != 2:
        raise ValueError("MatMul: the second input must be a constant matrix")
    return [dy @ a[1].T, None]


def _conv_forward(a, at):
    """A 1x1 convolution on a 1x1 map: a matrix product over channels."""
    x, w = a[0], a[1]
    y = x.reshape(x.shape[0], -1) @ w.reshape(w.shape[0], -1).T
    if len(a) > 2:
        y = y + a[2]
    return y.reshape(x.shape[0], w.shape[0], 1, 1)


def _conv_backward(a, at, y, dy, v):
    w = a[1]
    dx = dy.reshape(dy.shape[0], -1) @ w.reshape(w.shape[0], -1)
    return [dx.reshape(dy.shape[0], *a[0].shape[1:])] + [None] * (len(a) - 1)


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
    g = dy * a[1]
    dx = inv_std * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return [dx] + [None] * (len(a) - 1)


def _reshape_to(x: np.ndarray, shape) -> np.ndarray:
    """ONNX Reshape: a 0 copies the input's dimension, -1 is inferred."""
    shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def _like_input(a, dy):
    """Reshape the cotangent to the op's input shape, with the cotangent's batch."""
    return [dy.reshape(dy.shape[0], *a[0].shape[1:])] + [None] * (len(a) - 1)


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
            dy, y = np.expand_dims(dy, axes), np.expand_dims(y, axes)
        return [np.broadcast_to(dy * df(x, y, axes), (dy.shape[0], *x.shape[1:])).copy()]

    return _Rule(forward, backward)


def _l2_gradient(x, y, axes):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(y > 0, x / y, 0.0)  # the norm's subgradient 0 at 0, as torch's


def _prelu_backward(a, at, y, dy, v):
    if v[1]:
        raise ValueError("PRelu: the slope must be a constant")
    x, slope = a
    return [dy * np.where(x > 0, 1.0, slope), None]


def _expand_backward(a, at, y, dy, v):
    return [_unbroadcast(dy, a[0].shape)]


# Quantization (QDQ models, as onnxruntime's quantizer writes them). The forward is exact. The gradient is the
# straight-through one: a QuantizeLinear -> DequantizeLinear pair passes it unchanged, so Grad-CAM explains the
# float head that the int8 one approximates. Rounding's own derivative is zero almost everywhere, and a clipped
# value (a logit outside the calibrated range) has none at all: either would leave empty maps.


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


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _gelu(x, at):
    if at.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _dgelu(x, y, at):
    if at.get("approximate", "none") == "tanh":
        k = math.sqrt(2 / math.pi)
        t = np.tanh(k * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _hard_sigmoid(x, at):
    return np.clip(at.get("alpha", 0.2) * x + at.get("beta", 0.5), 0, 1)


def _clip_bounds(at):
    return at.get("min", -np.inf), at.get("max", np.inf)


OPS: dict[str, _Rule] = {
    "Gemm": _Rule(_gemm_forward, _gemm_backward),
    "MatMul": _Rule(lambda a, at: a[0] @ a[1], _matmul_backward),
    "Conv": _Rule(_conv_forward, _conv_backward),
    "Add": _binary(np.add, lambda a, b: 1.0, lambda a, b: 1.0),
    "Sub": _binary(np.subtract, lambda a, b: 1.0, lambda a, b: -1.0),
    "Mul": _binary(np.multiply, lambda a, b: b, lambda a, b: a),
    "Div": _binary(np.divide, lambda a, b: 1.0 / b, lambda a, b: -a / b**2),
    "Pow": _Rule(lambda a, at: a[0] ** a[1], _pow_backward),
    "Relu": _elementwise(lambda x, at: np.maximum(x, 0), lambda x, y, at: x > 0),
    "LeakyRelu": _elementwise(
        lambda x, at: np.where(x > 0, x, at.get("alpha", 0.01) * x),
        lambda x, y, at: np.where(x > 0, 1.0, at.get("alpha", 0.01)),
    ),
    "Clip": _elementwise(
        lambda x, at: np.clip(x, *_clip_bounds(at)),
        lambda x, y, at: (x > _clip_bounds(at)[0]) & (x < _clip_bounds(at)[1]),
    ),
    "HardSigmoid": _elementwise(
        _hard_sigmoid,
        lambda x, y, at: at.get("alpha", 0.2) * ((y > 0) & (y < 1)),
    ),
    "HardSwish": _elementwise(
        lambda x, at: x * np.clip(x / 6 + 0.5, 0, 1),
        # torch's rule: 0 below -3, x/3 + 1/2 up to 3, 1 above.
        lambda x, y, at: np.where(x < -3, 0.0, np.where(x <= 3, x / 3 + 0.5, 1.0)),
    ),
    "Sigmoid": _elementwise(lambda x, at: 1 / (1 + np.exp(-x)), lambda x, y, at: y * (1 - y)),
    "Tanh": _elementwise(lambda x, at: np.tanh(x), lambda x, y, at: 1 - y**2),
    "Erf": _elementwise(lambda x, at: _erf(x), lambda x, y, at: 2 / math.sqrt(math.pi) * np.exp(-(x**2))),
    "Gelu": _elementwise(_gelu, _dgelu),
    "Sqrt": _elementwise(lambda x, at: np.sqrt(x), lambda x, y, at: 0.5 / y),
    "Neg": _elementwise(lambda x, at: -x, lambda x, y, at: -1.0),
    "BatchNormalization": _Rule(_bn_forward, _bn_backward),
    "LayerNormalization": _Rule(_ln_forward, _ln_backward),
    "Max": _binary(np.maximum, lambda a, b: a >= b, lambda a, b: a < b),
    "Min": _binary(np.minimum, lambda a, b: a <= b, lambda a, b: a > b),
    "PRelu": _Rule(lambda a, at: np.where(a[0] > 0, a[0], a[1] * a[0]), _prelu_backward),
    "Elu": _elementwise(
        lambda x, at: np.where(x > 0, x, at.get("alpha", 1.0) * np.expm1(np.minimum(x, 0))),
        lambda x, y, at: np.where(x > 0, 1.0, y + at.get("alpha", 1.0)),
    ),
    "Softplus": _elementwise(lambda x, at: np.logaddexp(0, x), lambda x, y, at: 1 / (1 + np.exp(-x))),
    "Exp": _elementwise(lambda x, at: np.exp(x), lambda x, y, at: y),
    "Log": _elementwise(lambda x, at: np.log(x), lambda x, y, at: 1 / x),
    "Abs": _elementwise(lambda x, at: np.abs(x), lambda x, y, at: np.sign(x)),
    "ReduceMean": _reduce(
        lambda x, axes, keep: x.mean(axis=axes, keepdims=keep),
        lambda x, y, axes: 1.0 / math.prod(x.shape[ax] for ax in axes),
    ),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(axis=axes, keepdims=keep), lambda x, y, axes: 1.0),
    "ReduceL2": _reduce(lambda x, axes, keep: np.sqrt((x**2).sum(axis=axes, keepdims=keep)), _l2_gradient),
    "Expand": _Rule(lambda a, at: a[0] * np.ones(at["shape"]), _expand_backward),
    "QuantizeLinear": _Rule(lambda a, at: quantize(*a, axis=at.get("axis", 1)), _quantize_backward),
    "DequantizeLinear": _Rule(lambda a, at: dequantize(*a, axis=at.get("axis", 1)), _dequantize_backward),
    "Flatten": _Rule(
        lambda a, at: a[0].reshape(math.prod(a[0].shape[: at.get("axis", 1)]), -1),
        lambda a, at, y, dy, v: _like_input(a, dy),
    ),
    "Reshape": _Rule(lambda a, at: _reshape_to(a[0], at["shape"]), lambda a, at, y, dy, v: _like_input(a, dy)),
    "Squeeze": _Rule(
        lambda a, at: np.squeeze(a[0], axis=tuple(at["axes"])),
        lambda a, at, y, dy, v: _like_input(a, dy),
    ),
    "Unsqueeze": _Rule(
        lambda a, at: np.expand_dims(a[0], axis=tuple(at["axes"])),
        lambda a, at, y, dy, v: _like_input(a, dy),
    ),
    "Transpose": _Rule(
        lambda a, at: np.transpose(a[0], at["perm"]),
        lambda a, at, y, dy, v: [np.transpose(dy, np.argsort(at["perm"]))],
    ),
}


# Static shapes: each op's output shape from its inputs', without computing anything.

_SAME_SHAPE = {
    "Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Erf", "Gelu", "Sqrt", "Neg",
    "Elu", "Softplus", "Exp", "Log", "Abs",
}  # fmt: skip
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "LayerNormalization"}


def infer_shapes(
    ops: Sequence[Op], arrays: dict[str, np.ndarray], input_shape: Sequence[int], input: str
) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for a batch of one, as :meth:`GraphHead.forward` would compute it.

    Raises ValueError, naming the op, for shapes that do not fit together, and for any tensor (the input
    included) over :data:`MAX_VALUES` values.
    """
    if len(input_shape) < 2 or any(d <= 0 for d in input_shape[1:]):
        raise ValueError(f"input_shape {list(input_shape)} must be [-1, positive sizes...]")
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    shapes[input] = (1, *input_shape[1:])
    _within_budget(f"the input {input!r}", shapes[input])
    for op in ops:
        try:
            args = [shapes[n] for n in op.inputs]
            out = _output_shape(op.op, args, op.attrs)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"op {op.op} ({op.output!r}): {e}") from None
        _within_budget(f"op {op.op} ({op.output!r})", out)
        shapes[op.output] = out
    return shapes


def _within_budget(what: str, shape: Sequence[int]) -> None:
    values = math.prod(shape)
    if values > MAX_VALUES:
        raise ValueError(f"{what} would hold {values:,} values for one image, over the limit of {MAX_VALUES:,}")


def _output_shape(name: str, s: list[tuple[int, ...]], at: dict) -> tuple[int, ...]:
    if not s:
        raise ValueError("no inputs")
    x = s[0]
    if name in _SAME_SHAPE:
        return x
    if name in _BROADCAST:
        return tuple(np.broadcast_shapes(*s))
    if name == "Gemm":
        if len(x) != 2 or len(s[1]) != 2:
            raise ValueError(f"needs 2-D inputs, not {list(x)} and {list(s[1])}")
        rows, inner = x[::-1] if at.get("transA", 0) else x
        inner_w, cols = s[1][::-1] if at.get("transB", 0) else s[1]
        if inner != inner_w:
            raise ValueError(f"shapes {list(x)} and {list(s[1])} do not multiply")
        return tuple(np.broadcast_shapes((rows, cols), *s[2:3]))
    if name == "MatMul":
        a, b = x, s[1]
        if not a or not b:
            raise ValueError("scalars do not multiply")
        a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
        if a2[-1] != b2[-2]:
            raise ValueError(f"shapes {list(a)} and {list(b)} do not multiply")
        out = (*np.broadcast_shapes(a2[:-2], b2[:-2]), a2[-2], b2[-1])
        return out[: len(out) - 2] + out[len(out) - 2 + (len(a) == 1) : len(out) - (len(b) == 1)]
    if name == "Conv":
        w = s[1]
        if len(x) < 1 or len(w) < 1 or math.prod(x[1:]) != math.prod(w[1:]):
            raise ValueError(f"input {list(x)} and weight {list(w)} do not fit a 1x1 convolution")
        if len(s) > 2 and math.prod(np.broadcast_shapes((x[0], w[0]), s[2])) != x[0] * w[0]:
            raise ValueError(f"bias {list(s[2])} does not fit {w[0]} channels")
        return (x[0], w[0], 1, 1)
    if name == "BatchNormalization":
        if len(x) < 2 or len(s) != 5:
            raise ValueError("needs an input of 2 or more dimensions and 4 parameters")
        params = math.prod(np.broadcast_shapes(*s[1:]))
        return tuple(np.broadcast_shapes(x, (1, params) + (1,) * (len(x) - 2)))
    if name in ("ReduceMean", "ReduceSum", "ReduceL2"):
        axes = {int(ax) % len(x) for ax in at.get("axes", range(len(x)))} if x else set()
        keep = bool(at.get("keepdims", 1))
        return tuple(1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes)
    if name == "Expand":
        shape = tuple(int(d) for d in at["shape"])
        if any(d < 0 for d in shape):
            raise ValueError(f"shape {list(shape)} has a negative size")
        if math.prod(shape) > MAX_VALUES:  # the forward multiplies by np.ones(shape)
            raise ValueError(f"its shape would hold {math.prod(shape):,} values, over the limit of {MAX_VALUES:,}")
        return tuple(np.broadcast_shapes(x, shape))
    if name in ("QuantizeLinear", "DequantizeLinear"):
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
    if name == "Flatten":
        axis = int(at.get("axis", 1))
        first = math.prod(x[:axis])
        if first == 0:
            raise ValueError(f"cannot flatten {list(x)} at axis {axis}")
        return (first, math.prod(x) // first)
    if name == "Reshape":
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
    if name == "Squeeze":
        axes = {int(ax) % len(x) for ax in at["axes"]} if x else set()
        if any(x[ax] != 1 for ax in axes):
            raise ValueError(f"cannot squeeze axes {sorted(axes)} of {list(x)}")
        return tuple(d for i, d in enumerate(x) if i not in axes)
    if name == "Unsqueeze":
        n = len(x) + len(at["axes"])
        axes = {int(ax) % n for ax in at["axes"]}
        if len(axes) != len(at["axes"]):
            raise ValueError(f"repeated axes {list(at['axes'])}")
        rest = iter(x)
        return tuple(1 if i in axes else next(rest) for i in range(n))
    if name == "Transpose":
        perm = [int(p) for p in at["perm"]]
        if sorted(perm) != list(range(len(x))):
            raise ValueError(f"perm {perm} is not a permutation of the {len(x)} axes")
        return tuple(x[p] for p in perm)
    raise ValueError(f"unsupported op {name}")
