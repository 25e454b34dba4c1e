"""D-RISE (Petsiuk et al., CVPR 2021), and RISE (Petsiuk et al., BMVC 2018) on a classifier: random masks over the
input, each weighted by how much of the target survives it. Only forward passes, so it takes any network.

For each of N random masks ``M_i`` the whole network scores the masked input ``x * M_i``, and the target's
probability there is the mask's weight ``w_i`` (:meth:`npcam.targets.Target.probabilities`): for a detection,
D-RISE's similarity of the detection to its best match among the masked output's candidates, ``max_j IoU x cos x
objectness``; for a class, its probability (RISE). RISE's estimate ``S = sum_i w_i M_i / (N p)`` is the
target's expected weight when a pixel is kept; the map is ``S`` less the weights' mean, what keeping the pixel
adds to it. Definition, options and cost: docs/methods.md.
"""

from __future__ import annotations

import numpy as np

from ..errors import NpcamError
from ..probe import Probe
from ..upsample import interpolation_matrix

# RISE's and D-RISE's chance that a cell of a mask is kept.
PROBABILITY = 0.5


def cell_size(size: tuple[int, int], cells: int) -> tuple[int, int]:
    """A mask cell's ``(height, width)`` in pixels, for masks of ``cells x cells`` cells over ``size`` ``(h, w)``:
    RISE's ``ceil(h / s)``."""
    return -(-size[0] // cells), -(-size[1] // cells)


def draw_masks(
    count: int, cells: int, size: tuple[int, int], seed: int, probability: float = PROBABILITY
) -> tuple[np.ndarray, np.ndarray]:
    """The random part of ``count`` masks over ``size`` ``(h, w)``: which cells are kept and where each mask is
    shifted.

    Drawn from ``numpy.random.default_rng(seed)`` in this order, so that the same seed gives the same masks: the
    grids (``random((count, cells, cells)) < probability``), then the row shifts, then the column shifts (each
    ``integers(0, cell)``, the cell's size in pixels, :func:`cell_size`).

    Returns
    -------
    grids : bool ``[count, cells, cells]``
    shifts : int64 ``[count, 2]``, each mask's ``(dy, dx)``
    """
    rng = np.random.default_rng(seed)
    grids = rng.random((count, cells, cells)) < probability
    cell_h, cell_w = cell_size(size, cells)
    rows = rng.integers(0, cell_h, count)
    cols = rng.integers(0, cell_w, count)
    return grids, np.stack([rows, cols], axis=1)


def smooth_masks(grids: np.ndarray, shifts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RISE's masks from their grids: each ``s x s`` grid upsampled bilinearly to ``s + 1`` cells a side
    (half-pixel centres, :mod:`npcam.upsample`), and the ``size`` window at its shift cut out.

    Parameters
    ----------
    grids : bool ``[n, s, s]``, shifts : int ``[n, 2]`` (from :func:`draw_masks`)
    size : ``(h, w)``, the masked part of the input

    Returns
    -------
    float32 ``[n, h, w]`` in [0, 1]
    """
    cells = grids.shape[1]
    (h, w), (cell_h, cell_w) = size, cell_size(size, cells)
    rows = interpolation_matrix(cells, (cells + 1) * cell_h)  # [(s + 1) cell_h, s]
    cols = interpolation_matrix(cells, (cells + 1) * cell_w)
    out = np.empty((len(grids), h, w), dtype=np.float32)
    for i, (grid, (dy, dx)) in enumerate(zip(grids, shifts)):
        # Only the window's rows and columns of the upsampling matrices: the shifted crop, never the whole mask.
        out[i] = rows[dy : dy + h] @ grid.astype(np.float32) @ cols[dx : dx + w].T
    return out


def estimate(probe: Probe) -> tuple[np.ndarray, np.ndarray]:
    """RISE's estimate ``S = sum_i w_i M_i / (N p)`` for each of the probe's k targets, over the photo's part of the
    input (:attr:`~npcam.probe.Probe.region`; a letterbox's pad is neither masked nor mapped), and the weights'
    mean ``w_bar = sum_i w_i / N``: float64 ``[k, h, w]`` and ``[k]``.

    ``probe.options`` gives N (``masks``), s (``mask_cells``) and the ``seed``. The masked inputs run through the
    whole network in batches of :meth:`~npcam.probe.Probe.input_batch`, shared by the k targets;
    ``probe.check()`` comes before each batch and ``probe.progress`` after it.
    """
    options = probe.options.checked()
    top, left, h, w = probe.region
    cells = options.mask_cells
    if cells > min(h, w):
        raise NpcamError(f"mask_cells={cells} is more than the photo's {min(h, w)} pixels in the network input")
    grids, shifts = draw_masks(options.masks, cells, (h, w), options.seed)
    x = probe.input  # [1, 3, H, W]
    total, weight_sum = np.zeros((probe.k, h * w)), np.zeros(probe.k)
    batch = probe.input_batch()
    for start in range(0, options.masks, batch):
        probe.check()
        stop = min(start + batch, options.masks)
        masks = smooth_masks(grids[start:stop], shifts[start:stop], (h, w))  # [n, h, w]
        inputs = np.repeat(x, stop - start, axis=0)
        inputs[:, :, top : top + h, left : left + w] *= masks[:, None]
        weights = probe.score_inputs(inputs, probabilities=True)  # [n, k]
        total += weights.T @ masks.reshape(len(masks), -1).astype(np.float64)
        weight_sum += weights.sum(axis=0)
        probe.progress(stop, options.masks)
    return (total / (options.masks * PROBABILITY)).reshape(probe.k, h, w), weight_sum / options.masks


def saliency(probe: Probe) -> np.ndarray:
    """RISE's estimate ``S`` alone (:func:`estimate`): float64 ``[k, h, w]``."""
    return estimate(probe)[0]


def drise_maps(probe: Probe) -> np.ndarray:
    """D-RISE's maps at the network input's resolution, float64 ``[k, H, W]``: ``S - w_bar`` (:func:`estimate`)
    over the photo's part, 0 outside it (the pad, which the model's maps cut away).

    ``S - w_bar = sum_i w_i (M_i - p) / (N p)``: how much more of the target survives the masks that keep a pixel
    than masks on average; a pixel that does not matter is 0 give or take the sampling noise, which the ReLU
    after every method halves (RISE's own ``S`` is ``w_bar`` there, a floor the scaling would show as signal).
    """
    top, left, h, w = probe.region
    inside, mean = estimate(probe)
    out = np.zeros((probe.k, *probe.input.shape[2:]))
    out[:, top : top + h, left : left + w] = inside - mean[:, None, None]
    return out
