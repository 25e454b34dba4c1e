"""Recipro-CAM (Byun and Lee, 2022; ViT-ReciproCAM on tokens): a position's value is the target's probability
with only that position of ``A`` kept. It gives maps, not channel weights."""

from __future__ import annotations

import numpy as np

from ..probe import Probe


def reciprocam_maps(probe: Probe) -> np.ndarray:
    """Recipro-CAM's maps, float64 ``[k, h, w]``.

    For each of the hw positions, ``A`` with every other position zeroed runs through the head (a token head
    keeps its CLS token; the side inputs are this image's), in batches (:meth:`~npcam.probe.Probe.head_batch`).
    The map at ``(i, j)`` is the target's probability (a class's softmax, or its sigmoid on a multi-label
    model) less its minimum over positions, so that the max scaling afterwards is openvino_xai's min-max.
    npcam keeps one position only (openvino_xai's default also spreads each kept position over its 3x3
    neighbours with a Gaussian).
    """
    features = probe.features
    channels, h, w = features.shape

    def kept(start, stop):
        positions = np.arange(start, stop)
        grids = np.zeros((stop - start, channels, h * w), dtype=features.dtype)
        grids[np.arange(stop - start), :, positions] = features.reshape(channels, -1)[:, positions].T
        return grids.reshape(-1, channels, h, w)

    probs = probe.score_layers(kept, h * w, probabilities=True).T  # [k, hw]
    return (probs - probs.min(axis=1, keepdims=True)).reshape(probe.k, h, w)
