"""Eigen-CAM (Muhammad and Yeasin, IJCNN 2020): the activations' first principal component. It needs neither
gradients nor scores (the same map for every target), and gives a map, not channel weights."""

from __future__ import annotations

import numpy as np

from ..probe import Probe

# Below this |mean . v|, relative to the activations' size (the root mean square of the positions' norms), which
# way the activations' mean leans is too close to call (rounding, which CPUs do differently, could decide it):
# the sign then comes from the projection's largest value instead (docs/methods.md, Eigen-CAM's sign).
DECISIVE = 1e-3


def eigen_map(features: np.ndarray) -> np.ndarray:
    """Eigen-CAM: the ``[hw, C]`` activations, centred, projected on their first principal direction ``v``.

    The projection is ``sigma_1 u_1`` of the centred matrix's SVD, found as the top eigenvector of its small
    ``[hw, hw]`` Gram matrix. A principal direction's sign is arbitrary (LAPACK on one CPU returns ``v``, on
    another ``-v``), and the ReLU that follows keeps one side only, so npcam fixes it: ``v`` points the way the
    activations lie on average, ``mean . v > 0`` with ``mean`` the ``[C]`` activations averaged over the
    positions. Where that is too close to call (``|mean . v|`` below :data:`DECISIVE` times the activations'
    root-mean-square norm: a layer whose every channel averages to about 0), the projection's value of largest
    magnitude is made positive.
    Returns float64 ``[h, w]``.
    """
    channels, h, w = features.shape
    rows = features.reshape(channels, h * w).T.astype(np.float64)
    mean = rows.mean(axis=0)
    centred = rows - mean
    values, vectors = np.linalg.eigh(centred @ centred.T)
    if not values[-1] > 0:
        return np.zeros((h, w))
    projection = vectors[:, -1] * np.sqrt(values[-1])
    direction = centred.T @ vectors[:, -1] / np.sqrt(values[-1])  # v, a unit vector [C]
    size = np.sqrt((rows * rows).sum(axis=1).mean())
    lean = np.dot(mean, direction) / max(size, np.finfo(np.float64).tiny)
    if abs(lean) >= DECISIVE:
        flip = lean < 0
    else:
        flip = projection[np.argmax(np.abs(projection))] < 0
    return (-projection if flip else projection).reshape(h, w)


def eigencam_maps(probe: Probe) -> np.ndarray:
    """The Eigen-CAM map for each of the k targets (the same map): float64 ``[k, h, w]``."""
    return np.repeat(eigen_map(probe.features)[None], probe.k, axis=0)
