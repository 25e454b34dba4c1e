"""A bounding box from a CAM, as in the paper: threshold, largest blob, its box.

Zhou et al. keep the pixels above 20% of the CAM's max and box the largest
connected component. Connected components are computed here on runs: a
thresholded CAM is a few smooth blobs, so each row holds only a few runs of
``True`` and a union-find over overlapping runs is fast even at 12 MP. (SciPy's
``ndimage.label`` would do it, at ~40 MB of install for one function.)
"""

from __future__ import annotations

import numpy as np

PAPER_THRESHOLD = 0.2
# npcam's default keeps the pixels above the CAM's own mean. A fixed fraction
# suits one network and not the next (on the dev set the best fraction was 0.3
# for EfficientNet-Lite0, 0.2 for Lite1, 0.1 for Lite2); the mean adapts to how
# peaked each map is and beat the 20% rule on all three (docs/methods.md, "Localization on the dev set").
DEFAULT_THRESHOLD = "mean"

Box = tuple[int, int, int, int]


def parse_threshold(text: str) -> float | str:
    """``"mean"`` or a fraction of the max in (0, 1]; raises ValueError otherwise."""
    if text == "mean":
        return text
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"threshold must be 'mean' or in (0, 1], not {text}")
    return value


def cam_box(cam: np.ndarray, threshold: float | str = DEFAULT_THRESHOLD) -> Box | None:
    """Box around the largest 8-connected region of ``cam`` above a threshold.

    Parameters
    ----------
    cam : float ``[H, W]``, non-negative
    threshold : ``"mean"`` (keep ``cam >= cam.mean()``), or a fraction ``t``
        of the max (keep ``cam >= t * cam.max()``; the paper uses 0.2)

    Returns
    -------
    ``(x0, y0, x1, y1)`` inclusive pixel coordinates, or None for an all-zero map.
    """
    peak = float(cam.max())
    if not peak > 0:
        return None
    level = float(cam.mean()) if threshold == "mean" else float(threshold) * peak
    return largest_component_box(cam >= level)


def largest_component_box(mask: np.ndarray) -> Box | None:
    """Box ``(x0, y0, x1, y1)`` (inclusive) of the largest 8-connected region of a bool ``[H, W]`` mask."""
    boxes, sizes = component_boxes(mask)
    if not boxes:
        return None
    return boxes[int(np.argmax(sizes))]  # ties: the region met first in raster order


def component_boxes(mask: np.ndarray) -> tuple[list[Box], np.ndarray]:
    """The box of every 8-connected region of a bool ``[H, W]`` mask, and each region's pixel count.

    Returns
    -------
    boxes : ``(x0, y0, x1, y1)`` inclusive, one per region, in the raster order of each region's first pixel
    sizes : int64 ``[len(boxes)]``
    """
    rows, starts, ends = _runs(mask)
    if rows.size == 0:
        return [], np.zeros(0, dtype=np.int64)
    parent = np.arange(rows.size)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*_touching_runs(rows, starts, ends, mask.shape[1])):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(rows.size)])
    # Each region's root is its first run (the smallest index), so unique() keeps raster order.
    labels, region = np.unique(roots, return_inverse=True)
    count = labels.size
    sizes = np.bincount(region, weights=ends - starts, minlength=count).astype(np.int64)
    x0 = np.full(count, mask.shape[1]), np.full(count, mask.shape[0])
    x1 = np.full(count, -1), np.full(count, -1)
    np.minimum.at(x0[0], region, starts)
    np.minimum.at(x0[1], region, rows)
    np.maximum.at(x1[0], region, ends - 1)
    np.maximum.at(x1[1], region, rows)
    boxes = [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(x0[0], x0[1], x1[0], x1[1])]
    return boxes, sizes


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True, row-major: row, start and end (exclusive) of each."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows, starts, ends


def _touching_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of runs in consecutive rows that touch, diagonals included.

    Runs of one row are sorted and disjoint, so the runs of row r+1 touching
    run i form a contiguous range, found by binary search on row-major keys.
    """
    stride = width + 2
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    below = (rows + 1) * stride
    # j touches i when start_j <= end_i and end_j >= start_i (end exclusive, diagonal allowed).
    first = np.searchsorted(end_keys, below + starts, side="left")
    last = np.searchsorted(start_keys, below + ends, side="right")
    counts = np.maximum(last - first, 0)
    i = np.repeat(np.arange(rows.size), counts)
    j = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    return i, j


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two inclusive-pixel boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area - inter)
