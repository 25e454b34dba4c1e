"""Graph rewrites of a head that compute the same function faster."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .op import Op
from .ops import OPS
from .ops.pointwise import UNARY

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
            shapes[op.output] = OPS[op.op].shape([shapes[n] for n in op.inputs], op.attrs)


def _token_of(op: Op, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The token a Gather takes (axis 1 of a rank-3 value, a constant scalar index), or None."""
    if op.op != "Gather" or len(op.inputs) != 2 or int(op.attrs.get("axis", 0)) not in (1, -2):
        return None
    index = arrays.get(op.inputs[1])
    shape = shapes.get(op.inputs[0])
    if index is None or index.ndim != 0 or index.dtype.kind not in "iu" or shape is None or len(shape) != 3:
        return None
    return int(index) % shape[1]


def _tokenwise_operands(op: Op, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> list[int] | None:
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
    if op.op in UNARY and len(op.inputs) == 1:
        return full
    if op.op in _TOKENWISE_BINARY and len(op.inputs) == 2 and all(c.ndim <= 1 for c in constants):
        return full
    if op.op == "LayerNormalization" and int(op.attrs.get("axis", -1)) in (-1, 2) and full == [0]:
        return full if all(c.ndim <= 1 for c in constants) else None
    if op.op == "MatMul" and full == [0] and len(constants) == 1 and constants[0].ndim == 2:
        return full
    return None
