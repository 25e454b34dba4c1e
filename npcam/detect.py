"""Detections: a detector's raw output decoded into candidate boxes and class scores, and class-aware NMS, in NumPy.

A detection bundle's head ends in the model's raw outputs, joined into one flat vector (the exporter writes where
each output lies in it). A :class:`Decoder` reads that vector the way the model's package does:

- ``yolo``: boxes decoded in the graph (YOLOv8/v11 ``[1, 4+C, N]``; YOLOv5/v7 ``[1, N, 5+C]`` with objectness):
  centre x, centre y, width, height in input pixels, then the class scores;
- ``distribution``: raw per-stride outputs of a GFL/DFL head (PP-PicoDet, NanoDet): for each stride, class
  scores ``[1, N_s, C]`` and box distributions ``[1, N_s, 4 (R+1)]``, a side's distance being the softmax
  expectation over its R+1 bins, times the stride, from the cell's centre;
- ``anchors``: SSD-style box regressors ``[1, N, 4+...]`` and class scores ``[1, N, C]``, against anchors the
  model's package generates (MediaPipe: offsets and sizes divided by the input size, sizes linear against unit
  anchors; the TF Object Detection API: scaled by (10, 10, 5, 5), sizes exponential).

The decoder's spec, in ``bundle.json`` ``"detect"``, is documented in docs/formats.md ("Detection bundles").
Every candidate's class scores (and objectness) are entries of the flat output seen through an activation, so a
detection's score and its derivative with respect to the output (what the gradient methods pull back through
the head, :mod:`npcam.targets.detection`) come from the same index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cam import sigmoid, softmax
from .errors import NpcamError

DECODES = ("yolo", "distribution", "anchors")
ACTIVATIONS = ("identity", "sigmoid", "softmax")
# The YOLO tools' defaults (ultralytics' predict): keep a class score above CONF, suppress an overlap above IOU,
# at most MAX_DET detections an image, and at most MAX_NMS candidates into the suppression (the best ones).
CONF, IOU, MAX_DET, MAX_NMS = 0.25, 0.7, 300, 30000


@dataclass(frozen=True)
class Thresholds:
    """What is kept of a detector's candidates (:func:`select`): a score of at least ``conf``, an IoU with a better
    box of its class of at most ``iou``, at most ``max_det`` an image."""

    conf: float = CONF
    iou: float = IOU
    max_det: int = MAX_DET


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Detection:
    """One detection, as the model's package reports it.

    Attributes
    ----------
    box : ``(x0, y0, x1, y1)`` in the photo's pixels, clipped to it
    class_index, label : the detected class
    score : the score it was ranked by (a class score, times the objectness where the model has one)
    candidate : which of the model's N candidates it is (what its target explains)
    """

    box: tuple[float, float, float, float]
    class_index: int
    label: str
    score: float
    candidate: int


@dataclass(frozen=True)
class Candidates:
    """Every candidate of one output: ``boxes`` float64 ``[N, 4]`` (x0, y0, x1, y1, input pixels), ``scores``
    float64 ``[N, C]`` (class probabilities), ``objectness`` float64 ``[N]`` or None."""

    boxes: np.ndarray
    scores: np.ndarray
    objectness: np.ndarray | None

    def ranked(self) -> np.ndarray:
        """The scores detections are ranked by, float64 ``[N, C]``: class scores times objectness."""
        return self.scores if self.objectness is None else self.scores * self.objectness[:, None]


def _activate(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "sigmoid":
        return sigmoid(x)
    if kind == "softmax":
        return softmax(x, axis=-1)
    return x


class Decoder:
    """A detector's raw flat output ``[n, T]`` read as candidates (see the module's docstring).

    Parameters
    ----------
    spec : the ``"detect"`` object of ``bundle.json``
    arrays : the decode's arrays (``decode.npz``: ``anchors`` for the ``anchors`` decode)
    input_size : the network input ``(h, w)`` (the grids of a ``distribution`` decode)
    where : what to name in one-line errors (the bundle's ``bundle.json``)
    """

    def __init__(self, spec: dict, arrays: dict[str, np.ndarray], input_size: tuple[int, int], where: object):
        self.spec, self.where = spec, where
        try:
            self.kind = spec["decode"]
            self.classes = int(spec["classes"])
            self.segments = {o["name"]: (int(o["offset"]), tuple(int(d) for d in o["shape"])) for o in spec["outputs"]}
        except (KeyError, TypeError, ValueError) as e:
            raise self.error(f"'detect' needs decode, classes and outputs [{{name, offset, shape}}] ({e})") from None
        if self.kind not in DECODES:
            raise self.error(f"'detect.decode' must be one of {', '.join(DECODES)}, not {self.kind!r}")
        self.size = sum(int(np.prod(shape)) for _, shape in self.segments.values())
        build = {"yolo": self._yolo, "distribution": self._distribution, "anchors": self._anchors}[self.kind]
        build(spec, arrays, input_size)
        self.count = len(self.class_index)

    def error(self, message: str) -> NpcamError:
        return NpcamError(f"{self.where}: {message}")

    def _segment(self, name: str, rank: int) -> tuple[int, tuple[int, ...]]:
        if name not in self.segments:
            raise self.error(f"the {self.kind} decode needs an output named {name!r}")
        offset, shape = self.segments[name]
        if len(shape) != rank or shape[0] != 1:
            raise self.error(
                f"output {name!r} has shape {list(shape)}; the {self.kind} decode reads [1, ...] of rank {rank}"
            )
        return offset, shape

    # Each decode sets: class_index [N, C] (flat indices of the class values), class_activation,
    # objectness_index [N] or None, objectness_activation, and self._boxes(flat [n, T]) -> [n, N, 4].

    def _yolo(self, spec, arrays, input_size):
        (name,) = list(self.segments) if len(self.segments) == 1 else [None]
        if name is None:
            raise self.error("the yolo decode reads one output")
        offset, shape = self._segment(name, 3)
        objectness = bool(spec.get("objectness", False))
        values = 4 + objectness + self.classes
        first = spec.get("layout", "channels_first") == "channels_first"
        count = shape[2] if first else shape[1]
        if (shape[1] if first else shape[2]) != values:
            raise self.error(
                f"output {name!r} {list(shape)} does not hold 4 box values, "
                f"{'an objectness, ' if objectness else ''}and {self.classes} class scores per candidate"
            )
        channel, candidate = np.arange(values), np.arange(count)
        index = (
            (offset + channel[None, :] * count + candidate[:, None])
            if first
            else (offset + candidate[:, None] * values + channel[None, :])
        )  # [N, values]
        self.class_index = index[:, 4 + objectness :]
        self.objectness_index = index[:, 4] if objectness else None
        self.class_activation = spec.get("scores", "identity")
        self.objectness_activation = spec.get("objectness_scores", self.class_activation)
        box_index, box_kind = index[:, :4], spec.get("box", "cxcywh")

        def boxes(flat):
            b = flat[:, box_index]  # [n, N, 4]
            if box_kind == "xyxy":
                return b
            half = b[..., 2:] / 2
            return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)

        self._boxes = boxes

    def _distribution(self, spec, arrays, input_size):
        strides = [int(s) for s in spec.get("strides", [])]
        bins = int(spec.get("bins", 0))
        if not strides or bins < 2:
            raise self.error("the distribution decode needs 'strides' and 'bins' (R + 1, at least 2)")
        offset_in_cell = float(spec.get("offset", 0.5))
        rows, cols = input_size
        class_index, box_parts, centres, scale = [], [], [], []
        for stride in strides:
            h, w = -(-rows // stride), -(-cols // stride)
            c_off, c_shape = self._segment(f"scores.{stride}", 3)
            b_off, b_shape = self._segment(f"boxes.{stride}", 3)
            if c_shape[1:] != (h * w, self.classes) or b_shape[1:] != (h * w, 4 * bins):
                raise self.error(
                    f"stride {stride}: outputs {list(c_shape)} and {list(b_shape)} are not "
                    f"[1, {h * w}, {self.classes}] and [1, {h * w}, {4 * bins}] for a {rows}x{cols} input"
                )
            cells = np.arange(h * w)
            class_index.append(c_off + cells[:, None] * self.classes + np.arange(self.classes)[None, :])
            box_parts.append(b_off + cells[:, None] * 4 * bins + np.arange(4 * bins)[None, :])
            y, x = np.divmod(cells, w)
            centres.append(np.stack([(x + offset_in_cell) * stride, (y + offset_in_cell) * stride], axis=1))
            scale.append(np.full(h * w, float(stride)))
        self.class_index = np.concatenate(class_index)
        self.objectness_index = None
        self.class_activation = spec.get("scores", "sigmoid")
        self.objectness_activation = "identity"
        box_index, centre, stride_of = np.concatenate(box_parts), np.concatenate(centres), np.concatenate(scale)
        projection = np.arange(bins, dtype=np.float64)

        def boxes(flat):
            logits = flat[:, box_index].reshape(len(flat), -1, 4, bins)  # [n, N, 4 sides (l, t, r, b), bins]
            distance = softmax(logits, axis=-1) @ projection * stride_of[None, :, None]
            return np.concatenate([centre - distance[..., :2], centre + distance[..., 2:]], axis=-1)

        self._boxes = boxes

    def _anchors(self, spec, arrays, input_size):
        anchors = arrays.get("anchors")
        if anchors is None or anchors.ndim != 2 or anchors.shape[1] != 4:
            raise self.error("the anchors decode needs decode.npz's 'anchors' [N, 4] (centre x, centre y, w, h)")
        b_off, b_shape = self._segment("boxes", 3)
        s_off, s_shape = self._segment("scores", 3)
        count = len(anchors)
        background = spec.get("background")
        columns = s_shape[2]
        if b_shape[1] != count or s_shape[1] != count or b_shape[2] < 4:
            raise self.error(f"outputs {list(b_shape)} and {list(s_shape)} do not fit {count} anchors")
        kept = [c for c in range(columns) if c != background]
        if len(kept) != self.classes:
            raise self.error(
                f"'scores' has {columns} columns, not {self.classes} classes"
                + (" and a background" if background is not None else "")
            )
        rows = np.arange(count)[:, None]
        self.class_activation = spec.get("scores", "sigmoid")
        # A softmax runs over every column, background included; its derivative needs the whole row.
        self.class_index = s_off + rows * columns + np.asarray(kept)[None, :]
        self.row_index = s_off + rows * columns + np.arange(columns)[None, :]
        self.kept_columns = np.asarray(kept)
        self.objectness_index = None
        self.objectness_activation = "identity"
        order = spec.get("order", "xywh")
        scales = np.asarray(spec.get("scales", [1.0, 1.0, 1.0, 1.0]), dtype=np.float64)
        exponential = spec.get("sizes", "linear") == "exp"
        box_index = b_off + rows * b_shape[2] + np.arange(4)[None, :]
        anchors = anchors.astype(np.float64)
        rows_in, cols_in = input_size

        def boxes(flat):
            raw = flat[:, box_index] / scales  # [n, N, 4]
            if order == "yxhw":
                raw = raw[..., [1, 0, 3, 2]]
            centre = raw[..., :2] * anchors[:, 2:] + anchors[:, :2]
            size = (np.exp(raw[..., 2:]) if exponential else raw[..., 2:]) * anchors[:, 2:]
            box = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
            return box * np.array([cols_in, rows_in, cols_in, rows_in], dtype=np.float64)

        self._boxes = boxes

    def class_scores(self, flat: np.ndarray) -> np.ndarray:
        """Class probabilities of every candidate, float64 ``[n, N, C]``."""
        if self.kind == "anchors" and self.class_activation == "softmax":
            return softmax(flat[:, self.row_index].astype(np.float64), axis=-1)[..., self.kept_columns]
        return _activate(self.class_activation, flat[:, self.class_index].astype(np.float64))

    def objectness(self, flat: np.ndarray) -> np.ndarray | None:
        """Each candidate's objectness, float64 ``[n, N]``, or None."""
        if self.objectness_index is None:
            return None
        return _activate(self.objectness_activation, flat[:, self.objectness_index].astype(np.float64))

    def decode(self, flat: np.ndarray) -> list[Candidates]:
        """The candidates of each of ``n`` flat outputs float ``[n, T]``."""
        flat = np.asarray(flat, dtype=np.float64).reshape(len(flat), -1)
        boxes, scores, objectness = self._boxes(flat), self.class_scores(flat), self.objectness(flat)
        return [
            Candidates(boxes[i], scores[i], None if objectness is None else objectness[i]) for i in range(len(flat))
        ]

    def scores_of(self, flat: np.ndarray, candidates: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The ranked score of candidate ``candidates[j]`` in class ``classes[j]`` for each of n outputs:
        float64 ``[n, k]``."""
        flat = np.asarray(flat, dtype=np.float64).reshape(len(flat), -1)
        if self.kind == "anchors" and self.class_activation == "softmax":
            rows = softmax(flat[:, self.row_index[candidates]], axis=-1)  # [n, k, columns]
            score = np.take_along_axis(rows, self.kept_columns[classes][None, :, None], axis=2)[..., 0]
        else:
            score = _activate(self.class_activation, flat[:, self.class_index[candidates, classes]])
        if self.objectness_index is not None:
            score = score * _activate(self.objectness_activation, flat[:, self.objectness_index[candidates]])
        return score

    def score_cotangents(self, flat: np.ndarray, candidates: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``d scores_of / d flat`` at one output ``[1, T]``: float64 ``[k, T]``, nonzero only at the entries
        each score reads."""
        flat = np.asarray(flat, dtype=np.float64).reshape(-1)
        seed = np.zeros((len(candidates), flat.size))
        for j, (a, c) in enumerate(zip(candidates, classes)):
            objectness = 1.0
            if self.objectness_index is not None:
                o = self.objectness_index[a]
                objectness = float(_activate(self.objectness_activation, flat[o : o + 1])[0])
            if self.kind == "anchors" and self.class_activation == "softmax":
                row = self.row_index[a]
                p = softmax(flat[row], axis=-1)
                column = self.kept_columns[c]
                seed[j, row] = objectness * p[column] * ((np.arange(len(row)) == column) - p)
                score = p[column]
            else:
                i = self.class_index[a, c]
                value = flat[i : i + 1]
                score = float(_activate(self.class_activation, value)[0])
                slope = score * (1 - score) if self.class_activation == "sigmoid" else 1.0
                seed[j, i] = objectness * slope
            if self.objectness_index is not None:
                o = self.objectness_index[a]
                slope = objectness * (1 - objectness) if self.objectness_activation == "sigmoid" else 1.0
                seed[j, o] += score * slope
        return seed


def select(
    candidates: Candidates, conf: float = CONF, iou: float = IOU, max_det: int = MAX_DET, max_nms: int = MAX_NMS
) -> list[tuple[int, int, float]]:
    """Class-aware non-maximum suppression, as the YOLO tools do it: ``(candidate, class, score)`` of the kept ones,
    best first.

    Each candidate keeps its best class (one label a box); those whose score is at least ``conf`` (and finite,
    with a finite box of some area) are taken best first, at most ``max_nms`` of them, and each suppresses the
    later ones of its class that overlap it by an IoU above ``iou``; at most ``max_det`` are kept.
    """
    ranked = candidates.ranked()
    if ranked.size == 0:
        return []
    best = ranked.argmax(axis=1)
    score = ranked[np.arange(len(ranked)), best]
    boxes = candidates.boxes
    usable = np.isfinite(score) & np.isfinite(boxes).all(axis=1) & (score >= conf)
    # A box of no area (x1 <= x0 or y1 <= y0) is no detection: it would overlap nothing, so suppress nothing, and
    # take one of the max_det places.
    usable &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = np.flatnonzero(usable)
    order = order[np.argsort(-score[order], kind="stable")][:max_nms]
    kept: list[int] = []
    alive = np.ones(len(order), dtype=bool)
    b, cls = boxes[order], best[order]
    for i in range(len(order)):
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) == max_det:
            break
        rest = np.flatnonzero(alive[i + 1 :]) + i + 1
        rest = rest[cls[rest] == cls[i]]
        if rest.size:
            alive[rest[pairwise_iou(b[i : i + 1], b[rest])[0] > iou]] = False
    return [(int(order[i]), int(cls[i]), float(score[order[i]])) for i in kept]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each box of ``a`` ``[k, 4]`` with each of ``b`` ``[m, 4]`` (x0, y0, x1, y1): float64 ``[k, m]``; 0 where
    the union is empty."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
