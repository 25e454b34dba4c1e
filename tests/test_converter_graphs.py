"""ONNX graphs as converters write them, exported through the ONNX route and checked against the graph itself.

Each graph is written with ``onnx.helper`` in the shape a converter gives it:

- **keras-tf1** (tf2onnx from a TF1-era Keras graph): NHWC input of a fixed
  batch of 1, Transpose -> Conv, BatchNorm written as ``If`` on
  ``keras_learning_phase`` whose branches read outer tensors without listing
  them (captured), the training branch computing batch statistics with
  ReduceMean(axes=[0,2,3]) (also at top level: a decoy, not a pooling), a
  Dropout ``If`` after the pooling, Identity/Cast chains, and the head
  ReduceMean(axes=[1,2], keepdims=0) -> MatMul -> Add -> Softmax. The
  condition comes as a Constant node through an Identity, or as an
  initializer that is also listed as a graph input (as older converters do).
- **tf-cond-trunk**: an ``If`` whose condition depends on the data (``tf.cond``)
  inside the trunk: it cannot be inlined, and the cut trunk must keep its
  captured tensors.
- **identity-cast** (NCHW, dynamic batch): GlobalAveragePool and Gemm with
  Identity and float Cast nodes between every step, after the Softmax too.

The reference is the original graph in onnxruntime: its probabilities for
the same network input, and the paper's CAM from its own feature map (the
pooling's input, an extra output of the original graph) times the FC weights.
Tolerances: probabilities within 1e-4 absolute, maps within 1e-4 of the
reference map (max-normalized), as for every other family: both sides run the
same float32 convolutions, so anything above float32 rounding (~1e-6) is a
wrong branch, weight or channel order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import PHOTOS, REPO, record
from onnx import TensorProto, helper, numpy_helper

import npcam
from export.__main__ import main as export_main
from export.api import run_onnx

RNG = np.random.default_rng(17)
K = 6  # classes
EPS = 1e-3


def _t(name: str, value) -> onnx.TensorProto:
    value = np.asarray(value)
    return numpy_helper.from_array(value.astype(np.float32) if value.dtype.kind == "f" else value, name)


def _bn(prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}/gamma": RNG.uniform(0.5, 1.5, c),
        f"{prefix}/beta": RNG.uniform(-0.2, 0.2, c),
        f"{prefix}/moving_mean": RNG.uniform(-0.2, 0.2, c),
        f"{prefix}/moving_variance": RNG.uniform(0.5, 2.0, c),
    }


def bn_if(prefix: str, x: str, out: str, stats: str | None = None) -> onnx.NodeProto:
    """Keras' BatchNormalization as tf2onnx writes it: If(learning phase), both branches capturing ``x``.

    The training branch normalizes with the batch's statistics (ReduceMean over axes 0, 2, 3: the
    batch and the map), or with ``stats``, a top-level mean it captures; the inference branch uses
    the moving averages.
    """
    g, b, m, v = (f"{prefix}/{k}" for k in ("gamma", "beta", "moving_mean", "moving_variance"))
    mean = stats or f"{prefix}/batch_mean"
    training = [
        *([] if stats else [helper.make_node("ReduceMean", [x], [mean], axes=[0, 2, 3], keepdims=1)]),
        helper.make_node("Sub", [x, mean], [f"{prefix}/centered"]),
        helper.make_node("Mul", [f"{prefix}/centered", f"{prefix}/centered"], [f"{prefix}/sq"]),
        helper.make_node("ReduceMean", [f"{prefix}/sq"], [f"{prefix}/batch_var"], axes=[0, 2, 3], keepdims=1),
        helper.make_node("Add", [f"{prefix}/batch_var", f"{prefix}/eps"], [f"{prefix}/var_eps"]),
        helper.make_node("Sqrt", [f"{prefix}/var_eps"], [f"{prefix}/std"]),
        helper.make_node("Div", [f"{prefix}/centered", f"{prefix}/std"], [f"{prefix}/normed"]),
        helper.make_node("Reshape", [g, f"{prefix}/bshape"], [f"{prefix}/g4"]),
        helper.make_node("Reshape", [b, f"{prefix}/bshape"], [f"{prefix}/b4"]),
        helper.make_node("Mul", [f"{prefix}/normed", f"{prefix}/g4"], [f"{prefix}/scaled"]),
        helper.make_node("Add", [f"{prefix}/scaled", f"{prefix}/b4"], [f"{prefix}/train_out"]),
    ]
    then_branch = helper.make_graph(
        training,
        f"{prefix}/cond/then",
        [],
        [helper.make_tensor_value_info(f"{prefix}/train_out", TensorProto.FLOAT, None)],
        [_t(f"{prefix}/eps", np.array([EPS])), _t(f"{prefix}/bshape", np.array([1, -1, 1, 1], np.int64))],
    )
    else_branch = helper.make_graph(
        [helper.make_node("BatchNormalization", [x, g, b, m, v], [f"{prefix}/infer_out"], epsilon=EPS)],
        f"{prefix}/cond/else",
        [],
        [helper.make_tensor_value_info(f"{prefix}/infer_out", TensorProto.FLOAT, None)],
    )
    return helper.make_node(
        "If", ["keras_learning_phase:0"], [out], name=f"{prefix}/cond", then_branch=then_branch, else_branch=else_branch
    )


def dropout_if(x: str, out: str) -> onnx.NodeProto:
    """Keras' Dropout: If(learning phase): a random-mask stand-in when training, the captured ``x`` otherwise."""
    then_branch = helper.make_graph(
        [helper.make_node("Mul", [x, "dropout/mask"], ["dropout/masked"])],
        "dropout/cond/then",
        [],
        [helper.make_tensor_value_info("dropout/masked", TensorProto.FLOAT, None)],
        [_t("dropout/mask", (RNG.random(16) > 0.5) * 2.0)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [x], ["dropout/kept"])],
        "dropout/cond/else",
        [],
        [helper.make_tensor_value_info("dropout/kept", TensorProto.FLOAT, None)],
    )
    return helper.make_node(
        "If", ["keras_learning_phase:0"], [out], name="dropout/cond", then_branch=then_branch, else_branch=else_branch
    )


def keras_tf1(phase: str = "constant") -> tuple[onnx.ModelProto, dict]:
    """A small Keras CNN as tf2onnx writes a TF1 frozen graph (see the module docstring); and its facts."""
    w1 = RNG.standard_normal((8, 3, 3, 3)) * 0.4
    w2 = RNG.standard_normal((16, 8, 3, 3)) * 0.3
    fc = RNG.standard_normal((16, K))
    consts = {"conv1/kernel": w1, "conv2/kernel": w2, "dense/kernel": fc, "dense/bias": RNG.standard_normal(K) * 0.1}
    consts |= _bn("bn1", 8) | _bn("bn2", 16)
    nodes = []
    inits = [_t(k, v) for k, v in consts.items()]
    inputs = [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [1, 32, 32, 3])]
    if phase == "constant":
        nodes += [
            helper.make_node("Constant", [], ["keras_learning_phase/default"], value=_t("v", np.array(False))),
            helper.make_node("Identity", ["keras_learning_phase/default"], ["keras_learning_phase:0"]),
        ]
    else:  # an initializer that is also a graph input: a default value
        inits.append(_t("keras_learning_phase:0", np.array(False)))
        inputs.append(helper.make_tensor_value_info("keras_learning_phase:0", TensorProto.BOOL, []))
    nodes += [
        helper.make_node("Transpose", ["input_1:0"], ["conv1/nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["conv1/nchw", "conv1/kernel"], ["conv1/out"], strides=[2, 2], pads=[1, 1, 1, 1]),
        bn_if("bn1", "conv1/out", "bn1/out"),
        helper.make_node("Relu", ["bn1/out"], ["relu1"]),
        helper.make_node("Conv", ["relu1", "conv2/kernel"], ["conv2/out"], strides=[2, 2], pads=[1, 1, 1, 1]),
        # BatchNorm statistics at top level, over the batch and the map: a decoy, not a pooling.
        helper.make_node("ReduceMean", ["conv2/out"], ["bn2/moments/mean"], axes=[0, 2, 3], keepdims=1),
        bn_if("bn2", "conv2/out", "bn2/out", stats="bn2/moments/mean"),
        helper.make_node("Relu", ["bn2/out"], ["relu2"]),
        helper.make_node("Transpose", ["relu2"], ["relu2/nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Identity", ["relu2/nhwc"], ["features:0"]),
        helper.make_node("ReduceMean", ["features:0"], ["gap/Mean:0"], axes=[1, 2], keepdims=0),
        dropout_if("gap/Mean:0", "dropout/out"),
        helper.make_node("Cast", ["dropout/out"], ["dropout/cast"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["dropout/cast"], ["dense/in"]),
        helper.make_node("MatMul", ["dense/in", "dense/kernel"], ["dense/MatMul:0"]),
        helper.make_node("Add", ["dense/MatMul:0", "dense/bias"], ["dense/BiasAdd:0"]),
        helper.make_node("Softmax", ["dense/BiasAdd:0"], ["dense/Softmax:0"], axis=-1),
        helper.make_node("Identity", ["dense/Softmax:0"], ["Identity:0"]),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx", inputs, [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, [1, K])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model, {"features": "features:0", "nhwc": True, "fc": fc.T, "affine": True}


def tf_cond_trunk() -> tuple[onnx.ModelProto, dict]:
    """An NCHW net with a data-dependent If in the trunk (both branches capture the conv's output)."""
    w1 = RNG.standard_normal((8, 3, 3, 3)) * 0.4
    fc = RNG.standard_normal((K, 8))
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["conv/out"], ["relu"])],
        "then",
        [],
        [helper.make_tensor_value_info("relu", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["conv/out", "leak"], ["leaky"])],
        "else",
        [],
        [helper.make_tensor_value_info("leaky", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "conv/w"], ["conv/out"], strides=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
        helper.make_node("Greater", ["xmax", "threshold"], ["bright"]),
        helper.make_node("If", ["bright"], ["act"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc/w"], ["logits"], transB=1),
    ]
    inits = [_t("conv/w", w1), _t("fc/w", fc), _t("leak", np.array(0.1)), _t("threshold", np.array(-100.0))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"features": "act", "nhwc": False, "fc": fc, "affine": True, "size": 64}


def identity_cast() -> tuple[onnx.ModelProto, dict]:
    """GAP -> Flatten -> Gemm -> Softmax, with Identity and float Casts between all of them."""
    w1 = RNG.standard_normal((8, 3, 3, 3)) * 0.4
    fc = RNG.standard_normal((K, 8))
    chain = ["relu", "gap", "flat", "logits", "probs"]
    nodes = [
        helper.make_node("Conv", ["x", "conv/w"], ["conv"], strides=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
    ]
    ops = {"gap": "GlobalAveragePool", "flat": "Flatten", "logits": "Gemm", "probs": "Softmax"}
    for before, name in zip(chain, chain[1:]):
        nodes += [
            helper.make_node("Identity", [before], [f"{before}/id"]),
            helper.make_node("Cast", [f"{before}/id"], [f"{before}/cast"], to=TensorProto.FLOAT),
        ]
        extra = ["fc/w", "fc/b"] if name == "logits" else []
        nodes.append(
            helper.make_node(ops[name], [f"{before}/cast", *extra], [name], **({"transB": 1} if extra else {}))
        )
    nodes += [
        helper.make_node("Cast", ["probs"], ["probs/cast"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["probs/cast"], ["output"]),
    ]
    inits = [_t("conv/w", w1), _t("fc/w", fc), _t("fc/b", RNG.standard_normal(K) * 0.1)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"features": "relu", "nhwc": False, "fc": fc, "affine": True}


SHAPES = {
    "keras-tf1, learning phase a Constant": lambda: keras_tf1("constant"),
    "keras-tf1, learning phase an initializer input": lambda: keras_tf1("initializer"),
    "tf-cond in the trunk": tf_cond_trunk,
    "identity-cast chains": identity_cast,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_converter_graph_explained_as_its_own_graph_says(shape, tmp_path):
    model, facts = SHAPES[shape]()
    onnx.save(model, tmp_path / "m.onnx")
    bundle = npcam.load(run_onnx(tmp_path / "m.onnx", tmp_path / "b", input_size=facts.get("size", 32)))
    assert bundle.head.kind == "affine"
    np.testing.assert_allclose(bundle.head.weight, facts["fc"], rtol=1e-6)
    # The reference: the original graph, its feature map added as an output.
    with_features = onnx.ModelProto()
    with_features.CopyFrom(model)
    with_features.graph.output.append(helper.make_tensor_value_info(facts["features"], TensorProto.FLOAT, None))
    session = ort.InferenceSession(with_features.SerializeToString(), providers=["CPUExecutionProvider"])
    image = session.get_inputs()[0].name
    for photo in PHOTOS:
        pred = bundle.predict(photo)
        x = np.ascontiguousarray(pred.input.transpose(0, 2, 3, 1) if facts["nhwc"] else pred.input)
        out, features = session.run([model.graph.output[0].name, facts["features"]], {image: x})
        features = features[0].transpose(2, 0, 1) if facts["nhwc"] else features[0]
        probs = out[0] if shape != "tf-cond in the trunk" else npcam.cam.softmax(out[0].astype(np.float64))
        assert record(f"converter graph probabilities, abs ({shape})", np.abs(pred.probs - probs).max()) <= 1e-4
        for c in (pred.top1, (pred.top1 + 1) % K):
            want = np.maximum(np.einsum("k,khw->hw", facts["fc"][c].astype(np.float64), features), 0)
            want = want / want.max() if want.max() > 0 else want
            got = bundle.cam(pred, c)
            assert record(f"converter graph CAM, abs ({shape})", np.abs(got - want).max()) <= 1e-4, photo.name


def test_constant_learning_phase_ifs_are_gone_from_the_trunk(tmp_path):
    """The trunk holds the inference branch's BatchNormalization, no If and no batch-statistics ReduceMean."""
    model, _ = keras_tf1("constant")
    onnx.save(model, tmp_path / "m.onnx")
    out = run_onnx(tmp_path / "m.onnx", tmp_path / "b")
    trunk = onnx.load(str(out / "trunk.onnx"))
    ops = [n.op_type for n in trunk.graph.node]
    assert "If" not in ops and "ReduceMean" not in ops and ops.count("BatchNormalization") == 2, ops
    assert json.loads((out / "bundle.json").read_text())["layout"] == "NHWC"


def test_data_dependent_if_stays_in_the_trunk_with_what_it_captures(tmp_path):
    model, _ = tf_cond_trunk()
    onnx.save(model, tmp_path / "m.onnx")
    trunk = onnx.load(str(run_onnx(tmp_path / "m.onnx", tmp_path / "b") / "trunk.onnx"))
    assert [n.op_type for n in trunk.graph.node].count("If") == 1
    assert "leak" in {i.name for i in trunk.graph.initializer}  # read only inside the else branch


# True hints: --input-size only where another input size makes the pooling global


def avg_pool_model(kernel: int, input_shape) -> onnx.ModelProto:
    """Conv (3x3, stride 2) -> AveragePool(kernel, stride kernel) -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["f"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["f"], ["p"], kernel_shape=[kernel, kernel], strides=[kernel, kernel]),
        helper.make_node("Flatten", ["p"], ["q"]),
        helper.make_node("Gemm", ["q", "fc"], ["y"], transB=1),
    ]
    inits = [_t("w", RNG.standard_normal((4, 3, 3, 3))), _t("fc", RNG.standard_normal((K, 4)))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_local_pooling_of_a_fixed_size_model_gets_no_input_size_hint(tmp_path, capsys):
    """Fixed 32x32 input, AveragePool 2x2 over the 16x16 map: no input size can make it global."""
    onnx.save(avg_pool_model(2, (1, 3, 32, 32)), tmp_path / "m.onnx")
    assert export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "AveragePool (2x2 over the 16x16 map at 32 px) is a local pooling, not a global one" in err, err
    assert "--input-size" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_a_pooling_global_at_another_size_names_that_size_and_it_works(tmp_path, capsys):
    """Dynamic input, AveragePool 16x16 (the map at 32 px): at the default 224 px it is local; the hint names 32."""
    onnx.save(avg_pool_model(16, ("N", 3, "H", "W")), tmp_path / "m.onnx")
    assert export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "covers the whole map at 32 px: give the model's input size with --input-size 32" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    assert export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b"), "--input-size", "32"]) == 0
    assert npcam.load(tmp_path / "b").bundle.input_size == (32, 32)


# A quiet exporter


def _export_subprocess(tmp_path, *args) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "export", "onnx", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return (done.stdout + done.stderr).strip().splitlines()


def position_bias_model() -> onnx.ModelProto:
    """A dynamic-size input whose trunk adds a learned 8x8 position bias: it runs at 32 px only, and probing
    other sizes fails inside onnxruntime. One conv channel has near-zero weights and a bias: the int8 quantizer
    cannot fit that bias in int32 at the weights' scale."""
    w = RNG.standard_normal((8, 3, 3, 3)) * 0.4
    w[3] *= 1e-10  # a dead channel, as training leaves some
    b = RNG.standard_normal(8)
    b[3] = 0.05
    fc = RNG.standard_normal((K, 8))
    fc[:, 3] *= 0.01  # what the clipped bias changes hardly shows in the scores
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "pos"], ["f"]),
        helper.make_node("GlobalAveragePool", ["f"], ["p"]),
        helper.make_node("Flatten", ["p"], ["q"]),
        helper.make_node("Gemm", ["q", "fc"], ["y"], transB=1),
    ]
    inits = [
        _t("w", w),
        _t("b", b),
        _t("pos", RNG.standard_normal((1, 8, 8, 8)) * 0.1),
        _t("fc", fc),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_successful_export_prints_its_own_lines_only(tmp_path):
    """Probing other sizes fails in onnxruntime, and the int8 quantizer clips a bias: neither prints a line."""
    onnx.save(position_bias_model(), tmp_path / "m.onnx")
    lines = _export_subprocess(tmp_path, tmp_path / "m.onnx", "--input-size", "32", "--out", tmp_path / "b")
    assert len(lines) == 1 and lines[0].startswith("exported "), lines
    assert npcam.load(tmp_path / "b").bundle.fixed_size  # the probing did fail
    # u8u8: onnxruntime widens signed weights' scales to fit such a bias in int32, but not unsigned ones, so
    # this setting does clip (the default ones do not).
    lines = _export_subprocess(
        tmp_path, tmp_path / "m.onnx", "--input-size", "32", "--out", tmp_path / "q", "--int8", PHOTOS[0].parent,
        "--int8-setting", "u8u8",
    )
    assert not [line for line in lines if "[E:onnxruntime" in line or "Quantized bias" in line], lines
    assert [line.split(" ")[0] for line in lines] == ["exported", "int8"], lines
    meta = json.loads((tmp_path / "q" / "bundle.json").read_text())
    # the quantizer's warning did happen, and was counted, not printed
    assert list(meta["int8"]["tried"]) == ["u8u8"] and meta["int8"]["clipped_biases"] >= 1, meta["int8"]
    assert ("bias" in lines[1]) == (meta["int8"]["clipped_biases"] >= 1), (lines, meta["int8"])


def test_nested_constant_ifs_inline_to_the_graph_onnxruntime_runs():
    """An If in a constant If's branch, branches reading captured outer tensors, a branch tensor named like an
    outer one, and a condition computed from constants (Not of a Constant): all inlined, the same outputs."""
    from export.graph import inline_constant_ifs

    def branch(name, nodes, out, inits=()):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)

    inner = helper.make_node(
        "If",
        ["not_flag"],
        ["inner_out"],
        then_branch=branch("it", [helper.make_node("Neg", ["a"], ["y"])], "y"),  # 'y' is also an outer name
        else_branch=branch("ie", [helper.make_node("Identity", ["a"], ["a_copy"])], "a_copy"),
    )
    outer = helper.make_node(
        "If",
        ["not_flag"],
        ["outer_out"],
        then_branch=branch("ot", [inner, helper.make_node("Mul", ["inner_out", "two"], ["m"])], "m", [_t("two", 2.0)]),
        else_branch=branch("oe", [helper.make_node("Identity", ["x"], ["z"])], "z"),
    )
    nodes = [
        helper.make_node("Constant", [], ["flag"], value=_t("f", np.array(False))),
        helper.make_node("Not", ["flag"], ["not_flag"]),
        helper.make_node("Exp", ["x"], ["a"]),
        outer,
        helper.make_node("Add", ["outer_out", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inlined = inline_constant_ifs(model)
    assert "If" in [n.op_type for n in model.graph.node]  # the original is left as it was
    assert "If" not in [n.op_type for n in inlined.graph.node]
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    want, got = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for m in (model, inlined)
    )
    np.testing.assert_array_equal(got, want)  # the same float32 ops in the same order: bit for bit
    np.testing.assert_allclose(want, -np.exp(x) * 2 + x, rtol=1e-6)  # not_flag: both then branches
