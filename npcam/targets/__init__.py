"""What is explained: a target turns the network's output into the k scores that k maps explain.

A method never sees class indices or a model's kind of output; it sees a :class:`Target`, which gives it

- ``scores(outputs)``: the k scores of each of n outputs (float ``[n, *output]`` to float64 ``[n, k]``), for
  the methods that score perturbed inputs or layers (Score-CAM, Ablation-CAM, Recipro-CAM, the metrics);
- ``probabilities(outputs)``: the same scores as probabilities, float64 ``[n, k]`` (Recipro-CAM, the metrics);
- ``seed(outputs)``: ``d score_i / d output`` at one image's output ``[1, *output]``, float64 ``[k, *output]``:
  the cotangents that the head's vector-Jacobian product pulls back to the explained layer (the gradient
  methods: :meth:`npcam.head.GraphHead.vjp`);
- ``linear``: whether the scores are linear in the output (then closed forms on an affine head hold);
- ``names``: one short name per score, for records.

A classifier's class scores are :class:`ClassScores` (:mod:`.classes`), a detector's detections
:class:`DetectionScores` (:mod:`.detection`). A new kind of target (a region's summed score) is one new module
here with these five members and a ``request(model, prediction, what)`` that makes one, registered in
:data:`REQUESTS` under its task; no method changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from . import classes, detection
from .classes import ClassScores
from .detection import DetectionScores


@runtime_checkable
class Target(Protocol):
    """k scalar functions of the network's output (see the module's docstring)."""

    names: Sequence[str]
    linear: bool

    def scores(self, outputs: np.ndarray) -> np.ndarray: ...

    def probabilities(self, outputs: np.ndarray) -> np.ndarray: ...

    def seed(self, outputs: np.ndarray) -> np.ndarray: ...


# How a request of each task (a class, a detection) becomes that task's target: ``fn(model, prediction, what)``.
REQUESTS = {"classify": classes.request, "detect": detection.request}


def make(model, prediction, what) -> Target:
    """What ``model`` explains for ``what`` on ``prediction``: a :class:`Target` as it is, else the target that its
    task (``model.bundle.task``) makes of the request (:data:`REQUESTS`)."""
    if isinstance(what, Target):
        return what
    return REQUESTS[model.bundle.task](model, prediction, what)


__all__ = ["REQUESTS", "ClassScores", "DetectionScores", "Target", "make"]
