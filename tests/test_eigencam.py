"""Eigen-CAM's sign convention: the same map whichever sign LAPACK gives the principal component (issue 25).

A principal component's sign is arbitrary, and LAPACK's choice differs between CPUs; the ReLU after it keeps
one side. npcam orients ``v`` so that the activations' mean projects positively on it, and, where that is too
close to call (a LayerNorm's output), makes the largest value of the projection positive (docs/methods.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from npcam.methods import eigen

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


def relu_features(seed: int) -> np.ndarray:
    """A conv layer's output after a ReLU: non-negative ``[C, h, w]`` with one region more active."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(32, 7, 7))
    a[:8, 2:5, 1:4] += 3.0
    return np.maximum(a, 0).astype(np.float32)


def layernorm_tokens(seed: int) -> np.ndarray:
    """A LayerNorm's output on a grid: every position's channels have mean 0 and variance 1. The sum of a principal
    direction's components is then about 0 (the rule before issue 25 took that sum's sign: rounding decided it)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(32, 7, 7))
    a[:8, 2:5, 1:4] += 3.0
    a = (a - a.mean(axis=0)) / a.std(axis=0)
    return a.astype(np.float32)


def flipped_eigh(monkeypatch):
    """Make LAPACK return every eigenvector with the opposite sign, as another CPU may."""
    real = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda m: (lambda w, v: (w, -v))(*real(m)))


def centred_features(seed: int) -> np.ndarray:
    """Every channel with mean 0 over the positions (up to float32 rounding): the activations' mean says nothing
    of the sign."""
    a = relu_features(seed)
    return a - a.mean(axis=(1, 2), keepdims=True)


def lean(features: np.ndarray) -> float:
    """``mean . v`` over the activations' root-mean-square norm, for the orientation npcam chose (from its map)."""
    rows = features.reshape(len(features), -1).T.astype(np.float64)
    mean = rows.mean(axis=0)
    direction = (rows - mean).T @ eigen.eigen_map(features).ravel()
    size = np.sqrt((rows * rows).sum(axis=1).mean())
    return float(mean @ direction / (np.linalg.norm(direction) * size))


@pytest.mark.parametrize("make", [relu_features, layernorm_tokens, centred_features])
@pytest.mark.parametrize("seed", range(5))
def test_the_map_does_not_depend_on_the_sign_lapack_returns(monkeypatch, make, seed):
    features = make(seed)
    want = eigen.eigen_map(features)
    flipped_eigh(monkeypatch)
    np.testing.assert_array_equal(eigen.eigen_map(features), want)


@pytest.mark.parametrize("make", [relu_features, layernorm_tokens])
@pytest.mark.parametrize("seed", range(5))
def test_the_activations_mean_projects_positively(make, seed):
    features = make(seed)
    assert lean(features) >= eigen.DECISIVE  # decisive: the rule, not the fallback, chose the sign
    projection = eigen.eigen_map(features)
    assert projection[2:5, 1:4].mean() > projection.mean()  # and the more active region is what the map shows
    rows = features.reshape(len(features), -1).T.astype(np.float64)
    direction = (rows - rows.mean(axis=0)).T @ projection.ravel()
    if make is layernorm_tokens:  # the old rule's quantity: about 0, so any rounding could flip it
        assert abs(direction.sum()) < 1e-6 * np.abs(direction).sum()


@pytest.mark.parametrize("seed", range(5))
def test_a_layer_whose_mean_is_zero_falls_back_to_the_largest_value(seed):
    features = centred_features(seed)
    assert abs(lean(features)) < eigen.DECISIVE
    projection = eigen.eigen_map(features).ravel()
    assert projection[np.argmax(np.abs(projection))] > 0
