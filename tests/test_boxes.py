"""CAM boxes: connected components against a flood-fill reference, thresholds, IoU."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from npcam.boxes import cam_box, iou, largest_component_box, parse_threshold

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


def components(mask: np.ndarray) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(size, box) of every 8-connected region, by breadth-first flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pixels = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        ys, xs = zip(*pixels)
        found.append((len(pixels), (min(xs), min(ys), max(xs), max(ys))))
    return found


@pytest.mark.parametrize("seed", range(40))
def test_largest_component_matches_flood_fill(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, size=2)
    mask = rng.random((h, w)) < rng.uniform(0.2, 0.6)
    want = sorted(components(mask), reverse=True)
    got = largest_component_box(mask)
    if not want:
        assert got is None
    elif len(want) == 1 or want[0][0] > want[1][0]:  # a unique largest region
        assert got == want[0][1]
    else:
        assert got in [box for size, box in want if size == want[0][0]]


def test_diagonal_pixels_connect():
    mask = np.eye(5, dtype=bool)
    mask[0, 4] = True
    assert largest_component_box(mask) == (0, 0, 4, 4)


def test_box_of_a_blob_and_thresholds():
    yy, xx = np.mgrid[0:100, 0:200]
    cam = np.exp(-(((xx - 150) / 20.0) ** 2 + ((yy - 40) / 10.0) ** 2)).astype(np.float32)
    cam[90:, :10] = 0.5  # a smaller, separate region
    x0, y0, x1, y1 = cam_box(cam, 0.2)
    # exp(-r^2) >= 0.2 for r <= 1.2686: x in [124.63, 175.37], y in [27.31, 52.69]
    assert (x0, y0, x1, y1) == (125, 28, 175, 52)
    assert cam_box(cam, "mean")[2] - cam_box(cam, "mean")[0] > x1 - x0  # the mean is lower than 20% here
    assert cam_box(np.zeros((5, 5), np.float32)) is None


def test_parse_threshold():
    assert parse_threshold("mean") == "mean" and parse_threshold("0.2") == 0.2
    for bad in ("0", "1.5", "max"):
        with pytest.raises(ValueError):
            parse_threshold(bad)


def test_iou():
    assert iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
