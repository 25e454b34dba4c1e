"""Class activation maps in NumPy: weight the feature channels, keep the positive part, scale to [0, 1].

A CNN that ends in global average pooling (GAP) and one linear layer scores
class ``c`` as ``sum_k W[c,k] * mean_xy A[k,x,y] + b[c]``. Moving the sum
inside the mean gives the CAM of Zhou et al. (2016): ``M_c = sum_k W[c,k] A[k]``,
a map whose mean is the class score (less the bias). npcam shows where the
evidence *for* the class is, so it keeps the positive part and scales it to
[0, 1] by its max. The other methods (:mod:`npcam.methods`) only choose other
channel weights, and share these steps.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``; same shape and dtype as ``x``."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large ``|x|``; same shape and dtype as ``x``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def probabilities(scores: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Class probabilities from class scores ``[..., K]``: a softmax over the classes, or each class's
    sigmoid for a multi-label model (whose classes are independent yes/no questions)."""
    return sigmoid(scores) if multi_label else softmax(scores, axis=-1)


def pool(features: np.ndarray) -> np.ndarray:
    """Global average pooling: float32 ``[N, C, h, w]`` to float32 ``[N, C]``."""
    return features.mean(axis=(2, 3), dtype=np.float32)


def logits(features: np.ndarray, fc_weight: np.ndarray, fc_bias: np.ndarray) -> np.ndarray:
    """Class scores of an affine head from conv features: GAP, then the FC layer.

    Parameters
    ----------
    features : float32 ``[N, C, h, w]``
    fc_weight : float32 ``[K, C]``
    fc_bias : float32 ``[K]``

    Returns
    -------
    float32 ``[N, K]``
    """
    return pool(features) @ fc_weight.T + fc_bias


def weighted_maps(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The one combine step of every channel-weight method: float64 ``[k, h, w]``.

    Channel weights ``[k, C]`` give ``sum_c weights[j, c] * features[c]``;
    per-position weights ``[k, C, h, w]`` (HiResCAM, Layer-CAM on a head that
    is not globally pooled) give ``sum_c weights[j, c] * features[c]``
    elementwise.

    Parameters
    ----------
    features : float32 ``[C, h, w]``
    weights : float ``[k, C]`` or ``[k, C, h, w]``

    float64 is cheap at this size, and no finite float32 input can overflow it.
    ``optimize=True`` lets einsum hand the contraction to BLAS.
    """
    spec = "kc,chw->khw" if weights.ndim == 2 else "kchw,chw->khw"
    return np.einsum(spec, weights.astype(np.float64), features.astype(np.float64), optimize=True)


def normalize(maps: np.ndarray) -> np.ndarray:
    """ReLU each map of ``[k, h, w]``, then divide it by its max; returns float32 in [0, 1].

    A map with no positive value stays all zeros, never NaN.
    """
    maps = np.maximum(np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0), 0)
    peak = maps.max(axis=(1, 2), keepdims=True)
    return (maps / np.where(peak > 0, peak, 1)).astype(np.float32)


def class_activation_maps(features: np.ndarray, fc_weight: np.ndarray, classes: np.ndarray | list[int]) -> np.ndarray:
    """The paper's CAMs of several classes for one image, in one contraction.

    Parameters
    ----------
    features : float32 ``[C, h, w]``, the last conv features of one image
    fc_weight : float32 ``[K, C]``
    classes : int ``[k]``, indices into ``fc_weight``

    Returns
    -------
    float32 ``[k, h, w]``, each map ``relu(W_c . A) / max`` in [0, 1].
    """
    return normalize(weighted_maps(features, fc_weight[np.asarray(classes, dtype=np.intp)]))
