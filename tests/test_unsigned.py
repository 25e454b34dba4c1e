"""int8 QDQ graphs rewritten to uint8 (export/unsigned.py), and the int8 kernels of this CPU (scripts/int8_kernels.py).

The rewrite adds 128 to every int8 value and zero point: the real values do not change, so the rewritten graph
must give the same outputs bit for bit when onnxruntime runs its Q/DQ ops one by one and the convolution in
float (graph optimizations off: nothing is fused into int8 kernels). With optimizations on, onnxruntime fuses
the uint8 graph into ``u8u8`` kernels, whose integer sums are exact on every CPU: the script's comparison with
NumPy's exact integer arithmetic says so on this one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError
from export.unsigned import unsigned_int8


def _qdq_graph(computing: bool = False) -> onnx.ModelProto:
    """float x -> Q (int8) -> Transpose -> DQ -> Conv (int8 per-channel weights) -> Q -> Pad (no value: 0)
    -> MaxPool -> Concat with an int8 constant -> DQ -> float y. ``computing``: an Add on the int8 values."""
    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(-7, np.int8), "z"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, 4).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.2, np.float32), "s2"),
        numpy_helper.from_array(np.array(5, np.int8), "z2"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(rng.integers(-128, 128, (1, 2, 6, 6)).astype(np.int8), "extra"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("Transpose", ["xq"], ["xt"], perm=[0, 3, 1, 2]),  # NHWC int8 in, as tf2onnx writes
        helper.make_node("DequantizeLinear", ["xt", "s", "z"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
        helper.make_node("Conv", ["xf", "wf"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("QuantizeLinear", ["c", "s2", "z2"], ["cq"]),
        helper.make_node("Pad", ["cq", "pads"], ["padded"]),  # pads with int8 0, which is uint8 128
        helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Concat", ["pooled", "extra"], ["joined"], axis=1),
    ]
    if computing:
        nodes.append(helper.make_node("Add", ["joined", "extra_all"], ["added"]))
        inits.append(numpy_helper.from_array(np.ones((1, 6, 6, 6), np.int8), "extra_all"))
    nodes.append(helper.make_node("DequantizeLinear", ["added" if computing else "joined", "s2", "z2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10, 10, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, fused: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


def test_the_rewrite_keeps_every_value():
    original = _qdq_graph()
    rewritten, count = unsigned_int8(_qdq_graph(), "qdq.onnx")
    onnx.checker.check_model(rewritten, full_check=True)
    assert count > 0
    used = {name for node in rewritten.graph.node for name in node.input}
    int8 = [i.name for i in rewritten.graph.initializer if i.data_type == TensorProto.INT8 and i.name in used]
    assert int8 == []  # no int8 value or zero point left: the weights are uint8 with zero point 128
    rng = np.random.default_rng(1)
    for _ in range(3):  # inputs over the whole int8 range and past it (clipped alike)
        x = rng.uniform(-8, 8, (1, 10, 10, 3)).astype(np.float32)
        want = _run(original, x, fused=False)
        assert np.array_equal(_run(rewritten, x, fused=False), want)  # Q/DQ one by one, the conv in float
        # fused into onnxruntime's uint8 kernels: exact sums, requantized in float32 (a value within rounding of
        # a boundary may land one step away)
        assert np.abs(_run(rewritten, x, fused=True) - want).max() <= 0.2 + 1e-6


def test_an_op_that_computes_with_int8_values_is_refused():
    with pytest.raises(ExportError, match="read by Add"):
        unsigned_int8(_qdq_graph(computing=True), "qdq.onnx")


def test_this_cpus_uint8_kernels_compute_the_exact_integers():
    """scripts/int8_kernels.py on this CPU: ``u8u8`` equals NumPy's integer arithmetic; ``u8s8`` equals either
    that (VNNI, aarch64, SSE-only x86) or the saturating ``vpmaddubsw`` model (AVX2 and AVX-512 without VNNI),
    so the script's account of the difference holds here."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "int8_kernels.py"), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["pairs_beyond_int16"] > 0.01  # the experiment reaches the saturating range
    assert result["u8u8"]["exact"]["max_steps"] <= 1 and result["u8u8"]["exact"]["cells_off"] < 0.01
    explained = [name for name, r in result["u8s8"].items() if r["max_steps"] <= 1 and r["cells_off"] < 0.01]
    assert explained, result["u8s8"]
