"""The NumPy head engine (npcam.head) and heads written directly as ONNX graphs.

Every op's vector-Jacobian product is checked against central finite
differences in float64. The ONNX graphs cover what torch does not emit: Gemm
with transB=0, an AveragePool over the whole map, BatchNormalization after the
pooling, ReduceMean with its axes as an input (opset 18), and Paddle's
dynamic flatten (Shape -> Slice -> Concat -> Reshape).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTOS, record
from onnx import TensorProto, helper, numpy_helper

import npcam
from export.__main__ import main as export_main
from export.api import run_onnx
from npcam.head import OPS, GraphHead, Op

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def static_shapes_are_the_computed_ones(monkeypatch):
    """For every head these tests build or load: the shapes inferred statically at load (which bound what a
    hostile head.json can make npcam allocate) are exactly the shapes the forward computes."""
    build = GraphHead.__init__

    def checked(self, *args, **kwargs):
        build(self, *args, **kwargs)
        zeros = {name: np.zeros((1, *shape[1:])) for name, shape in self.inputs.items()}
        computed = {name: value.shape for name, value in self._run(zeros).items()}
        assert computed == {name: self.shapes[name] for name in computed}

    monkeypatch.setattr(GraphHead, "__init__", checked)


def finite_difference(head: GraphHead, pooled: np.ndarray, classes, step=1e-6) -> np.ndarray:
    grads = np.zeros((len(classes), pooled.size))
    for k in range(pooled.size):
        up, down = pooled.copy(), pooled.copy()
        up[k] += step
        down[k] -= step
        diff = head.forward_float64(up[None])[0] - head.forward_float64(down[None])[0]
        grads[:, k] = diff[classes] / (2 * step)
    return grads


C = 6
UNARY = {
    "Relu": {}, "LeakyRelu": {"alpha": 0.1}, "Clip": {"min": -0.5, "max": 0.7}, "HardSigmoid": {"alpha": 1 / 6, "beta": 0.5},
    "HardSwish": {}, "Sigmoid": {}, "Tanh": {}, "Erf": {}, "Gelu": {}, "Neg": {},
    "Elu": {"alpha": 0.8}, "Softplus": {}, "Exp": {}, "Abs": {},
}  # fmt: skip


def one_op_head(
    op: str, attrs: dict | None = None, extra: tuple[str, ...] = (), arrays=None, shape=(-1, C)
) -> GraphHead:
    """pooled -> op -> Gemm to 3 classes (so that each op is tested inside a head)."""
    arrays = dict(arrays or {})
    arrays["w"] = RNG.standard_normal((3, C))
    ops = [
        Op(op, ("pooled", *extra), "t", attrs or {}),
        Op("Flatten", ("t",), "u", {"axis": 1}),
        Op("Gemm", ("u", "w"), "scores", {"transB": 1}),
    ]
    return GraphHead(ops, arrays, shape)


def away_from_kinks(n=C) -> np.ndarray:
    x = RNG.uniform(-4, 4, n)
    for kink in (-3, -0.5, 0, 0.7, 3):  # finite differences straddling a kink are meaningless
        x[np.abs(x - kink) < 1e-3] += 0.01
    return x


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_op_gradient(op):
    head = one_op_head(op, UNARY[op])
    p = away_from_kinks()
    np.testing.assert_allclose(head.gradient(p, [0, 1, 2]), finite_difference(head, p, [0, 1, 2]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min"])
def test_binary_op_with_a_constant(op):
    const = RNG.uniform(0.5, 2.0, C) if op != "Pow" else np.array(2.0)
    head = one_op_head(op, extra=("k",), arrays={"k": const})
    p = RNG.uniform(0.5, 2.0, C) if op != "PRelu" else RNG.uniform(-2, 2, C)
    if op in ("Max", "Min"):  # some channels on each side of the constant, none at a tie
        p = const + np.where(np.arange(C) % 2, 0.3, -0.3)
    np.testing.assert_allclose(head.gradient(p, [0, 2]), finite_difference(head, p, [0, 2]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["Add", "Mul", "Div", "Sub"])
def test_binary_op_of_two_computed_tensors_with_broadcasting(op):
    # t = op(sigmoid(p) [N,C], mean_c(p) [N,1]): both sides depend on p; the second broadcasts.
    ops = [
        Op("Sigmoid", ("pooled",), "a"),
        Op("ReduceMean", ("pooled",), "m", {"axes": [1], "keepdims": 1}),
        Op("Add", ("m", "three"), "b"),
        Op(op, ("a", "b"), "t"),
        Op("Gemm", ("t", "w"), "scores", {"transB": 1}),
    ]
    head = GraphHead(ops, {"w": RNG.standard_normal((3, C)), "three": np.array(3.0)}, (-1, C))
    p = RNG.uniform(-1, 1, C)
    np.testing.assert_allclose(head.gradient(p, [0, 1, 2]), finite_difference(head, p, [0, 1, 2]), rtol=1e-5, atol=1e-7)


def test_linear_algebra_and_normalization_ops():
    ops = [
        Op("Conv", ("pooled", "cw", "cb"), "a"),  # 1x1 conv on the 1x1 pooled map
        Op("BatchNormalization", ("a", "g", "b", "mu", "var"), "b1", {"epsilon": 1e-3}),
        Op("HardSwish", ("b1",), "b2"),
        Op("Transpose", ("b2",), "b3", {"perm": [0, 2, 3, 1]}),
        Op("Reshape", ("b3",), "c", {"shape": [0, -1]}),
        Op("LayerNormalization", ("c", "lg", "lb"), "d", {"axis": -1, "epsilon": 1e-5}),
        Op("Unsqueeze", ("d",), "e", {"axes": [2]}),
        Op("Squeeze", ("e",), "f", {"axes": [2]}),
        Op("MatMul", ("f", "m"), "g1"),
        Op("Pow", ("g1", "two"), "g2"),
        Op("Add", ("g2", "one"), "g3"),
        Op("Sqrt", ("g3",), "g4"),
        Op("Gemm", ("g4", "w", "wb"), "scores", {"alpha": 0.5, "beta": 2.0, "transB": 0}),
    ]
    arrays = {
        "cw": RNG.standard_normal((8, C, 1, 1)), "cb": RNG.standard_normal(8),
        "g": RNG.uniform(0.5, 1.5, 8), "b": RNG.standard_normal(8), "mu": RNG.standard_normal(8), "var": RNG.uniform(0.5, 2, 8),
        "lg": RNG.uniform(0.5, 1.5, 8), "lb": RNG.standard_normal(8), "m": RNG.standard_normal((8, 5)),
        "two": np.array(2.0), "one": np.array(1.0), "w": RNG.standard_normal((5, 4)), "wb": RNG.standard_normal(4),
    }  # fmt: skip
    head = GraphHead(ops, arrays, (-1, C, 1, 1))
    p = RNG.uniform(-1, 1, C)
    np.testing.assert_allclose(head.gradient(p, [0, 1, 3]), finite_difference(head, p, [0, 1, 3]), rtol=1e-5, atol=1e-7)
    assert head.classes == 4 and set(OPS) >= {op.op for op in ops}


def test_reductions_expand_and_log():
    """F.normalize's ops (ReduceL2, Clip, Expand, Div), ReduceSum with and without keepdims, Log."""
    ops = [
        Op("ReduceL2", ("pooled",), "n", {"axes": [1], "keepdims": 1}),
        Op("Clip", ("n",), "n1", {"min": 1e-12}),
        Op("Expand", ("n1",), "n2", {"shape": [1, C]}),
        Op("Div", ("pooled", "n2"), "u"),
        Op("ReduceSum", ("pooled",), "s", {"axes": [1], "keepdims": 0}),
        Op("Unsqueeze", ("s",), "s1", {"axes": [1]}),
        Op("Mul", ("u", "s1"), "v"),
        Op("Softplus", ("v",), "v1"),
        Op("Log", ("v1",), "v2"),
        Op("Gemm", ("v2", "w"), "scores", {"transB": 1}),
    ]
    head = GraphHead(ops, {"w": RNG.standard_normal((3, C))}, (-1, C))
    p = RNG.uniform(-1, 1, C)
    np.testing.assert_allclose(head.gradient(p, [0, 1, 2]), finite_difference(head, p, [0, 1, 2]), rtol=1e-5, atol=1e-7)
    assert head.forward(p[None]).shape == (1, 3) and head.forward(np.vstack([p, p])).shape == (2, 3)


def test_head_batches_like_single_samples():
    head = one_op_head("HardSwish")
    p = RNG.standard_normal((5, C))
    np.testing.assert_array_equal(head.forward(p), np.vstack([head.forward(row[None]) for row in p]))


# Heads written as ONNX graphs, exported with `npcam-export onnx`

K = 5
CONV_W = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5
CONV_B = RNG.standard_normal(8).astype(np.float32) * 0.1


def graph_model(head_nodes, head_inits, *, input_shape=("N", 3, 32, 32), trunk_extra=(), trunk_inits=(), opset=17,
                inputs=None, scores="y"):  # fmt: skip
    """A small trunk (3x3 conv, stride 4, ReLU: 32x32 -> [N,8,8,8] as 'f') and the given head nodes."""
    trunk = [
        helper.make_node(
            "Conv", ["x", "conv_w", "conv_b"], ["c"], strides=[4, 4], pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["c"], ["f0" if trunk_extra else "f"]),
        *trunk_extra,
    ]
    inits = [numpy_helper.from_array(CONV_W, "conv_w"), numpy_helper.from_array(CONV_B, "conv_b"), *trunk_inits]
    inits += [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else np.int64), k)
              for k, v in head_inits.items()]  # fmt: skip
    graph = helper.make_graph(
        trunk + head_nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(scores, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def features_of(image: np.ndarray) -> torch.Tensor:
    """The trunk above in torch: [1,8,h,w] from a network input."""
    return torch.relu(
        F.conv2d(torch.from_numpy(image), torch.from_numpy(CONV_W), torch.from_numpy(CONV_B), stride=4, padding=1)
    )


def export_graph(model, tmp_path, *args) -> npcam.Model:
    import onnx

    onnx.save(model, tmp_path / "m.onnx")
    return npcam.load(run_onnx(tmp_path / "m.onnx", tmp_path / "b", *args))


def check_cam(model: npcam.Model, weight: np.ndarray):
    """npcam's CAM on the photos equals relu(W_c . A)/max with the torch trunk's features and the given W."""
    for photo in PHOTOS:
        pred = model.predict(photo)
        f = features_of(pred.input)[0].double()
        want = torch.relu(torch.einsum("k,khw->hw", torch.from_numpy(weight[pred.top1]).double(), f))
        want = (want / want.max()).numpy()
        assert record("ONNX-graph head CAM, abs", np.abs(model.cam(pred) - want).max()) <= 1e-5, photo.name


def test_gemm_with_untransposed_weights(tmp_path):
    b = RNG.standard_normal((8, K)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["f"], ["p"]), helper.make_node("Flatten", ["p"], ["q"]),
             helper.make_node("Gemm", ["q", "B", "bias"], ["y"], transB=0)]  # fmt: skip
    model = export_graph(graph_model(nodes, {"B": b, "bias": np.arange(K) * 0.1}), tmp_path, None, None, None, 32)
    assert model.head.kind == "affine" and model.bundle.input_size == (32, 32)
    np.testing.assert_allclose(model.head.weight, b.T, rtol=1e-6)
    check_cam(model, b.T)


def test_average_pool_over_the_whole_map_and_a_fixed_size_trunk(tmp_path, capsys):
    w = RNG.standard_normal((K, 8)).astype(np.float32)
    position = RNG.standard_normal((1, 8, 8, 8)).astype(np.float32) * 0.1  # a learned bias per position: fixes the size
    trunk_extra = [helper.make_node("Add", ["f0", "pos"], ["f"])]
    nodes = [helper.make_node("AveragePool", ["f"], ["p"], kernel_shape=[8, 8]), helper.make_node("Flatten", ["p"], ["q"]),
             helper.make_node("Gemm", ["q", "W"], ["y"], transB=1)]  # fmt: skip
    onnx_model = graph_model(nodes, {"W": w}, input_shape=(1, 3, 32, 32), trunk_extra=trunk_extra,
                             trunk_inits=[numpy_helper.from_array(position, "pos")])  # fmt: skip
    model = export_graph(onnx_model, tmp_path)
    assert model.bundle.fixed_size and model.bundle.input_size == (32, 32) and model.head.kind == "affine"
    np.testing.assert_allclose(model.head.weight, w, rtol=1e-6)
    from npcam.cli import main

    for option in (["--size", "64"], ["--keep-aspect"]):
        capsys.readouterr()
        assert main(["-m", str(tmp_path / "b"), str(PHOTOS[0]), "-o", str(tmp_path / "o.jpg"), *option]) == 2
        err = capsys.readouterr().err
        assert "takes only 32x32 inputs" in err and option[0] in err and len(err.strip().splitlines()) == 1
    assert main(["-m", str(tmp_path / "b"), str(PHOTOS[0]), "-o", str(tmp_path / "o.jpg")]) == 0


def test_batch_normalization_after_the_pooling_folds_exactly(tmp_path):
    w = RNG.standard_normal((K, 8)).astype(np.float32)
    gamma, beta = RNG.uniform(0.5, 1.5, 8), RNG.standard_normal(8)
    mean, var = RNG.standard_normal(8), RNG.uniform(0.5, 2, 8)
    nodes = [
        helper.make_node("GlobalAveragePool", ["f"], ["p"]),
        helper.make_node("Flatten", ["p"], ["q"]),
        helper.make_node("BatchNormalization", ["q", "g", "b", "m", "v"], ["r"], epsilon=1e-3),  # on [N, C]
        helper.make_node("Mul", ["r", "two"], ["s"]),
        helper.make_node("Gemm", ["s", "W"], ["y"], transB=1),
    ]
    model = export_graph(graph_model(nodes, {"W": w, "g": gamma, "b": beta, "m": mean, "v": var, "two": 2.0}), tmp_path)
    scale = gamma / np.sqrt(var + 1e-3)
    folded = 2 * w * scale
    np.testing.assert_allclose(model.head.weight, folded, rtol=1e-5)
    np.testing.assert_allclose(model.head.bias, 2 * w @ (beta - mean * scale), rtol=1e-5, atol=1e-6)
    check_cam(model, folded)


def test_reduce_mean_with_axes_as_an_input(tmp_path):
    """Opset 18's ReduceMean takes its axes as an input, keepdims=0 gives [N, C] directly."""
    w = RNG.standard_normal((8, K)).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["f", "axes"], ["p"], keepdims=0), helper.make_node("MatMul", ["p", "W"], ["z"]),
             helper.make_node("Add", ["z", "bias"], ["y"])]  # fmt: skip
    model = export_graph(graph_model(nodes, {"W": w, "axes": np.array([2, 3]), "bias": np.ones(K)}, opset=18), tmp_path)
    np.testing.assert_allclose(model.head.weight, w.T, rtol=1e-6)
    check_cam(model, w.T)


def paddle_like_head():
    """PP-LCNet's ending: GAP -> 1x1 Conv -> HardSwish -> Dropout as a Mul -> dynamic Flatten -> MatMul + Add -> Softmax."""
    arrays = {
        "cw": RNG.standard_normal((16, 8, 1, 1)) * 0.5, "cb": RNG.standard_normal(16) * 0.1, "keep": np.float32(0.8),
        "W": RNG.standard_normal((16, K)), "bias": RNG.standard_normal(K) * 0.1,
        "zero": np.array([0]), "one": np.array([1]), "minus_one": np.array([-1]),
    }  # fmt: skip
    nodes = [
        helper.make_node("GlobalAveragePool", ["f"], ["p"]),
        helper.make_node("Conv", ["p", "cw", "cb"], ["h"], kernel_shape=[1, 1]),
        helper.make_node("HardSwish", ["h"], ["hs"]),
        helper.make_node("Mul", ["hs", "keep"], ["d"]),
        helper.make_node("Shape", ["d"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["d", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["z"]),
        helper.make_node("Add", ["z", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    return nodes, arrays


def test_paddle_style_head_gives_torch_autograd_gradcam(tmp_path):
    nodes, arrays = paddle_like_head()
    model = export_graph(graph_model(nodes, arrays, opset=15), tmp_path)
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert model.head.kind == "graph" and meta["output"] == "probabilities"
    ops = [op.op for op in model.head.ops]
    assert "Shape" not in ops and "Concat" not in ops and "Reshape" in ops  # the shape arithmetic was folded
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    for photo in PHOTOS:
        pred = model.predict(photo)
        features = features_of(pred.input).requires_grad_(True)
        hidden = F.hardswish(F.conv2d(features.mean(dim=(2, 3), keepdim=True), t["cw"], t["cb"])) * t["keep"]
        logits = hidden.flatten(1) @ t["W"] + t["bias"]
        np.testing.assert_allclose(pred.probs, torch.softmax(logits, 1)[0].detach().numpy(), atol=1e-6)
        logits[0, pred.top1].backward()
        cam = torch.relu((features.grad.mean(dim=(2, 3), keepdim=True) * features).sum(1))[0].detach()
        want = (cam / cam.max()).numpy()
        assert record("Paddle-style head Grad-CAM, abs", np.abs(model.cam(pred) - want).max()) <= 1e-5, photo.name


def test_cam_on_a_graph_head_is_explained_in_one_line(tmp_path):
    nodes, arrays = paddle_like_head()
    model = export_graph(graph_model(nodes, arrays, opset=15), tmp_path)
    with pytest.raises(npcam.NpcamError, match=r"CAM is defined only there\); .* use gradcam"):
        model.cam(PHOTOS[0], method="cam")


@pytest.mark.parametrize(
    "case, message",
    [
        ("unsupported op", "uses the op Cos"),
        ("two inputs", "2 inputs"),
        ("integer input", "not float32"),
        ("no spatial tensor", "'x' is the model's input: there is no trunk before it"),
    ],
)
def test_graphs_npcam_cannot_explain_are_refused_in_one_line(case, message, tmp_path, capsys):
    import onnx

    w = RNG.standard_normal((K, 8)).astype(np.float32)
    head = [helper.make_node("GlobalAveragePool", ["f"], ["p"]), helper.make_node("Flatten", ["p"], ["q"]),
            helper.make_node("Gemm", ["q", "W"], ["y"], transB=1)]  # fmt: skip
    inputs = None
    if case == "unsupported op":
        head = head[:2] + [helper.make_node("Cos", ["q"], ["r"]), helper.make_node("Gemm", ["r", "W"], ["y"], transB=1)]
    elif case == "two inputs":
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32]),
                  helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1])]  # fmt: skip
    elif case == "integer input":
        inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 32, 32])]
    elif case == "no spatial tensor":  # an MLP on the image itself (a Flatten of a map is a spatial head now)
        w = RNG.standard_normal((K, 3 * 32 * 32)).astype(np.float32)
        head = [helper.make_node("Flatten", ["x"], ["q"]), helper.make_node("Gemm", ["q", "W"], ["y"], transB=1)]
    onnx.save(graph_model(head, {"W": w}, inputs=inputs), tmp_path / "m.onnx")
    assert export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_trunk_that_takes_one_image_at_a_time(tmp_path):
    """A Reshape with a constant batch of 1 inside the trunk: the bundle keeps batch 1 and npcam loops."""
    w = RNG.standard_normal((K, 8)).astype(np.float32)
    trunk_extra = [
        helper.make_node("Reshape", ["f0", "flat"], ["g"]),
        helper.make_node("Reshape", ["g", "back"], ["f"]),
    ]
    shapes = [
        numpy_helper.from_array(np.array([1, 8, 64]), "flat"),
        numpy_helper.from_array(np.array([1, 8, 8, 8]), "back"),
    ]
    nodes = [helper.make_node("GlobalAveragePool", ["f"], ["p"]), helper.make_node("Flatten", ["p"], ["q"]),
             helper.make_node("Gemm", ["q", "W"], ["y"], transB=1)]  # fmt: skip
    model = export_graph(graph_model(nodes, {"W": w}, input_shape=(1, 3, 32, 32), trunk_extra=trunk_extra,
                                     trunk_inits=shapes), tmp_path)  # fmt: skip
    assert model.session.get_inputs()[0].shape[0] == 1 and model.bundle.fixed_size
    preds = model.predict(PHOTOS)  # three images, one trunk call each
    assert len(preds) == len(PHOTOS)
    for photo, pred in zip(PHOTOS, preds):
        np.testing.assert_allclose(pred.logits, model.predict(photo).logits, rtol=1e-6)


def test_quantize_and_dequantize_match_onnxruntime():
    """QuantizeLinear/DequantizeLinear (uint8 and int8, per tensor and per channel) as onnxruntime computes them:
    half-way values round to even, values outside the range clip."""
    import onnxruntime as ort

    from npcam.head import dequantize, quantize

    x = np.concatenate([RNG.uniform(-3, 3, 30), [0.05, 0.15, 0.25, -0.05, 100.0, -100.0]]).astype(np.float32)
    x = x.reshape(1, 6, 6)
    for zero_point, scale in ((np.uint8(128), np.float32(0.1)), (np.array([0, 3, -3, 1, 0, 2], np.int8), None)):
        scale = RNG.uniform(0.05, 0.2, 6).astype(np.float32) if scale is None else scale
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]  # fmt: skip
        graph = helper.make_graph(
            nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.asarray(scale), "s"), numpy_helper.from_array(np.asarray(zero_point), "z")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        got = dequantize(quantize(x.astype(np.float64), scale, zero_point), scale, zero_point)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
