"""Faithfulness metrics: does the model's confidence follow the map? Plain functions on arrays, no torch.

Each metric takes the network input ``x`` (float32 ``[3, H, W]``, normalized
as the model takes it), the maps at the input's size (float ``[M, H, W]`` in
[0, 1], :func:`npcam.upsample` of a map gives one) and a *score function*:
``score(inputs: float32 [N, 3, H, W]) -> float64 [N]``, the explained
target's score (:func:`probability` makes the usual one, a class's
probability; :func:`target_probability` any target's, such as a detection's
D-RISE similarity). The metrics themselves know nothing of models, so
detector or segmentation targets reuse them with their own score functions.
The perturbed inputs go to ``score`` in batches of at most :data:`BATCH`.

The definitions, with their papers, are in docs/methods.md ("The metrics"):

- **Average Drop and Increase in Confidence** (Chattopadhay et al. 2018), as
  TorchCAM's ``ClassificationMetric``: :func:`confidence_change`.
- **Deletion and Insertion AUC** (Petsiuk et al. 2018), as TorchCAM's
  ``DeletionInsertionMetric``: :func:`deletion_insertion`.
- **ROAD**, remove and debias (Rong et al. 2022), MoRF and LeRF with noisy
  linear imputation, as pytorch-grad-cam's ``ROADMostRelevantFirst`` /
  ``ROADLeastRelevantFirst``: :func:`road` and :func:`impute`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

BATCH = 32
STEPS = 20  # deletion and insertion: TorchCAM's default
ROAD_PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's and the ROAD paper's
ROAD_NOISE = 0.01  # the imputation's noise, absolute, in the network input's units (the ROAD authors')
# The imputation's relative residual: on 224 x 224 inputs it left the imputed values within 1e-4 of the exact
# solution (1% of the noise added to them) at 10 to 90% removed (docs/methods.md, ROAD).
IMPUTE_TOLERANCE = 1e-5

Score = Callable[[np.ndarray], np.ndarray]
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy 2 renamed it


def probability(model, class_index: int) -> Score:
    """The score function of a class's probability under ``model`` (softmax; sigmoid for a multi-label model)."""

    def score(inputs: np.ndarray) -> np.ndarray:
        return model.probabilities(model.scores(inputs).astype(np.float64))[:, class_index]

    return score


def target_probability(model, target, index: int = 0) -> Score:
    """The score function of score ``index`` of a :class:`npcam.targets.Target` under ``model``: its
    ``probabilities`` of the network's output (a detection's: D-RISE's similarity, :mod:`npcam.targets.detection`)."""

    def score(inputs: np.ndarray) -> np.ndarray:
        return target.probabilities(model.scores(inputs))[:, index]

    return score


def scores(score: Score, inputs: Iterable[np.ndarray], batch: int = BATCH) -> np.ndarray:
    """``score`` of a stream of inputs ``[3, H, W]``, called on batches of at most ``batch``: float64 ``[N]``."""
    out, pending = [], []
    for x in inputs:
        pending.append(x)
        if len(pending) == batch:
            out.append(np.asarray(score(np.stack(pending)), dtype=np.float64))
            pending = []
    if pending:
        out.append(np.asarray(score(np.stack(pending)), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def _one(score: Score, x: np.ndarray) -> float:
    return float(scores(score, [x])[0])


def confidence_change(
    x: np.ndarray, maps: np.ndarray, score: Score, original: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Average Drop's and Increase in Confidence's terms of each map: ``(drop float64 [M], increase bool [M])``.

    With ``s = score(x)`` and ``s' = score(map * x)``: ``drop = max(0, s - s') / (s + 1e-7)``
    and ``increase = s < s'`` (TorchCAM's ``ClassificationMetric``). ``original`` is ``score(x)``, if known.
    """
    s = _one(score, x) if original is None else float(original)
    masked = scores(score, (x * m.astype(np.float32) for m in maps))
    return np.maximum(0.0, s - masked) / (s + 1e-7), s < masked


@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of M maps at the same fractions of the input.

    Attributes
    ----------
    fractions : float64 ``[P]``, the fraction of positions changed, 0 to 1
    deletion, insertion : float64 ``[M, P]``, the score at each fraction
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    def areas(self) -> tuple[np.ndarray, np.ndarray]:
        """Deletion and insertion AUC of each map (trapezoid rule over the fractions): float64 ``[M]`` each."""
        return _trapezoid(self.deletion, self.fractions, axis=1), _trapezoid(self.insertion, self.fractions, axis=1)


def deletion_insertion(
    x: np.ndarray, maps: np.ndarray, score: Score, steps: int = STEPS, original: float | None = None
) -> Curves:
    """Deletion and insertion curves of each map (Petsiuk et al. 2018, as TorchCAM computes them).

    The positions are ranked by the map, highest first, ties in raster order.
    With ``P`` positions and ``k = ceil(P / steps)``, the curve's points are at
    ``0, k, 2k, …`` positions and at ``P``. Deletion replaces the first
    positions of the ranking with the baseline (zeros) in every channel;
    insertion starts from the baseline and restores them. Each map costs
    ``2 * (points - 2)`` network passes; the all-baseline input is scored
    once for all maps.
    """
    channels = x.shape[0]
    flat = x.reshape(channels, -1)
    positions = flat.shape[1]
    step = math.ceil(positions / steps)
    counts = [*range(0, positions, step), positions]
    fractions = np.asarray(counts, dtype=np.float64) / positions
    s = _one(score, x) if original is None else float(original)
    empty = _one(score, np.zeros_like(x))

    def perturbed() -> Iterator[np.ndarray]:
        for m in maps:
            ranks = _ranks(m)
            for count in counts[1:-1]:
                first = (ranks < count)[None]
                yield np.where(first, 0.0, flat).reshape(x.shape).astype(np.float32)
                yield np.where(first, flat, 0.0).reshape(x.shape).astype(np.float32)

    inner = scores(score, perturbed()).reshape(len(maps), len(counts) - 2, 2)
    deletion = np.concatenate([np.full((len(maps), 1), s), inner[:, :, 0], np.full((len(maps), 1), empty)], axis=1)
    insertion = np.concatenate([np.full((len(maps), 1), empty), inner[:, :, 1], np.full((len(maps), 1), s)], axis=1)
    return Curves(fractions, deletion, insertion)


def _ranks(full: np.ndarray) -> np.ndarray:
    """Each position's rank when the map is sorted highest first, ties in raster order."""
    order = np.argsort(-full.ravel(), kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(order.size)
    return ranks


def road_count(positions: int, percent: int) -> int:
    """How many of ``positions`` pixels ROAD removes at ``percent``: ``P - ceil((P - 1) (100 - percent) / 100)``.

    That is the count of pixels at or above the map's ``100 - percent`` percentile (NumPy's linear
    interpolation) when no two pixels are equal, the rule of pytorch-grad-cam's ROAD, computed exactly.
    """
    return positions - (-(-(positions - 1) * (100 - percent) // 100))


def road(
    x: np.ndarray,
    maps: np.ndarray,
    score: Score,
    percents: Iterable[int] = ROAD_PERCENTS,
    noise: float = ROAD_NOISE,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """ROAD (Rong et al. 2022): the score after removing the most (MoRF) and least (LeRF) relevant pixels.

    At each percent ``r``, :func:`road_count` pixels are removed: MoRF removes
    the highest of the map, LeRF the lowest (ties in an order drawn from
    ``rng``, as the ROAD authors' code breaks them with noise). The removed
    pixels are filled by :func:`impute` from the others, with ``noise``, and
    the result is scored. ``rng`` also draws the noise (default: a fixed seed).

    Returns
    -------
    morf, lerf : float64 ``[M, len(percents)]``, the scores of the imputed inputs
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    percents = list(percents)
    height, width = x.shape[1:]
    positions = height * width

    def perturbed() -> Iterator[np.ndarray]:
        for m in maps:
            order = np.lexsort((rng.random(positions), -m.ravel().astype(np.float64)))  # highest first
            ranks = np.empty(positions, dtype=np.int64)
            ranks[order] = np.arange(positions)
            ranks = ranks.reshape(height, width)
            for most in (True, False):
                for r in percents:
                    k = road_count(positions, r)
                    removed = ranks < k if most else ranks >= positions - k
                    yield impute(x, removed, noise, rng)

    both = scores(score, perturbed()).reshape(len(maps), 2, len(percents))
    return both[:, 0], both[:, 1]


# Noisy linear imputation: the weights of the 8 neighbours (the ROAD authors'; their sum is 1).
NEIGHBOURS = {(dy, dx): (1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
del NEIGHBOURS[(0, 0)]


def impute(
    x: np.ndarray,
    removed: np.ndarray,
    noise: float = ROAD_NOISE,
    rng: np.random.Generator | None = None,
    tolerance: float = IMPUTE_TOLERANCE,
) -> np.ndarray:
    """Noisy linear imputation (Rong et al. 2022): each removed pixel becomes the weighted mean of its neighbours.

    For every removed pixel ``i`` and channel, ``d_i v_i = sum_j w_ij v_j`` over
    its neighbours inside the image (weight 1/6 beside, 1/12 diagonal;
    ``d_i`` their sum), the kept pixels' values given: one sparse symmetric
    positive definite system for all removed pixels, shared by the channels.
    It is solved by conjugate gradients preconditioned with a multigrid V-cycle
    (Galerkin coarse grids), to a relative residual of ``tolerance``: SciPy's
    direct sparse solver, which pytorch-grad-cam uses, is not a runtime
    dependency. Then ``noise`` times standard normal noise is added to the
    removed pixels.

    Parameters
    ----------
    x : float ``[C, H, W]``
    removed : bool ``[H, W]``

    Returns
    -------
    float32 ``[C, H, W]``: ``x`` with the removed pixels imputed
    """
    removed = np.asarray(removed, dtype=bool)
    out = np.array(x, dtype=np.float32)
    if not removed.any():
        return out
    if removed.all():
        raise ValueError("impute: every pixel is removed; there is nothing to impute from")
    system = _System(removed)
    values = x.astype(np.float64) * ~removed
    rhs = system.neighbour_sum(values) * removed
    solution = system.solve(rhs, tolerance)
    out[:, removed] = solution[:, removed].astype(np.float32)
    if noise:
        rng = rng if rng is not None else np.random.default_rng(0)
        out[:, removed] += (noise * rng.standard_normal((x.shape[0], int(removed.sum())))).astype(np.float32)
    return out


def _shift(v: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[..., i, j] = v[..., i + dy, j + dx]``, zero outside."""
    out = np.zeros_like(v)
    h, w = v.shape[-2:]
    out[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)] = v[
        ..., max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)
    ]
    return out


def _apply(stencil: dict[tuple[int, int], np.ndarray], v: np.ndarray) -> np.ndarray:
    """A 9-point operator with coefficients per cell: ``sum_o stencil[o][i] * v[i + o]`` (zero outside)."""
    h, w = v.shape[-2:]
    padded = np.zeros((*v.shape[:-2], h + 2, w + 2), dtype=v.dtype)
    padded[..., 1:-1, 1:-1] = v
    out = stencil[(0, 0)] * v
    for (dy, dx), c in stencil.items():
        if (dy, dx) != (0, 0):
            out += c * padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def _prolong(v: np.ndarray) -> np.ndarray:
    """Bilinear interpolation from a coarse grid ``[.., h, w]`` to the fine one ``[.., 2h - 1, 2w - 1]``."""
    for axis in (-2, -1):
        moved = np.moveaxis(v, axis, 0)
        fine = np.empty((2 * moved.shape[0] - 1, *moved.shape[1:]), dtype=v.dtype)
        fine[0::2] = moved
        fine[1::2] = 0.5 * (moved[:-1] + moved[1:])
        v = np.moveaxis(fine, 0, axis)
    return v


def _restrict(v: np.ndarray) -> np.ndarray:
    """The transpose of :func:`_prolong`: a fine grid ``[.., 2h - 1, 2w - 1]`` to ``[.., h, w]``."""
    for axis in (-2, -1):
        moved = np.moveaxis(v, axis, 0)
        coarse = moved[0::2].copy()
        coarse[:-1] += 0.5 * moved[1::2]
        coarse[1:] += 0.5 * moved[1::2]
        v = np.moveaxis(coarse, 0, axis)
    return v


def _odd(stencil: dict) -> dict:
    """Pad a level to odd sides with identity cells (coefficient 1 on the diagonal, no coupling)."""
    h, w = stencil[(0, 0)].shape
    pad = ((0, 1 - h % 2), (0, 1 - w % 2))
    if pad == ((0, 0), (0, 0)):
        return stencil
    return {o: np.pad(c, pad, constant_values=1.0 if o == (0, 0) else 0.0) for o, c in stencil.items()}


class _System:
    """The imputation's operator on the whole grid and its multigrid hierarchy.

    Kept pixels are identity rows, so the operator is symmetric positive
    definite on the full grid and the removed pixels' solution is unchanged;
    their coefficients (1) match the removed pixels' diagonal (1 inside the
    image), so coarse grids mix them without scaling trouble.
    """

    COARSEST = 15  # sides at most this: a dense solve
    DTYPE = np.float32  # the iterates (the dot products are float64): half the memory traffic of float64
    # Jacobi sweeps before and after the coarse correction, and their damping: the fastest of 1-2 sweeps and
    # 0.7-1.0 damping on 10-90% removed (5-20 cycles to a relative residual of 1e-5)
    SWEEPS = 1
    OMEGA = 0.85

    def __init__(self, removed: np.ndarray):
        h, w = removed.shape
        self.shape = (h, w)
        inside = np.ones((h, w))
        weight_sum = sum(wt * _shift(inside, dy, dx) for (dy, dx), wt in NEIGHBOURS.items())
        stencil = {(0, 0): np.where(removed, weight_sum, 1.0)}
        for (dy, dx), wt in NEIGHBOURS.items():
            stencil[(dy, dx)] = np.where(removed & (_shift(removed.astype(np.float64), dy, dx) > 0), -wt, 0.0)
        self.levels = [_odd(stencil)]
        while max(self.levels[-1][(0, 0)].shape) > self.COARSEST:
            self.levels.append(_odd(self._galerkin(self.levels[-1])))
        last = self.levels[-1]
        hc, wc = last[(0, 0)].shape
        dense = np.zeros((hc * wc, hc * wc))
        index = np.arange(hc * wc).reshape(hc, wc)
        for (dy, dx), c in last.items():
            target = _shift(index.astype(np.float64) + 1, dy, dx).astype(np.int64) - 1  # -1 outside
            ok = target >= 0
            dense[index[ok], target[ok]] += c[ok]
        self.coarsest = np.linalg.inv(dense).astype(self.DTYPE)
        self.levels = [{o: c.astype(self.DTYPE) for o, c in level.items()} for level in self.levels]

    def neighbour_sum(self, values: np.ndarray) -> np.ndarray:
        """``sum_j w_ij values_j`` over each pixel's neighbours inside the image: ``[C, H, W]``."""
        return sum(wt * _shift(values, dy, dx) for (dy, dx), wt in NEIGHBOURS.items())

    @staticmethod
    def _galerkin(fine: dict) -> dict:
        """The coarse operator ``R A P`` (``R = P^T``), a 9-point stencil, term by term.

        With ``p(d)`` the bilinear weights (1 at 0, 1/2 at +-1 on each axis), the coefficient
        of coarse offset ``O`` at coarse cell ``I`` is ``sum p(a) p(a + o - 2 O) c_o(2 I + a)``
        over the fine offsets ``a`` and the fine stencil's offsets ``o``.
        """
        h, w = fine[(0, 0)].shape
        hc, wc = (h + 1) // 2, (w + 1) // 2
        weight = {-1: 0.5, 0: 1.0, 1: 0.5}
        padded = {o: np.pad(c, 1) for o, c in fine.items()}  # fine points outside the grid contribute 0
        coarse = {}
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                total = np.zeros((hc, wc))
                for ay in (-1, 0, 1):
                    for ax in (-1, 0, 1):
                        at = (slice(1 + ay, 1 + ay + 2 * hc, 2), slice(1 + ax, 1 + ax + 2 * wc, 2))
                        for (dy, dx), c in padded.items():
                            ty, tx = ay + dy - 2 * oy, ax + dx - 2 * ox
                            if abs(ty) <= 1 and abs(tx) <= 1:
                                total += weight[ay] * weight[ax] * weight[ty] * weight[tx] * c[at]
                coarse[(oy, ox)] = total
        return coarse

    def _cycle(self, level: int, r: np.ndarray) -> np.ndarray:
        """One symmetric V-cycle for ``A e = r`` from ``e = 0`` (the preconditioner)."""
        if level == len(self.levels) - 1:
            flat = r.reshape(r.shape[0], -1)
            return (flat @ self.coarsest.T).reshape(r.shape)
        stencil = self.levels[level]
        diagonal = self.OMEGA / stencil[(0, 0)]
        e = diagonal * r
        for _ in range(self.SWEEPS - 1):
            e += diagonal * (r - _apply(stencil, e))
        coarse = _restrict(r - _apply(stencil, e))
        hc, wc = self.levels[level + 1][(0, 0)].shape
        padded = np.zeros((r.shape[0], hc, wc), dtype=self.DTYPE)
        padded[:, : coarse.shape[1], : coarse.shape[2]] = coarse
        correction = self._cycle(level + 1, padded)[:, : coarse.shape[1], : coarse.shape[2]]
        e += _prolong(correction)
        for _ in range(self.SWEEPS):
            e += diagonal * (r - _apply(stencil, e))
        return e

    def solve(self, rhs: np.ndarray, tolerance: float) -> np.ndarray:
        """Preconditioned conjugate gradients, each channel to ``|r| <= tolerance |rhs|``: ``[C, H, W]``."""
        h, w = self.shape
        top = self.levels[0]
        hp, wp = top[(0, 0)].shape
        b = np.zeros((rhs.shape[0], hp, wp), dtype=self.DTYPE)
        b[:, :h, :w] = rhs
        x = np.zeros_like(b)
        r = b.copy()
        dot = lambda u, v: np.einsum("cij,cij->c", u, v, dtype=np.float64)  # noqa: E731
        goal = tolerance * np.sqrt(dot(b, b))
        z = self._cycle(0, r)
        p = z.copy()
        rz = dot(r, z)
        for _ in range(500):
            if (np.sqrt(dot(r, r)) <= goal).all():
                break
            ap = _apply(top, p)
            alpha = (rz / np.maximum(dot(p, ap), 1e-300)).astype(self.DTYPE)
            x += alpha[:, None, None] * p
            r -= alpha[:, None, None] * ap
            z = self._cycle(0, r)
            rz, previous = dot(r, z), rz
            p = z + (rz / np.maximum(previous, 1e-300)).astype(self.DTYPE)[:, None, None] * p
        return x[:, :h, :w]
