"""The affine head ``W p + b`` after global average pooling: where CAM is defined (Zhou et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def one_hot(indices: Sequence[int], size: int, dtype=np.float64) -> np.ndarray:
    """Rows of the identity: ``[k, size]`` with a 1 at each of ``indices``, the cotangents that pick outputs."""
    rows = np.zeros((len(indices), size), dtype=dtype)
    rows[np.arange(len(indices)), np.asarray(indices, dtype=np.intp)] = 1.0
    return rows


class AffineHead:
    """``scores = pooled @ weight.T + bias``: one linear layer after global average pooling.

    It takes the same arguments as :class:`~npcam.head.GraphHead` (side inputs and traces are accepted and
    unused), so that callers never ask which kind of head they hold.

    Parameters
    ----------
    weight : float32 ``[K, C]``
    bias : float32 ``[K]``
    """

    kind = "affine"
    layout = "pooled"  # what its input is: the pooled vector (see GraphHead)
    grid = None
    prefix = 0
    sides: dict[str, tuple[int, ...]] = {}

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        self.weight = weight
        self.bias = bias

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    @property
    def input_values(self) -> int:
        return self.weight.shape[1]

    @property
    def input_shape(self) -> tuple[int, int]:
        return (-1, self.weight.shape[1])

    @property
    def inputs(self) -> dict[str, tuple[int, int]]:
        """Its one input by name, as :attr:`GraphHead.inputs <npcam.head.GraphHead>` gives them: the pooled vector."""
        return {"pooled": self.input_shape}

    @property
    def classes(self) -> int:
        return self.weight.shape[0]

    @property
    def bytes_per_input(self) -> int:
        """What one input costs a batched forward, in bytes (its vector and its scores, in float64)."""
        return 8 * (self.channels + self.classes)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (1, self.weight.shape[0])

    def forward(self, pooled: np.ndarray, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """float32 ``[N, C]`` to float32 ``[N, K]``."""
        return pooled.reshape(len(pooled), -1) @ self.weight.T + self.bias

    def forward_float64(self, pooled: np.ndarray, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """As :meth:`forward`, in float64 ``[N, K]``."""
        return pooled.reshape(len(pooled), -1).astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias

    def vjp(self, pooled, seed: np.ndarray, sides=None, trace=None) -> np.ndarray:
        """``seed @ W``: the k cotangents ``seed`` float ``[k, K]`` of the scores pulled back to the pooled vector,
        float64 ``[k, C]`` (``pooled`` is unused: the head is linear)."""
        seed = np.asarray(seed, dtype=np.float64).reshape(len(seed), -1)
        return seed @ self.weight.astype(np.float64)

    def gradient(self, pooled, classes: Sequence[int], sides=None, trace=None) -> np.ndarray:
        """``d scores[c] / d pooled`` for each class: the FC rows, float64 ``[k, C]`` (``pooled`` is unused)."""
        return self.weight[np.asarray(classes, dtype=np.intp)].astype(np.float64)
