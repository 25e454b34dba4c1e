"""Methods on a detector (fast tier): the tiny two-stride detector of tests/tiny_detector.py.

Eigen-CAM as YOLO users know it from pytorch-grad-cam: at each explained layer, the activations' projection on
their first principal component (here from numpy's SVD of the centred ``[hw, C]`` matrix, not npcam's
eigendecomposition of its Gram matrix), positive part, scaled to its max; the layers' maps upsampled to the
input, averaged and scaled again; then the photo's part of the letterboxed input. npcam fixes the component's
sign (docs/methods.md, Eigen-CAM's sign), which SVD leaves to LAPACK, so the reference takes the sign npcam's
rule gives and the test checks the rule separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_detector as td
from conftest import synthetic_image

import npcam
from npcam.cam import normalize
from npcam.methods.eigen import DECISIVE
from npcam.upsample import upsample


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> npcam.Model:
    return npcam.load(td.bundle(tmp_path_factory.mktemp("detector") / "bundle"))


def svd_projection(features: np.ndarray) -> np.ndarray:
    """The centred activations projected on their first right singular vector, its sign by npcam's rule."""
    channels, h, w = features.shape
    rows = features.reshape(channels, -1).T.astype(np.float64)
    centred = rows - rows.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[0]
    size = np.sqrt((rows * rows).sum(axis=1).mean())
    lean = rows.mean(axis=0) @ v / size
    projection = centred @ v
    if abs(lean) >= DECISIVE:
        flip = lean < 0
    else:
        flip = projection[np.argmax(np.abs(projection))] < 0
    return (-projection if flip else projection).reshape(h, w)


def test_eigencam_on_a_detector_is_per_layer_then_combined(detector):
    for seed in range(3):
        pred = detector.predict(synthetic_image(150, 130, seed=seed))
        got = detector.cam(pred, detection=[0, 1], method="eigencam")
        layers = [upsample(normalize(svd_projection(grid)[None]), td.SIZE) for grid in pred.grids]
        want = normalize(np.mean(layers, axis=0))
        place = pred.placement
        want = normalize(want[:, place.top : place.top + place.size[0], place.left : place.left + place.size[1]])[0]
        # float64 SVD against float64 eigh of the Gram matrix: the same projection to ~1e-12; float32 upsampling
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        np.testing.assert_array_equal(got[0], got[1])  # class-agnostic: every detection the same map
        assert got.shape == (2, *place.size) and got.max() == pytest.approx(1.0)
        # Both layers count: the map is not either layer's alone.
        for layer in layers:
            alone = normalize(layer[:, place.top : place.top + place.size[0], place.left : place.left + place.size[1]])
            assert np.abs(alone[0] - got[0]).max() > 1e-3
