"""The explanation methods, against TorchCAM and independent torch references (the metrics: test_metrics_parity.py).

Maps are compared as npcam shows them: ReLU, then divided by the max (TorchCAM
min-max normalizes, and its CAM skips the ReLU, so its raw maps are taken with
``normalized=False`` and put through the same step). Tolerance 1e-5 on [0, 1]
maps computed from the same features; 1e-4 where torch computes the features.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import PHOTOS, record
from references import torch_eigen_cam

import npcam
from export.from_torch import Trunk
from npcam import methods
from npcam.cam import normalize, weighted_maps
from npcam.methods.ablation import ablation_weights
from npcam.probe import MethodOptions

torchcam = pytest.importorskip("torchcam", reason="TorchCAM (in the test extra) is the reference for these tests")
from torchcam import methods as tc  # noqa: E402


@pytest.fixture(scope="module")
def classifier(torch_net):
    """The ResNet-18 as TorchCAM needs it: the trunk a module of its own, then GAP, Flatten, FC."""
    return torch.nn.Sequential(Trunk(torch_net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch_net.fc).eval()


def shown(raw) -> np.ndarray:
    """A raw map as npcam shows it: ReLU, divided by its max."""
    raw = raw.detach().double().numpy() if isinstance(raw, torch.Tensor) else raw
    return normalize(raw[None])[0]


def torchcam_map(extractor_cls, classifier, x, c, **kwargs) -> np.ndarray:
    with extractor_cls(classifier, target_layer=classifier[0], **kwargs) as extractor:
        scores = classifier(x)
        context = torch.no_grad() if extractor_cls in (tc.CAM, tc.ScoreCAM) else nullcontext()
        with context:
            raw = extractor(c, scores, normalized=False)[0][0]
    return shown(raw)


@pytest.fixture(scope="module")
def preds(model):
    return [model.predict(p) for p in PHOTOS]


@pytest.mark.parametrize(
    "name, extractor, kwargs",
    [
        ("cam", tc.CAM, {"fc_layer": 3}),
        ("gradcam", tc.GradCAM, {}),
        ("xgradcam", tc.XGradCAM, {}),
        ("layercam", tc.LayerCAM, {}),
    ],
)
def test_matches_torchcam(name, extractor, kwargs, model, preds, classifier):
    if "fc_layer" in kwargs:
        kwargs = {"fc_layer": classifier[kwargs["fc_layer"]]}
    for pred in preds:
        x = torch.from_numpy(pred.input)
        for c in (pred.top1, 7):
            want = torchcam_map(extractor, classifier, x, c, **kwargs)
            got = model.cam(pred, c, method=name)
            assert record(f"vs TorchCAM {name}, abs", np.abs(got - want).max()) <= 1e-4, c


def test_score_cam_matches_torchcam(model, classifier):
    """TorchCAM's ScoreCAM (one pass per channel) on small inputs, to keep the test fast."""
    for photo in PHOTOS[:1]:
        pred = model.predict(photo, size=96)
        x = torch.from_numpy(pred.input)
        # All 512 masked inputs in one torch batch: a quarter faster than batches of 64 on 2 cores.
        want = torchcam_map(tc.ScoreCAM, classifier, x, pred.top1, batch_size=512)
        got = model.cam(pred, method="scorecam")
        assert record("vs TorchCAM scorecam, abs", np.abs(got - want).max()) <= 1e-4, photo.name


def test_score_cam_shares_passes_between_classes_and_skips_duplicate_masks(tiny_model, monkeypatch):
    """How many passes npcam makes, not parity with torch: the tiny bundle's 512 channels (3x3 at 96 px) are
    enough, and its five convolutions cost a small part of the ResNet-18's passes."""
    model = tiny_model
    pred = model.predict(PHOTOS[0], size=96)
    calls = []
    real = model.scores
    monkeypatch.setattr(model, "scores", lambda batch: calls.append(len(batch)) or real(batch))
    both = model.cam(pred, [pred.top1, 3], method="scorecam")
    distinct = len(np.unique(methods_low_masks(pred), axis=0))
    assert sum(calls) == distinct < pred.features.shape[0]  # one pass per distinct mask, for both classes
    np.testing.assert_allclose(both[0], model.cam(pred, pred.top1, method="scorecam"), atol=1e-6)


def methods_low_masks(pred):
    f = pred.features
    low = f - f.min(axis=(1, 2), keepdims=True)
    low = low / (low.max(axis=(1, 2), keepdims=True) + np.float32(1e-8))
    return low.reshape(len(low), -1)


def test_gradcampp_follows_pytorch_grad_cam_and_torchcam_differs(model, preds, classifier):
    """npcam's Grad-CAM++ is pytorch-grad-cam's alpha (without its eps), from torch autograd here.

    TorchCAM's GradCAMpp divides a masked *copy* of alpha (``alpha[mask].div_``),
    so its alpha stays g^2 and its weights are sum_ij g^2 relu(g): proportional
    to relu(W)^3 on a pooled head. The test pins both facts down.
    """
    for pred in preds:
        x = torch.from_numpy(pred.input)
        features = classifier[0](x).detach().requires_grad_(True)
        classifier[3](classifier[2](classifier[1](features)))[0, pred.top1].backward()
        g, a = features.grad.double(), features.detach().double()
        g2, g3 = g**2, g**3
        alpha = torch.where(g != 0, g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3), torch.zeros_like(g))
        weights = (torch.relu(g) * alpha).sum(dim=(2, 3))
        want = shown((weights[:, :, None, None] * a).sum(1)[0])
        got = model.cam(pred, method="gradcampp")
        assert record("gradcampp vs pytorch-grad-cam's formula, abs", np.abs(got - want).max()) <= 1e-4
        theirs = torchcam_map(tc.GradCAMpp, classifier, x, pred.top1)
        cubed = shown(weighted_maps(pred.features, np.maximum(model.head.weight[[pred.top1]], 0) ** 3)[0])
        assert record("TorchCAM GradCAMpp vs relu(W)^3 weights, abs", np.abs(theirs - cubed).max()) <= 1e-4
        assert np.abs(theirs - got).max() > 1e-2  # so the two libraries' Grad-CAM++ really differ


def test_hirescam_equals_gradcam_on_a_pooled_head(model, preds, classifier):
    """HiResCAM (sum_k grad_k * A_k, elementwise, from autograd) equals Grad-CAM here: the gradient is flat."""
    for pred in preds:
        features = classifier[0](torch.from_numpy(pred.input)).detach().requires_grad_(True)
        classifier[3](classifier[2](classifier[1](features)))[0, pred.top1].backward()
        want = shown((features.grad * features).sum(1)[0])
        for name in ("hirescam", "gradcam", "cam"):
            assert np.abs(model.cam(pred, method=name) - want).max() <= 1e-4, name


def test_ablation_weights_equal_brute_force_ablation(model, preds):
    pred = preds[0]
    classes = [pred.top1, 11]
    features = pred.features.astype(np.float64)
    brute = np.zeros((2, len(features)))
    base = model.head.forward(pred.pooled[None])[0]
    for k in range(len(features)):
        ablated = features.copy()
        ablated[k] = 0
        score = model.head.forward(ablated.mean(axis=(1, 2))[None].astype(np.float32))[0]
        brute[:, k] = (base[classes] - score[classes]) / base[classes]
    got = ablation_weights(model.probe(pred, classes))
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-6 * np.abs(brute).max())


def test_ablation_on_a_graph_head_equals_brute_force(graph_bundle):
    graph = npcam.load(graph_bundle)
    pred = graph.predict(PHOTOS[0])
    got = ablation_weights(graph.probe(pred, [pred.top1]))[0]
    y = pred.logits[pred.top1]
    for k in (0, 5, 77):
        p = pred.pooled.copy()
        p[k] = 0
        assert got[k] == pytest.approx((y - graph.head.forward(p[None])[0, pred.top1]) / y, rel=1e-4, abs=1e-7)


def test_eigen_cam_is_the_first_principal_component_with_a_positive_sign(model, preds):
    for pred in preds:
        want = shown(torch_eigen_cam(torch.from_numpy(pred.features)))
        got = model.cam(pred, [1, 2], method="eigencam")
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        np.testing.assert_array_equal(got[0], got[1])  # class-agnostic


@pytest.mark.parametrize("name", list(npcam.METHODS))
def test_every_method_keeps_zero_maps_zero_and_never_gives_nan(name, model):
    """No positive evidence, zero features, a zero score: all-zero maps, never NaN (a map of the input itself,
    D-RISE's, does not read the layer: in range and finite)."""
    pred = model.predict(PHOTOS[0], size=64)
    few = MethodOptions(masks=40)
    for features in (np.zeros_like(pred.features), -np.abs(pred.features)):
        blank = npcam.Prediction(pred.image, pred.input, features, pred.logits * 0, pred.probs, pred.labels)
        maps = model.cam(blank, [0, 1], method=name, options=few)
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, name
        if not features.any() and not npcam.METHODS[name].at_input:
            assert not maps.any(), name


def test_method_names_and_aliases(model, preds):
    kind = model.head.kind
    assert methods.resolve("gradcam++", kind).name == "gradcampp" and methods.resolve("GradCAM", kind).name == "gradcam"
    with pytest.raises(npcam.NpcamError, match="unknown method 'nope'; choose one of cam, gradcam"):
        methods.resolve("nope", kind)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A MobileNetV3-like graph head (1x1 conv, HardSwish, Linear after the pooling) and its torch module."""
    import models

    from export.api import run_torch

    return npcam.load(
        run_torch("models:mobilenet_v3ish", tmp_path_factory.mktemp("v3") / "b", input_size=128)
    ), models.mobilenet_v3ish()


@pytest.mark.parametrize("name", ["gradcam", "layercam", "gradcampp"])
def test_gradient_methods_on_a_graph_head_match_autograd(name, v3):
    model, net = v3
    for photo in PHOTOS:
        pred = model.predict(photo)
        features = net.features(torch.from_numpy(pred.input)).detach().requires_grad_(True)
        net.scores(features)[0, pred.top1].backward()
        g, a = features.grad.double(), features.detach().double()
        if name == "gradcam":
            weights = g.mean(dim=(2, 3))
        elif name == "layercam":
            weights = torch.relu(g).sum(dim=(2, 3))
        else:
            g2, g3 = g**2, g**3
            alpha = torch.where(g != 0, g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3), torch.zeros_like(g))
            weights = (torch.relu(g) * alpha).sum(dim=(2, 3))
        want = shown((weights[:, :, None, None] * a).sum(1)[0])
        got = model.cam(pred, method=name)
        assert record(f"graph head {name} vs autograd, abs", np.abs(got - want).max()) <= 1e-4, photo.name


def test_an_affine_head_as_a_graph_gives_the_same_maps(model, preds):
    """The same FC layer as an AffineHead (CAM) and as a one-Gemm GraphHead (Grad-CAM): maps within 1e-6."""
    from npcam.head import GraphHead, Op

    graph = GraphHead([Op("Gemm", ("pooled", "w", "b"), "scores", {"transB": 1})],
                      {"w": model.head.weight, "b": model.head.bias}, (-1, model.head.channels))  # fmt: skip
    for pred in preds:
        classes = [pred.top1, 4, 500]
        cam = model.cam(pred, classes, method="cam")
        gradient = graph.gradient(pred.pooled, classes)
        np.testing.assert_allclose(gradient, model.head.weight[classes], rtol=1e-6)
        np.testing.assert_allclose(normalize(weighted_maps(pred.features, gradient)), cam, atol=1e-6)
