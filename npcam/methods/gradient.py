"""The gradient methods: Grad-CAM, HiResCAM, XGrad-CAM, Layer-CAM and Grad-CAM++.

Each weighs ``A``'s channels (or its values) with ``G``, the targets' gradient. On a globally pooled head
``G = d target / d p`` is one vector per target and each method has a closed form; on any other head
``G = d target / d A`` ``[k, C, h, w]`` and each has its general definition, as pytorch-grad-cam computes it
(docs/methods.md).
"""

from __future__ import annotations

import numpy as np

from ..probe import Probe


def gradcam_weights(gradient: np.ndarray) -> np.ndarray:
    """Grad-CAM's channel weights, the spatial mean of ``G``: ``[k, C, h, w]`` to float64 ``[k, C]``."""
    return gradient.mean(axis=(2, 3), dtype=np.float64)


def xgradcam_weights(gradient: np.ndarray, features: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """XGrad-CAM's channel weights ``sum_ij(G A) / (sum_ij A + eps)``: float64 ``[k, C]``.

    ``eps`` is pytorch-grad-cam's 1e-7. Parameters: ``gradient`` float ``[k, C, h, w]``,
    ``features`` float ``[C, h, w]``.
    """
    a = features.astype(np.float64)
    return (gradient * a).sum(axis=(2, 3)) / (a.sum(axis=(1, 2)) + eps)


def gradcampp_weights(gradient: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """Grad-CAM++ channel weights on a globally pooled head, up to a positive scale.

    pytorch-grad-cam computes, with ``g = G/(hw)`` and ``S_k = sum_ij A_k``,
    ``alpha = g^2 / (2 g^2 + S_k g^3)`` (0 where g = 0) and
    ``w_k = sum_ij max(g, 0) * alpha``; that is ``max(G, 0) / (2 + G * p)`` times hw.
    (pytorch-grad-cam adds eps=1e-6 to the denominator, which for typical head
    gradients of 1e-4..1e-3 per position changes its own result; npcam leaves
    it out.) A zero denominator gives a zero weight.

    Parameters
    ----------
    gradient : float64 ``[k, C]``, ``G`` for each target
    pooled : ``[C]``, ``p``
    """
    denominator = 2.0 + gradient * pooled.astype(np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 0.0, np.maximum(gradient, 0) / safe)


def gradcampp_general_weights(gradient: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Grad-CAM++'s channel weights from the full gradient, as pytorch-grad-cam computes them: float64 ``[k, C]``.

    ``alpha_ij = g^2 / (2 g^2 + S_k g^3)`` with ``g = G[k, :, i, j]`` and
    ``S_k = sum_ij A_k``, 0 where ``g = 0``; ``w_k = sum_ij max(g, 0) alpha_ij``.
    As in :func:`gradcampp_weights`, npcam leaves out pytorch-grad-cam's eps of
    1e-6 in the denominator (it outweighs ``g^2`` for small gradients), so
    where ``g != 0`` alpha is ``1 / (2 + S_k g)``, and a zero denominator gives 0.
    On a pooled head (``g = G/hw`` everywhere) this is :func:`gradcampp_weights` over hw.

    Parameters
    ----------
    gradient : float ``[k, C, h, w]``
    features : float ``[C, h, w]``
    """
    g = gradient.astype(np.float64, copy=False)
    sums = features.astype(np.float64).sum(axis=(1, 2))[None, :, None, None]
    g2 = g * g
    denominator = 2 * g2 + sums * g2 * g
    alpha = np.divide(g2, denominator, out=np.zeros_like(g), where=(g != 0) & (denominator != 0))
    return (np.maximum(g, 0) * alpha).sum(axis=(2, 3))


def gradcam(probe: Probe) -> np.ndarray:
    """Grad-CAM: ``G``'s spatial mean, float64 ``[k, C]``."""
    if probe.pooled:
        return probe.pooled_gradient()
    return gradcam_weights(probe.gradient())


def hirescam(probe: Probe) -> np.ndarray:
    """HiResCAM: ``G`` itself, per position, float64 ``[k, C, h, w]`` (on a pooled head, Grad-CAM's weights)."""
    if probe.pooled:  # G/hw at every position: Grad-CAM's map over hw
        return gradcam(probe)
    return probe.gradient()


def xgradcam(probe: Probe) -> np.ndarray:
    """XGrad-CAM: :func:`xgradcam_weights` (on a pooled head ``sum_ij(G A/hw) / sum_ij A = G/hw``: Grad-CAM's)."""
    if probe.pooled:
        return gradcam(probe)
    return xgradcam_weights(probe.gradient(), probe.features)


def layercam(probe: Probe) -> np.ndarray:
    """Layer-CAM: ``G``'s positive part, per position (per channel on a pooled head)."""
    if probe.pooled:
        return np.maximum(probe.pooled_gradient(), 0)
    return np.maximum(probe.gradient(), 0)


def gradcampp(probe: Probe) -> np.ndarray:
    """Grad-CAM++: :func:`gradcampp_weights` on a pooled head, :func:`gradcampp_general_weights` on any other."""
    if probe.pooled:
        return gradcampp_weights(probe.pooled_gradient(), probe.pooled_vector)
    return gradcampp_general_weights(probe.gradient(), probe.features)
