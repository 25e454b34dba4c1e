"""npcam against torch on the same weights, with each tolerance derived from what it guards.

- network input: 1e-6 absolute (the same float32 operations in the same order);
- trunk: features within 1e-4 of the largest feature (onnxruntime and torch use
  different conv kernels, so the float32 sums are ordered differently; this is
  the one tolerance that depends on the CPU, and it has a wide margin);
- head and CAM, on the *same* features: compared with torch in float64; the
  head (float32, as it runs) within the textbook bound on a float32 dot
  product, the CAM (computed in float64) within 1e-6 (float32 output rounding);
- end to end (npcam's trunk and maps vs torch's): a map is a weighted sum of
  features, so a feature error of at most d moves the raw map of class c by at
  most ``|W_c|_1 * d``, and the [0, 1] map by at most twice that over its peak.
  The bound is computed per class from the trunk tolerance, so classes whose map
  has a tiny peak get the wider bound they need on any CPU;
- colormap: exact vs OpenCV; overlay: 1 level of 255.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTOS, record, synthetic_image
from PIL import Image

import npcam
from npcam import render
from npcam.image import REDUCING_GAP

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
FEATURES_TOLERANCE = 1e-4  # relative to the largest feature


def torch_input(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """torchvision's Resize((s, s)) + ToTensor + Normalize, spelled out in torch.

    Resize is Pillow's, as in torchvision, with the ``reducing_gap`` that npcam
    uses (it changes only images over 2 * REDUCING_GAP times ``size``, here the
    4000x3000 one; how far that moves the input is tests/test_photo.py's subject).
    """
    resized = Image.fromarray(rgb).resize((size, size), Image.BILINEAR, reducing_gap=REDUCING_GAP)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
    return ((x - MEAN) / STD)[None]


def torch_cam(features: torch.Tensor, fc_weight: torch.Tensor, c: int) -> torch.Tensor:
    """The paper's CAM in torch: relu(sum_k w_k f_k) / max."""
    cam = torch.relu(torch.einsum("k,khw->hw", fc_weight[c], features))
    return cam / cam.max() if cam.max() > 0 else cam


def map_bound(features: torch.Tensor, fc_weight: torch.Tensor, c: int) -> float:
    """How far a [0, 1] map may move when every feature moves by up to FEATURES_TOLERANCE * max|A|."""
    raw = torch.relu(torch.einsum("k,khw->hw", fc_weight[c].double(), features.double()))
    if raw.max() == 0:
        return 0.0
    shift = float(fc_weight[c].abs().sum()) * FEATURES_TOLERANCE * float(features.abs().max())
    return 2 * shift / float(raw.max())


def images() -> list[tuple[str, np.ndarray]]:
    real = [(p.name, npcam.read_image(p)) for p in PHOTOS]
    odd = [(f"{h}x{w}", synthetic_image(h, w, seed=h + w)) for h, w in [(1, 1), (3, 1000), (4000, 3000)]]
    return real + odd


@pytest.fixture(scope="module")
def cases(model, torch_net):
    """Each image through npcam and through torch."""
    out = []
    for name, rgb in images():
        pred = model.predict(rgb)
        x = torch_input(rgb)
        with torch.no_grad():
            features = torch_net.trunk(x)[0]
            logits = torch_net(x)[0]
        out.append((name, rgb, pred, features, logits))
    return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_input_tensor_matches_torch(model):
    for _, rgb in images()[:3]:
        got = npcam.preprocess(rgb, 224, model.bundle.mean, model.bundle.std)
        np.testing.assert_allclose(got, torch_input(rgb).numpy(), rtol=0, atol=1e-6)


def test_trunk_features_match_torch(cases):
    for name, _, pred, features, _ in cases:
        assert record("features, relative", relative_error(pred.features, features.numpy())) <= FEATURES_TOLERANCE, name


def test_head_matches_torch_on_the_same_features(model, torch_net, cases):
    weight, bias = torch_net.fc.weight.detach().double(), torch_net.fc.bias.detach().double()
    for name, _, _, features, _ in cases:
        pooled = features.numpy().mean(axis=(1, 2), dtype=np.float32)  # as the runtime pools
        got = model.head.forward(pooled[None])[0]
        want = (weight @ torch.from_numpy(pooled).double() + bias).numpy()
        # A float32 dot product of C terms is off by at most C * 2^-24 * sum_k |W_ck p_k| (plus the bias's rounding).
        terms = weight.abs().numpy() @ np.abs(pooled).astype(np.float64) + bias.abs().numpy()
        bound = len(pooled) * 2**-24 * terms
        record("head on torch's features / its bound", float((np.abs(got - want) / bound).max()))
        assert np.all(np.abs(got - want) <= bound), name


def test_end_to_end_scores(cases):
    for name, _, pred, _, logits in cases:
        assert (
            record("logits end to end, relative", relative_error(pred.logits, logits.numpy())) <= FEATURES_TOLERANCE
        ), name
        assert pred.top1 == int(logits.argmax()), name
        np.testing.assert_allclose(pred.probs, torch.softmax(logits, 0).numpy(), atol=1e-6)


def test_cam_matches_torch_on_the_same_features(torch_net, cases):
    fc_weight = torch_net.fc.weight.detach()
    rng = np.random.default_rng(1)
    for name, _, pred, features, _ in cases:
        classes = [pred.top1, *rng.choice(1000, 4, replace=False).tolist()]
        got = npcam.class_activation_maps(features.numpy(), fc_weight.numpy(), classes)  # one contraction
        assert got.shape == (5, *features.shape[1:]) and got.dtype == np.float32
        for c, cam in zip(classes, got):
            want = torch_cam(features.double(), fc_weight.double(), c).numpy()
            assert record("CAM on the same features, abs", np.abs(cam - want).max()) <= 1e-6, (name, c)


def test_low_res_cam_end_to_end_within_the_trunk_bound(model, torch_net, cases):
    fc_weight = torch_net.fc.weight.detach()
    rng = np.random.default_rng(1)
    for name, _, pred, features, _ in cases:
        classes = [pred.top1, *rng.choice(1000, 4, replace=False).tolist()]
        got = model.cam(pred, classes)
        assert len(got) == len(classes)
        for c, cam in zip(classes, got):
            error = np.abs(cam - torch_cam(features, fc_weight, c).numpy()).max()
            bound = map_bound(features, fc_weight, c)
            record("low-res CAM end to end / its bound", error / bound if bound else 0.0)
            assert error <= bound, (name, c, error, bound)


def test_full_res_cam_matches_interpolate(model, torch_net, cases):
    fc_weight = torch_net.fc.weight.detach()
    for name, rgb, pred, features, _ in cases:
        size = rgb.shape[:2]
        got = model.cam(pred, pred.top1, size=size)
        low = torch_cam(features, fc_weight, pred.top1)
        want = F.interpolate(low[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        assert got.shape == size
        # Bilinear weights are a convex combination: the low-res bound carries over, plus float32 interpolation.
        bound = map_bound(features, fc_weight, pred.top1) + 1e-6
        assert record("full-res top-1 CAM, abs", np.abs(got - want).max()) <= min(bound, 1e-4), name


@pytest.mark.parametrize("size", [(1, 1), (3, 1000), (7, 7), (5, 3), (224, 224), (300, 451), (4000, 3000)])
def test_upsample_matches_interpolate(size):
    cam = np.random.default_rng(0).random((7, 9), dtype=np.float32)
    want = F.interpolate(torch.from_numpy(cam)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(npcam.upsample(cam, size), want.numpy(), rtol=0, atol=1e-6)


def test_softmax_method_is_the_tutorials(model, torch_net, cases):
    fc_weight = torch_net.fc.weight.detach()
    for name, _, pred, _, _ in cases[:3]:
        c = pred.top1
        # The seed tutorial's step 3, on npcam's features.
        weights = torch.softmax(fc_weight[c].double(), dim=0)
        res = torch.einsum("k,khw->hw", weights, torch.from_numpy(pred.features).double())
        want = (res / res.max()).clamp(0, 1).numpy()
        np.testing.assert_allclose(model.cam(pred, c, method="softmax"), want, rtol=0, atol=1e-6, err_msg=name)


def test_jet_table_is_opencvs():
    gray = np.arange(256, dtype=np.uint8)[:, None]
    want = cv2.applyColorMap(gray, cv2.COLORMAP_JET)[:, 0, ::-1]  # BGR -> RGB
    np.testing.assert_array_equal(render.JET, want)


def test_colorize_matches_opencv_on_a_cam():
    cam = npcam.upsample(np.random.default_rng(2).random((7, 7), dtype=np.float32), (300, 451))
    gray = render.to_uint8(cam)
    np.testing.assert_array_equal(gray, np.floor(cam * np.float32(255) + np.float32(0.5)).astype(np.uint8))  # half up
    want = cv2.applyColorMap(gray, cv2.COLORMAP_JET)[:, :, ::-1]
    np.testing.assert_array_equal(npcam.colorize(cam), want)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.6, 1.0])
def test_overlay_within_one_level(alpha):
    rgb = synthetic_image(300, 451)
    cam = npcam.upsample(np.random.default_rng(3).random((7, 7), dtype=np.float32), rgb.shape[:2])
    heat = npcam.colorize(cam)
    got = npcam.overlay(rgb, cam, alpha).astype(int)
    exact = alpha * heat + (1 - alpha) * rgb
    assert record("overlay vs float blend, levels", np.abs(got - exact).max()) <= 1
    opencv = cv2.addWeighted(heat, alpha, rgb, 1 - alpha, 0)
    assert np.abs(got - opencv).max() <= 1
    if alpha == 0:
        np.testing.assert_array_equal(got, rgb)


def test_cam_with_no_positive_evidence_is_zero_not_nan():
    features = np.abs(np.random.default_rng(4).standard_normal((8, 7, 7), dtype=np.float32))
    fc_weight = -np.ones((2, 8), dtype=np.float32)
    fc_weight[1] = 0
    cams = npcam.class_activation_maps(features, fc_weight, [0, 1])
    assert np.isfinite(cams).all() and not cams.any()


def test_cam_is_scaled_to_one_and_mean_is_the_score(model, cases):
    _, _, pred, _, _ = cases[0]
    raw = model.head.weight[pred.top1] @ pred.features.reshape(pred.features.shape[0], -1)
    # The CAM's mean is the class score less the bias: what makes it a faithful map.
    assert abs(raw.mean() + model.head.bias[pred.top1] - pred.logits[pred.top1]) <= 1e-4 * abs(pred.logits).max()
    assert model.cam(pred).max() == pytest.approx(1.0)
