"""scripts/localization_study.py: its boxes, MaxBoxAccV2 and upsampling against independent references, and a
run of its three commands on the shipped photos (the dev set's figures are in docs/methods.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
from conftest import REPO, SAMPLES

sys.path.insert(0, str(REPO / "scripts"))
import localization_study as study  # noqa: E402

from npcam.upsample import interpolation_matrix, upsample  # noqa: E402


def flood_fill_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The reference: breadth-first search over 8-neighbours, one pixel at a time."""
    seen = np.zeros_like(mask, dtype=bool)
    boxes = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, xs, ys = deque([(y, x)]), [x], [y]
        while queue:
            cy, cx = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
                        xs.append(nx)
                        ys.append(ny)
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    return sorted(boxes)


def masks(count: int = 120):
    """Random masks of every density and thresholded smooth maps (the blobs that CAMs give)."""
    rng = np.random.default_rng(0)
    for k in range(count):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        if k % 2:
            yield rng.random((height, width)) < rng.random()
        else:
            yield upsample(rng.random((5, 6)).astype(np.float32), (height, width)) > rng.uniform(0.2, 0.8)


def test_component_boxes_match_a_flood_fill():
    for mask in masks():
        assert sorted(map(tuple, study.component_boxes(mask).tolist())) == flood_fill_boxes(mask)


def test_opencv_component_boxes_match_the_numpy_ones():
    pytest.importorskip("cv2")
    for mask in masks():
        assert sorted(map(tuple, study._cv2_component_boxes(mask).tolist())) == sorted(
            map(tuple, study.component_boxes(mask).tolist())
        )


def test_best_iou_per_threshold_sees_every_component():
    """Two blobs, 1.0 and 0.5 high; the ground truth is the lower one: found exactly while t < 0.5, never after."""
    cam = np.zeros((study.FRAME, study.FRAME), dtype=np.float32)
    cam[20:60, 30:90] = 1.0
    cam[120:200, 100:150] = 0.5
    best = study.best_iou_per_threshold(cam, np.array([[100, 120, 149, 199]]))
    below = study.BOX_THRESHOLDS < 0.5
    assert np.all(best[below] == 1.0) and np.all(best[~below] == 0.0)


def test_max_box_acc_v2_is_the_mean_over_iou_levels_of_the_best_threshold():
    best = np.array([[0.8, 0.4], [0.2, 0.6]])  # two photos, two thresholds
    # IoU 0.3: accuracies (0.5, 1.0) -> 1.0; 0.5: (0.5, 0.5) -> 0.5; 0.7: (0.5, 0.0) -> 0.5.
    assert study.max_box_acc_v2(best) == pytest.approx((1.0 + 0.5 + 0.5) / 3)


def test_frame_boxes_truncate_like_choe_et_al():
    assert study.frame_boxes([(0, 0, 447, 299)], 300, 448).tolist() == [[0, 0, 223, 223]]
    assert study.frame_boxes([(10, 5, 100, 50)], 100, 200).tolist() == [[11, 11, 112, 112]]


def test_cubic_rows_sum_to_one_and_a_half_keeps_a_ramp():
    np.testing.assert_allclose(study.cubic_matrix(7, 224).sum(axis=1), 1, atol=1e-6)
    # Keys' kernel with a = -1/2 reproduces linear functions (a = -3/4, torch's and OpenCV's, does not);
    # the clamped edges keep the ramp away from the first and last cell.
    src = (np.arange(224) + 0.5) * 7 / 224 - 0.5
    inner = (src >= 1) & (src <= 5)
    np.testing.assert_allclose((study.cubic_matrix(7, 224, a=-0.5) @ np.arange(7.0))[inner], src[inner], atol=1e-5)


def test_cubic_is_opencvs_inter_cubic():
    cv2 = pytest.importorskip("cv2")
    cam = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    ours = study.cubic_matrix(7, 224) @ cam @ study.cubic_matrix(9, 300).T
    # float32 products of 4-tap sums of values in [0, 1]: a few units in the last place (measured 3e-7).
    np.testing.assert_allclose(ours, cv2.resize(cam, (300, 224), interpolation=cv2.INTER_CUBIC), atol=1e-5)


def test_alignment_half_is_npcams_upsampling():
    np.testing.assert_array_equal(study.aligned_matrix(9, 375, 288, "half"), interpolation_matrix(9, 375))
    np.testing.assert_allclose(study.aligned_matrix(9, 375, 288, "0"), interpolation_matrix(9, 375), atol=1e-6)
    mirrored = study.aligned_matrix(7, 224, 224, "8", mirrored=True)
    np.testing.assert_allclose(mirrored, study.aligned_matrix(7, 224, 224, "-8"), atol=1e-6)


@pytest.mark.parametrize(
    "side, centre",
    [
        # Even sides pad TensorFlow's SAME as (0, 1) for k=3 and (1, 2) for k=5: each stride-2 layer moves the
        # centre by one of its input pixels, 1 + 2 + 4 + 8 + 16 = 31 in all.
        (224, 31.5),
        # 240 -> 120 -> 60 -> 30 -> 15 -> 8: the last layer's input is odd, padded (1, 1): 1 + 2 + 4 + 8.
        (240, 15.5),
        # 260 -> 130 -> 65 -> 33 -> 17 -> 9: only the first two inputs are even.
        (260, 3.5),
    ],
)
def test_same_padding_centres(side, centre):
    assert study.same_padding_centres(side) == (32.0, centre)


MANIFEST = """file,imagenet_index,wnid,class_name,bboxes_xyxy,width,height,source,note
chelsea.png,285|281,n02124075,Egyptian cat,"60,0,400,299",451,300,skimage,face
coffee.jpg,967|968,n07920052,espresso,"100,30,450,330",600,400,skimage,cup
rocket.jpg,812,n04266014,space shuttle,,640,427,skimage,no box
"""


def run(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "localization_study.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cache_and_report_agree_with_eval_localization(tiny_bundle, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(MANIFEST)
    cache = tmp_path / "cache"
    for aspect in ("squash", "keep"):
        done = run("cache", manifest, SAMPLES, "--model", tiny_bundle, "--cache", cache, "--size", 224, 288,
                   "--aspect", aspect, "--methods", "cam,eigencam")  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["224.pkl", "224k.pkl", "288.pkl", "288k.pkl"]
    report = run("report", manifest, SAMPLES, "--cache", cache, "224", "288k:0.2", "224+288:mean:bicubic",
                 "--methods", "cam,eigencam", "--boot", 20, "--json", tmp_path / "r.json")  # fmt: skip
    assert report.returncode == 0, report.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == 2 * 3 and {r["subset"] for r in results} == {"all"}  # the photos are one subset
    for r in results:
        assert r["n"] == 2 and 0 <= r["gt_known"] <= 1 and 0 <= r["maxboxacc_v2"] <= 1
        assert r["top1_loc"] <= min(r["gt_known"], r["top1_cls"])
        assert ("d_gt_known" in r["ci"]) == (r["candidate"] != "224")
    # The baseline's GT-known and Top-1 Loc are eval_localization.py's, computed there from the model directly.
    direct = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_localization.py"), manifest, SAMPLES, "--model", tiny_bundle],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    fields = dict(item.split("=") for item in direct)
    cam = next(r for r in results if r["method"] == "cam" and r["candidate"] == "224")
    assert cam["gt_known"] == float(fields["gt_known_loc"]) and cam["top1_loc"] == float(fields["top1_loc"])


def test_time_reports_each_option_set(tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "coffee.jpg"):
        (photos / name).write_bytes((SAMPLES / name).read_bytes())
    done = run("time", "--model", tiny_bundle, "--photos", photos, "--rounds", 1, "--set=", "--set=--size 288",
               "--json", tmp_path / "t.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "t.json").read_text())
    assert [r["options"] for r in results] == ["", "--size 288"]
    assert results[0]["wall_ratio"] == 1.0 and results[0]["cpu_ratio"] == 1.0
    assert all(len(r["wall"]) == 1 and len(r["cpu"]) == 1 for r in results)
