"""The metrics of ``npcam evaluate`` on synthetic data, each against a slow, direct implementation written here
from its paper's definition (loops, flood fill, a dense linear solve). NumPy only: the fast tier.

Parity with the reference libraries (TorchCAM, pytorch-grad-cam) is in test_metrics_parity.py.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from npcam import localization as loc
from npcam import metrics
from npcam.boxes import component_boxes, largest_component_box

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

RNG = np.random.default_rng(7)


def smooth_map(h: int, w: int, seed: int, ties: bool = False) -> np.ndarray:
    """A CAM-like map: a few Gaussian blobs, ReLU'd below a level (ties at 0) or not."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    m = np.zeros((h, w))
    for _ in range(3):
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * max(h, w)
        m += rng.uniform(0.3, 1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s**2))
    m /= m.max()
    return np.maximum(m - 0.3, 0) / 0.7 if ties else m + 1e-9 * rng.random((h, w))


class LinearScore:
    """A score function with a known form: a sigmoid of a fixed linear function of the input. Records its calls."""

    def __init__(self, shape, seed=0):
        self.w = np.random.default_rng(seed).normal(0, 0.05, shape)
        self.batches = []

    def __call__(self, inputs):
        self.batches.append(len(inputs))
        return 1 / (1 + np.exp(-(inputs.reshape(len(inputs), -1) @ self.w.ravel())))

    def one(self, x):
        return float(1 / (1 + np.exp(-(x.ravel() @ self.w.ravel()))))


# Average Drop, Increase in Confidence (Chattopadhay et al. 2018)


def test_confidence_change_is_the_papers_drop_and_increase():
    x = RNG.normal(size=(3, 24, 20)).astype(np.float32)
    maps = np.stack([smooth_map(24, 20, s) for s in range(5)]).astype(np.float32)
    score = LinearScore(x.shape)
    drop, increase = metrics.confidence_change(x, maps, score)
    s = score.one(x)
    for i, m in enumerate(maps):
        masked = score.one(x * m)
        assert drop[i] == pytest.approx(max(0.0, s - masked) / (s + 1e-7), abs=1e-6)
        assert increase[i] == (s < masked)


# Deletion and insertion (Petsiuk et al. 2018, as TorchCAM's DeletionInsertionMetric)


def slow_deletion_insertion(x, cam, score, steps):
    """Rank positions by a stable descending sort; perturb ceil(P/steps) positions a step; trapezoid over fractions."""
    positions = cam.size
    order = sorted(range(positions), key=lambda i: (-cam.flat[i], i))
    step = -(-positions // steps)
    counts = list(range(0, positions, step)) + [positions]
    deletion, insertion = [], []
    for count in counts:
        top = np.zeros(positions, dtype=bool)
        top[order[:count]] = True
        top = top.reshape(cam.shape)
        deletion.append(score.one(np.where(top, 0.0, x)))
        insertion.append(score.one(np.where(top, x, 0.0)))
    fractions = [c / positions for c in counts]
    area = lambda ys: sum((fractions[i + 1] - fractions[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(ys) - 1))  # noqa: E731
    return area(deletion), area(insertion), deletion, insertion


@pytest.mark.parametrize("steps", [20, 7])
def test_deletion_insertion_match_the_direct_definition(steps):
    x = RNG.normal(size=(3, 17, 23)).astype(np.float32)
    maps = np.stack([smooth_map(17, 23, 10 + s, ties=s % 2 == 1) for s in range(4)]).astype(np.float32)
    score = LinearScore(x.shape, seed=1)
    curves = metrics.deletion_insertion(x, maps, score, steps=steps)
    deletion, insertion = curves.areas()
    assert max(score.batches) <= metrics.BATCH
    for i, m in enumerate(maps):
        d, n, d_curve, n_curve = slow_deletion_insertion(x, m, score, steps)
        np.testing.assert_allclose(curves.deletion[i], d_curve, atol=1e-6)
        np.testing.assert_allclose(curves.insertion[i], n_curve, atol=1e-6)
        assert deletion[i] == pytest.approx(d, abs=1e-6) and insertion[i] == pytest.approx(n, abs=1e-6)


# ROAD (Rong et al. 2022): which pixels, and the noisy linear imputation


@pytest.mark.parametrize("positions", [1000, 3072, 50176, 50177])
def test_road_removes_the_pixels_at_or_above_the_percentile(positions):
    """For a map without ties, road_count is how many values are >= NumPy's percentile at 100 - r (grad-cam's rule)."""
    values = RNG.permutation(positions).astype(np.float64)
    for percent in metrics.ROAD_PERCENTS:
        assert metrics.road_count(positions, percent) == int((values >= np.percentile(values, 100 - percent)).sum())


def dense_imputation(x, removed):
    """The imputation's linear system written out as a dense matrix, one equation per removed pixel, and solved."""
    h, w = removed.shape
    unknown = [tuple(p) for p in np.argwhere(removed)]
    index = {p: k for k, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), x.shape[0]))
    for k, (i, j) in enumerate(unknown):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di, dj) == (0, 0) or not (0 <= i + di < h and 0 <= j + dj < w):
                    continue
                weight = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                a[k, k] += weight
                if removed[i + di, j + dj]:
                    a[k, index[(i + di, j + dj)]] -= weight
                else:
                    b[k] += weight * x[:, i + di, j + dj]
    out = x.astype(np.float64).copy()
    out[:, removed] = np.linalg.solve(a, b).T
    return out


@pytest.mark.parametrize("shape", [(12, 17), (31, 8), (40, 40)])
def test_imputation_solves_the_papers_system(shape):
    """Blobs and scattered pixels, 5% to 99% removed: within 1e-4 of the dense solve (the solver's tolerance,
    1e-5 of the residual, measured to leave 1e-5 here; 1e-4 is 1% of the noise ROAD then adds)."""
    h, w = shape
    x = RNG.normal(size=(3, h, w))
    for fraction in (0.05, 0.5, 0.9, 0.99):
        scattered = RNG.random((h, w)) < fraction
        blob = smooth_map(h, w, int(fraction * 100)) > np.quantile(smooth_map(h, w, int(fraction * 100)), 1 - fraction)
        for removed in (scattered, blob):
            if removed.all() or not removed.any():
                continue
            got = metrics.impute(x, removed, noise=0)
            want = dense_imputation(x, removed)
            assert np.abs(got - want).max() <= 1e-4
            assert np.array_equal(got[:, ~removed], x[:, ~removed].astype(np.float32))  # kept pixels untouched


def test_imputation_noise_is_added_to_the_removed_pixels_only():
    x = RNG.normal(size=(3, 30, 30))
    removed = smooth_map(30, 30, 3) > 0.5
    clean = metrics.impute(x, removed, noise=0)
    noisy = metrics.impute(x, removed, noise=0.01, rng=np.random.default_rng(0))
    difference = (noisy - clean)[:, removed]
    assert np.array_equal(noisy[:, ~removed], clean[:, ~removed])
    # 3 x ~300 draws: the sample std of N(0, 0.01) is within 10% of it with near certainty
    assert abs(difference.std() - 0.01) < 0.001 and abs(difference.mean()) < 0.002
    with pytest.raises(ValueError, match="every pixel is removed"):
        metrics.impute(x, np.ones((30, 30), bool))


def test_road_scores_the_imputed_inputs_morf_and_lerf():
    """MoRF removes the highest pixels of the map, LeRF the lowest, road_count of them; each input imputed and scored."""
    h, w = 16, 18
    x = RNG.normal(size=(3, h, w)).astype(np.float32)
    maps = np.stack([smooth_map(h, w, 40), smooth_map(h, w, 41)])
    score = LinearScore(x.shape, seed=3)
    morf, lerf = metrics.road(x, maps, score, noise=0)
    for i, m in enumerate(maps):
        order = np.argsort(-m.ravel())  # no ties
        for j, percent in enumerate(metrics.ROAD_PERCENTS):
            k = metrics.road_count(h * w, percent)
            for removed_flat, got in ((order[:k], morf[i, j]), (order[h * w - k :], lerf[i, j])):
                removed = np.zeros(h * w, dtype=bool)
                removed[removed_flat] = True
                want = score.one(dense_imputation(x, removed.reshape(h, w)).astype(np.float32))
                assert got == pytest.approx(want, abs=1e-5)


def test_road_breaks_ties_by_its_generator_and_removes_the_exact_count():
    h, w = 20, 20
    x = RNG.normal(size=(3, h, w)).astype(np.float32)
    flat = np.zeros((1, h, w))  # every pixel tied
    seen = []

    def score(inputs):
        seen.extend(inputs)
        return np.zeros(len(inputs))

    metrics.road(x, flat, score, percents=(30,), noise=0, rng=np.random.default_rng(1))
    changed = [int((np.abs(s - x).max(axis=0) > 0).sum()) for s in seen]
    # generic values: every removed pixel changes; exactly road_count of them, for MoRF and for LeRF
    assert changed == [metrics.road_count(h * w, 30)] * 2


# Localization: regions, MaxBoxAccV2 (Choe et al. 2020), the pointing games


def flood_fill_boxes(mask):
    """Boxes of the 8-connected regions of a mask, by breadth-first search, and their sizes."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        queue, members = deque([(i, j)]), []
        seen[i, j] = True
        while queue:
            a, b = queue.popleft()
            members.append((a, b))
            for da in (-1, 0, 1):
                for db in (-1, 0, 1):
                    y, x = a + da, b + db
                    if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                        seen[y, x] = True
                        queue.append((y, x))
        ys, xs = zip(*members)
        out.append(((min(xs), min(ys), max(xs), max(ys)), len(members)))
    return out


def pixel_iou(a, b):
    """IoU by counting pixels of two inclusive boxes."""
    pa = {(x, y) for x in range(a[0], a[2] + 1) for y in range(a[1], a[3] + 1)}
    pb = {(x, y) for x in range(b[0], b[2] + 1) for y in range(b[1], b[3] + 1)}
    return len(pa & pb) / len(pa | pb)


@pytest.mark.parametrize("seed", range(6))
def test_component_boxes_are_the_flood_fill_regions(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((30, 41)) < [0.2, 0.45, 0.6][seed % 3]
    boxes, sizes = component_boxes(mask)
    want = flood_fill_boxes(mask)
    assert sorted(zip(boxes, sizes.tolist())) == sorted(want)
    largest = max((s for _, s in want), default=0)
    if [s for _, s in want].count(largest) == 1:  # a unique largest region: its box
        assert largest_component_box(mask) == next(b for b, s in want if s == largest)


@pytest.mark.extras  # OpenCV
def test_component_boxes_match_opencvs_contours():
    """The regions' boxes are cv2's outer contours' bounding rectangles (without wsolevaluation's +1 on x1, y1)."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (in the test extra) is a second reference here")
    for seed in range(4):
        mask = smooth_map(60, 80, 100 + seed) > 0.4
        contours = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
        theirs = sorted((x, y, x + w - 1, y + h - 1) for x, y, w, h in map(cv2.boundingRect, contours))
        assert sorted(component_boxes(mask)[0]) == theirs


def slow_box_ious(cam, truth, thresholds):
    low, high = cam.min(), cam.max()
    out = []
    for t in thresholds:
        regions = flood_fill_boxes((cam - low) / (high - low) > t)
        out.append(max((pixel_iou(box, g) for box, _ in regions for g in truth), default=0.0))
    return np.array(out)


def test_maxboxacc_v2_is_the_best_threshold_per_iou_level_averaged():
    thresholds = np.arange(20) / 20  # a coarser sweep than the default's 100, for the slow reference's sake
    photos = []
    for seed in range(6):
        cam = smooth_map(32, 40, 200 + seed, ties=seed % 2 == 0)
        truth = [(int(RNG.integers(0, 20)), int(RNG.integers(0, 16)), int(RNG.integers(21, 40)), int(RNG.integers(17, 32)))
                 for _ in range(1 + seed % 2)]  # fmt: skip
        got = loc.box_ious(cam, truth, thresholds)
        np.testing.assert_allclose(got, slow_box_ious(cam, truth, thresholds), atol=1e-12)
        photos.append(got)
    photos = np.array(photos)
    want = np.mean([max(np.mean([p[t] >= level for p in photos]) for t in range(len(thresholds)))
                    for level in (0.3, 0.5, 0.7)])  # fmt: skip
    assert loc.max_box_acc_v2(photos) == pytest.approx(want)


def test_pointing_game_is_a_hit_within_15_pixels_of_a_box():
    """TorchRay's definition: some pixel of the boxes lies at a distance below 15 from the map's maximum."""
    h, w = 60, 70
    for seed in range(30):
        rng = np.random.default_rng(seed)
        cam = np.zeros((h, w))
        py, px = int(rng.integers(0, h)), int(rng.integers(0, w))
        cam[py, px] = 1.0
        x0, y0 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
        box = (x0, y0, int(rng.integers(x0, w)), int(rng.integers(y0, h)))
        ys, xs = np.mgrid[:h, :w]
        inside = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
        want = bool((inside & ((xs - px) ** 2 + (ys - py) ** 2 < 15**2)).any())
        assert loc.pointing_hit(cam, [box]) == want
    assert not loc.pointing_hit(np.zeros((h, w)), [(0, 0, w - 1, h - 1)])  # an all-zero map points nowhere


def test_energy_pointing_game_is_the_share_inside_the_union_of_boxes():
    cam = smooth_map(40, 50, 300)
    boxes = [(5, 5, 20, 30), (15, 10, 45, 20)]
    inside = np.zeros(cam.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                inside[y, x] = True
    assert loc.energy_in_boxes(cam, boxes) == pytest.approx(cam[inside].sum() / cam.sum())
    assert loc.energy_in_boxes(np.zeros((4, 4)), boxes) == 0.0


def test_iou_is_pixel_counting():
    for _ in range(50):
        a = sorted(RNG.integers(0, 20, 2)), sorted(RNG.integers(0, 20, 2))
        b = sorted(RNG.integers(0, 20, 2)), sorted(RNG.integers(0, 20, 2))
        box_a, box_b = (a[0][0], a[1][0], a[0][1], a[1][1]), (b[0][0], b[1][0], b[0][1], b[1][1])
        assert loc.best_iou(box_a, [box_b]) == pytest.approx(pixel_iou(box_a, box_b))
    assert math.isclose(loc.best_iou(None, [(0, 0, 1, 1)]), 0.0)
