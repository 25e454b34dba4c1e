"""Localization metrics: how well a map points at the annotated boxes. Plain functions on arrays.

Each is defined, with its paper, in docs/methods.md ("The metrics"); the
definitions are repeated in the docstrings below. A map is float ``[H, W]``,
non-negative, at the photo's own size (the annotated boxes' pixels); a box is
``(x0, y0, x1, y1)`` in inclusive pixels, as :mod:`npcam.boxes` gives them.
An all-zero map localizes nothing: no box, no point, no energy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .boxes import Box, component_boxes

IOU = 0.5  # GT-known and Top-1 Loc: a box is correct at IoU >= 0.5 (Zhou et al. 2016)
# MaxBoxAccV2 (Choe et al. 2020): IoU levels, and the map thresholds swept (wsolevaluation's default interval, 0.01).
MAXBOXACC_IOUS = (0.3, 0.5, 0.7)
MAXBOXACC_THRESHOLDS = np.arange(100) / 100
POINTING_TOLERANCE = 15  # pixels (Zhang et al. 2016, and TorchRay's pointing game)
MATCH_IOU = 0.5  # a detection matches an annotated box of its class at this IoU (PASCAL VOC's true positive)


def ious(boxes: Sequence[Box], truth: Sequence[Box]) -> np.ndarray:
    """IoU of every box with every ground-truth box: float64 ``[len(boxes), len(truth)]`` (inclusive pixels)."""
    a = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(truth, dtype=np.float64).reshape(-1, 4)[None]
    width = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    height = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    area = lambda box: (box[..., 2] - box[..., 0] + 1) * (box[..., 3] - box[..., 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def pixel_box(box: Sequence[float]) -> Box:
    """The pixels a box of continuous coordinates ``(x0, y0, x1, y1)`` touches, as an inclusive pixel box:
    ``(floor(x0), floor(y0), ceil(x1) - 1, ceil(y1) - 1)`` (a detection's box; a COCO box is read so too)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (
        int(np.floor(x0)),
        int(np.floor(y0)),
        max(int(np.ceil(x1)) - 1, int(np.floor(x0))),
        max(int(np.ceil(y1)) - 1, int(np.floor(y0))),
    )


def match(
    box: Sequence[float], class_index: int, objects: Sequence[tuple[int, Box]]
) -> tuple[float | None, Box | None]:
    """The annotated box a detection is evaluated against: of the annotated boxes of its class, the one of largest
    IoU with the detection's box (the first of equals), if that IoU is at least :data:`MATCH_IOU`.

    ``box`` is the detection's ``(x0, y0, x1, y1)`` in the photo's continuous pixels, compared as the pixels it
    touches (:func:`pixel_box`); ``objects`` the photo's annotated ``(class, box)``, inclusive
    pixels. Returns ``(best IoU, matched box)``: ``(None, None)`` with no box of its class, ``(iou, None)`` when
    the best IoU falls short.
    """
    mine = [b for c, b in objects if c == class_index]
    if not mine:
        return None, None
    overlaps = ious([pixel_box(box)], mine)[0]
    best = int(np.argmax(overlaps))
    return float(overlaps[best]), (mine[best] if overlaps[best] >= MATCH_IOU else None)


def best_iou(box: Box | None, truth: Sequence[Box]) -> float:
    """The largest IoU of ``box`` with any ground-truth box; 0 without a box or without ground truth."""
    if box is None or not truth:
        return 0.0
    return float(ious([box], truth).max())


def box_ious(cam: np.ndarray, truth: Sequence[Box], thresholds: np.ndarray = MAXBOXACC_THRESHOLDS) -> np.ndarray:
    """MaxBoxAccV2's per-photo term: at each threshold, the best IoU of any region's box with any true box.

    The map is min-max scaled to ``s`` in [0, 1]; at threshold ``t`` the mask
    ``s > t`` is split into 8-connected regions, each region gives its box, and
    the result is the largest IoU between those boxes and the ground-truth
    boxes (0 where the mask is empty).

    Returns
    -------
    float64 ``[len(thresholds)]``
    """
    out = np.zeros(len(thresholds))
    low, high = float(cam.min()), float(cam.max())
    if not high > low or not truth:
        return out
    scaled = (cam - low) / (high - low)
    for i, t in enumerate(thresholds):
        boxes, _ = component_boxes(scaled > t)
        if not boxes:
            break  # the masks only shrink as t grows
        out[i] = ious(boxes, truth).max()
    return out


def box_accuracy(photo_ious: np.ndarray, levels: Sequence[float] = MAXBOXACC_IOUS) -> np.ndarray:
    """BoxAcc at every IoU level and threshold: the fraction of photos whose best IoU reaches the level.

    ``photo_ious`` is float ``[N, T]`` (:func:`box_ious` of N photos); the result is float64 ``[len(levels), T]``.
    """
    return np.stack([(photo_ious >= level).mean(axis=0) for level in levels])


def max_box_acc_v2(photo_ious: np.ndarray, levels: Sequence[float] = MAXBOXACC_IOUS) -> float:
    """MaxBoxAccV2 of N photos: the mean over IoU levels of the best BoxAcc over one threshold for all photos."""
    return float(box_accuracy(photo_ious, levels).max(axis=1).mean())


def peak(cam: np.ndarray) -> tuple[int, int] | None:
    """``(x, y)`` of the map's maximum (the first in raster order), or None for an all-zero map."""
    flat = int(np.argmax(cam))
    if not cam.flat[flat] > 0:
        return None
    return flat % cam.shape[1], flat // cam.shape[1]


def pointing_hit(cam: np.ndarray, truth: Sequence[Box], tolerance: float = POINTING_TOLERANCE) -> bool:
    """The pointing game's hit: the map's maximum lies closer than ``tolerance`` pixels to a true box's pixel.

    The distance is Euclidean, from the peak's pixel to the nearest pixel of any
    box (0 inside one), and a hit needs it to be below the tolerance, as in TorchRay.
    """
    point = peak(cam)
    if point is None or not truth:
        return False
    x, y = point
    b = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    dx = np.maximum.reduce([b[:, 0] - x, np.zeros(len(b)), x - b[:, 2]])
    dy = np.maximum.reduce([b[:, 1] - y, np.zeros(len(b)), y - b[:, 3]])
    return bool((dx**2 + dy**2 < tolerance**2).any())


def energy_in_boxes(cam: np.ndarray, truth: Sequence[Box]) -> float:
    """The energy-based pointing game: the share of the map's sum that lies inside the union of the true boxes."""
    total = float(cam.sum(dtype=np.float64))
    if not total > 0 or not truth:
        return 0.0
    inside = np.zeros(cam.shape, dtype=bool)
    for x0, y0, x1, y1 in truth:
        inside[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
    return float(cam[inside].sum(dtype=np.float64)) / total
