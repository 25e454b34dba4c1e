"""The classifier head: from the layer tensor the maps explain to the class scores, in NumPy.

A head starts at the *pooled* vector of a global average pooling, or at a spatial map or a token tensor
(Flatten/FC and max-pooled CNNs, vision transformers: the head is then the rest of the network after the cut).

- :class:`AffineHead`: ``f(p) = W p + b`` after global average pooling. This is where CAM is defined
  (Zhou et al. 2016): the map ``W_c . A`` averages to the score.
- :class:`GraphHead`: any small function of the head's input (a 1x1 conv and HardSwish as in MobileNetV3,
  LayerNorm as in ConvNeXt, an MLP, VGG's Flatten and fully connected layers, a transformer's last block),
  kept as a list of ONNX ops. npcam evaluates it and its exact gradient here, by reverse mode, with no
  autograd framework: ``d score_c / d A`` at every position and channel is what the gradient CAM methods
  need (Selvaraju et al. 2017).

Both have ``forward(x) -> scores`` and ``gradient(x, classes) -> d score / d x``.
The graph format is written by the exporter (``head.json`` + ``head.npz``) and
documented in docs/formats.md ("The head graph").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import head_windows as windows

# The largest tensor a head may compute, in values for one image (512 MiB in float64). Real heads stay far
# below (a 21,843-class layer on 2,048 channels holds 45 M values); this only bounds what a hostile head.json
# could make a load allocate.
MAX_VALUES = 2**26

# What a graph head computes in: float64 is exact to rounding; float32 is for heads where float64 is slow.
PRECISIONS = ("float64", "float32")


class AffineHead:
    """``scores = pooled @ weight.T + bias``: one linear layer after global average pooling.

    Parameters
    ----------
    weight : float32 ``[K, C]``
    bias : float32 ``[K]``
    """

    kind = "affine"
    layout = "pooled"  # what its input is: the pooled vector (see GraphHead)
    grid = None
    prefix = 0

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
    """A head given as a list of ops on the layer tensor (pooled vector, spatial map or tokens).

    Parameters
    ----------
    ops : the nodes in an order where each input is computed before it is used
    arrays : the constants the ops name
    input_shape : the head input's layout with -1 for the batch: ``[-1, C, 1, 1]`` after GlobalAveragePool,
        ``[-1, C]`` after a flat mean (both "pooled"), ``[-1, C, h, w]`` for a spatial map, ``[-1, L, C]`` for tokens
    input, output : names of the head's input and of the scores
    sides : ``{name: shape}`` (shape with -1 for the batch) of other trunk tensors the ops read, such as the
        residual stream before the cut. They are constants for :meth:`gradient`, as a forward hook on the layer
        makes them in autograd.
    precision : ``"float64"`` (exact to rounding) or ``"float32"`` (a transformer block: about 2x faster, see
        docs/formats.md)
    layout : what the input is: ``"pooled"`` (a globally average-pooled vector), ``"spatial"`` (``[-1, C, h, w]``)
        or ``"tokens"`` (``[-1, L, C]``)
    grid : tokens only: ``(gh, gw)``, the patch tokens' grid (row-major)
    prefix : tokens only: how many tokens come before the patch tokens (1 for a CLS token, 2 with a
        distillation token, 0 for a mean-pooled model); ``L = prefix + gh * gw``
    """

    kind = "graph"

    def __init__(
        self,
        ops: Sequence[Op],
        arrays: dict[str, np.ndarray],
        input_shape: Sequence[int],
        input: str = "pooled",
        output: str = "scores",
        sides: dict[str, Sequence[int]] | None = None,
        precision: str = "float64",
        layout: str = "pooled",
        grid: Sequence[int] | None = None,
        prefix: int = 0,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.layout, self.grid, self.prefix = _check_layout(layout, input_shape, grid, prefix)
        self.precision = precision
        self.dtype = np.dtype(precision)
        self.ops = list(ops)
        # The constants, in the precision the head runs in (a float32 VGG head would take 1 GB more in float64).
        self.arrays = {k: np.asarray(v, dtype=self.dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input = input
        self.output = output
        self.sides = {name: tuple(int(d) for d in shape) for name, shape in (sides or {}).items()}
        for op in self.ops:
            if op.op not in OPS:
                raise ValueError(f"unsupported op {op.op} in the head")
        # Shapes first, statically: a hostile head (an Expand to billions of values) is refused before
        # the zero forward below would allocate it.
        self.shapes = infer_shapes(self.ops, self.arrays, self.input_shape, self.input, self.sides)
        rewritten = select_token_early(self.ops, self.arrays, self.shapes, self.output)
        if rewritten is not self.ops:
            self.ops = rewritten
            self.shapes = infer_shapes(self.ops, self.arrays, self.input_shape, self.input, self.sides)
        # What depends on the input: the only tensors the gradient flows through (sides are constants).
        self._variable = {self.input}
        for op in self.ops:
            if any(n in self._variable for n in op.inputs):
                self._variable.add(op.output)
        zero_sides = {name: np.zeros((1, *shape[1:])) for name, shape in self.sides.items()}
        self.classes = int(self.forward(np.zeros((1, self.channels)), zero_sides).shape[1])

    @property
    def channels(self) -> int:
        """The number of values of the head's input for one image (C for a pooled head)."""
        return math.prod(self.input_shape[1:])

    def _run(self, x: np.ndarray, sides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {self.input: x.astype(self.dtype).reshape(-1, *self.input_shape[1:])}
        batch = values[self.input].shape[0]
        for name, shape in self.sides.items():
            if sides is None or name not in sides:
                raise ValueError(f"the head reads the side input {name!r}, which was not given")
            side = np.asarray(sides[name]).astype(self.dtype, copy=False).reshape(-1, *shape[1:])
            if side.shape[0] != batch:  # one image's sides for a batch of variants of its layer (ablation)
                if side.shape[0] != 1:
                    raise ValueError(f"side input {name!r} has a batch of {side.shape[0]}, the input {batch}")
                side = np.broadcast_to(side, (batch, *side.shape[1:]))
            values[name] = side
        for op in self.ops:
            args = [values[n] if n in values else self.arrays[n] for n in op.inputs]
            values[op.output] = OPS[op.op].forward(args, op.attrs)
        return values

    def forward(self, x: np.ndarray, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """float ``[N, *input_shape[1:]]`` (or ``[N, prod]``) to float32 ``[N, K]``.

        ``sides`` maps each side input's name to its ``[N, ...]`` array (a batch of 1 is shared by all N).
        """
        return self.forward_float64(x, sides).astype(np.float32)

    def forward_float64(self, x: np.ndarray, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """As :meth:`forward`, float64 ``[N, K]``: as computed (in float32 for a float32 head)."""
        scores = self._run(x, sides)[self.output]
        return scores.reshape(scores.shape[0], -1).astype(np.float64, copy=False)

    def trace(self, x: np.ndarray, sides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One image's forward, keeping every value for :meth:`gradient` (``trace=``) to reuse, so that a
        transformer block does not run twice. ``trace[head.output]`` is the scores ``[1, K]`` as computed."""
        return self._run(x.reshape(1, -1), sides)

    def gradient(
        self,
        x: np.ndarray,
        classes: Sequence[int],
        sides: dict[str, np.ndarray] | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``d scores[c] / d x`` at one image's input, by reverse mode: float64 ``[k, prod(input_shape[1:])]``.

        ``x`` is one image's input (batch 1); with ``trace`` (:meth:`trace` of that same input) its forward
        is not run again. One backward pass for all classes: every cotangent carries a leading axis of k
        classes before the forward value's own shape (whose batch is 1), so each op's vector-Jacobian
        product broadcasts the forward values over it. Callers reshape to ``[k, *input_shape[1:]]``. The
        side inputs are constants.
        """
        values = self._run(x.reshape(1, -1), sides) if trace is None else trace
        classes = np.asarray(classes, dtype=np.intp)
        scores = values[self.output]
        seed = np.zeros((len(classes), scores.size), dtype=self.dtype)
        seed[np.arange(len(classes)), classes] = 1.0
        grads: dict[str, np.ndarray] = {self.output: seed.reshape(len(classes), *scores.shape)}
        for op in reversed(self.ops):
            dy = grads.pop(op.output, None)
            if dy is None or op.output not in self._variable:
                continue  # this op does not reach the scores, or does not depend on the input
            args = [values[n] if n in values else self.arrays[n] for n in op.inputs]
            variable = [n in self._variable for n in op.inputs]
            for name, is_var, g in zip(
                op.inputs, variable, OPS[op.op].backward(args, op.attrs, values[op.output], dy, variable)
            ):
                if is_var and g is not None:
                    grads[name] = grads[name] + g if name in grads else g
        if self.input not in grads:
            return np.zeros((len(classes), self.channels))
        return grads[self.input].reshape(len(classes), -1).astype(np.float64, copy=False)


# Ops that act on each token alone, so that taking one token commutes with them (select_token_early).
_TOKENWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


def select_token_early(
    ops: Sequence[Op], arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], output: str
) -> list[Op]:
    """The ops with each one-token Gather moved above the token-wise ops that feed it: the same function.

    A ViT's head ends ``LayerNorm -> Gather(CLS) -> Gemm``, and the last block's MLP, second LayerNorm and
    residual adds act on each token alone. Taking the CLS token before them, not after, runs them on 1
    token instead of L (197 for ViT/16), forward and backward; the attention, which mixes tokens, still
    runs on all. A Gather moves up through an op when it takes one token (axis 1 of a ``[1, L, C]`` value,
    a constant scalar index) and every consumer of that op's output is such a Gather of the same token; the
    op is elementwise (unary, or binary with constants that do not reach the token axis), a
    LayerNormalization over the last axis, or a MatMul by a constant matrix. Returns ``ops`` itself when
    nothing moves.
    """
    original, ops, shapes = ops, list(ops), dict(shapes)
    names = {n for op in ops for n in (*op.inputs, op.output)} | set(arrays)
    changed = False
    while True:
        producer = {op.output: i for i, op in enumerate(ops)}
        consumers: dict[str, list[int]] = {}
        for i, op in enumerate(ops):
            for n in op.inputs:
                consumers.setdefault(n, []).append(i)
        move = None
        for g in ops:
            token = _token_of(g, arrays, shapes)
            t = g.inputs[0] if token is not None else None
            if t is None or t == output or t not in producer:
                continue
            users = consumers.get(t, [])
            if not all(_token_of(ops[j], arrays, shapes) == token and ops[j].inputs[0] == t for j in users):
                continue
            if any(ops[j].output == output for j in users) and len(users) > 1:
                continue
            p = producer[t]
            variables = _tokenwise_operands(ops[p], arrays, shapes)
            if variables is not None:
                move = (p, users, token, variables)
                break
        if move is None:
            return ops if changed else original
        p, users, token, variables = move
        changed = True
        source, keep = ops[p], ops[users[0]].output
        index_name = ops[users[0]].inputs[1]
        replaced = {ops[j].output: keep for j in users}
        inputs = list(source.inputs)
        new_gathers = []
        for k in variables:
            name = f"{source.inputs[k]}:token{token}"
            while name in names:
                name += "'"
            names.add(name)
            new_gathers.append(Op("Gather", (source.inputs[k], index_name), name, {"axis": 1}))
            inputs[k] = name
        attrs = dict(source.attrs)
        if source.op == "LayerNormalization":
            attrs["axis"] = -1
        moved = Op(source.op, tuple(inputs), keep, attrs)
        rest = [
            Op(op.op, tuple(replaced.get(n, n) for n in op.inputs), op.output, op.attrs)
            for j, op in enumerate(ops)
            if j != p and j not in users
        ]
        at = sum(1 for j in range(p) if j not in users)  # where the source op was, among the rest
        ops = rest[:at] + new_gathers + [moved] + rest[at:]
        for name in (*replaced, keep, *(g.output for g in new_gathers)):
            shapes.pop(name, None)
        for op in (*new_gathers, moved):
            shapes[op.output] = _output_shape(op.op, [shapes[n] for n in op.inputs], op.attrs)


def _token_of(op: Op, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The token a Gather takes (axis 1 of a rank-3 value, a constant scalar index), or None."""
    if op.op != "Gather" or len(op.inputs) != 2 or int(op.attrs.get("axis", 0)) not in (1, -2):
        return None
    index = arrays.get(op.inputs[1])
    shape = shapes.get(op.inputs[0])
    if index is None or index.ndim != 0 or index.dtype.kind not in "iu" or shape is None or len(shape) != 3:
        return None
    return int(index) % shape[1]


def _tokenwise_operands(
    op: Op, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> list[int] | None:
    """Which inputs of ``op`` a one-token Gather of its ``[1, L, C]`` output moves to, or None if it cannot move."""
    out = shapes[op.output]
    if len(out) != 3:
        return None
    full = [k for k, n in enumerate(op.inputs) if n not in arrays]
    if not full or any(shapes[op.inputs[k]][:2] != out[:2] or len(shapes[op.inputs[k]]) != 3 for k in full):
        return None  # a variable broadcast along the tokens
    if op.op != "MatMul" and any(shapes[op.inputs[k]] != out for k in full):
        return None
    constants = [arrays[n] for n in op.inputs if n in arrays]
    if op.op in _SAME_SHAPE and len(op.inputs) == 1:
        return full
    if op.op in _TOKENWISE_BINARY and len(op.inputs) == 2 and all(c.ndim <= 1 for c in constants):
        return full
    if op.op == "LayerNormalization" and int(op.attrs.get("axis", -1)) in (-1, 2) and full == [0]:
        return full if all(c.ndim <= 1 for c in constants) else None
    if op.op == "MatMul" and full == [0] and len(constants) == 1 and constants[0].ndim == 2:
        return full
    return None


LAYOUTS = ("pooled", "spatial", "tokens")


def _check_layout(
    layout: str, input_shape: Sequence[int], grid: Sequence[int] | None, prefix: int
) -> tuple[str, tuple[int, int] | None, int]:
    """The layout, grid and prefix of a head's input, checked against its shape (ValueError naming what is wrong)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    shape = [int(d) for d in input_shape]
    if layout == "spatial" and len(shape) != 4:
        raise ValueError(f"a spatial head's input_shape must be [-1, C, h, w], not {shape}")
    if layout != "tokens":
        return layout, None, 0
    if len(shape) != 3:
        raise ValueError(f"a token head's input_shape must be [-1, L, C], not {shape}")
    ok = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    if grid is None or len(grid) != 2 or not all(ok(d) and d > 0 for d in grid):
        raise ValueError(f"a token head needs grid [gh, gw] in positive integers, not {grid!r}")
    if not ok(prefix) or prefix < 0 or prefix + grid[0] * grid[1] != shape[1]:
        raise ValueError(
            f"prefix {prefix!r} + grid {list(grid)} ({grid[0] * grid[1]} patch tokens) is not the {shape[1]} tokens"
        )
    return layout, (int(grid[0]), int(grid[1])), int(prefix)


# Above this many values (computed for one image, plus the constants), a spatial or token head runs in float32.
# Measured on a 2-core AMD EPYC shared with other jobs (one BLAS thread; ranges over runs), trace + gradient of
# one class: a ViT-B/16 last block (197 tokens, 768 wide, 15 M values) 0.39-0.58 s in float64, 0.16-0.24 s in
# float32 (torch autograd, float32: 0.09-0.17 s); ViT-S/16 (5.8 M values) 0.11-0.16 s and 0.05-0.06 s (torch 0.06-0.12 s);
# VGG-16's Flatten head (120 M weights: 1 GB in float64) 0.28-0.33 s and 0.11-0.13 s (torch 0.11 s). The
# tests' small heads (thousands of values) take milliseconds either way, and stay exact in float64.
FLOAT32_WORK = 2**22


def recommended_precision(head: GraphHead, layout: str = "pooled") -> str:
    """The precision a head should run in: ``"float32"`` for a spatial or token head holding or computing more
    than :data:`FLOAT32_WORK` values (a transformer block, VGG's MLP), where float64 is 2-4x slower, and
    ``"float64"`` otherwise. Pooled heads always keep float64 (their results do not move).

    float32 costs accuracy the maps cannot show: gradients within 1e-4 of their largest value, relative
    (tests/test_head_ops.py measures it on a ViT block against torch autograd in float64).
    """
    if layout == "pooled":
        return "float64"
    work = sum(math.prod(head.shapes[op.output]) for op in head.ops)
    work += sum(a.size for a in head.arrays.values())
    return "float32" if work > FLOAT32_WORK else "float64"


# The ops: forward on arrays (batch first), and the vector-Jacobian product.
# backward(args, attrs, y, dy, variable) returns one gradient per input (None for constants). The forward ran
# on a batch of 1, and dy has one more, leading, axis than y: k classes, dy[i] the cotangent for class i. The
# forward values broadcast against it. (The batch axis of 1 may move: attention reshapes and transposes it.)


@dataclass(frozen=True)
class _Rule:
    """An op: ``forward(args, attrs) -> y`` and ``backward(args, attrs, y, dy, variable) -> [dx or None]``."""

    forward: Callable
    backward: Callable


def _sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a cotangent ``g`` ``[k, *out]`` down to ``[k, *shape]``, undoing NumPy broadcasting of ``shape``."""
    lead = g.ndim - 1 - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(1, 1 + lead)))
    axes = tuple(i + 1 for i, d in enumerate(shape) if d == 1 and g.shape[i + 1] != 1)
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
            _sum_to(dy * dfa(a[0], a[1]), a[0].shape) if v[0] else None,
            _sum_to(dy * dfb(a[0], a[1]), a[1].shape) if v[1] else None,
        ],
    )


def _batch_first(dy: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """The cotangent with its class axis in place of y's batch axis of 1 (``[k, *y.shape[1:]]``), or None when
    y's first axis is not a batch of 1. Products then run as one matrix product over the k rows."""
    return dy.reshape(dy.shape[0], *y.shape[1:]) if y.ndim and y.shape[0] == 1 else None


def _gemm_forward(a, at):
    x = a[0].T if at.get("transA", 0) else a[0]
    w = a[1].T if at.get("transB", 0) else a[1]
    y = at.get("alpha", 1.0) * (x @ w)
    return y + at.get("beta", 1.0) * a[2] if len(a) > 2 else y


def _gemm_backward(a, at, y, dy, v):
    alpha, k = at.get("alpha", 1.0), dy.shape[0]
    ta, tb = at.get("transA", 0), at.get("transB", 0)
    opa = a[0].T if ta else a[0]
    opb = a[1].T if tb else a[1]
    flat = _batch_first(dy, y)
    if v[0] and not ta and flat is not None:  # x @ W: the usual linear layer, one product for all k rows
        da = (alpha * flat @ opb.T).reshape(k, *a[0].shape)
    elif v[0]:
        da = alpha * dy @ opb.T
        da = np.swapaxes(da, 1, 2) if ta else da
    else:
        da = None
    db = None
    if v[1]:
        db = alpha * opa.T @ dy
        db = np.swapaxes(db, 1, 2) if tb else db
    dc = _sum_to(at.get("beta", 1.0) * dy, a[2].shape) if len(a) > 2 and v[2] else None
    return [da, db] + ([dc] if len(a) > 2 else [])


def _pow_backward(a, at, y, dy, v):
    if v[1]:
        raise ValueError("Pow: the exponent must be a constant")
    return [dy * a[1] * a[0] ** (a[1] - 1), None]


def _matmul_backward(a, at, y, dy, v):
    x, w = a
    k = dy.shape[0]
    flat = _batch_first(dy, y)
    if v[0] and not v[1] and w.ndim == 2 and x.ndim >= 2 and flat is not None:
        return [(flat @ w.T).reshape(k, *x.shape), None]  # x @ W with a constant matrix
    # The general batched product (attention's Q K^T and A V): NumPy's 1-D promotion made explicit.
    x2 = x[None, :] if x.ndim == 1 else x
    w2 = w[:, None] if w.ndim == 1 else w
    g = dy
    if x.ndim == 1:
        g = np.expand_dims(g, -2)
    if w.ndim == 1:
        g = np.expand_dims(g, -1)
    dx = _sum_to(g @ np.swapaxes(w2, -1, -2), x2.shape).reshape(k, *x.shape) if v[0] else None
    dw = _sum_to(np.swapaxes(x2, -1, -2) @ g, w2.shape).reshape(k, *w.shape) if v[1] else None
    return [dx, dw]


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
    axes = tuple(ax + 1 for ax in axes)  # on the cotangent, behind its class axis
    g = dy * a[1]
    dx = inv_std * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return [dx] + [None] * (len(a) - 1)


def _reshape_to(x: np.ndarray, shape) -> np.ndarray:
    """ONNX Reshape: a 0 copies the input's dimension, -1 is inferred."""
    shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def _like_input(a, dy):
    """Reshape the cotangent to the op's input shape, behind its class axis."""
    return [dy.reshape(dy.shape[0], *a[0].shape)] + [None] * (len(a) - 1)


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

    return _Rule(forward, backward)


def _l2_gradient(x, y, axes):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(y > 0, x / y, 0.0)  # the norm's subgradient 0 at 0, as torch's


def _extreme_gradient(x, y, axes):
    """ReduceMax/Min: the gradient goes to the extreme value, shared evenly by ties (as torch.amax's)."""
    hit = (x == y).astype(x.dtype)
    return hit / hit.sum(axis=axes, keepdims=True)


def _prelu_backward(a, at, y, dy, v):
    if v[1]:
        raise ValueError("PRelu: the slope must be a constant")
    x, slope = a
    return [dy * np.where(x > 0, 1.0, slope), None]


def _expand_backward(a, at, y, dy, v):
    return [_sum_to(dy, a[0].shape)]


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


# Erf, vectorized. Below |x| = 1, erf(x) = x S(x^2) with S the Taylor series, 18 terms: they alternate and
# shrink (the 18th is 5e-18), so Horner's rule in place keeps it to a few ulps. Above, erfc(x) = exp(-x^2) G(x),
# with G = exp(x^2) erfc(x) smooth and slowly varying, as Chebyshev interpolants on [1, 3] and [3, 6] built at
# import from the C library's erfc at the Chebyshev nodes (degree 18: the last coefficient is below 1e-16).
# From |x| = 6 on, erf is +-1 in float64 (erfc(6) = 2e-17). Accuracy against the C library's erf: 2e-15
# absolute (the rounding of exp(-x^2)), 4e-15 relative below 1 (tests/test_head_ops.py checks both).
# Temporaries are few: on this project's machines each fresh 4 MB array costs milliseconds in page faults.

_ERF_TAYLOR = [2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(18)]


def _chebyshev(f: Callable[[float], float], low: float, high: float, degree: int) -> list[float]:
    """Chebyshev coefficients of the interpolant of ``f`` on ``[low, high]`` at the first-kind nodes."""
    n = degree + 1
    nodes = [math.cos(math.pi * (j + 0.5) / n) for j in range(n)]
    values = [f(0.5 * (high - low) * t + 0.5 * (high + low)) for t in nodes]
    coefs = [2.0 / n * sum(v * math.cos(i * math.pi * (j + 0.5) / n) for j, v in enumerate(values)) for i in range(n)]
    coefs[0] /= 2
    return coefs


def _clenshaw(coefs: list[float], t: np.ndarray) -> np.ndarray:
    """``sum_i coefs[i] T_i(t)``, in the dtype of ``t`` (the coefficients are Python floats)."""
    b1, b2 = np.zeros_like(t), np.zeros_like(t)
    two_t = 2 * t
    for c in coefs[:0:-1]:
        b1, b2 = two_t * b1 - b2 + c, b1
    return t * b1 - b2 + coefs[0]


_ERFC_PIECES = [(1.0, 3.0, _chebyshev(lambda x: math.exp(x * x) * math.erfc(x), 1, 3, 18)),
                (3.0, 6.0, _chebyshev(lambda x: math.exp(x * x) * math.erfc(x), 3, 6, 18))]  # fmt: skip


def _erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in the dtype of ``x``."""
    x = np.asarray(x)
    u = np.minimum(x * x, 1.0)  # the series everywhere (most values are small), then the rest replaced
    out = np.full_like(x, _ERF_TAYLOR[-1])
    for c in _ERF_TAYLOR[-2::-1]:
        out *= u
        out += c
    a = np.abs(x)
    out *= a
    big = a >= 1
    if big.any():
        s = a[big]
        tail = np.ones_like(s)
        for low, high, coefs in _ERFC_PIECES:
            piece = (s >= low) & (s < high)
            p = s[piece]
            tail[piece] = 1 - np.exp(-p * p) * _clenshaw(coefs, (2 * p - (low + high)) / (high - low))
        out[big] = tail
    return np.copysign(out, x, out=out)


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


# Softmax and LogSoftmax on any axis (opset 13: the axis alone, default -1).


def _softmax(x, at):
    e = np.exp(x - x.max(axis=at.get("axis", -1), keepdims=True))
    return e / e.sum(axis=at.get("axis", -1), keepdims=True)


def _log_softmax(x, at):
    axis = at.get("axis", -1)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _class_axis(axis: int, ndim: int) -> int:
    """An axis of a forward value, as an axis of its cotangent (which has a leading class axis)."""
    return int(axis) % ndim + 1


def _softmax_backward(a, at, y, dy, v):
    axis = _class_axis(at.get("axis", -1), y.ndim)
    return [y * (dy - (dy * y).sum(axis=axis, keepdims=True))]


def _log_softmax_backward(a, at, y, dy, v):
    axis = _class_axis(at.get("axis", -1), y.ndim)
    return [dy - np.exp(y) * dy.sum(axis=axis, keepdims=True)]


# Indexing: Gather (constant indices), Slice, Concat, Where (constant condition).


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
    return [_sum_to(p, x.shape) if is_var else None for p, x, is_var in zip(parts, a, v)]


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


def _where_backward(a, at, y, dy, v):
    if v[0]:
        raise ValueError("Where: the condition must be a constant")
    cond = a[0].astype(bool)
    return [
        None,
        _sum_to(np.where(cond, dy, 0), a[1].shape) if v[1] else None,
        _sum_to(np.where(cond, 0, dy), a[2].shape) if v[2] else None,
    ]


OPS: dict[str, _Rule] = {
    "Gemm": _Rule(_gemm_forward, _gemm_backward),
    "MatMul": _Rule(lambda a, at: a[0] @ a[1], _matmul_backward),
    "Conv": _Rule(windows.conv_forward, windows.conv_backward),
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
    "ReduceMax": _reduce(lambda x, axes, keep: x.max(axis=axes, keepdims=keep), _extreme_gradient),
    "ReduceMin": _reduce(lambda x, axes, keep: x.min(axis=axes, keepdims=keep), _extreme_gradient),
    "Expand": _Rule(lambda a, at: a[0] * np.ones(at["shape"], dtype=a[0].dtype), _expand_backward),
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
        lambda a, at, y, dy, v: [np.transpose(dy, [0, *(int(p) + 1 for p in np.argsort(at["perm"]))])],
    ),
    "Softmax": _Rule(lambda a, at: _softmax(a[0], at), _softmax_backward),
    "LogSoftmax": _Rule(lambda a, at: _log_softmax(a[0], at), _log_softmax_backward),
    "Gather": _Rule(
        lambda a, at: np.take(a[0], np.asarray(a[1], dtype=np.intp), axis=int(at.get("axis", 0))), _gather_backward
    ),
    "Slice": _Rule(_slice_forward, _slice_backward),
    "Concat": _Rule(_concat_forward, _concat_backward),
    "Where": _Rule(lambda a, at: np.where(a[0].astype(bool), a[1], a[2]), _where_backward),
    "Pad": _Rule(_pad_forward, _pad_backward),
    "MaxPool": _Rule(windows.max_pool_forward, windows.max_pool_backward),
    "AveragePool": _Rule(windows.average_pool_forward, windows.average_pool_backward),
    "GlobalMaxPool": _Rule(windows.global_max_forward, windows.global_max_backward),
    "GlobalAveragePool": _Rule(windows.global_average_forward, windows.global_average_backward),
}


# Static shapes: each op's output shape from its inputs', without computing anything.

_SAME_SHAPE = {
    "Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Erf", "Gelu", "Sqrt", "Neg",
    "Elu", "Softplus", "Exp", "Log", "Abs",
}  # fmt: skip
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "LayerNormalization", "Where"}
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax", "ReduceMin"}


def infer_shapes(
    ops: Sequence[Op],
    arrays: dict[str, np.ndarray],
    input_shape: Sequence[int],
    input: str,
    sides: dict[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for a batch of one, as :meth:`GraphHead.forward` would compute it.

    Raises ValueError, naming the op, for shapes that do not fit together, and for any tensor (the input and
    the side inputs included, and the windows a pool or convolution copies) over :data:`MAX_VALUES` values.
    """
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    for name, shape in [(input, input_shape), *(sides or {}).items()]:
        what = f"the input {name!r}" if name == input else f"the side input {name!r}"
        if len(shape) < 2 or any(d <= 0 for d in shape[1:]):
            raise ValueError(
                f"{'input_shape' if name == input else what} {list(shape)} must be [-1, positive sizes...]"
            )
        shapes[name] = (1, *(int(d) for d in shape[1:]))
        _within_budget(what, shapes[name])
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


def _within_windows_budget(x: tuple[int, ...], win) -> None:
    """What a pool or a convolution allocates besides its output: the padded input (huge pads with a huge
    stride give a small output) and the windows' copy (a huge kernel)."""
    padded = [max(n, b + size + e) for n, b, size, e in zip(win.length, win.pad_begin, x[2:], win.pad_end)]
    _within_budget("its padded input", (x[0], x[1], *padded))
    _within_budget("its windows", (x[0], x[1], *win.out, *win.kernel))


def _spatial(x: tuple[int, ...], what: str) -> None:
    if len(x) < 3:
        raise ValueError(f"{what} needs an input [N, C, spatial...], not {list(x)}")


def _output_shape(name: str, s: list[tuple[int, ...]], at: dict) -> tuple[int, ...]:
    if not s:
        raise ValueError("no inputs")
    x = s[0]
    if name in _SAME_SHAPE:
        return x
    if name in _BROADCAST:
        return tuple(np.broadcast_shapes(*s))
    if name in ("Softmax", "LogSoftmax"):
        if not x or not -len(x) <= int(at.get("axis", -1)) < len(x):
            raise ValueError(f"axis {at.get('axis', -1)} is not an axis of {list(x)}")
        return x
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
        if len(x) < 1 or len(w) < 1:
            raise ValueError("needs an input and a weight")
        if windows.pointwise(x, w, at):
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
        win = windows.conv_windows(x, w, at)
        _within_windows_budget(x, win)
        return (x[0], w[0], *win.out)
    if name in ("MaxPool", "AveragePool"):
        _spatial(x, "a pool")
        win = windows.pool_windows(x, at)
        _within_windows_budget(x, win)
        return (x[0], x[1], *win.out)
    if name in ("GlobalMaxPool", "GlobalAveragePool"):
        _spatial(x, "a global pool")
        return (x[0], x[1], *[1] * (len(x) - 2))
    if name == "BatchNormalization":
        if len(x) < 2 or len(s) != 5:
            raise ValueError("needs an input of 2 or more dimensions and 4 parameters")
        params = math.prod(np.broadcast_shapes(*s[1:]))
        return tuple(np.broadcast_shapes(x, (1, params) + (1,) * (len(x) - 2)))
    if name in _REDUCTIONS:
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
    if name == "Gather":
        if not x or not -len(x) <= int(at.get("axis", 0)) < len(x):
            raise ValueError(f"axis {at.get('axis', 0)} is not an axis of {list(x)}")
        axis = int(at.get("axis", 0)) % len(x)
        return (*x[:axis], *s[1], *x[axis + 1 :])
    if name == "Slice":
        if not x:
            raise ValueError("cannot slice a scalar")
        out = tuple(len(range(x[i])[sl]) for i, sl in enumerate(_slices(x, at)))
        if 0 in out:
            raise ValueError(f"the slice of {list(x)} is empty")
        return out
    if name == "Pad":
        if not x:
            raise ValueError("cannot pad a scalar")
        widths, kept, _ = _pad_regions(x, at)
        return tuple(k.stop - k.start + b + e for k, (b, e) in zip(kept, widths))
    if name == "Concat":
        if not x or not -len(x) <= int(at["axis"]) < len(x):
            raise ValueError(f"axis {at['axis']} is not an axis of {list(x)}")
        axis = int(at["axis"]) % len(x)
        if any(len(t) != len(x) for t in s):
            raise ValueError(f"inputs of different ranks: {[list(t) for t in s]}")
        rest = [np.broadcast_shapes(*(t[:axis] + t[axis + 1 :] for t in s))]
        return (*rest[0][:axis], sum(t[axis] for t in s), *rest[0][axis:])
    raise ValueError(f"unsupported op {name}")
