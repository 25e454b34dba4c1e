"""Bundle format 4: heads that start at a spatial map or at tokens, with side inputs, written by
npcam.bundle.write and run by npcam.Model (no torch, no exporter).

The references are independent of npcam's head engine: the trunk runs in its own onnxruntime session and the
head (affine on a flattened map, or on the mean of tokens plus a residual) is computed here in NumPy.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import synthetic_image, tiny_trunk
from onnx import TensorProto, helper, numpy_helper

import npcam
from npcam import bundle
from npcam.errors import NpcamError
from npcam.head import GraphHead, Op

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

CLASSES = 5
META = {"arch": "tiny", "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "fixed_size": True}
# float32 trunk outputs, heads computed in float64 both sides: only the trunk's float32 values are shared.
TOLERANCE = 1e-5


def token_trunk(channels: int = 6, patch: int = 8, seed: int = 0) -> bytes:
    """image [N,3,32,32] -> patch embedding -> tokens [N,17,C]: a "CLS" (the patches' mean) then the 16 patch
    tokens, as ``features``; ``resid`` = Relu(features) as a side output."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.2, (channels, 3, patch, patch)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([0, channels, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["embed"], strides=[patch, patch]),
        helper.make_node("Reshape", ["embed", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["patches"], perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["patches"], ["cls"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["cls", "patches"], ["features"], axis=1),
        helper.make_node("Relu", ["features"], ["resid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 17, channels]) for n in ("features", "resid")],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def trunk_outputs(trunk: bytes, x: np.ndarray, names) -> list[np.ndarray]:
    return ort.InferenceSession(trunk, providers=["CPUExecutionProvider"]).run(list(names), {"image": x})


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    """tiny_trunk (8, 16): features [N,16,8,8] at 32 px; head Flatten -> Gemm over the whole map."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.1, (CLASSES, 16 * 8 * 8)).astype(np.float32)
    bias = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    ops = [Op("Flatten", ("A",), "flat", {"axis": 1}), Op("Gemm", ("flat", "w", "b"), "scores", {"transB": 1})]
    head = GraphHead(ops, {"w": weight, "b": bias}, [-1, 16, 8, 8], "A", "scores", layout="spatial")
    trunk = tiny_trunk((8, 16))
    out = tmp_path_factory.mktemp("spatial") / "b"
    out.mkdir()
    bundle.write(out, trunk, head, [f"c{i}" for i in range(CLASSES)], {**META, "stride": 4, "layer": "relu1"})
    return out, trunk, weight, bias


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """token_trunk: head (tokens + resid) -> mean over the 17 tokens -> Gemm; one prefix token, a 4x4 grid."""
    rng = np.random.default_rng(4)
    weight = rng.normal(0, 0.5, (CLASSES, 6)).astype(np.float32)
    bias = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    ops = [
        Op("Add", ("T", "resid"), "sum"),
        Op("ReduceMean", ("sum",), "mean", {"axes": [1], "keepdims": 0}),
        Op("Gemm", ("mean", "w", "b"), "scores", {"transB": 1}),
    ]
    head = GraphHead(
        ops, {"w": weight, "b": bias}, [-1, 17, 6], "T", "scores",
        sides={"resid": [-1, 17, 6]}, layout="tokens", grid=(4, 4), prefix=1, precision="float32",
    )  # fmt: skip
    trunk = token_trunk()
    out = tmp_path_factory.mktemp("tokens") / "b"
    out.mkdir()
    bundle.write(out, trunk, head, [f"c{i}" for i in range(CLASSES)], {**META, "stride": 8, "layer": "blocks.0.norm1"})
    return out, trunk, weight, bias


def test_spatial_bundle_round_trip_and_scores(spatial):
    out, trunk, weight, bias = spatial
    spec = json.loads((out / "head.json").read_text())
    assert spec["layout"] == "spatial" and spec["precision"] == "float64" and "sides" not in spec
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["format_version"] == 5 and meta["layer"] == "relu1" and meta["channels"] == 16
    model = npcam.load(out)
    assert model.bundle.layer == "relu1" and model.head.layout == model.bundle.layout == "spatial"
    pred = model.predict(synthetic_image(32, 32))
    (features,) = trunk_outputs(trunk, pred.input, ["features"])
    want = features.reshape(1, -1).astype(np.float64) @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(pred.logits, want[0], rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_array_equal(pred.features, features[0])
    assert pred.head_input.shape == (1, 16, 8, 8) and pred.sides == {}
    # The map's gradient is the FC row laid on the map: position dependent, unlike a pooled head's.
    grad = model.probe(pred, [1, 3]).gradient()
    assert grad.shape == (2, 16, 8, 8) and grad.dtype == np.float64
    np.testing.assert_allclose(grad, weight[[1, 3]].reshape(2, 16, 8, 8), rtol=1e-6)
    np.testing.assert_array_equal(model.from_grid(pred.features[None], pred.head_input), pred.features[None])
    np.testing.assert_allclose(model.head_scores(pred.head_input, {}), pred.logits[None], rtol=1e-6)


def test_token_bundle_round_trip_and_scores(tokens):
    out, trunk, weight, bias = tokens
    spec = json.loads((out / "head.json").read_text())
    assert (spec["layout"], spec["grid"], spec["prefix"], spec["precision"]) == ("tokens", [4, 4], 1, "float32")
    assert spec["sides"] == {"resid": [-1, 17, 6]}
    model = npcam.load(out)
    head = model.head
    assert (head.layout, head.grid, head.prefix, head.precision) == ("tokens", (4, 4), 1, "float32")
    assert model.bundle.layer == "blocks.0.norm1" and model.bundle.meta["channels"] == 6
    images = [synthetic_image(32, 32, seed) for seed in (0, 1)]
    preds = model.predict(images)
    batch = np.concatenate([p.input for p in preds])
    features, resid = trunk_outputs(trunk, batch, ["features", "resid"])
    layer, sides = model.trunk(batch)
    np.testing.assert_array_equal(layer, features)
    np.testing.assert_array_equal(sides["resid"], resid)
    want = (features + resid).astype(np.float64).mean(axis=1) @ weight.T.astype(np.float64) + bias
    # float32 head: its rounding, relative to the scores' size
    np.testing.assert_allclose(np.stack([p.logits for p in preds]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.scores(batch), want, rtol=1e-5, atol=1e-5)
    for j, pred in enumerate(preds):
        # The grid: the 16 patch tokens row-major, channels first; the prefix token is not on it.
        np.testing.assert_array_equal(pred.features, features[j, 1:].reshape(4, 4, 6).transpose(2, 0, 1))
        np.testing.assert_array_equal(pred.head_input, features[j : j + 1])
        np.testing.assert_array_equal(pred.sides["resid"], resid[j : j + 1])
        np.testing.assert_array_equal(model.from_grid(pred.features[None], pred.head_input), pred.head_input)
    # Sides constant: d score_c / d token = W_c / 17 at every token; the CLS token's share is dropped.
    grad = model.probe(preds[0], [0, 2]).gradient()
    assert grad.shape == (2, 6, 4, 4) and grad.dtype == np.float64
    np.testing.assert_allclose(grad, np.broadcast_to(weight[[0, 2], :, None, None] / 17, grad.shape), rtol=1e-6)
    # from_grid keeps like's prefix token for every map of a batch, and the head scores them.
    maps = np.random.default_rng(0).standard_normal((3, 6, 4, 4)).astype(np.float32)
    x = model.from_grid(maps, preds[0].head_input)
    assert x.shape == (3, 17, 6)
    np.testing.assert_array_equal(x[:, 0], np.repeat(features[:1, 0], 3, axis=0))
    np.testing.assert_array_equal(model.to_grid(x), maps)
    scored = model.head_scores(x, preds[0].sides)
    want = (x + resid[:1]).astype(np.float64).mean(axis=1) @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(scored, want, rtol=1e-5, atol=1e-5)


def test_pooled_bundles_of_format_3_keep_loading(tmp_path, tiny_model):
    """A graph head without the format-4 keys is a pooled head; from_grid pools; the probe's gradient spreads G / hw."""
    rng = np.random.default_rng(5)
    weight = rng.normal(0, 0.5, (CLASSES, 512)).astype(np.float32)
    ops = [Op("Flatten", ("p",), "flat", {"axis": 1}), Op("Gemm", ("flat", "w"), "scores", {"transB": 1})]
    head = GraphHead(ops, {"w": weight}, [-1, 512, 1, 1], "p", "scores")
    out = tmp_path / "b"
    out.mkdir()
    bundle.write(out, tiny_model.bundle.trunk, head, [f"c{i}" for i in range(CLASSES)], {**META, "input_size": 64})
    spec = json.loads((out / "head.json").read_text())
    for key in ("layout", "precision"):
        del spec[key]
    (out / "head.json").write_text(json.dumps(spec))
    meta = json.loads((out / "bundle.json").read_text())
    meta["format_version"] = 3
    meta["files"]["head.json"] = hashlib.sha256((out / "head.json").read_bytes()).hexdigest()
    (out / "bundle.json").write_text(json.dumps(meta))
    model = npcam.load(out)
    assert model.head.layout == "pooled" and model.bundle.layer == "features"
    pred = model.predict(synthetic_image(64, 64))
    np.testing.assert_allclose(pred.head_input, pred.features.mean(axis=(1, 2))[None], rtol=1e-6)
    np.testing.assert_allclose(pred.logits, pred.features.mean(axis=(1, 2)) @ weight.T, rtol=1e-5, atol=1e-6)
    grad = model.probe(pred, [2]).gradient()
    np.testing.assert_allclose(grad[0], np.broadcast_to(weight[2, :, None, None] / 4, (512, 2, 2)), rtol=1e-6)
    np.testing.assert_allclose(model.from_grid(pred.features[None], pred.head_input), pred.head_input, rtol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layout": "ring"}, "layout 'ring' is not one of pooled, spatial, tokens"),
        ({"grid": [4, 5]}, r"prefix 1 \+ grid \[4, 5\] \(20 patch tokens\) is not the 17 tokens"),
        ({"grid": None}, "a token head needs grid"),
        ({"prefix": 2}, "is not the 17 tokens"),
        ({"precision": "float16"}, "precision 'float16' is not one of"),
        ({"sides": {"features": [-1, 17, 6]}}, "side input 'features' has the name of"),
    ],
)
def test_bad_format_4_keys_are_named(tokens, tmp_path, change, message):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(tokens[0], out)
    spec = {**json.loads((out / "head.json").read_text()), **change}
    (out / "head.json").write_text(json.dumps(spec))
    meta = json.loads((out / "bundle.json").read_text())
    meta["files"]["head.json"] = hashlib.sha256((out / "head.json").read_bytes()).hexdigest()
    (out / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(NpcamError, match=message) as e:
        npcam.load(out)
    assert "head.json" in str(e.value) and "\n" not in str(e.value)


def test_trunk_without_the_side_output_is_refused(tokens, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(tokens[0], out)
    model = onnx.load(str(out / "trunk.onnx"))
    del model.graph.output[1]
    (out / "trunk.onnx").write_bytes(model.SerializeToString())
    meta = json.loads((out / "bundle.json").read_text())
    meta["files"]["trunk.onnx"] = hashlib.sha256((out / "trunk.onnx").read_bytes()).hexdigest()
    (out / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(NpcamError, match="has no output 'resid' \\(a side input\\)"):
        npcam.load(out)
