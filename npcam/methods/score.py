"""Score-CAM (Wang et al., CVPR-W 2020): a channel's weight is the score of the input masked by that channel."""

from __future__ import annotations

import numpy as np

from ..cam import softmax
from ..probe import INPUT_BATCH, Probe
from ..upsample import upsample


def score_weights(probe: Probe) -> np.ndarray:
    """Score-CAM weights as TorchCAM computes them: float64 ``[k, C]``.

    Each channel map is min-max normalized at feature resolution (TorchCAM's eps of 1e-8), upsampled bilinearly
    to the network input, multiplied into the input, and scored by the whole network; the weights are the
    softmax over channels of each target's score. The passes do not depend on the target, so every target
    shares them. Channels with identical masks (all-zero channels, or one active cell at the same place) give
    identical inputs, so each distinct mask runs once: the result is the same, with fewer passes.
    """
    x = probe.input  # [1, 3, H, W]
    features = probe.features
    low = features - features.min(axis=(1, 2), keepdims=True)
    low = (low / (low.max(axis=(1, 2), keepdims=True) + np.float32(1e-8))).astype(np.float32)
    unique, inverse = np.unique(low.reshape(len(low), -1), axis=0, return_inverse=True)
    unique = unique.reshape(-1, *low.shape[1:])
    scores = np.empty((len(unique), probe.k))
    for start in range(0, len(unique), INPUT_BATCH):
        probe.check()
        masks = upsample(unique[start : start + INPUT_BATCH], x.shape[2:])  # [b, H, W]
        scores[start : start + len(masks)] = probe.score_inputs(masks[:, None] * x)
        probe.progress(min(start + INPUT_BATCH, len(unique)), len(unique))
    return softmax(scores[inverse.ravel()].T, axis=1)  # [k, C]
