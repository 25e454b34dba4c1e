"""Bilinear resizing of small maps as two matrix products.

Bilinear interpolation is separable, so resizing an ``[h, w]`` map to
``[H, W]`` is ``Ry @ map @ Rx.T`` with ``Ry: [H, h]`` and ``Rx: [W, w]``.
Each row of ``R`` holds the two weights of one output pixel. The matrices
depend only on the sizes and are cached, so a batch of same-size photos pays
for them once.

Sampling uses half-pixel centres: output pixel ``i`` reads the source at
``(i + 0.5) * in / out - 0.5``, clamped to the edges. That is torch's
``interpolate(mode="bilinear", align_corners=False)`` and OpenCV's
``INTER_LINEAR``; when upsampling, Pillow's ``BILINEAR`` agrees too. When
shrinking there is no antialiasing (as in torch and OpenCV).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Weights that resize a 1-D signal of ``size_in`` samples to ``size_out``.

    Returns
    -------
    float32 ``[size_out, size_in]``, read-only; each row sums to 1.
    """
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    src = np.maximum(src, 0.0)
    left = np.minimum(np.floor(src).astype(np.intp), size_in - 1)
    right = np.minimum(left + 1, size_in - 1)
    frac = src - left
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, left), 1.0 - frac)
    np.add.at(matrix, (rows, right), frac)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a map to ``size`` with bilinear interpolation.

    Parameters
    ----------
    cam : float32 ``[h, w]`` or ``[k, h, w]``
    size : ``(H, W)``

    Returns
    -------
    float32 ``[H, W]`` or ``[k, H, W]``. Values stay within the input's range.
    """
    height, width = size
    rows = interpolation_matrix(cam.shape[-2], height)
    cols = interpolation_matrix(cam.shape[-1], width)
    return rows @ cam.astype(np.float32, copy=False) @ cols.T
