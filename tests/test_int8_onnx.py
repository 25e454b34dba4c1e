"""Imported int8 ONNX classifiers (onnxruntime's quantizer, QDQ and QOperator) compute the model's integers on
every CPU.

``npcam-export onnx`` writes an int8 model's QOperator ops as QDQ, its trunk with uint8 weights and activations
(export/unsigned.py: onnxruntime's ``u8u8`` kernels sum exactly on every CPU, its ``u8s8`` ones saturate on x86
without VNNI), and checks the bundle against the QDQ graph run by onnxruntime with graph optimizations off: each
DequantizeLinear, float op and QuantizeLinear on its own, so no integer kernel (export/qdq.py). The models are
made here: a small float classifier (convolutions, a residual Add, MaxPool, global average pooling, Gemm, and
a Softmax for one), quantized by ``quantize_static`` with int8 and uint8 activations, per-channel and
per-tensor int8 weights, in both formats.

Bounds, derived from the quantization steps (export.qdq.int8_bound): the bundle sums the integers exactly and
requantizes in float32; the reference sums dequantized values in float32. Both round half to even, so a tensor
can be one step apart only where the exact value lies within float32 rounding of a rounding boundary, and such
cells are rare. So:

- the features (the last int8 tensor before the pooling): within one step ``s_f`` of the reference's;
- the output: logits within ``2 s_out`` (one step inherited through the pooled vector, one of their own
  rounding); a softmax within ``s_out / 2 + s_z`` (the reference rounds it to ``s_out``; two logit steps
  ``s_z`` move a softmax by at most half of that, its slope in the max norm being at most 1/2).

On a CPU whose ``u8s8`` kernels saturate (AVX2 or AVX-512 without VNNI, as this suite's AMD EPYC Zen 3), the
original file in onnxruntime's default session must be beyond these bounds, or the test could not fail.

The same bundles also run under qemu-user on the CPUs of tests/test_cpus.py (x86-64 ``Haswell-noTSX``: AVX2
without VNNI, whatever this machine has; aarch64 without and with dot-product instructions), from the cache
``scripts/arm64_env.sh`` makes (without it those tests skip, naming the script). There the features must be
identical to this machine's, not merely within a step: the uint8 products are summed exactly in int32 on every
CPU and requantized by the same float32 multiply and round-half-to-even, so the integers are the same, while
a saturating kernel gives features many steps away (as the default session's, above).
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import PHOTOS, record
from onnx import TensorProto, helper, numpy_helper
from test_aarch64 import OTHER_CPUS, emulated, run_script

import npcam
from export.__main__ import main as export_main
from export.qdq import as_qdq

SIZE, CLASSES = 32, 10
# name: (format, activation type, per-channel weights, softmax output)
CASES = {
    "QDQ, int8 activations, per-channel weights": ("QDQ", "QInt8", True, False),
    "QDQ, uint8 activations, per-channel weights": ("QDQ", "QUInt8", True, False),
    "QDQ, int8 activations, per-tensor weights, softmax": ("QDQ", "QInt8", False, True),
    "QOperator, uint8 activations, per-channel weights": ("QOperator", "QUInt8", True, False),
}


def float_classifier(softmax: bool = False, seed: int = 0) -> onnx.ModelProto:
    """conv s2 -> conv s2 (a) -> conv -> conv + a (residual Add) -> MaxPool 3x3 s1 -> conv s2 -> global average
    pooling -> Gemm [-> Softmax], ReLUs between; input [N, 3, 32, 32]. The weights are He-uniform (as Keras'
    default initializer, uniform): activations neither vanish nor blow up, and per-channel int8 weights spread
    over their whole range, where pairs of large products saturate int16."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(x: str, cin: int, cout: int, stride: int, out: str, relu: bool = True) -> str:
        i = len(nodes)
        w = rng.uniform(-1, 1, (cout, cin, 3, 3)).astype(np.float32) * np.float32(np.sqrt(6 / (9 * cin)))
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(
            rng.normal(0, 0.05, cout).astype(np.float32), f"b{i}")])  # fmt: skip
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"{out}_c" if relu else out], pads=[1] * 4,
                                      strides=[stride] * 2))  # fmt: skip
        if relu:
            nodes.append(helper.make_node("Relu", [f"{out}_c"], [out]))
        return out

    a = conv(conv("image", 3, 16, 2, "c1"), 16, 32, 2, "a")
    b = conv(conv(a, 32, 32, 1, "c3"), 32, 32, 1, "c4", relu=False)
    nodes += [helper.make_node("Add", [b, a], ["sum"]), helper.make_node("Relu", ["sum"], ["res"]),
              helper.make_node("MaxPool", ["res"], ["mp"], kernel_shape=[3, 3], pads=[1] * 4)]  # fmt: skip
    features = conv("mp", 32, 64, 2, "features")
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, (CLASSES, 64)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(rng.normal(0, 0.1, CLASSES).astype(np.float32), "fc_b")]  # fmt: skip
    nodes += [helper.make_node("GlobalAveragePool", [features], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]  # fmt: skip
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["N", CLASSES])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def quantize(float_model: Path, out: Path, fmt: str, activations: str, per_channel: bool, weights: str = "QInt8"):
    """``quantize_static`` of ``float_model`` into ``out``, calibrated on 16 seeded random images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(5)
            self.inputs = iter([{"image": rng.standard_normal((1, 3, SIZE, SIZE), np.float32)} for _ in range(16)])

        def get_next(self):
            return next(self.inputs, None)

    quantize_static(
        str(float_model), str(out), Images(), quant_format=QuantFormat[fmt], activation_type=QuantType[activations],
        weight_type=QuantType[weights], per_channel=per_channel,
    )  # fmt: skip


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensor ``name`` (of whatever type it has)."""
    model = copy.deepcopy(model)
    model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


def run(model: onnx.ModelProto, x: np.ndarray, optimized: bool, keep: str | None = None) -> list[np.ndarray]:
    """``model`` in onnxruntime: its default session (``optimized``: integer kernels fused) or with graph
    optimizations off (each node as written). ``keep``: write the graph onnxruntime runs there."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if keep:
        options.optimized_model_filepath = keep
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})


def steps(model: onnx.ModelProto) -> tuple[dict[str, float], dict[str, onnx.NodeProto]]:
    """The scales of the model's DequantizeLinear outputs (per tensor), and the tensors' producers."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    scales = {
        n.output[0]: float(inits[n.input[1]].reshape(()))
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits[n.input[1]].size == 1
    }
    return scales, producers


def derived_bound(model: onnx.ModelProto) -> float:
    """The output's bound (module docstring), from the QDQ graph's own scales."""
    scales, producers = steps(model)
    output = model.graph.output[0].name
    s_out = scales[output]
    quantize = producers[producers[output].input[0]]
    before = producers[quantize.input[0]]
    if before.op_type == "Softmax":
        return s_out / 2 + scales[before.input[0]]
    return 2 * s_out


def saturating_cpu() -> bool:
    """Whether onnxruntime's u8s8 kernels here are the saturating ``vpmaddubsw`` ones: x86 with AVX2, no VNNI."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    flags = set(flags.partition(":")[2].split())
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni"} & flags


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Each case's float model quantized, exported by the command, and its inputs: the photos as the bundle
    preprocesses them and random normalized images."""
    root = tmp_path_factory.mktemp("int8_onnx")
    for softmax in (False, True):
        onnx.save(float_classifier(softmax), root / f"float_{softmax}.onnx")
    cases = {}
    for case, (fmt, activations, per_channel, softmax) in CASES.items():
        path = root / f"{len(cases)}.onnx"
        quantize(root / f"float_{softmax}.onnx", path, fmt, activations, per_channel)
        out = root / f"bundle{len(cases)}"
        assert export_main(["onnx", str(path), "--out", str(out)]) == 0
        model = npcam.load(out)
        rng = np.random.default_rng(1)
        x = np.concatenate(
            [*(model.preprocess(p) for p in PHOTOS), rng.standard_normal((5, 3, SIZE, SIZE), np.float32)]
        )
        cases[case] = {"file": path, "bundle": out, "x": x.astype(np.float32)}
    return {"root": root, "cases": cases}


def reference(case: dict) -> dict:
    """The case's QDQ graph (a QOperator file's as export.qdq writes it) with graph optimizations off: features
    (the bundle's layer), output; the steps and bound; the original file in the default session."""
    original = onnx.load(str(case["file"]))
    qdq_model, _ = as_qdq(copy.deepcopy(original), "case")
    model = npcam.load(case["bundle"])
    layer = model.bundle.layer
    scales, _ = steps(qdq_model)
    want = run(with_output(qdq_model, layer), case["x"], optimized=False)
    if any(layer in n.output for n in original.graph.node):
        default = run(with_output(original, layer), case["x"], optimized=True)
    else:  # a QOperator file: the layer is the translation's DequantizeLinear of the file's 8-bit tensor
        dq = next(n for n in qdq_model.graph.node if n.output[0] == layer)
        default = run(with_output(original, dq.input[0]), case["x"], optimized=True)
        inits = {i.name: numpy_helper.to_array(i) for i in qdq_model.graph.initializer}
        default[1] = (default[1].astype(np.float64) - inits[dq.input[2]]) * inits[dq.input[1]]
    return {
        "model": model, "output": want[0], "features": want[1], "default_output": default[0],
        "default_features": default[1], "s_f": scales[layer], "bound": derived_bound(qdq_model),
    }  # fmt: skip


def bundle_outputs(model: npcam.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's features and output (probabilities for a softmax model), computed by npcam's runtime."""
    scores = model.scores(x)
    output = model.probabilities(scores) if model.bundle.meta["output"] != "logits" else scores
    return model.features(x), output


@pytest.mark.parametrize("case", list(CASES))
def test_int8_onnx_bundle_computes_the_models_integers(case, exported):
    """The bundle against the reference within the derived bounds; the original file in onnxruntime's default
    session beyond them on a CPU whose u8s8 kernels saturate."""
    info = exported["cases"][case]
    ref = reference(info)
    model = ref["model"]
    assert model.bundle.meta["source"]["int8_bound"]["bound"] == pytest.approx(ref["bound"], rel=1e-6)
    trunk = onnx.load(str(info["bundle"] / "trunk.onnx"))
    assert not [i.name for i in trunk.graph.initializer if i.data_type == TensorProto.INT8]  # all uint8 now
    features, output = bundle_outputs(model, info["x"])
    assert features.shape == ref["features"].shape and np.abs(ref["features"]).max() > 0
    off = np.abs(features.astype(np.float64) - ref["features"]) / ref["s_f"]
    assert record(f"int8 ONNX {case}: features vs reference, steps", off.max()) <= 1 + 1e-3  # float32 values
    error = np.abs(output.astype(np.float64) - ref["output"]).max()
    assert record(f"int8 ONNX {case}: output vs reference, of the bound", error / ref["bound"]) <= 1
    default_off = np.abs(ref["default_features"].astype(np.float64) - ref["features"]).max() / ref["s_f"]
    default_error = np.abs(ref["default_output"].astype(np.float64) - ref["output"]).max() / ref["bound"]
    record(f"int8 ONNX {case}: original in onnxruntime's default session, features vs reference, steps", default_off)
    record(f"int8 ONNX {case}: original in onnxruntime's default session, output vs reference, of the bound",
           default_error)  # fmt: skip
    if saturating_cpu():  # the test can fail: without npcam's rewrite the integers are others
        assert default_off > 1
        if model.bundle.meta["output"] == "logits":  # a softmax flattens the logits' error: recorded only
            assert default_error > 1


def test_the_reference_runs_the_qdq_graph_as_written(exported, tmp_path):
    """With graph optimizations off onnxruntime runs the QDQ graph node for node: the graph it runs is the one it
    was given (the default session fuses QLinearConv), and it agrees with onnx's reference evaluator, which
    implements each op's definition in NumPy."""
    from onnx.reference import ReferenceEvaluator

    case = exported["cases"]["QDQ, int8 activations, per-channel weights"]
    original = onnx.load(str(case["file"]))
    layer = npcam.load(case["bundle"]).bundle.layer
    model = with_output(original, layer)
    x = case["x"][:4]
    got = run(model, x, optimized=False, keep=str(tmp_path / "off.onnx"))
    run(model, x, optimized=True, keep=str(tmp_path / "on.onnx"))
    ran = Counter(n.op_type for n in onnx.load(str(tmp_path / "off.onnx")).graph.node)
    given = Counter(n.op_type for n in model.graph.node)
    # the same ops; a DequantizeLinear read by two nodes may be duplicated (onnxruntime gives each its own)
    assert set(ran) == set(given) and ran - given <= Counter({"DequantizeLinear": ran["DequantizeLinear"]})
    assert given - ran == Counter()
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(tmp_path / "on.onnx")).graph.node}
    evaluated = copy.deepcopy(model)
    # DequantizeLinear and QuantizeLinear of opset 17 and 21 are the same for 8-bit types (21 adds types and
    # blocks), as are the other ops here; onnx's evaluator implements them from opset 19.
    evaluated.opset_import[0].version = 21
    want = ReferenceEvaluator(evaluated).run(None, {"image": x})
    scales, _ = steps(original)
    off = np.abs(got[1].astype(np.float64) - want[1]).max() / scales[layer]
    assert record("int8 ONNX reference: onnxruntime unoptimized vs onnx's evaluator, features in steps", off) <= 1
    error = np.abs(got[0].astype(np.float64) - want[0]).max() / derived_bound(original)
    assert record("int8 ONNX reference: onnxruntime unoptimized vs onnx's evaluator, logits of the bound", error) <= 1


def test_qoperator_ops_are_their_qdq_definition(exported):
    """A QOperator file against its translation (export.qdq.as_qdq) run with optimizations off: the same model
    within the bounds. The file's int8 weights are stored as uint8 here (``q + 128``, zero point + 128: the same
    values; onnxruntime's quantizer writes per-channel convolution weights as int8 whatever it is asked), so that
    onnxruntime runs it in its u8u8 kernels, exact on every CPU. Every QOperator op of the file is translated."""
    original = onnx.load(str(exported["cases"]["QOperator, uint8 activations, per-channel weights"]["file"]))
    for tensor in original.graph.initializer:
        if tensor.data_type == TensorProto.INT8:
            shifted = (numpy_helper.to_array(tensor).astype(np.int16) + 128).astype(np.uint8)
            tensor.CopyFrom(numpy_helper.from_array(shifted, tensor.name))
    kinds = {n.op_type for n in original.graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= kinds  # what is translated
    translated, count = as_qdq(copy.deepcopy(original), "qoperator.onnx")
    assert count == sum(n.op_type.startswith(("QLinear", "QGemm")) for n in original.graph.node)
    assert not [n.op_type for n in translated.graph.node if n.op_type.startswith(("QLinear", "QGemm"))]
    gap = next(n for n in translated.graph.node if n.op_type == "GlobalAveragePool")
    dq = next(n for n in translated.graph.node if n.output[0] == gap.input[0])
    x = exported["cases"]["QDQ, int8 activations, per-channel weights"]["x"]
    want = run(with_output(translated, gap.input[0]), x, optimized=False)
    got = run(with_output(original, dq.input[0]), x, optimized=True)  # the file's uint8 features
    inits = {i.name: numpy_helper.to_array(i) for i in translated.graph.initializer}
    features = (got[1].astype(np.float64) - inits[dq.input[2]]) * inits[dq.input[1]]
    scales, _ = steps(translated)
    off = np.abs(features - want[1]).max() / scales[gap.input[0]]
    assert record("int8 ONNX QOperator file (u8u8) vs its QDQ translation, features in steps", off) <= 1 + 1e-3
    error = np.abs(got[0].astype(np.float64) - want[0]).max() / derived_bound(translated)
    assert record("int8 ONNX QOperator file (u8u8) vs its QDQ translation, logits of the bound", error) <= 1


def test_the_self_check_refuses_a_trunk_left_in_int8(exported, tmp_path, monkeypatch, capsys):
    """Without the uint8 rewrite the self-check, against the reference that runs no integer kernel, refuses the
    bundle on a CPU whose u8s8 kernels saturate (in one line, writing nothing); elsewhere the trunk passes."""
    monkeypatch.setattr("export.api.unsigned_int8", lambda model, source: (model, 0))
    path = exported["cases"]["QDQ, int8 activations, per-channel weights"]["file"]
    code = export_main(["onnx", str(path), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    if saturating_cpu():
        assert code == 1 and "self-check failed" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "b").exists()
    else:
        assert code == 0, err


def test_int8_models_npcam_cannot_make_exact_are_refused(exported, tmp_path, capsys):
    """A dynamically quantized convolution (DynamicQuantizeLinear -> ConvInteger with int8 weights: an integer
    kernel npcam does not translate) is refused in one line, and so is ``--int8`` on an int8 model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = exported["root"]
    quantize_dynamic(str(root / "float_False.onnx"), str(tmp_path / "dynamic.onnx"), op_types_to_quantize=["Conv"],
                     weight_type=QuantType.QInt8)  # fmt: skip
    capsys.readouterr()
    assert export_main(["onnx", str(tmp_path / "dynamic.onnx"), "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert "computes with 8-bit integers" in err and len(err.splitlines()) == 1 and not (tmp_path / "d").exists()
    path = exported["cases"]["QDQ, int8 activations, per-channel weights"]["file"]
    assert export_main(["onnx", str(path), "--int8", str(PHOTOS[0].parent), "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err.strip()
    assert "already int8" in err and len(err.splitlines()) == 1 and not (tmp_path / "q").exists()


# argv: the inputs' .npz, the output .npz, then bundles and .onnx files; saves each bundle's features and output,
# computed by npcam's runtime on the CPU it runs on, and each .onnx file's second output (an original file that
# also outputs the bundle's layer) run by onnxruntime's default session there, as a user would run the file
RUN = """
import sys, numpy as np, onnxruntime as ort, npcam
x = np.load(sys.argv[1])["x"]
out = {}
for b, path in enumerate(sys.argv[3:]):
    if path.endswith(".onnx"):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        out[f"features{b}"] = session.run(None, {"image": x})[1]
        continue
    model = npcam.load(path)
    scores = model.scores(x)
    out[f"features{b}"] = model.features(x)
    out[f"output{b}"] = model.probabilities(scores) if model.bundle.meta["output"] != "logits" else scores
np.savez(sys.argv[2], **out)
"""


def run_bundles(command: list[str], env: dict[str, str], root: Path, name: str, paths: list[Path]) -> dict:
    """:data:`RUN` on ``paths`` (bundles, .onnx files) with ``command`` (this machine's Python or an emulated
    one)."""
    out = root / f"{name}.npz"
    run_script(command, env, RUN, [str(root / "inputs.npz"), str(out), *map(str, paths)], name)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def on_this_cpu(exported) -> dict:
    """Every case's bundle on one set of inputs, run here by :data:`RUN`; the references; and the QDQ files with
    the bundle's layer as a second output (a QOperator file has no such tensor: its layer is the translation's)."""
    root, cases = exported["root"], list(exported["cases"].values())
    x = cases[0]["x"]
    np.savez(root / "inputs.npz", x=x)
    here = run_bundles([sys.executable], {}, root, "here", [c["bundle"] for c in cases])
    references = [reference({**c, "x": x}) for c in cases]
    originals = {}
    for b, (case, ref) in enumerate(zip(cases, references)):
        original = onnx.load(str(case["file"]))
        if any(ref["model"].bundle.layer in n.output for n in original.graph.node):
            originals[b] = root / f"original{b}.onnx"
            onnx.save(with_output(original, ref["model"].bundle.layer), originals[b])
    return {"root": root, "here": here, "references": references, "originals": originals}


@pytest.mark.parametrize("cpu", list(OTHER_CPUS))
def test_int8_onnx_bundles_compute_the_same_on_other_cpus(cpu, exported, on_this_cpu):
    """The bundles on an emulated CPU: the features identical to this CPU's (uint8 products summed exactly in
    int32 on every CPU, and requantized by the same float32 multiply and rounding), and within the bounds of the
    reference. The QDQ files in onnxruntime's default session there: beyond one step on the emulated Haswell."""
    arch, qemu_cpu = OTHER_CPUS[cpu]
    command, env = emulated(arch, qemu_cpu)
    names = list(exported["cases"])
    originals = on_this_cpu["originals"]
    bundles = [exported["cases"][c]["bundle"] for c in names]
    got = run_bundles(command, env, on_this_cpu["root"], qemu_cpu, [*bundles, *originals.values()])
    for b, (case, ref) in enumerate(zip(names, on_this_cpu["references"])):
        differ = np.abs(got[f"features{b}"] - on_this_cpu["here"][f"features{b}"]).max()
        assert record(f"{cpu}, int8 ONNX {case}: features vs this CPU's, abs", differ) == 0
        off = np.abs(got[f"features{b}"].astype(np.float64) - ref["features"]).max() / ref["s_f"]
        # one step (module docstring), + 1e-3: each dequantized (q - z) s is rounded to float32, < 255 * 2**-23 steps
        assert record(f"{cpu}, int8 ONNX {case}: features vs reference, steps", off) <= 1 + 1e-3
        error = np.abs(got[f"output{b}"].astype(np.float64) - ref["output"]).max() / ref["bound"]
        assert record(f"{cpu}, int8 ONNX {case}: output vs reference, of the bound", error) <= 1
    for k, b in enumerate(originals):  # the files themselves, in onnxruntime's default session on that CPU
        ref = on_this_cpu["references"][b]
        off = np.abs(got[f"features{len(bundles) + k}"].astype(np.float64) - ref["features"]).max() / ref["s_f"]
        record(f"{cpu}, int8 ONNX {names[b]}: original in onnxruntime's default session, features vs reference, steps",
               off)  # fmt: skip
        if arch == "x86_64":  # AVX2 without VNNI: the u8s8 kernels saturate, so the test can fail there
            assert off > 1
