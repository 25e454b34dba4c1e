"""The paper's CAM (Zhou et al. 2016) and the seed tutorial's softmax variant: defined on an affine head only.

On ``W p + b`` the weights of a class's map are its FC row ``W_c``: the target's gradient with respect to the
pooled vector, so that the map averages to the score less the bias.
"""

from __future__ import annotations

import numpy as np

from ..cam import softmax
from ..probe import Probe


def cam(probe: Probe) -> np.ndarray:
    """CAM: the FC rows of the explained classes (for any linear target, their combination), float64 ``[k, C]``."""
    return probe.pooled_gradient()


def softmax_weights(probe: Probe) -> np.ndarray:
    """The seed tutorial's variant: a softmax over each FC row, so every weight is positive: float64 ``[k, C]``."""
    return softmax(probe.pooled_gradient(), axis=1)
