"""Class scores: what a classifier's maps explain (the paper's CAM explains one class's score)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..cam import probabilities
from ..head import one_hot
from ..labels import class_index


@dataclass(frozen=True)
class ClassScores:
    """The scores (logits) of ``classes`` in a classifier's output ``[n, K]``, one target per class.

    Parameters
    ----------
    classes : the k class indices, in the order of the maps
    labels : the K class names (for :attr:`names`)
    multi_label : the classes are independent yes/no questions: probabilities are each class's sigmoid, not a
        softmax over the K classes
    """

    classes: tuple[int, ...]
    labels: Sequence[str]
    multi_label: bool = False
    linear = True

    @property
    def names(self) -> list[str]:
        return [self.labels[c] for c in self.classes]

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """float ``[n, K]`` logits to float64 ``[n, k]``: the explained classes' columns."""
        return outputs.reshape(len(outputs), -1)[:, list(self.classes)].astype(np.float64)

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """float ``[n, K]`` logits to float64 ``[n, k]``: the explained classes' probabilities."""
        flat = outputs.reshape(len(outputs), -1).astype(np.float64)
        return probabilities(flat, self.multi_label)[:, list(self.classes)]

    def seed(self, outputs: np.ndarray) -> np.ndarray:
        """One-hot rows, float64 ``[k, K]``: each score is one output."""
        return one_hot(self.classes, outputs.size)


def request(model, prediction, what) -> ClassScores:
    """The class scores that ``what`` asks for: a class (an index or a label, :func:`npcam.labels.class_index`) or a
    list of them, of ``model``'s classes (``prediction`` is not needed)."""
    wanted = [what] if isinstance(what, (int, str, np.integer)) else list(what)
    indices = tuple(class_index(model.labels, c) for c in wanted)
    return ClassScores(indices, model.labels, model.bundle.multi_label)
