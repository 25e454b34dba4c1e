"""The error function, vectorized in NumPy (the head's Erf and exact Gelu).

Below |x| = 1, erf(x) = x S(x^2) with S the Taylor series, 18 terms: they alternate and shrink (the 18th is
5e-18), so Horner's rule in place keeps it to a few ulps. Above, erfc(x) = exp(-x^2) G(x), with
G = exp(x^2) erfc(x) smooth and slowly varying, as Chebyshev interpolants on [1, 3] and [3, 6] built at import
from the C library's erfc at the Chebyshev nodes (degree 18: the last coefficient is below 1e-16). From |x| = 6
on, erf is +-1 in float64 (erfc(6) = 2e-17). Accuracy against the C library's erf: 2e-15 absolute (the rounding
of exp(-x^2)), 4e-15 relative below 1 (tests/test_head_ops.py checks both). Temporaries are few: on this
project's machines each fresh 4 MB array costs milliseconds in page faults.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

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


def erf(x: np.ndarray) -> np.ndarray:
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
