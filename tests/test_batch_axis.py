"""export/batch_axis.py: the batch followed through a head whose shapes were written for a batch of 1.

The head below is nn.MultiheadAttention's sequence-first attention as the TorchScript exporter writes it for a
fixed batch of 1, on tokens ``[N, L, C]``: the batch moves to axis 1 (``[L, N, C]``), merges with the heads
(``[L, N*heads, d]``, then ``[N*heads, L, d]``) and with the tokens (``[L*N, C]``), and comes back. Its literal
Reshape targets say 1 for the batch, or nothing at all (``[L, C]``). The reference is the same ops run one image
at a time: a batch must give each image's own scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from export.batch_axis import Lost, follow
from npcam.head import GraphHead, Op, infer_shapes

L, C, HEADS, K = 5, 4, 2, 3
D = C // HEADS


def attention_head(rng) -> tuple[list[Op], dict[str, np.ndarray]]:
    arrays = {
        "wq": rng.normal(size=(C, C)), "wk": rng.normal(size=(C, C)), "wv": rng.normal(size=(C, C)),
        "wo": rng.normal(size=(C, C)), "bo": rng.normal(size=C), "fc": rng.normal(size=(K, C)),
        "scale": np.array(D**-0.5),
    }  # fmt: skip
    ops = [
        Op("Transpose", ("x",), "seq", {"perm": [1, 0, 2]}),  # [L, N, C]
        *[Op("MatMul", ("seq", f"w{t}"), t) for t in "qkv"],
        *[Op("Reshape", (t,), f"{t}h", {"shape": [L, HEADS, D]}) for t in "qkv"],  # [L, N*heads, d]
        *[Op("Transpose", (f"{t}h",), f"{t}t", {"perm": [1, 0, 2]}) for t in "qkv"],  # [N*heads, L, d]
        Op("Transpose", ("kt",), "kT", {"perm": [0, 2, 1]}),
        Op("MatMul", ("qt", "kT"), "logits"),
        Op("Mul", ("logits", "scale"), "scaled"),
        Op("Softmax", ("scaled",), "weights", {"axis": -1}),
        Op("MatMul", ("weights", "vt"), "mixed"),  # [N*heads, L, d]
        Op("Reshape", ("mixed",), "split", {"shape": [1, HEADS, L, D]}),  # [N, heads, L, d]
        Op("Transpose", ("split",), "lnhd", {"perm": [2, 0, 1, 3]}),  # [L, N, heads, d]
        Op("Reshape", ("lnhd",), "rows", {"shape": [L, C]}),  # [L*N, C]: the batch inside the rows
        Op("Gemm", ("rows", "wo", "bo"), "out", {"transB": 1}),
        Op("Reshape", ("out",), "back", {"shape": [L, 1, C]}),  # [L, N, C]
        Op("Transpose", ("back",), "tokens", {"perm": [1, 0, 2]}),  # [N, L, C]
        Op("Add", ("tokens", "x"), "residual"),
        Op("ReduceMean", ("residual",), "pooled", {"axes": [1], "keepdims": 0}),
        Op("Gemm", ("pooled", "fc"), "scores", {"transB": 1}),
    ]
    return ops, arrays


def shapes_of(ops, arrays) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape at batch 1."""
    return infer_shapes(ops, arrays, {"x": [-1, L, C]})


def test_literal_shapes_of_batch_one_are_rewritten_to_run_at_any_batch():
    rng = np.random.default_rng(0)
    ops, arrays = attention_head(rng)
    literal = GraphHead(ops, arrays, [-1, L, C], "x", "scores", layout="tokens", grid=(1, L), prefix=0)
    rewritten = follow(ops, arrays, shapes_of(ops, arrays), ["x"], "scores")
    targets = {op.output: op.attrs["shape"] for op in rewritten if op.op == "Reshape"}
    # The batch's axis of each target becomes -1: in the heads of [L, N*heads, d] (not in L), its own axis of
    # [N, heads, L, d], inside the rows of [L*N, C] (not the columns, which the Gemm contracts), its own of [L, N, C].
    assert targets == {
        "qh": [L, -1, D], "kh": [L, -1, D], "vh": [L, -1, D],
        "split": [-1, HEADS, L, D], "rows": [-1, C], "back": [L, -1, C],
    }  # fmt: skip
    batched = GraphHead(rewritten, arrays, [-1, L, C], "x", "scores", layout="tokens", grid=(1, L), prefix=0)
    x = rng.normal(size=(4, L, C))
    one_at_a_time = np.concatenate([literal.forward_float64(x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(batched.forward_float64(x), one_at_a_time, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):  # the literal head cannot take a batch at all
        literal.forward_float64(x)
    # One image's gradient is unchanged by the rewrite (the shapes at batch 1 are the same).
    np.testing.assert_allclose(batched.gradient(x[:1], [0, 2]), literal.gradient(x[:1], [0, 2]), rtol=1e-12)


def test_the_shapes_at_batch_2_choose_where_a_model_of_dynamic_batch_put_it():
    """[1, 1, C] -> Reshape [1, 1, C]: the batch's own axis could be either; batch 2's shape says which."""
    arrays = {"fc": np.eye(C)[:K]}
    ops = [
        Op("Unsqueeze", ("x",), "u", {"axes": [1]}),  # [N, 1, C]
        Op("Reshape", ("u",), "r", {"shape": [1, 1, C]}),
        Op("Squeeze", ("r",), "s", {"axes": [1]}),
        Op("Gemm", ("s", "fc"), "scores", {"transB": 1}),
    ]
    shapes = {"x": (1, C), "u": (1, 1, C), "r": (1, 1, C), "s": (1, C), "scores": (1, K)}
    rewritten = follow(ops, arrays, shapes, ["x"], "scores")
    assert rewritten[1].attrs["shape"] == [-1, 1, C]  # its own axis of size 1, the first: then Squeeze(1) fits
    with pytest.raises(Lost, match="squeezes the batch's axis"):  # a batch-2 run that put it on axis 1
        follow(ops, arrays, shapes, ["x"], "scores", {**shapes, "x": (2, C), "u": (2, 1, C), "r": (1, 2, C)})


@pytest.mark.parametrize(
    "op, message",
    [
        (Op("ReduceMean", ("x",), "scores", {"axes": [0, 1], "keepdims": 1}), "reduces over the batch"),
        (Op("Gemm", ("x", "w"), "scores", {"transA": 1}), "multiplies along the batch"),
        (Op("Softmax", ("x",), "scores", {"axis": 0}), "normalizes over the batch"),
        (Op("Slice", ("x",), "scores", {"starts": [0], "ends": [1], "axes": [0]}), None),  # all of the batch: kept
    ],
)
def test_ops_that_mix_the_images_of_a_batch_are_refused_saying_which(op, message):
    arrays = {"w": np.ones((1, 2))}
    shapes = {"x": (1, 2), "scores": (1, 2) if op.op != "Gemm" else (2, 2)}
    if message is None:
        (kept,) = follow([op], arrays, shapes, ["x"], "scores")
        assert kept.attrs["ends"] == [2**62]  # to the end of the batch's axis, at any batch
        return
    with pytest.raises(Lost, match=message):
        follow([op], arrays, shapes, ["x"], "scores")


def test_a_head_that_mixes_the_batch_is_refused_in_one_line(tmp_path):
    """Through the ONNX route: scores centred on their mean over the batch (a ReduceMean over axis 0 in the
    head) give each image a score that depends on the others. Refused in one line, nothing written."""
    from onnx import TensorProto, helper, numpy_helper

    from export.api import run_onnx
    from export.errors import ExportError

    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(K, 4)).astype(np.float32), "fc_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["a"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1),
        helper.make_node("ReduceMean", ["logits"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["logits", "mean"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    path = tmp_path / "centred.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    with pytest.raises(ExportError) as e:
        run_onnx(path, tmp_path / "b")
    message = str(e.value)
    assert "\n" not in message and "cannot keep the images of a batch apart" in message, message
    assert "ReduceMean" in message and "reduces over the batch's axis" in message and "nothing was written" in message
    assert not (tmp_path / "b").exists()
