"""Faithfulness metrics: does the model's confidence follow the map? Batched trunk calls, no torch.

Both follow TorchCAM's implementations (``torchcam.metrics``), so their
numbers can be compared. The input ``x`` is the *normalized* network input,
the map is upsampled bilinearly to its size, and the scores are the model's
probabilities of the explained class (softmax; sigmoid for a multi-label model).

- **Average Drop and Increase in Confidence** (Chattopadhay et al., Grad-CAM++,
  WACV 2018): with ``s = p_c(x)`` and ``s' = p_c(map * x)``,
  ``drop = max(0, s - s') / s`` (TorchCAM adds 1e-7 to ``s``) and
  ``increase = [s < s']``, each averaged over images. Lower drop and higher
  increase mean the map keeps what the model needs.
- **Deletion and Insertion AUC** (Petsiuk et al., RISE, BMVC 2018): rank the
  input's positions by the map, highest first (ties in raster order); replace
  them step by step with the baseline (zeros), ``ceil(P / steps)`` positions a
  step, for deletion, or restore them from the baseline for insertion; the
  area under the score curve, by the trapezoid rule over the fraction of
  positions changed. Lower deletion and higher insertion are better.
"""

from __future__ import annotations

import math

import numpy as np

from .model import Model, Prediction
from .upsample import upsample

BATCH = 32
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy 2 renamed it


def _probability(model: Model, inputs: np.ndarray, class_index: int) -> np.ndarray:
    """The probability of one class for each of ``inputs`` ``[N, 3, H, W]``, in batches."""
    out = []
    for start in range(0, len(inputs), BATCH):
        out.append(model.probabilities(model.scores(inputs[start : start + BATCH]).astype(np.float64))[:, class_index])
    return np.concatenate(out)


def confidence_change(model: Model, prediction: Prediction, cam: np.ndarray, class_index: int) -> tuple[float, bool]:
    """Average Drop's and Increase in Confidence's terms for one image: ``(drop, increase)``.

    ``cam`` is the map at any resolution (float ``[h, w]``); it is upsampled to the input.
    """
    x = prediction.input
    mask = upsample(cam.astype(np.float32), x.shape[2:])
    s = float(model.probabilities(prediction.logits.astype(np.float64))[class_index])
    masked = float(_probability(model, x * mask, class_index)[0])
    return max(0.0, s - masked) / (s + 1e-7), s < masked


def deletion_insertion(
    model: Model, prediction: Prediction, cam: np.ndarray, class_index: int, steps: int = 20
) -> tuple[float, float]:
    """Deletion and insertion AUC of one image's map: ``(deletion, insertion)``.

    Runs ``2 * (number of points - 2) + 1`` perturbed inputs through the
    network (41 for 20 steps), in batches.
    """
    x = prediction.input[0]  # [3, H, W]
    ranks = _ranks(upsample(cam.astype(np.float32), x.shape[1:]))
    positions = ranks.size
    step = math.ceil(positions / steps)
    counts = [*range(0, positions, step), positions]
    fractions = np.asarray(counts, dtype=np.float64) / positions
    flat = x.reshape(3, -1)
    # Inputs: the all-baseline one, then each interior point's deletion and insertion.
    perturbed = [np.zeros_like(flat)]
    for count in counts[1:-1]:
        first = (ranks < count)[None]
        perturbed += [np.where(first, 0.0, flat), np.where(first, flat, 0.0)]
    scores = _probability(model, np.stack(perturbed).reshape(-1, *x.shape).astype(np.float32), class_index)
    original = float(model.probabilities(prediction.logits.astype(np.float64))[class_index])
    deletion = np.concatenate([[original], scores[1::2], [scores[0]]])
    insertion = np.concatenate([[scores[0]], scores[2::2], [original]])
    return float(_trapezoid(deletion, fractions)), float(_trapezoid(insertion, fractions))


def _ranks(full: np.ndarray) -> np.ndarray:
    """Each position's rank when the map is sorted highest first, ties in raster order."""
    order = np.argsort(-full.ravel(), kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(order.size)
    return ranks
