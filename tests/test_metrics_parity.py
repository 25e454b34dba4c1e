"""The faithfulness metrics against the torch libraries that define them, on the same model and maps.

- Average Drop, Increase in Confidence, Deletion and Insertion AUC: TorchCAM's ``torchcam.metrics``.
- ROAD (MoRF and LeRF with noisy linear imputation): pytorch-grad-cam's (PyPI ``grad-cam``). It imports
  torchvision, whose compiled ops do not load beside this torch, and scikit-learn, for methods not used
  here: both are stubbed with the names it imports. It needs SciPy (its sparse solver).

The model is the exported random-weight ResNet-18 (conftest) and the same weights in torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from contextlib import nullcontext
from functools import partial

import numpy as np
import pytest
import torch
from conftest import PHOTOS, record

from npcam import metrics
from npcam.upsample import upsample

torchcam = pytest.importorskip("torchcam", reason="TorchCAM (in the test extra) is the reference for these tests")
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric  # noqa: E402


class Given:
    """A stand-in TorchCAM extractor that returns given maps, so only the metrics' arithmetic is compared."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return nullcontext()


@pytest.mark.parametrize("method, photo", [("cam", 0), ("layercam", 1), ("eigencam", 2)])
def test_confidence_and_deletion_insertion_match_torchcam(method, photo, model, torch_net):
    pred = model.predict(PHOTOS[photo], size=128)
    cam = model.cam(pred, pred.top1, method=method)
    x = pred.input[0]
    full = upsample(cam, x.shape[1:])[None]  # TorchCAM resizes with interpolate(bilinear, align_corners=False)
    score = metrics.probability(model, pred.top1)
    given = Given(torch_net, torch.from_numpy(cam)[None])
    theirs = ClassificationMetric(given, partial(torch.softmax, dim=-1))
    with torch.no_grad():
        theirs.update(torch.from_numpy(pred.input), class_idx=pred.top1)
    drop, increase = metrics.confidence_change(x, full, score)
    # 1e-4: the bundle's probabilities are torch's to the export's self-check (logits within 1e-4 relative)
    assert drop[0] == pytest.approx(theirs.summary()["avg_drop"], abs=1e-4)
    assert float(increase[0]) == theirs.summary()["conf_increase"]
    curves = DeletionInsertionMetric(given, partial(torch.softmax, dim=-1), steps=20)
    with torch.no_grad():
        curves.update(torch.from_numpy(pred.input), class_idx=pred.top1)
    deletion, insertion = metrics.deletion_insertion(x, full, score, steps=20).areas()
    assert record("deletion AUC vs TorchCAM, abs", abs(deletion[0] - curves.summary()["deletion_auc"])) <= 1e-4
    assert record("insertion AUC vs TorchCAM, abs", abs(insertion[0] - curves.summary()["insertion_auc"])) <= 1e-4


def test_deletion_ranks_ties_in_raster_order():
    """Ties are broken in raster order, as torch's stable descending argsort does."""
    full = np.zeros((4, 5), np.float32)
    full[2, 3] = 1.0
    want = torch.argsort(torch.argsort(torch.from_numpy(full).flatten(), descending=True, stable=True))
    np.testing.assert_array_equal(metrics._ranks(full), want.numpy())


@pytest.fixture(scope="module")
def grad_cam_road():
    """pytorch-grad-cam's ROAD modules, imported with torchvision and scikit-learn stubbed."""
    pytest.importorskip("scipy.sparse", reason="pytorch-grad-cam's ROAD solves with SciPy (in the test extra)")
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip("pytorch-grad-cam is not installed (scripts/venv.sh installs it without its dependencies)")
    stubs = {}
    for name, attributes in {
        "torchvision": {},
        "torchvision.transforms": {"Compose": object, "Normalize": object, "ToTensor": object},
        "torchvision.transforms.functional": {"resize": None},
        "sklearn": {},
        "sklearn.decomposition": {"KernelPCA": object, "NMF": object},
    }.items():
        try:
            importlib.import_module(name)
        except Exception:  # torchvision fails to load its compiled ops; sklearn is absent
            stubs[name] = types.ModuleType(name)
            stubs[name].__dict__.update(attributes)
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        road = importlib.import_module("pytorch_grad_cam.metrics.road")
        targets = importlib.import_module("pytorch_grad_cam.utils.model_targets")
        yield road, targets
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_road_matches_pytorch_grad_cam(grad_cam_road, model, torch_net):
    """MoRF and LeRF at each of the 9 percents, noise off on both sides (theirs draws it from torch's generator).

    pytorch-grad-cam's ``ROADMostRelevantFirst(p)`` keeps the pixels below the map's p-th percentile: npcam's
    MoRF at 100 - p. The input is 64 x 96 (6144 pixels): (P - 1) * p / 100 is never whole, so NumPy's
    interpolated percentile falls strictly between two values and both sides remove the same pixels. The map
    is a real CAM with a tiny seeded jitter, so that no two pixels tie (grad-cam removes every pixel tied at the
    percentile; npcam breaks ties at random and removes the count).
    """
    road, targets = grad_cam_road
    pred = model.predict(PHOTOS[0], size=(64, 96))
    x = pred.input[0]
    cam = upsample(model.cam(pred, pred.top1, method="gradcam"), x.shape[1:])
    cam = cam.astype(np.float64) + 1e-6 * np.random.default_rng(0).random(cam.shape)
    assert np.unique(cam).size == cam.size
    score = metrics.probability(model, pred.top1)
    morf, lerf = metrics.road(x, cam[None], score, noise=0)
    original = float(score(pred.input)[0])
    target = [targets.ClassifierOutputSoftmaxTarget(pred.top1)]
    imputer = road.NoisyLinearImputer(noise=0)
    for j, percent in enumerate(metrics.ROAD_PERCENTS):
        for mine, remove in ((morf, road.RemoveMostRelevantFirst), (lerf, road.RemoveLeastRelevantFirst)):
            metric = road.PerturbationConfidenceMetric(remove(100 - percent, imputer))
            theirs = float(metric(torch.from_numpy(pred.input), cam[None], target, torch_net)[0])
            # Their result is the change of the score. The two sides differ by the bundle against torch (logits
            # within 1e-4 relative: probabilities of this random net, ~1e-3, within 1e-6) and by the imputation
            # (npcam's iterative solve within 1e-4 of the exact one, test_metrics.py); 2e-5 allows both.
            error = abs((mine[0, j] - original) - theirs)
            assert record("ROAD vs pytorch-grad-cam, abs", error) <= 2e-5, (percent, remove.__name__)
