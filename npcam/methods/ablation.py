"""Ablation-CAM (Ramaswamy et al., WACV 2020): a channel's weight is the score's relative drop without it."""

from __future__ import annotations

import numpy as np

from ..probe import LAYER_BATCH, Probe


def ablation_weights(probe: Probe) -> np.ndarray:
    """Ablation-CAM weights ``(y_c - y_c with channel k zeroed) / y_c``: float64 ``[k, C]``.

    On a pooled head, zeroing the channel map ``A_k`` zeroes ``p_k``, so only the head runs again. For an affine
    head and a linear target the drop is ``G_k p_k`` exactly; other pooled heads run C forward passes, in
    batches of :data:`~npcam.probe.LAYER_BATCH`. On a head that is not pooled, channel k of ``A`` is zeroed on
    the grid (a token head keeps its CLS token) and the head runs on the C ablated layers, batched within
    :data:`~npcam.probe.HEAD_PASS_BYTES`. A zero score gives zero weights. (pytorch-grad-cam ablates with
    ``min(A) - 1e7`` instead of 0 when the activations can be negative; npcam follows the paper.)
    """
    scores = probe.scores
    if not probe.pooled:
        features = probe.features

        def ablated(start, stop):
            grids = np.repeat(features[None], stop - start, axis=0)
            grids[np.arange(stop - start), np.arange(start, stop)] = 0.0
            return grids

        drop = scores[:, None] - probe.score_layers(ablated, len(features)).T
    elif probe.affine and probe.target.linear:
        drop = probe.pooled_gradient() * probe.pooled_vector.astype(np.float64)
    else:
        pooled = probe.pooled_vector.astype(np.float64)
        ablated_scores = np.empty((len(pooled), probe.k))
        for start in range(0, len(pooled), LAYER_BATCH):
            probe.check()
            rows = np.arange(start, min(start + LAYER_BATCH, len(pooled)))
            ablated = np.repeat(pooled[None], len(rows), axis=0)
            ablated[np.arange(len(rows)), rows] = 0.0
            ablated_scores[rows] = probe.score_pooled(ablated)
        drop = scores[:, None] - ablated_scores.T
    safe = np.where(scores == 0, 1.0, scores)[:, None]
    return np.where(scores[:, None] == 0, 0.0, drop / safe)
