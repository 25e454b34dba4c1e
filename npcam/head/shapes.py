"""Static shapes: every tensor of a head for a batch of one, from the ops' shape rules, computing nothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .op import Op
from .ops import OPS
from .ops.rule import within_budget


def infer_shapes(
    ops: Sequence[Op],
    arrays: dict[str, np.ndarray],
    inputs: dict[str, Sequence[int]],
    sides: dict[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for a batch of one, as :meth:`~npcam.head.GraphHead.forward` would compute it.

    ``inputs`` and ``sides`` give the head's input and side-input shapes with -1 (or any value) for the batch.
    Raises ValueError, naming the op, for shapes that do not fit together, and for any tensor (the inputs and
    the side inputs included, and the windows a pool or convolution copies) over
    :data:`~npcam.head.ops.MAX_VALUES` values.
    """
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    for name, shape in [*inputs.items(), *(sides or {}).items()]:
        what = f"the input {name!r}" if name in inputs else f"the side input {name!r}"
        if len(shape) < 2 or any(d <= 0 for d in shape[1:]):
            raise ValueError(
                f"{'input_shape' if name in inputs else what} {list(shape)} must be [-1, positive sizes...]"
            )
        shapes[name] = (1, *(int(d) for d in shape[1:]))
        within_budget(what, shapes[name])
    for op in ops:
        try:
            rule = OPS.get(op.op)
            if rule is None:
                raise ValueError(f"unsupported op {op.op}")
            args = [shapes[n] for n in op.inputs]
            if not args:
                raise ValueError("no inputs")
            out = rule.shape(args, op.attrs)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"op {op.op} ({op.output!r}): {e}") from None
        within_budget(f"op {op.op} ({op.output!r})", out)
        shapes[op.output] = out
    return shapes
