"""Properties of the numeric core, for any input hypothesis can think of."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import npcam

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # the whole float32 range
sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@given(
    st.integers(1, 16).flatmap(
        lambda c: st.tuples(
            arrays(np.float32, st.tuples(st.just(c), st.integers(1, 9), st.integers(1, 9)), elements=finite32),
            arrays(np.float32, st.tuples(st.integers(1, 5), st.just(c)), elements=finite32),
        )
    )
)
def test_cam_is_finite_and_in_unit_range(data):
    features, fc_weight = data
    cams = npcam.class_activation_maps(features, fc_weight, list(range(fc_weight.shape[0])))
    assert cams.dtype == np.float32 and cams.shape == (fc_weight.shape[0], *features.shape[1:])
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    peaks = cams.max(axis=(1, 2))
    assert np.all((peaks == 1) | (peaks == 0))


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 1), st.tuples(st.integers(1, 12), st.integers(1, 12)), sizes)
def test_upsampling_a_constant_gives_the_constant(value, low, size):
    cam = np.full(low, value, dtype=np.float32)
    out = npcam.upsample(cam, size)
    assert out.shape == size
    np.testing.assert_allclose(out, value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # images of up to 25 MP: the longest test of the runtime
@settings(max_examples=25, deadline=None)
@given(sizes, st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_overlay_has_the_image_size_and_stays_in_uint8(size, alpha, seed):
    rng = np.random.default_rng(seed)
    cam = npcam.upsample(rng.random((7, 7), dtype=np.float32), size)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    out = npcam.overlay(image, cam, alpha)
    assert out.dtype == np.uint8 and out.shape == (*size, 3)
    heat = npcam.colorize(cam).astype(int)
    low, high = np.minimum(heat, image), np.maximum(heat, image)
    assert np.all(out >= low) and np.all(out <= high)  # a blend lies between its two inputs
    np.testing.assert_array_equal(npcam.overlay(image, cam, 0.0), image)
    np.testing.assert_array_equal(npcam.overlay(image, cam, 1.0), npcam.colorize(cam))
