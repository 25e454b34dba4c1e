"""The classifier head and Class Activation Maps, in NumPy.

A CNN that ends in global average pooling (GAP) and one linear layer scores
class ``c`` as ``sum_k W[c,k] * mean_xy A[k,x,y] + b[c]``. Moving the sum
inside the mean gives the CAM of Zhou et al. (2016): ``M_c = sum_k W[c,k] A[k]``,
a map whose mean is the class score (less the bias). npcam shows where the
evidence *for* the class is, so it keeps the positive part and scales it to
[0, 1] by its max.
"""

from __future__ import annotations

import numpy as np

WEIGHTINGS = ("fc", "softmax")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``; same shape and dtype as ``x``."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def logits(features: np.ndarray, fc_weight: np.ndarray, fc_bias: np.ndarray) -> np.ndarray:
    """Class scores from conv features: GAP, then the FC layer.

    Parameters
    ----------
    features : float32 ``[N, C, h, w]``
    fc_weight : float32 ``[K, C]``
    fc_bias : float32 ``[K]``

    Returns
    -------
    float32 ``[N, K]``
    """
    pooled = features.mean(axis=(2, 3), dtype=np.float32)
    return pooled @ fc_weight.T + fc_bias


def class_activation_maps(
    features: np.ndarray,
    fc_weight: np.ndarray,
    classes: np.ndarray | list[int],
    weighting: str = "fc",
) -> np.ndarray:
    """CAMs of several classes for one image, in one matrix product.

    Parameters
    ----------
    features : float32 ``[C, h, w]``
        Last conv features of one image.
    fc_weight : float32 ``[K, C]``
    classes : int ``[k]``
        Class indices into ``fc_weight``.
    weighting : {"fc", "softmax"}
        ``"fc"`` (default) uses the FC weights as they are, as in the paper.
        ``"softmax"`` first softmaxes each weight row, as the seed tutorial
        does; it makes every weight positive and so loses the negative evidence.

    Returns
    -------
    float32 ``[k, h, w]``, each map in [0, 1]: ``relu(W_c . A) / max``. A map
    with no positive value is all zeros (never NaN).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
    channels, h, w = features.shape
    weights = fc_weight[np.asarray(classes, dtype=np.intp)]
    if weighting == "softmax":
        weights = softmax(weights, axis=1)
    # float64: cheap at [k, C] @ [C, h*w], and no finite float32 input can overflow it.
    cams = weights.astype(np.float64) @ features.reshape(channels, h * w).astype(np.float64)
    return normalize(cams.reshape(-1, h, w))


def normalize(cams: np.ndarray) -> np.ndarray:
    """ReLU each map of ``[k, h, w]``, then divide it by its max; returns float32 in [0, 1]."""
    cams = np.maximum(cams, 0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    # An all-zero map stays zero: dividing by 1 there avoids 0/0.
    return (cams / np.where(peak > 0, peak, 1)).astype(np.float32)
