"""A detection's score: what a detector's maps explain, one target per detection.

The score is the model's own output for the detection's candidate and class, before NMS, as the model's package
ranks detections: the class score, times the objectness where the model has one (YOLOv5-style). Its cotangent
with respect to the head's output is nonzero only at the entries it reads (:meth:`npcam.detect.Decoder.
score_cotangents`), and the head's VJP carries it back to the explained layers.

Its probability, for the methods that perturb the input or the layers and for the metrics, is D-RISE's
similarity (Petsiuk et al., CVPR 2021): a perturbed output's candidates may move, so the detection counts as
still there to the degree that some candidate matches it, ``max_j IoU(box, box_j) * cos(p, p_j) * o_j`` with
``p`` the class scores and ``o_j`` candidate j's objectness. A model without an objectness (YOLOv8, the anchor
and distribution heads) gets the candidate's confidence, its best class score, in its place: the cosine does not
see how large the scores are (a candidate of scores 0.001 and one of 0.9 in the same proportions have a cosine
of 1; for a one-class model every cosine is 1), and without that factor every mask would keep some weak
candidate at the box and weigh alike. The paper sets ``o_j = 1`` only for Faster R-CNN, whose softmax over the
classes and the background already carries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..detect import Decoder, pairwise_iou
from ..errors import NpcamError


@dataclass(frozen=True)
class DetectionScores:
    """The scores of k detections of one image.

    Parameters
    ----------
    decoder : the bundle's :class:`~npcam.detect.Decoder`
    candidates, classes : each detection's candidate index and class, ``[k]``
    boxes : float64 ``[k, 4]``, each detection's box in input pixels (x0, y0, x1, y1), for the similarity
    vectors : float64 ``[k, C]``, each detection's class scores, for the similarity
    labels : the C class names (for :attr:`names`)
    """

    decoder: Decoder
    candidates: tuple[int, ...]
    classes: tuple[int, ...]
    boxes: np.ndarray
    vectors: np.ndarray
    labels: Sequence[str]
    linear = False

    @property
    def names(self) -> list[str]:
        return [f"{self.labels[c]} (candidate {a})" for a, c in zip(self.candidates, self.classes)]

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """float ``[n, T]`` flat outputs to float64 ``[n, k]``: each detection's candidate's score in its class."""
        return self.decoder.scores_of(outputs, np.asarray(self.candidates), np.asarray(self.classes))

    def seed(self, outputs: np.ndarray) -> np.ndarray:
        """``d score / d output`` at one image's flat output: float64 ``[k, T]``."""
        return self.decoder.score_cotangents(outputs, np.asarray(self.candidates), np.asarray(self.classes))

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """D-RISE's similarity of each detection to its best match among each output's candidates: float64
        ``[n, k]`` in [0, 1] (the detection's own confidence for its unchanged output, when it has no
        objectness)."""
        found = self.decoder.decode(outputs)
        out = np.zeros((len(found), len(self.candidates)))
        norms = np.linalg.norm(self.vectors, axis=1)
        for i, candidates in enumerate(found):
            boxes, vectors = candidates.boxes, candidates.scores  # [N, 4], [N, C]
            iou = pairwise_iou(self.boxes, boxes)  # [k, N]
            length = np.linalg.norm(vectors, axis=1)[None, :] * norms[:, None]
            cosine = np.divide(self.vectors @ vectors.T, length, out=np.zeros_like(iou), where=length > 0)
            confidence = candidates.objectness if candidates.objectness is not None else vectors.max(axis=1)
            similarity = iou * cosine * confidence[None, :]
            similarity = np.where(np.isfinite(similarity), similarity, 0.0)
            out[i] = similarity.max(axis=1) if similarity.size else 0.0
        return out


def request(model, prediction, what) -> DetectionScores:
    """The scores of the detections that ``what`` asks for: an index in ``prediction.detections`` (0 is the best) or a
    list of them. One-line errors when there is none, or no such index."""
    detections = prediction.detections if prediction is not None else None
    if not detections:
        raise NpcamError("there is no detection to explain" + ("" if detections is not None else " (no prediction)"))
    wanted = [what] if isinstance(what, (int, np.integer)) else list(what)
    for i in wanted:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(detections):
            raise NpcamError(f"no detection {i!r}: this image has {len(detections)} (0 to {len(detections) - 1})")
    chosen = [detections[int(i)] for i in wanted]
    rows = [d.candidate for d in chosen]
    candidates = prediction.candidates
    return DetectionScores(
        model.bundle.decoder,
        tuple(rows),
        tuple(d.class_index for d in chosen),
        candidates.boxes[rows],
        candidates.scores[rows],
        model.labels,
    )
