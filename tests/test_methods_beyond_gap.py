"""The methods' general definitions on heads that are not globally average pooled (issue 19), against torch.

Two levels:

- the array formulas (npcam.methods on ``A [C,h,w]`` and ``G [k,C,h,w]``) against the same definitions written
  in torch, on the gradient torch autograd gives through a small hand-written head;
- end to end: tests/nets19.py's nets exported by the real torch route, every method's map (upsampled to the
  input) against a torch reference with a forward hook on the documented default layer and autograd
  (pytorch-grad-cam's definitions, written here in torch; its reshape_transform for tokens: the prefix tokens
  dropped, the patch tokens on their grid).

Maps are compared as npcam shows them: ReLU, divided by the max, bilinear to the input (torch's
``interpolate(align_corners=False)``, which npcam.upsample matches). Tolerance 1e-4 on these [0, 1] maps: both
sides compute the layer in float32 (onnxruntime, torch), so values agree to ~1e-6 relative; the head's gradient
is exact (float64) on npcam's side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import record, synthetic_image, tiny_trunk
from references import torch_eigen_cam
from torch import nn

import npcam
from npcam import bundle, methods, probe
from npcam.cam import normalize, weighted_maps
from npcam.cancel import Cancelled
from npcam.head import GraphHead, Op
from npcam.methods import ablation, gradient, recipro
from npcam.upsample import upsample

SIZE = 32
TOLERANCE = 1e-4


def shown(raw: torch.Tensor | np.ndarray, size=(SIZE, SIZE)) -> np.ndarray:
    """A raw ``[h, w]`` map as npcam shows it at ``size``: ReLU, divided by its max, bilinear (in torch)."""
    raw = torch.as_tensor(raw, dtype=torch.float64)
    cam = torch.relu(raw)
    cam = cam / cam.max() if cam.max() > 0 else cam
    return F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


# pytorch-grad-cam's definitions, in torch, on A [C,h,w] and G [C,h,w] (one class) -> raw map [h,w]


def t_gradcam(a, g):
    return (g.mean(dim=(1, 2))[:, None, None] * a).sum(0)


def t_hirescam(a, g):
    return (g * a).sum(0)


def t_xgradcam(a, g):
    weights = (g * a).sum(dim=(1, 2)) / (a.sum(dim=(1, 2)) + 1e-7)
    return (weights[:, None, None] * a).sum(0)


def t_layercam(a, g):
    return (torch.relu(g) * a).sum(0)


def t_gradcampp(a, g):
    """pytorch-grad-cam's Grad-CAM++ without its eps of 1e-6 (npcam leaves it out, docs/methods.md)."""
    g2, g3 = g**2, g**3
    sums = a.sum(dim=(1, 2))[:, None, None]
    denominator = 2 * g2 + sums * g3
    alpha = torch.where((g != 0) & (denominator != 0), g2 / torch.where(denominator == 0, 1, denominator), 0)
    weights = (torch.relu(g) * alpha).sum(dim=(1, 2))
    return (weights[:, None, None] * a).sum(0)


GRADIENT_METHODS = {
    "gradcam": t_gradcam,
    "hirescam": t_hirescam,
    "xgradcam": t_xgradcam,
    "layercam": t_layercam,
    "gradcampp": t_gradcampp,
}


def n_map(name: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """npcam's general definition of ``name`` on A [C,h,w], G [k,C,h,w]: raw maps [k,h,w]."""
    weights = {
        "gradcam": lambda: gradient.gradcam_weights(g),
        "hirescam": lambda: g,
        "xgradcam": lambda: gradient.xgradcam_weights(g, a),
        "layercam": lambda: np.maximum(g, 0),
        "gradcampp": lambda: gradient.gradcampp_general_weights(g, a),
    }[name]()
    return weighted_maps(a, weights)


# 1. The array formulas, on gradients from torch autograd through hand-written heads


class SpatialHead(nn.Module):
    """A [N,C,h,w] -> 1x1 conv -> ReLU -> MaxPool 2 -> Flatten -> Linear: a gradient far from uniform."""

    def __init__(self, channels=6, h=6, w=4, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 1)
        self.fc = nn.Linear(8 * (h // 2) * (w // 2), classes)

    def forward(self, a):
        return self.fc(torch.flatten(F.max_pool2d(torch.relu(self.conv(a)), 2), 1))


class TokenHead(nn.Module):
    """Tokens [N,1+h*w,C] -> LayerNorm -> one attention of the CLS token over all -> Linear on the CLS token."""

    def __init__(self, channels=6, classes=5):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.q, self.k = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        y = self.norm(x)
        attention = torch.softmax(self.q(y[:, :1]) @ self.k(y).transpose(1, 2), dim=-1)
        return self.fc((attention @ y)[:, 0] + x[:, 0])


def autograd_grid(head, a_input, classes, to_grid):
    """A (the head input on its grid) and dy_c/dA for each class, from torch autograd: float64 numpy."""
    x = a_input.clone().requires_grad_(True)
    scores = head(x)
    grads = [torch.autograd.grad(scores[0, c], x, retain_graph=True)[0] for c in classes]
    return to_grid(a_input)[0].double(), torch.stack([to_grid(g)[0] for g in grads]).double()


def tokens_to_grid(t, h=6, w=4):
    return t[:, 1:].reshape(len(t), h, w, t.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", ["spatial", "tokens"])
@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_array_formulas_match_torch(name, kind):
    torch.manual_seed(1)
    classes = [0, 3]
    if kind == "spatial":
        head = SpatialHead().double()
        a_in = torch.relu(torch.randn(1, 6, 6, 4, dtype=torch.float64))
        a, g = autograd_grid(head, a_in, classes, lambda t: t)
    else:
        head = TokenHead().double()
        a_in = torch.randn(1, 1 + 24, 6, dtype=torch.float64)
        a, g = autograd_grid(head, a_in, classes, tokens_to_grid)
    assert not torch.allclose(g, g.mean(dim=(2, 3), keepdim=True))  # the gradient really varies over positions
    got = normalize(n_map(name, a.numpy().astype(np.float32), g.numpy()))
    for j in range(len(classes)):
        want = shown(GRADIENT_METHODS[name](a.float().double(), g[j]))
        full = upsample(got[j], (SIZE, SIZE))
        assert record(f"formula {name} {kind} vs torch", np.abs(full - want).max()) <= TOLERANCE, j


def test_hirescam_differs_from_gradcam_beyond_pooling():
    """The point of the general definitions: with a non-uniform gradient, HiResCAM is not Grad-CAM."""
    torch.manual_seed(1)
    a, g = autograd_grid(SpatialHead().double(), torch.relu(torch.randn(1, 6, 6, 4).double()), [0], lambda t: t)
    a, g = a.numpy(), g.numpy()
    assert np.abs(normalize(n_map("hirescam", a, g)) - normalize(n_map("gradcam", a, g))).max() > 0.05


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_general_formulas_reduce_to_the_closed_forms_on_a_pooled_head(name):
    """G/hw at every position (what a pooled head's gradient is on the grid): the general definitions give the
    closed forms' maps (<= 1e-6 on [0, 1]); XGrad-CAM's eps of 1e-7 is the only difference, far below that."""
    rng = np.random.default_rng(2)
    a = np.maximum(rng.normal(size=(8, 5, 3)), 0).astype(np.float32)
    grad = rng.normal(size=(3, 8))  # dy/dp for 3 classes
    spread = np.broadcast_to((grad / 15)[:, :, None, None], (3, 8, 5, 3))
    closed = {
        "gradcam": grad,
        "hirescam": grad,
        "xgradcam": grad,
        "layercam": np.maximum(grad, 0),
        "gradcampp": gradient.gradcampp_weights(grad, a.mean(axis=(1, 2))),
    }[name]
    np.testing.assert_allclose(normalize(n_map(name, a, spread)), normalize(weighted_maps(a, closed)), atol=1e-6)


def test_weighted_maps_takes_per_position_weights():
    rng = np.random.default_rng(0)
    a, w = rng.normal(size=(4, 3, 2)).astype(np.float32), rng.normal(size=(2, 4, 3, 2))
    np.testing.assert_allclose(weighted_maps(a, w), (w * a[None]).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(weighted_maps(a, w[:, :, 0, 0]), np.einsum("kc,chw->khw", w[:, :, 0, 0], a))


# 2. A hand-written spatial bundle (no exporter): CAM refused, batching, Ctrl-C


@pytest.fixture(scope="module")
def spatial_bundle(tmp_path_factory):
    """tiny_trunk (8, 16): A [N,16,8,8] at 32 px; head Relu -> MaxPool 2 -> Flatten -> Gemm -> Relu -> Gemm."""
    rng = np.random.default_rng(3)
    arrays = {
        "w1": rng.normal(0, 0.1, (12, 16 * 4 * 4)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 12).astype(np.float32),
        "w2": rng.normal(0, 0.3, (5, 12)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    ops = [
        Op("MaxPool", ("A",), "pooled", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        Op("Flatten", ("pooled",), "flat", {"axis": 1}),
        Op("Gemm", ("flat", "w1", "b1"), "hidden", {"transB": 1}),
        Op("Relu", ("hidden",), "relu"),
        Op("Gemm", ("relu", "w2", "b2"), "scores", {"transB": 1}),
    ]
    head = GraphHead(ops, arrays, [-1, 16, 8, 8], "A", "scores", layout="spatial")
    out = tmp_path_factory.mktemp("spatial") / "b"
    out.mkdir()
    meta = {"arch": "tiny", "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "fixed_size": True}
    bundle.write(out, tiny_trunk((8, 16)), head, [f"c{i}" for i in range(5)], {**meta, "stride": 4, "layer": "relu1"})
    return npcam.Model(out)


def test_cam_is_refused_in_one_line_on_a_spatial_head(spatial_bundle):
    for name in ("cam", "softmax"):
        with pytest.raises(npcam.NpcamError) as e:
            spatial_bundle.cam(synthetic_image(32, 32), method=name)
        assert "\n" not in str(e.value) and f"method {name} needs a head" in str(e.value)
    assert methods.default_name(spatial_bundle.head.kind) == "gradcam"


def brute_force(model, pred, variants: np.ndarray) -> np.ndarray:
    """The head's scores of each variant grid, one at a time: float64 [n, K]."""
    return np.concatenate([model.head_scores(model.from_grid(v[None], pred.head_input), pred.sides) for v in variants])


@pytest.mark.parametrize("batch_bytes", [1, 10**9])  # one head input per pass, or all at once
def test_ablation_and_recipro_match_brute_force_at_any_batch(spatial_bundle, monkeypatch, batch_bytes):
    monkeypatch.setattr(probe, "HEAD_PASS_BYTES", batch_bytes)
    model = spatial_bundle
    pred = model.predict(synthetic_image(32, 32))
    a, classes = pred.features, [pred.top1, 2]
    channels, h, w = a.shape
    ablated = np.repeat(a[None], channels, axis=0)
    ablated[np.arange(channels), np.arange(channels)] = 0
    y = pred.logits[classes].astype(np.float64)
    want = (y[:, None] - brute_force(model, pred, ablated)[:, classes].T) / y[:, None]
    np.testing.assert_allclose(ablation.ablation_weights(model.probe(pred, classes)), want, rtol=1e-5, atol=1e-7)
    kept = np.zeros((h * w, channels, h * w), np.float32)
    kept[np.arange(h * w), :, np.arange(h * w)] = a.reshape(channels, -1).T
    probs = model.probabilities(brute_force(model, pred, kept.reshape(-1, channels, h, w)))[:, classes].T
    want = (probs - probs.min(axis=1, keepdims=True)).reshape(2, h, w)
    np.testing.assert_allclose(recipro.reciprocam_maps(model.probe(pred, classes)), want, atol=1e-6)


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_head_pass_methods_stop_between_batches(spatial_bundle, monkeypatch, name):
    monkeypatch.setattr(probe, "HEAD_PASS_BYTES", 1)  # one head input per batch
    pred = spatial_bundle.predict(synthetic_image(32, 32))
    calls, seen = [], []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        spatial_bundle.cam(pred, method=name, should_stop=should_stop, progress=lambda d, t: seen.append((d, t)))
    assert len(calls) == 4 and seen[-1][0] == 3  # stopped before the fourth batch


def test_head_batch_is_bounded(spatial_bundle, monkeypatch):
    monkeypatch.setattr(probe, "HEAD_PASS_BYTES", 10**6)
    head = spatial_bundle.head
    per_image = head.dtype.itemsize * (16 * 8 * 8 + sum(int(np.prod(head.shapes[op.output])) for op in head.ops))
    probed = spatial_bundle.probe(spatial_bundle.predict(synthetic_image(32, 32)), [0])
    assert probed.head_batch(10**6) == 10**6 // per_image
    assert probed.head_batch(3) == 3


def test_the_record_names_the_layer(spatial_bundle):
    from npcam.explain import Options, describe, explain
    from npcam.record import arrow_schema

    options = Options().checked(spatial_bundle)
    described = describe(explain(spatial_bundle, synthetic_image(32, 32), options), options)
    assert described["layer"] == "relu1" and described["method"] == "gradcam"
    assert str(arrow_schema().field("layer").type) == "string"


# 3. End to end: tests/nets19.py exported by the real torch route, against a forward hook + autograd

nets19 = pytest.importorskip("nets19")

NETS = ["vgg_like", "gmp", "concat_pool", "skip", "vit_cls", "deit", "vit_meanpool", "swin_like"]
ALL_METHODS = [*GRADIENT_METHODS, "ablationcam", "scorecam", "eigencam", "reciprocam"]
_MODELS: dict[tuple[str, str], npcam.Model] = {}


def exported(name: str, nets19_bundle, route: str = "torch") -> npcam.Model:
    """``name`` exported by npcam (conftest's nets19_bundle: shared with test_export_beyond_gap), loaded once."""
    if (name, route) not in _MODELS:
        _MODELS[name, route] = npcam.Model(nets19_bundle(name, route))
    return _MODELS[name, route]


class Hooked:
    """A torch net with a forward hook on its layer: A and dy_c/dA on the grid, and the scores with A replaced.

    ``grid`` lays the layer's output on ``[C,h,w]`` as pytorch-grad-cam's reshape_transform does (tokens: the
    ``L - h*w`` prefix tokens dropped; Swin's NHWC: channels first); ``replace(fn)`` runs the net with the
    layer's output's grid part replaced by ``fn(grid)`` (prefix tokens kept), for ablation and Recipro-CAM.
    """

    def __init__(self, net, layer: str, hw: tuple[int, int]):
        self.net, self.module, self.hw = net, net.get_submodule(layer), hw

    def _grid(self, t):
        h, w = self.hw
        if t.ndim == 3:  # tokens [N, L, C]
            return t[:, t.shape[1] - h * w :].reshape(len(t), h, w, t.shape[2]).permute(0, 3, 1, 2)
        return t if t.shape[2:] == (h, w) else t.permute(0, 3, 1, 2)  # NCHW, or NHWC

    def _put(self, t, grid):
        h, w = self.hw
        if t.ndim == 3:
            patches = grid.permute(0, 2, 3, 1).reshape(len(grid), h * w, t.shape[2])
            return torch.cat([t[:, : t.shape[1] - h * w].expand(len(grid), -1, -1), patches], dim=1)
        return grid if t.shape[2:] == (h, w) else grid.permute(0, 2, 3, 1)

    def gradients(self, x, classes, value: torch.Tensor | None = None):
        """A and dy_c/dA on the grid; with ``value``, the layer's output is replaced by it (the same layer value
        as npcam's, so that only the head's arithmetic is compared)."""
        seen = {}

        def hook(module, inputs, out):
            if value is not None:
                assert value.shape == out.shape, (value.shape, out.shape)
            return seen.setdefault("a", out if value is None else value.to(out.dtype).requires_grad_())

        handle = self.module.register_forward_hook(hook)
        try:
            scores = self.net(x)
        finally:
            handle.remove()
        grads = [self._grid(torch.autograd.grad(scores[0, c], seen["a"], retain_graph=True)[0])[0] for c in classes]
        return self._grid(seen["a"])[0].detach().double(), [g.double() for g in grads]

    @torch.no_grad()
    def replaced(self, x, variants: torch.Tensor) -> torch.Tensor:
        """The scores [n, K] (float64) with the layer's grid replaced by each of ``variants`` [n, C, h, w]."""
        handle = self.module.register_forward_hook(lambda m, i, out: self._put(out, variants.to(out.dtype)))
        try:
            return self.net(x.expand(len(variants), -1, -1, -1)).double()
        finally:
            handle.remove()


def torch_maps(net, layer, x, classes, hw, name, probabilities, value=None) -> list[torch.Tensor]:
    """``name``'s raw maps [h, w] for each class, in torch at ``layer``, as pytorch-grad-cam (and, for
    Score-CAM, TorchCAM; for Recipro-CAM, openvino_xai without its Gaussian) define them. ``value``: the
    layer's output to use instead of torch's own (:meth:`Hooked.gradients`)."""
    hooked = Hooked(net, layer, hw)
    a, grads = hooked.gradients(x, classes, value)
    channels, h, w = a.shape
    af = a.float()
    if name in GRADIENT_METHODS:
        return [GRADIENT_METHODS[name](a, g) for g in grads]
    if name == "ablationcam":
        ablated = af[None].repeat(channels, 1, 1, 1)
        ablated[torch.arange(channels), torch.arange(channels)] = 0
        y = net(x)[0].detach().double()
        drops = hooked.replaced(x, ablated)
        return [(((y[c] - drops[:, c]) / y[c])[:, None, None] * a).sum(0) for c in classes]
    if name == "reciprocam":
        kept = torch.zeros(h * w, channels, h * w)
        kept[torch.arange(h * w), :, torch.arange(h * w)] = af.reshape(channels, -1).T
        probs = probabilities(hooked.replaced(x, kept.reshape(-1, channels, h, w)))
        return [(probs[:, c] - probs[:, c].min()).reshape(h, w) for c in classes]
    if name == "scorecam":
        low = af - af.amin(dim=(1, 2), keepdim=True)
        low = low / (low.amax(dim=(1, 2), keepdim=True) + 1e-8)
        masks = F.interpolate(low[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)
        with torch.no_grad():
            scores = net(masks * x).double()
        return [(torch.softmax(scores[:, c], 0)[:, None, None] * a).sum(0) for c in classes]
    if name == "eigencam":
        return [torch_eigen_cam(a)] * len(classes)
    raise ValueError(name)


@pytest.mark.parametrize("net_name", NETS)
@pytest.mark.parametrize("name", ALL_METHODS)
def test_methods_match_torch_at_the_default_layer(net_name, name, nets19_bundle):
    model = exported(net_name, nets19_bundle)
    net = getattr(nets19, net_name)()
    layer, layout = nets19.LAYERS[net_name]
    assert model.head.layout == layout
    pred = model.predict(synthetic_image(SIZE, SIZE, seed=1))
    classes = [pred.top1, (pred.top1 + 3) % len(model.labels)]
    x = torch.from_numpy(pred.input)
    with torch.no_grad():  # the same network, and the same input
        np.testing.assert_allclose(net(x)[0].numpy(), pred.logits, atol=1e-4)

    def probabilities(scores):
        return torch.softmax(scores, dim=1)

    want = torch_maps(net, layer, x, classes, pred.features.shape[1:], name, probabilities)
    got = model.cam(pred, classes, size=(SIZE, SIZE), method=name)
    raw = methods.resolve(name).raw_maps(model.probe(pred, classes))
    for j, c in enumerate(classes):
        error = np.abs(got[j] - shown(want[j])).max()
        assert record(f"{net_name} {name} vs torch", error) <= TOLERANCE, c
        # The raw maps too, negative parts included (a map with no positive value shows as zeros), up to the
        # positive scale that the pooled closed forms leave out: divided by their largest magnitude.
        theirs = want[j].numpy()
        assert np.abs(theirs).max() > 0, c
        signed = np.abs(raw[j] / np.abs(raw[j]).max() - theirs / np.abs(theirs).max()).max()
        assert record(f"{net_name} {name} vs torch, signed raw", signed) <= TOLERANCE, c


@pytest.mark.parametrize("net_name", NETS)
def test_cam_is_refused_or_is_gradcam(net_name, nets19_bundle):
    """Heads that are not one affine layer after global pooling refuse CAM in one line; the mean-pooled token
    nets (folded to an affine head on the grid) take CAM, and it is their Grad-CAM."""
    model = exported(net_name, nets19_bundle)
    pred = model.predict(synthetic_image(SIZE, SIZE, seed=1))
    if model.head.kind == "affine":
        np.testing.assert_allclose(model.cam(pred, method="cam"), model.cam(pred, method="gradcam"), atol=1e-6)
        return
    with pytest.raises(npcam.NpcamError) as e:
        model.cam(pred, method="cam")
    assert "\n" not in str(e.value) and "method cam needs a head" in str(e.value)


@pytest.mark.parametrize(
    "net_name, route",
    [("vgg_like", "torchscript"), ("vgg_like", "dynamo"), ("vit_cls", "torchscript"), ("deit", "dynamo")],
)
def test_gradient_methods_match_torch_on_the_onnx_routes(net_name, route, nets19_bundle):
    """The head that npcam read from the ONNX file, against autograd on the torch net, from the same layer value.

    The trunk is onnxruntime's, whose float32 rounding differs from torch's by a few units in the last place; the
    layer agrees to that (checked here). The methods are then compared from npcam's layer value, put into
    torch's net by the hook, as a stage of its own: XGrad-CAM divides by the sum of each channel, which on a
    token layer can nearly cancel, so it amplifies the trunks' rounding difference (measured on vit_cls: 1.1e-4
    from torch's own layer value, 2.6e-6 from the same one), which is the method's conditioning, not an error
    of the head.
    """
    model = exported(net_name, nets19_bundle, route)
    net = getattr(nets19, net_name)()
    layer, layout = nets19.LAYERS[net_name]
    assert model.head.layout == layout
    pred = model.predict(synthetic_image(SIZE, SIZE, seed=2))
    classes = [pred.top1, (pred.top1 + 2) % len(model.labels)]
    x = torch.from_numpy(pred.input)
    value = torch.from_numpy(pred.head_input)
    own = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, out: own.setdefault("a", out.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    # float32 trunks agree to rounding: within 1e-5 of the layer's largest value (about 100 float32 ulps of it).
    np.testing.assert_allclose(own["a"].numpy(), pred.head_input, atol=1e-5 * float(value.abs().max()))
    for name in GRADIENT_METHODS:
        want = torch_maps(net, layer, x, classes, pred.features.shape[1:], name, None, value)
        got = model.cam(pred, classes, size=(SIZE, SIZE), method=name)
        for j in range(len(classes)):
            assert record(f"{net_name} {route} {name} vs torch", np.abs(got[j] - shown(want[j])).max()) <= TOLERANCE


# nn.MultiheadAttention in files of a fixed batch of 1 (issue 25): the head is rewritten to run at any batch
# (export/batch_axis.py), so that the multi-pass methods run it on many variants of the layer at once.
@pytest.mark.parametrize("net_name, route", [("vit_cls", "torchscript1"), ("deit_mha", "dynamo")])
@pytest.mark.parametrize("name", [*GRADIENT_METHODS, "ablationcam", "reciprocam"])
def test_methods_match_torch_on_attention_files_of_batch_one(net_name, route, name, nets19_bundle):
    model = exported(net_name, nets19_bundle, route)
    net = getattr(nets19, net_name)()
    layer, _ = nets19.LAYERS[net_name]
    pred = model.predict(synthetic_image(SIZE, SIZE, seed=4))
    classes = [pred.top1, (pred.top1 + 2) % len(model.labels)]
    x = torch.from_numpy(pred.input)
    # The gradient methods from npcam's layer value, as on the other ONNX routes (XGrad-CAM's conditioning).
    value = torch.from_numpy(pred.head_input) if name in GRADIENT_METHODS else None
    want = torch_maps(net, layer, x, classes, pred.features.shape[1:], name, lambda s: torch.softmax(s, dim=1), value)
    got = model.cam(pred, classes, size=(SIZE, SIZE), method=name)
    for j in range(len(classes)):
        assert record(f"{net_name} {route} {name} vs torch", np.abs(got[j] - shown(want[j])).max()) <= TOLERANCE


# 4. The head takes the CLS token before the token-wise ops (npcam.head.rewrite.select_token_early): the same function


def token_head(rewrite: bool, monkeypatch=None) -> GraphHead:
    """A token head [1,5,4] -> mix the tokens (constant MatMul from the left) -> LayerNorm -> MLP (MatMul, Add,
    Erf, Mul) -> residual Add -> LayerNorm -> Gather(CLS) -> Gemm; plus a token mean of the MLP's input that
    is added to the scores, so that one value on the way is read by more than the Gather."""
    rng = np.random.default_rng(5)
    arrays = {
        "mix": rng.normal(size=(5, 5)), "s1": rng.normal(size=4), "b1": rng.normal(size=4),
        "w": rng.normal(size=(4, 6)), "b": rng.normal(size=6), "w2": rng.normal(size=(6, 4)),
        "s2": rng.normal(size=4), "b2": rng.normal(size=4), "zero": np.array(0, np.int64),
        "fc": rng.normal(size=(3, 4)), "fcb": rng.normal(size=3), "half": np.array(0.5),
    }  # fmt: skip
    ops = [
        Op("MatMul", ("mix", "x"), "mixed"),
        Op("LayerNormalization", ("mixed", "s1", "b1"), "n1", {"axis": -1}),
        Op("MatMul", ("n1", "w"), "h"),
        Op("Add", ("h", "b"), "hb"),
        Op("Erf", ("hb",), "e"),
        Op("Mul", ("e", "hb"), "g"),
        Op("Mul", ("g", "half"), "g2"),
        Op("MatMul", ("g2", "w2"), "m"),
        Op("Add", ("mixed", "m"), "r"),
        Op("LayerNormalization", ("r", "s2", "b2"), "n2", {"axis": 2}),
        Op("Gather", ("n2", "zero"), "cls", {"axis": 1}),
        Op("Gemm", ("cls", "fc", "fcb"), "y", {"transB": 1}),
        Op("ReduceMean", ("n1",), "pooled", {"axes": [1, 2], "keepdims": 0}),
        Op("Add", ("y", "pooled"), "scores"),
    ]
    if not rewrite:
        monkeypatch.setattr("npcam.head.rewrite.select_token_early", lambda ops, *args: ops)
    return GraphHead(ops, arrays, [-1, 5, 4], "x", "scores", layout="tokens", grid=(2, 2), prefix=1)


def test_the_cls_token_is_taken_before_the_tokenwise_ops(monkeypatch):
    fast = token_head(True)
    with monkeypatch.context() as m:
        slow = token_head(False, m)
    # The MLP, the residual and the last LayerNorm run on one token; n1, which the token mean also reads, on all.
    wide = [op.output for op in fast.ops if len(fast.shapes[op.output]) == 3]
    assert wide == ["mixed", "n1"], wide
    assert len([op for op in slow.ops if len(slow.shapes[op.output]) == 3]) == 10
    x = np.random.default_rng(6).normal(size=(3, 5, 4))
    np.testing.assert_allclose(fast.forward_float64(x), slow.forward_float64(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast.gradient(x[:1], [0, 2]), slow.gradient(x[:1], [0, 2]), rtol=1e-10, atol=1e-12)
