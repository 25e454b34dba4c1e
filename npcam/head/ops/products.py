"""Matrix products: Gemm (a linear layer, any transposes) and MatMul (batched, as attention uses it)."""

from __future__ import annotations

import numpy as np

from .rule import Rule, Shape, batch_first, sum_to


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
    flat = batch_first(dy, y)
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
    dc = sum_to(at.get("beta", 1.0) * dy, a[2].shape) if len(a) > 2 and v[2] else None
    return [da, db] + ([dc] if len(a) > 2 else [])


def _matmul_backward(a, at, y, dy, v):
    x, w = a
    k = dy.shape[0]
    flat = batch_first(dy, y)
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
    dx = sum_to(g @ np.swapaxes(w2, -1, -2), x2.shape).reshape(k, *x.shape) if v[0] else None
    dw = sum_to(np.swapaxes(x2, -1, -2) @ g, w2.shape).reshape(k, *w.shape) if v[1] else None
    return [dx, dw]


def _gemm_shape(s: list[Shape], at: dict) -> Shape:
    x = s[0]
    if len(x) != 2 or len(s[1]) != 2:
        raise ValueError(f"needs 2-D inputs, not {list(x)} and {list(s[1])}")
    rows, inner = x[::-1] if at.get("transA", 0) else x
    inner_w, cols = s[1][::-1] if at.get("transB", 0) else s[1]
    if inner != inner_w:
        raise ValueError(f"shapes {list(x)} and {list(s[1])} do not multiply")
    return tuple(np.broadcast_shapes((rows, cols), *s[2:3]))


def _matmul_shape(s: list[Shape], at: dict) -> Shape:
    a, b = s[0], s[1]
    if not a or not b:
        raise ValueError("scalars do not multiply")
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    if a2[-1] != b2[-2]:
        raise ValueError(f"shapes {list(a)} and {list(b)} do not multiply")
    out = (*np.broadcast_shapes(a2[:-2], b2[:-2]), a2[-2], b2[-1])
    return out[: len(out) - 2] + out[len(out) - 2 + (len(a) == 1) : len(out) - (len(b) == 1)]


RULES: dict[str, Rule] = {
    "Gemm": Rule(_gemm_forward, _gemm_backward, _gemm_shape),
    "MatMul": Rule(lambda a, at: a[0] @ a[1], _matmul_backward, _matmul_shape),
}
