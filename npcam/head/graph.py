"""A head given as a list of ONNX ops, run forward and differentiated by reverse mode, in NumPy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import rewrite
from .affine import one_hot
from .op import Op
from .ops import OPS
from .shapes import infer_shapes

# What a graph head computes in: float64 is exact to rounding; float32 is for heads where float64 is slow.
PRECISIONS = ("float64", "float32")


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
    inputs : ``{name: shape}`` of every input the gradient flows to, when there are several (a detector's head
        takes one map per stride, each ``[-1, C_s, h_s, w_s]``, layout "spatial"); ``input`` and ``input_shape``
        are then its first entry (None: taken from it). ``x`` is then a dict ``{name: array}`` wherever it is
        taken, and :meth:`vjp_inputs` gives each input's cotangents.
    """

    kind = "graph"

    def __init__(
        self,
        ops: Sequence[Op],
        arrays: dict[str, np.ndarray],
        input_shape: Sequence[int] | None,
        input: str = "pooled",
        output: str = "scores",
        sides: dict[str, Sequence[int]] | None = None,
        precision: str = "float64",
        layout: str = "pooled",
        grid: Sequence[int] | None = None,
        prefix: int = 0,
        inputs: dict[str, Sequence[int]] | None = None,
    ):
        if inputs:
            input, input_shape = next(iter(inputs.items()))
            if len(inputs) > 1 and (layout != "spatial" or any(len(shape) != 4 for shape in inputs.values())):
                raise ValueError("a head with several inputs takes spatial maps [-1, C, h, w] only")
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
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in (inputs or {input: input_shape}).items()}
        self.output = output
        self.sides = {name: tuple(int(d) for d in shape) for name, shape in (sides or {}).items()}
        for op in self.ops:
            if op.op not in OPS:
                raise ValueError(f"unsupported op {op.op} in the head")
        # Shapes first, statically: a hostile head (an Expand to billions of values) is refused before
        # the zero forward below would allocate it.
        self.shapes = infer_shapes(self.ops, self.arrays, self.inputs, self.sides)
        rewritten = rewrite.select_token_early(self.ops, self.arrays, self.shapes, self.output)
        if rewritten is not self.ops:
            self.ops = rewritten
            self.shapes = infer_shapes(self.ops, self.arrays, self.inputs, self.sides)
        # What depends on the inputs: the only tensors the gradient flows through (sides are constants).
        self._variable = set(self.inputs)
        for op in self.ops:
            if any(n in self._variable for n in op.inputs):
                self._variable.add(op.output)
        zero_sides = {name: np.zeros((1, *shape[1:])) for name, shape in self.sides.items()}
        self.output_shape = self.shapes[self.output]
        zeros = {name: np.zeros((1, *shape[1:])) for name, shape in self.inputs.items()}
        self.classes = int(self.forward(zeros if len(zeros) > 1 else zeros[self.input], zero_sides).shape[1])

    @property
    def input_values(self) -> int:
        """The number of values of the head's inputs for one image."""
        return sum(math.prod(shape[1:]) for shape in self.inputs.values())

    @property
    def bytes_per_input(self) -> int:
        """What one input costs a batched forward, in bytes: every value it computes is kept until the end of the
        pass (the gradient reuses them)."""
        values = self.input_values + sum(math.prod(self.shapes[op.output]) for op in self.ops)
        return values * self.dtype.itemsize

    @property
    def channels(self) -> int:
        """C of the explained layer: the pooled vector's length, the map's channels, or the tokens' width."""
        if self.layout == "spatial":
            return self.input_shape[1]
        if self.layout == "tokens":
            return self.input_shape[2]
        return self.input_values

    def _run(self, x, sides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        given = x if isinstance(x, dict) else {self.input: x}
        if set(given) != set(self.inputs):
            raise ValueError(f"the head takes the inputs {list(self.inputs)}, not {list(given)}")
        values: dict[str, np.ndarray] = {
            name: np.asarray(given[name]).astype(self.dtype).reshape(-1, *shape[1:])
            for name, shape in self.inputs.items()
        }
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

    def forward(self, x, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """float ``[N, *input_shape[1:]]`` (or ``[N, prod]``; a dict of them for several inputs) to float32 ``[N, K]``.

        ``sides`` maps each side input's name to its ``[N, ...]`` array (a batch of 1 is shared by all N).
        """
        return self.forward_float64(x, sides).astype(np.float32)

    def forward_float64(self, x, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """As :meth:`forward`, float64 ``[N, K]``: as computed (in float32 for a float32 head)."""
        scores = self._run(x, sides)[self.output]
        return scores.reshape(scores.shape[0], -1).astype(np.float64, copy=False)

    def trace(self, x, sides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One image's forward, keeping every value for :meth:`gradient` (``trace=``) to reuse, so that a
        transformer block does not run twice. ``trace[head.output]`` is the scores ``[1, K]`` as computed."""
        return self._run(x, sides)

    def vjp(
        self,
        x: np.ndarray | None,
        seed: np.ndarray,
        sides: dict[str, np.ndarray] | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The head's vector-Jacobian products at one image's input: float64 ``[k, prod(input_shape[1:])]``.

        ``seed`` float ``[k, *output]`` holds k cotangents of the head's output (``d target_i / d output``, from
        :mod:`npcam.targets`); row i of the result is ``d target_i / d x``. ``x`` is one image's input (batch 1);
        with ``trace`` (:meth:`trace` of that same input) its forward is not run again. Callers reshape to
        ``[k, *input_shape[1:]]``. The side inputs are constants. For a head of several inputs, see
        :meth:`vjp_inputs`; this is the first input's.
        """
        return self.vjp_inputs(x, seed, sides, trace)[self.input]

    def vjp_inputs(
        self,
        x,
        seed: np.ndarray,
        sides: dict[str, np.ndarray] | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """As :meth:`vjp`, for every input: ``{name: float64 [k, prod(shape[1:])]}``.

        One backward pass for all k: every cotangent carries a leading axis of k before the forward value's own
        shape (whose batch is 1), so each op's vector-Jacobian product broadcasts the forward values over it.
        """
        values = self._run(x, sides) if trace is None else trace
        k = len(seed)
        grads: dict[str, np.ndarray] = {
            self.output: np.asarray(seed, dtype=self.dtype).reshape(k, *values[self.output].shape)
        }
        for op in reversed(self.ops):
            dy = grads.pop(op.output, None)
            if dy is None or op.output not in self._variable:
                continue  # this op does not reach the output, or does not depend on the inputs
            if not dy.any():
                continue  # nothing flows back (a detection's score reads one candidate: the other strides' ops)
            args = [values[n] if n in values else self.arrays[n] for n in op.inputs]
            variable = [n in self._variable for n in op.inputs]
            for name, is_var, g in zip(
                op.inputs, variable, OPS[op.op].backward(args, op.attrs, values[op.output], dy, variable)
            ):
                if is_var and g is not None:
                    grads[name] = grads[name] + g if name in grads else g
        return {
            name: grads[name].reshape(k, -1).astype(np.float64, copy=False)
            if name in grads
            else np.zeros((k, math.prod(shape[1:])))
            for name, shape in self.inputs.items()
        }

    def gradient(
        self,
        x: np.ndarray | None,
        classes: Sequence[int],
        sides: dict[str, np.ndarray] | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``d output[c] / d x`` for each output entry ``c`` in ``classes`` (a class score of a classifier): float64
        ``[k, prod(input_shape[1:])]``, :meth:`vjp` with one-hot cotangents."""
        return self.vjp(x, one_hot(classes, self.classes, self.dtype), sides, trace)


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
