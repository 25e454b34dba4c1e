"""Bring your own model: ONNX files and torch modules of several families, against torch on the same weights.

For each family the reference is torch itself: autograd Grad-CAM at the
tensor the last global pooling reads (for an affine head that is CAM, up to a
positive scale, so the normalized maps must agree either way), and the
module's own probabilities. Tolerances: full-resolution maps and probabilities
within 1e-4, the same top-1.
"""

from __future__ import annotations

import io
import json
import warnings

import models
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTOS, record

import npcam
from export.__main__ import main as export_main
from export.api import run_onnx, run_torch

SIZE = 128


def onnx_bytes(net: torch.nn.Module, shape, dynamic=True, opset=17) -> bytes:
    buffer = io.BytesIO()
    axes = {"x": {0: "N", 1 if shape[-1] == 3 else 2: "H", 2 if shape[-1] == 3 else 3: "W"}, "y": {0: "N"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(shape),), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes if dynamic else None, opset_version=opset, dynamo=False)  # fmt: skip
    return buffer.getvalue()


def torch_gradcam(net, x: torch.Tensor, c: int, size) -> np.ndarray:
    """Autograd Grad-CAM at the last pooled features, normalized and upsampled as npcam does."""
    features = net.features(x).detach().requires_grad_(True)
    net.scores(features)[0, c].backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1))[0].detach().double()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def check_against_torch(bundle, net, nhwc=False, name="", grey=False):
    """npcam's default method on the bundle vs torch's Grad-CAM, on the sample photos: maps and probabilities.

    ``grey``: the network takes one channel, fed the luma (ITU-R BT.601) of npcam's normalized RGB input.
    """
    model = npcam.load(bundle)
    for photo in PHOTOS:
        pred = model.predict(photo)
        x = torch.from_numpy(pred.input)
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if grey else x
        x = x.permute(0, 2, 3, 1) if nhwc else x
        with torch.no_grad():
            probs = torch.softmax(net.scores(net.features(x)), dim=-1)[0].numpy()
        assert record(f"BYOM probabilities, abs ({name})", np.abs(pred.probs - probs).max()) <= 1e-4, photo.name
        assert pred.top1 == int(probs.argmax())
        size = pred.image.shape[:2]
        for c in (pred.top1, (pred.top1 + 3) % models.CLASSES):
            got = model.cam(pred, c, size=size)
            want = torch_gradcam(net, x, c, size)
            assert record(f"BYOM full-res map, abs ({name})", np.abs(got - want).max()) <= 1e-4, (photo.name, c)
    return model


AFFINE = ["mobilenet_v2ish", "densenetish", "two_linear", "squeezenetish"]
GRAPH = [
    "mobilenet_v3ish",
    "convnextish",
    "mlp_head",
    "cosine_head",
    "prelu_head",
    "gem_pool",
    "fixed_pool",
    "two_outputs",
]


@pytest.mark.parametrize("family", AFFINE + GRAPH)
def test_torch_module_route(family, tmp_path):
    net = getattr(models, family)()
    out = run_torch(f"models:{family}", tmp_path / family, input_size=SIZE)
    model = check_against_torch(out, net, name=family)
    assert model.head.kind == ("affine" if family in AFFINE else "graph")
    assert npcam.methods.default_name(model.head.kind) == ("cam" if family in AFFINE else "gradcam")
    assert model.bundle.fixed_size == (family == "fixed_pool") and model.labels == tuple(
        f"class {i}" for i in range(models.CLASSES)
    )


@pytest.mark.parametrize("family", AFFINE + GRAPH)
def test_onnx_route(family, tmp_path):
    net = getattr(models, family)()
    (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE)))
    output = "y" if family == "two_outputs" else None  # the scores' name, as the model has two outputs
    out = run_onnx(tmp_path / "m.onnx", tmp_path / "b", input_size=SIZE, output=output)
    model = check_against_torch(out, net, name=family)
    assert model.head.kind == ("affine" if family in AFFINE else "graph")


def test_which_output_and_which_size_are_asked_for_in_one_line(tmp_path, capsys):
    """Two outputs need --output; a fixed AveragePool kernel on a dynamic-size model needs --input-size."""
    for family, flag in (("two_outputs", "name one with --output"), ("fixed_pool", "--input-size")):
        (tmp_path / "m.onnx").write_bytes(onnx_bytes(getattr(models, family)(), (1, 3, SIZE, SIZE)))
        assert export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")]) == 1
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


@pytest.mark.parametrize("route", ["onnx", "torch"])
def test_multi_label_model_gets_a_sigmoid_per_class(route, tmp_path, capsys):
    """A final Sigmoid: CAM of the logits, and probabilities that are each class's sigmoid, not a softmax."""
    net = models.multi_label()
    if route == "onnx":
        (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE)))
        out = run_onnx(tmp_path / "m.onnx", tmp_path / "b", input_size=SIZE)
    else:
        out = run_torch("models:multi_label", tmp_path / "b", input_size=SIZE)
    model = npcam.load(out)
    assert model.bundle.multi_label and model.head.kind == "affine"
    for photo in PHOTOS:
        pred = model.predict(photo)
        with torch.no_grad():
            probs = net(torch.from_numpy(pred.input))[0].numpy()
        assert record("multi-label probabilities, abs", np.abs(pred.probs - probs).max()) <= 1e-4
        c = pred.top1
        want = torch_gradcam(net, torch.from_numpy(pred.input), c, pred.image.shape[:2])
        assert (
            record("multi-label full-res map, abs", np.abs(model.cam(pred, c, size=pred.image.shape[:2]) - want).max())
            <= 1e-4
        )
    from npcam.cli import main

    assert main(["-m", str(out), str(PHOTOS[0]), "--json", "--top", "2", "-o", str(tmp_path / "o") + "/"]) == 0
    top5 = json.loads(capsys.readouterr().out)["top5"]
    assert sum(t["score"] for t in top5) > 1.0  # independent classes: probabilities need not sum to 1


@pytest.mark.parametrize("route", ["onnx", "torch"])
def test_grey_model_sees_the_luma_of_the_photo(route, tmp_path, capsys):
    """A one-channel model: the trunk takes npcam's RGB input and computes its luma; one --mean, one --std."""
    net = models.grey()
    out = tmp_path / "b"
    if route == "onnx":
        (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 1, SIZE, SIZE)))
        args = ["onnx", str(tmp_path / "m.onnx"), "--input-size", str(SIZE)]
    else:
        args = ["torch", "models:grey", "--input-size", str(SIZE)]
    # Different values per channel cannot be one grey normalization: refused, nothing written.
    assert export_main([*args, "--mean", "0.4", "0.5", "0.6", "--std", "0.25", "--out", str(out)]) == 1
    assert "one --mean and one --std" in capsys.readouterr().err and not out.exists()
    assert export_main([*args, "--mean", "0.45", "--std", "0.25", "--out", str(out)]) == 0
    model = check_against_torch(out, net, name=f"grey, {route}", grey=True)
    assert model.bundle.mean == (0.45,) * 3 and model.bundle.std == (0.25,) * 3


def test_int8_qdq_model_from_onnxruntimes_quantizer(tmp_path, capsys):
    """A QDQ model (onnxruntime.quantization, every op quantized, the Softmax too): the head's Q/DQ pairs run
    exactly, and Grad-CAM's gradient through them is the straight-through one, so an int8 affine head gives
    CAM with its dequantized weights. The QOperator model of the same quantization exports as its QDQ
    translation and gives the same probabilities (tests/test_int8_onnx.py checks both formats' integers)."""
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.inputs = iter([{"x": npcam.load(out).preprocess(p)} for p in PHOTOS])

        def get_next(self):
            return next(self.inputs, None)

    net = models.densenetish()
    net.probabilities = True
    (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE), dynamic=False))
    out = run_onnx(tmp_path / "m.onnx", tmp_path / "float")  # only for its preprocessing
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / f"{fmt.name}.onnx"), Photos(), quant_format=fmt)
    capsys.readouterr()
    assert export_main(["onnx", str(tmp_path / "QDQ.onnx"), "--out", str(tmp_path / "q")]) == 0
    # its probabilities are quantized: the self-check's bound is made of their step and the logits' (export.qdq)
    assert "of the original's int8 ones" in capsys.readouterr().err
    model = npcam.load(tmp_path / "q")
    assert model.head.kind == "graph" and npcam.methods.default_name(model.head.kind) == "gradcam"
    quantized = onnx.load(str(tmp_path / "QDQ.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    dq = next(n for n in quantized.graph.node if n.output[0] == gemm.input[1])
    w = (inits[dq.input[0]].astype(np.float64) - inits[dq.input[2]]) * inits[dq.input[1]]
    for photo in PHOTOS:
        pred = model.predict(photo)
        for c in (pred.top1, (pred.top1 + 1) % models.CLASSES):
            want = np.maximum(np.einsum("k,khw->hw", w[c], pred.features.astype(np.float64)), 0)
            got = model.cam(pred, c)
            assert (
                record("int8 QDQ head map vs CAM of dequantized W, abs", np.abs(got - want / want.max()).max()) <= 1e-5
            )
    assert export_main(["onnx", str(tmp_path / "QOperator.onnx"), "--out", str(tmp_path / "o")]) == 0
    qoperator = npcam.load(tmp_path / "o")
    assert qoperator.bundle.meta["source"]["int8"]["qoperator_ops"] > 0
    bound = model.bundle.meta["source"]["int8_bound"]["bound"]
    for photo in PHOTOS:  # both within their bound of the same model's QDQ definition
        x = model.preprocess(photo)
        got, want = (m.probabilities(m.scores(x)) for m in (qoperator, model))
        assert record("int8 QOperator vs QDQ bundle, probabilities, of the bound", np.abs(got - want).max() / bound) <= 2


def test_model_made_for_one_image_at_a_time(tmp_path):
    """A static batch of 1 throughout, so that torch writes ``view(x.size(0), -1)`` as Reshape to [1, C]."""
    net = models.fixed_pool()
    (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE), dynamic=False))
    model = check_against_torch(run_onnx(tmp_path / "m.onnx", tmp_path / "b"), net, name="batch of 1")
    pred = model.predict(PHOTOS[:2])  # the head itself still takes batches
    assert [p.top1 for p in pred] == [model.predict(p).top1 for p in PHOTOS[:2]]


def test_a_model_with_external_data_exports_a_self_contained_bundle(tmp_path, monkeypatch):
    """ONNX's external-data form (as the dynamo exporter writes large models): the bundle holds every byte, so
    it loads and answers the same once the model's data file is gone, from another working directory."""
    net = models.mlp_head()
    model = onnx.load_from_string(onnx_bytes(net, (1, 3, SIZE, SIZE)))
    source = tmp_path / "source"
    source.mkdir()
    onnx.save_model(model, source / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    assert (source / "m.data").stat().st_size > (source / "m.onnx").stat().st_size
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the data file is found beside the model, not in the working directory
    out = run_onnx(source / "m.onnx", tmp_path / "b", input_size=SIZE)
    trunk = onnx.load(str(out / "trunk.onnx"), load_external_data=False)
    assert trunk.graph.initializer and all(t.data_location == onnx.TensorProto.DEFAULT for t in trunk.graph.initializer)
    (source / "m.data").unlink()
    monkeypatch.chdir(tmp_path)
    check_against_torch(out, net, name="external data")


def test_tensors_named_like_the_bundle_contract_inside_the_model(tmp_path):
    """A model that already calls inner tensors ``image`` and ``features`` (and its input ``features``)."""
    import onnx

    net = models.mlp_head()
    graph_model = onnx.load_from_string(onnx_bytes(net, (1, 3, SIZE, SIZE)))
    convs = [n for n in graph_model.graph.node if n.op_type == "Conv"]
    renames = {graph_model.graph.input[0].name: "features", convs[1].output[0]: "image"}
    for node in graph_model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    graph_model.graph.input[0].name = "features"
    onnx.save(graph_model, tmp_path / "m.onnx")
    check_against_torch(run_onnx(tmp_path / "m.onnx", tmp_path / "b"), net, name="contract names inside")


def test_data_parallel_checkpoint(tmp_path):
    """A state dict saved from DataParallel (keys ``module.…``) inside a training checkpoint."""
    net = models.mlp_head(seed=4)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
    out = run_torch("models:mlp_head", tmp_path / "b", weights=tmp_path / "ckpt.pth", input_size=SIZE)
    check_against_torch(out, net, name="DataParallel checkpoint")


def test_affine_heads_fold_to_the_exact_weights(tmp_path):
    net = models.two_linear()
    model = npcam.load(run_torch("models:two_linear", tmp_path / "b", input_size=SIZE))
    w = (net.fc2.weight @ net.fc1.weight).detach().numpy()
    b = (net.fc2.weight @ net.fc1.bias + net.fc2.bias).detach().numpy()
    np.testing.assert_allclose(model.head.weight, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.head.bias, b, rtol=1e-5, atol=1e-6)


def test_keras_like_nhwc_graph(tmp_path):
    net = models.keras_nhwc()
    (tmp_path / "keras.onnx").write_bytes(onnx_bytes(net, (1, SIZE, SIZE, 3)))
    out = run_onnx(tmp_path / "keras.onnx", tmp_path / "b", mean=[0.5] * 3, std=[0.25] * 3)
    model = check_against_torch(out, net, nhwc=True, name="keras_nhwc")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["layout"] == "NHWC" and meta["output"] == "probabilities" and model.bundle.mean == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(model.head.weight, net.kernel.detach().numpy().T, rtol=1e-6)


def test_bgr_model_gets_the_channel_flip_in_its_trunk(tmp_path):
    net = models.densenetish()

    class BGR(torch.nn.Module):  # the same network, fed BGR
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.flip(1))

    (tmp_path / "bgr.onnx").write_bytes(onnx_bytes(BGR().eval(), (1, 3, SIZE, SIZE)))
    check_against_torch(run_onnx(tmp_path / "bgr.onnx", tmp_path / "b", bgr=True), net, name="bgr")


def test_fixed_size_trunk_refuses_other_sizes_in_one_line(tmp_path, capsys):
    net = models.densenetish()
    (tmp_path / "fixed.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE), dynamic=False))
    model = npcam.load(run_onnx(tmp_path / "fixed.onnx", tmp_path / "b"))
    # The trunk itself is fully convolutional: a static ONNX declaration alone does not fix the size.
    assert not model.bundle.fixed_size


def test_label_file_names_the_classes(tmp_path, capsys):
    net = models.mlp_head()
    (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE)))
    names = [f"part {i}" for i in range(models.CLASSES)]
    (tmp_path / "labels.json").write_text(json.dumps(names))
    code = export_main(
        ["onnx", str(tmp_path / "m.onnx"), "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err
    assert code == 0 and "graph head: Grad-CAM" in err
    from npcam.cli import main

    assert main(["-m", str(tmp_path / "b"), str(PHOTOS[0]), "--json", "-o", str(tmp_path / "o.jpg")]) == 0
    record_ = json.loads(capsys.readouterr().out)
    assert record_["label"] in names and record_["method"] == "gradcam"


@pytest.mark.parametrize("family", ["vggish", "skip_into_head", "concat_pool"])
def test_heads_beyond_gap_export_in_one_command(family, tmp_path, capsys):
    """Refused before issue 19: a Flatten head, a skip into the head, concat pooling. Now a spatial head (see
    tests/test_export_beyond_gap.py for parity with torch autograd); the self-check compares with the model."""
    net = getattr(models, family)()
    (tmp_path / "m.onnx").write_bytes(onnx_bytes(net, (1, 3, SIZE, SIZE), dynamic=False))
    code = export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 0 and "graph head: Grad-CAM" in err, err
    model = npcam.load(tmp_path / "b")
    assert model.head.layout == "spatial" and model.bundle.layer in [n.output[0] for n in onnx.load(tmp_path / "m.onnx").graph.node]
    code = export_main(["torch", f"models:{family}", "--input-size", str(SIZE), "--out", str(tmp_path / "t")])
    assert code == 0, capsys.readouterr().err
    assert npcam.load(tmp_path / "t").head.layout == "spatial"


def test_not_an_onnx_file(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all" * 10)
    assert export_main(["onnx", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "b")]) == 1
    assert "not an ONNX model" in capsys.readouterr().err
    assert export_main(["onnx", str(tmp_path / "missing.onnx")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_model_flag_given_an_onnx_file_says_how_to_convert(tmp_path, capsys):
    from npcam.cli import main

    (tmp_path / "small.onnx").write_bytes(onnx_bytes(models.mlp_head(), (1, 3, SIZE, SIZE)))
    assert main(["-m", str(tmp_path / "small.onnx"), str(PHOTOS[0])]) == 2
    err = capsys.readouterr().err
    assert f"npcam-export onnx {tmp_path / 'small.onnx'} --out DIR" in err and len(err.strip().splitlines()) == 1


def test_onnx_route_imports_no_torch(tmp_path):
    """`npcam-export onnx` runs where torch cannot be imported."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "m.onnx").write_bytes(onnx_bytes(models.convnextish(), (1, 3, SIZE, SIZE)))
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "export", "onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert npcam.load(tmp_path / "b").head.kind == "graph"
