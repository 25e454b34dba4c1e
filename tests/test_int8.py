"""The exporter's int8 trunk: held-out agreement, the settings' words, layers kept in float, and the runtime's
warning for a trunk whose answers depend on the CPU. Tiny models and a few generated images.

The agreement a bundle records is checked against the runtime's own predictions (``Model.predict`` on the
held-out files, a different path from the exporter's feature-level measure).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import synthetic_image
from PIL import Image
from test_aarch64 import tiny_classifier
from test_cpuinfo import ARM64_NEOVERSE_N1, X86_EPYC, X86_HASWELL

import npcam
from export import graph as export_graph
from export import quantize
from export.__main__ import main
from export.api import run_onnx
from export.errors import ExportError
from npcam import bundle as bundle_format


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of generated images: 7 to calibrate (and split), 3 others to check on."""
    root = tmp_path_factory.mktemp("int8-images")
    for name, count, first in (("calibration", 7, 0), ("check", 3, 50)):
        (root / name).mkdir()
        for i in range(count):
            Image.fromarray(synthetic_image(90, 120, seed=first + i)).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8-model")
    model = tiny_classifier(tmp / "tiny.onnx", hidden=False)
    return model, run_onnx(model, out=tmp / "fp32")


def test_split_is_interleaved_and_disjoint(folders):
    calibration, held_out, described = quantize.image_sets(folders / "calibration")
    assert [p.name for p in calibration] == ["00.png", "02.png", "04.png", "06.png"]
    assert [p.name for p in held_out] == ["01.png", "03.png", "05.png"]
    assert "held-out half" in described
    calibration, held_out, described = quantize.image_sets(folders / "calibration", folders / "check")
    assert len(calibration) == 7 and [p.parent.name for p in held_out] == ["check"] * 3
    assert str(folders / "check") in described


def test_one_image_cannot_be_split(tmp_path):
    Image.fromarray(synthetic_image(40, 40)).save(tmp_path / "only.png")
    with pytest.raises(ExportError, match="cannot be split"):
        quantize.image_sets(tmp_path)


def test_setting_words():
    options = quantize.parse_setting("u8s8 reduce_range entropy per_tensor symmetric float=first+last images=32")
    assert quantize.parse_setting("u8s8 float=first3+add")["float"] == ("first3", "add")
    assert options["reduce_range"] and not options["per_channel"] and options["symmetric"]
    assert options["calibrate_method"].name == "Entropy" and options["float"] == ("first", "last")
    assert options["images"] == 32
    assert quantize.parse_setting("u8u8")["weight_type"].name == "QUInt8"
    assert quantize.parse_setting("u8s8 unsigned gptq")["unsigned"] and quantize.parse_setting("u8s8 gptq")["gptq"]
    for bad in ("u8s8 fast", "int8", "u8s8 float=middle", "u8s8 images=0", "s8s8 unsigned"):
        with pytest.raises(ExportError, match="int8 setting"):
            quantize.parse_setting(bad)
    # 8-bit signed weights saturate in x86's vpmaddubsw kernels (no VNNI); 7-bit or unsigned ones do not.
    assert [quantize.portable(s) for s in ("u8s8", "s8s8", "u8s8 reduce_range", "u8u8")] == [False, False, True, True]


def weight_sources(path) -> dict[str, str]:
    """Each Conv's weight input: 'float' (an initializer) or 'int8' (a DequantizeLinear's output)."""
    graph = onnx.load(path).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    return {n.name: ("int8" if made_by.get(n.input[1]) == "DequantizeLinear" else "float")
            for n in graph.node if n.op_type == "Conv"}


def test_float_layers_stay_float(tiny, folders, tmp_path):
    model, _ = tiny
    inputs = [np.asarray(synthetic_image(64, 64, seed=i), np.float32).transpose(2, 0, 1)[None] / 255 for i in range(3)]
    onnx_model = onnx.load(model)
    for i, node in enumerate(onnx_model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    convs = [n.name for n in onnx_model.graph.node if n.op_type == "Conv"]  # first, depthwise, pointwise, last
    assert export_graph.float_nodes(onnx_model, ("first", "depthwise", "last")) == [convs[0], convs[3], convs[1]]
    quantize.quantize_trunk(model, inputs, tmp_path / "all.onnx", "u8s8 reduce_range")
    quantize.quantize_trunk(model, inputs, tmp_path / "some.onnx", "u8s8 reduce_range float=first+depthwise")
    assert set(weight_sources(tmp_path / "all.onnx").values()) == {"int8"}
    assert sorted(weight_sources(tmp_path / "some.onnx").values()) == ["float", "float", "int8", "int8"]


def test_export_records_held_out_agreement(tiny, folders, tmp_path, capsys):
    model, fp32_bundle = tiny
    out = tmp_path / "int8"
    assert main(["onnx", str(model), "--out", str(out), "--int8", str(folders / "calibration")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["exported", "int8"], lines
    q = json.loads((out / "bundle.json").read_text())["int8"]
    assert q["images"] == 4 and q["check_images"] == 3 and "held-out half" in q["checked_on"]
    # with no --int8-setting the export tries every default setting (test_export.py's ResNet-18 asks for one)
    assert "held-out half" in lines[1] and q["settings"] in quantize.SETTINGS and set(q["tried"]) == set(quantize.SETTINGS)
    assert q["portable"] == quantize.portable(q["settings"]) and q["cpu_family"] == npcam.cpu.cpu_family()
    # the recorded agreement is the runtime's, on the held-out files
    fp32, int8 = npcam.load(fp32_bundle), npcam.load(out)
    held_out = quantize.image_sets(folders / "calibration")[1]
    agree = [fp32.predict(p).top1 == int8.predict(p).top1 for p in held_out]
    assert q["top1_agreement"] == pytest.approx(np.mean(agree))


def test_export_checks_on_a_second_folder(tiny, folders, tmp_path, capsys):
    model, _ = tiny
    out = tmp_path / "int8"
    args = ["onnx", str(model), "--out", str(out), "--int8", str(folders / "calibration")]
    assert main([*args, "--int8-check", str(folders / "check")]) == 0
    q = json.loads((out / "bundle.json").read_text())["int8"]
    assert q["images"] == 7 and q["check_images"] == 3 and str(folders / "check") in q["checked_on"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["onnx", str(model), "--out", str(tmp_path / "x"), "--int8-check", str(folders / "check")])
    assert "--int8-check and --int8-setting need --int8" in capsys.readouterr().err


def test_cpu_family():
    assert npcam.cpu.cpu_family(X86_EPYC, "x86_64") == "x86_64 vnni"
    assert npcam.cpu.cpu_family(X86_HASWELL, "x86_64") == "x86_64"
    assert npcam.cpu.cpu_family(ARM64_NEOVERSE_N1, "aarch64") == "aarch64"


def test_warns_once_for_a_trunk_that_is_not_portable(tiny, tmp_path, capsys, monkeypatch):
    _, fp32_bundle = tiny
    monkeypatch.setattr(npcam.cpu, "_warned", set())
    bundles = []
    kinds = (("other", "aarch64-elsewhere", False), ("same", None, False), ("ok", "x", True))
    for name, family, portable in kinds:
        path = tmp_path / name
        shutil.copytree(fp32_bundle, path)
        meta = bundle_format.peek_meta(path)
        # no same_on: the family measured on is the only one
        q = {"settings": "u8s8", "portable": portable, "cpu_family": family or npcam.cpu.cpu_family()}
        bundle_format.seal(path, {**meta, "precision": "int8", "int8": q})
        bundles.append(path)
    for path in bundles[1:]:  # measured on this kind of CPU, or portable: no warning
        npcam.load(path)
    assert capsys.readouterr().err == ""
    npcam.load(bundles[0])
    npcam.load(bundles[0])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "aarch64-elsewhere" in err[0] and str(bundles[0]) in err[0], err


def test_same_on():
    """8-bit u8s8 gave the same integers on x86 with VNNI and on aarch64 (measured, docs/export.md); s8s8 did
    not, and x86 without VNNI saturates."""
    assert quantize.same_on("u8s8 reduce_range", "x86_64") == ["*"]
    assert quantize.same_on("u8s8 entropy", "x86_64 vnni") == ["x86_64 vnni", "aarch64"]
    assert quantize.same_on("u8s8", "x86_64") == ["x86_64"]
    assert quantize.same_on("s8s8", "aarch64") == ["aarch64"]


def test_zero_pads_fold_into_the_next_conv():
    """The fold is exact (onnxruntime on the original graph is the reference); a Pad of another value stays."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "amounts"),
        numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "amounts2"),
        numpy_helper.from_array(np.float32(0.5), "half"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Pad", ["image", "amounts"], ["p1"], mode="constant"),  # SAME, stride 2: (0, 1)
        helper.make_node("Conv", ["p1", "w1"], ["c1"], strides=[2, 2]),
        helper.make_node("Pad", ["c1", "amounts2"], ["p2"]),
        helper.make_node("Conv", ["p2", "w2"], ["c2"], group=4, pads=[1, 1, 1, 1]),  # own pads add up
        helper.make_node("Pad", ["c2", "amounts", "half"], ["p3"]),  # pads with 0.5: not a conv's zeros
        helper.make_node("Conv", ["p3", "w3"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes, "pads", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)], init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    fused = export_graph.fuse_pads(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Conv", "Pad", "Conv"]
    got = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert got[0].shape == want[0].shape
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)  # float32 sums of 27 terms, reordered


def test_shape_dependent_trunk_is_quantized_at_a_fixed_size(tiny, folders, tmp_path, monkeypatch):
    """A trunk that computes from its input's shape (Lite0's SAME padding) gets a fixed-size int8 trunk; the
    tiny model has no Shape node, so the rule is forced here and checked through the bundle it makes."""
    model, _ = tiny
    assert not quantize.shape_dependent(onnx.load(model))
    monkeypatch.setattr(quantize, "shape_dependent", lambda m: True)
    out = run_onnx(model, out=tmp_path / "int8", int8=folders / "calibration")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["fixed_size"] is True and all(s.endswith(" fixed") for s in meta["int8"]["tried"])
    dims = [d.dim_value for d in onnx.load(out / "trunk.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    int8 = npcam.load(out)
    assert int8.predict(folders / "check" / "00.png").features.shape == (32, 16, 16)
    with pytest.raises(npcam.NpcamError):
        int8.predict(folders / "check" / "00.png", keep_aspect=True)


def test_int8_setting_option(tiny, folders, tmp_path, capsys):
    model, _ = tiny
    args = ["onnx", str(model), "--int8", str(folders / "calibration"), "--int8-setting"]
    assert main([*args, "u8u8 float=first", "--out", str(tmp_path / "a")]) == 0
    assert list(json.loads((tmp_path / "a" / "bundle.json").read_text())["int8"]["tried"]) == ["u8u8 float=first"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "u8s8 fast", "--out", str(tmp_path / "b")])
    assert "unknown word 'fast'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_choose_the_fastest_of_the_best_agreeing():
    def r(top1, ms, fp32=10.0):
        return {"top1_agreement": top1, "trunk_ms": ms, "fp32_trunk_ms": fp32}

    # 100 images: 0.98 and 0.99 are one image apart (equal), 0.96 is not
    results = {"a": r(0.99, 6.0), "b": r(0.98, 4.0), "c": r(0.96, 2.0)}
    assert quantize.choose(results, list(results), 100) == "b"
    # speed as the ratio to fp32 measured alongside: "a" ran while the machine was twice as slow
    results = {"a": r(0.99, 6.0, fp32=20.0), "b": r(0.99, 4.0)}
    assert quantize.choose(results, list(results), 100) == "a"
    # none faster than fp32: the same rule over all of them
    results = {"a": r(0.99, 12.0), "b": r(0.90, 11.0)}
    assert quantize.choose(results, [], 100) == "a"


def test_windows_are_what_a_conv_multiplies():
    """export.gptq's input windows, times the weights, give onnxruntime's Conv output: strides, asymmetric pads,
    dilations, groups and depthwise. float64 windows against float32 onnxruntime sums of up to 36 products
    of values within 1: within 1e-4."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export import gptq

    rng = np.random.default_rng(1)
    cases = [  # channels in, out, kernel, attributes
        (4, 6, (3, 3), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
        (4, 6, (3, 2), {"dilations": [2, 1], "pads": [2, 1, 2, 1]}),
        (4, 6, (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
        (4, 4, (5, 5), {"group": 4, "pads": [2, 2, 2, 2], "strides": [2, 2]}),
        (3, 5, (1, 1), {}),
    ]
    for cin, cout, (kh, kw), attributes in cases:
        groups = attributes.get("group", 1)
        w = rng.uniform(-1, 1, (cout, cin // groups, kh, kw)).astype(np.float32)
        x = rng.uniform(-1, 1, (1, cin, 9, 11)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], **attributes)
        graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        patches = gptq.windows(x[0].astype(np.float64), node, (kh, kw))  # C, kh*kw, P
        grouped = patches.reshape(groups, -1, patches.shape[2])
        rows = w.reshape(groups, cout // groups, -1).astype(np.float64)
        got = np.matmul(rows, grouped).reshape(cout, -1)
        np.testing.assert_allclose(got, want[0].reshape(cout, -1), atol=1e-4)


def test_gptq_rounding_lowers_the_output_error_on_other_inputs():
    """GPTQ's integers, chosen from the second moments of one sample of inputs, give a smaller output error
    ``(w - q) . x`` than rounding to nearest on another sample, and stay in the range given. Correlated,
    positive inputs (as after a ReLU) are the case GPTQ is for; rounding to nearest is the reference."""
    from export import gptq

    rng = np.random.default_rng(2)
    mixing = rng.standard_normal((48, 48)) / 4 + np.eye(48)
    samples = [np.maximum(rng.standard_normal((4000, 48)) @ mixing + 0.5, 0) for _ in range(2)]
    weights = rng.standard_normal((2, 16, 48))  # 2 groups of 16 rows
    scale = np.abs(weights).max(axis=2, keepdims=True) / 64  # 7-bit, symmetric
    moments = np.stack([samples[0].T @ samples[0] / len(samples[0])] * 2)
    rounded = gptq.gptq(weights / scale, moments, -64, 64)
    nearest = np.round(weights / scale)
    assert rounded.min() >= -64 and rounded.max() <= 64 and not np.array_equal(rounded, nearest)

    def error(q):
        return np.mean((np.einsum("gmk,nk->gmn", weights - q * scale, samples[1])) ** 2)

    assert error(rounded) < 0.8 * error(nearest), (error(rounded), error(nearest))


def test_unsigned_weights_compute_as_the_signed_ones_without_saturating(tiny, tmp_path):
    """'unsigned' stores the int8 weights as uint8 + 128: the same values, so the trunk's features are
    bit-identical to those of the int8 trunk run with onnxruntime's own conversion (session.x64quantprecision,
    which x86 CPUs without VNNI need to avoid saturation and other CPUs ignore)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    _, fp32_bundle = tiny
    model = tmp_path / "trunk.onnx"
    model.write_bytes(npcam.load(fp32_bundle).bundle.trunk)
    inputs = [np.asarray(synthetic_image(64, 64, seed=i), np.float32).transpose(2, 0, 1)[None] / 255 for i in range(4)]
    quantize.quantize_trunk(model, inputs, tmp_path / "s8.onnx", "u8s8")
    quantize.quantize_trunk(model, inputs, tmp_path / "u8.onnx", "u8s8 unsigned")
    signed, unsigned = (onnx.load(tmp_path / f"{n}.onnx") for n in ("s8", "u8"))
    values = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (signed, unsigned)]
    weights = [n for n, v in values[1].items() if v.dtype == np.uint8 and v.ndim == 4]
    assert len(weights) == 4  # the four convs
    for name in weights:
        np.testing.assert_array_equal(values[1][name].astype(int), values[0][name].astype(int) + 128)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    sessions = [ort.InferenceSession((tmp_path / "s8.onnx").read_bytes(), options, providers=["CPUExecutionProvider"]),
                ort.InferenceSession((tmp_path / "u8.onnx").read_bytes(), providers=["CPUExecutionProvider"])]
    for x in inputs:
        a, b = (s.run(["features"], {"image": x})[0] for s in sessions)
        np.testing.assert_array_equal(a, b)
    assert quantize.portable("u8s8 unsigned") and not quantize.portable("u8s8")


def test_gptq_trunk_follows_fp32_more_closely(tiny, folders, tmp_path):
    """On the tiny model, 7-bit weights rounded by GPTQ give features closer to fp32's than rounded to nearest,
    on images not calibrated on (7-bit: the same integers on every CPU)."""
    import onnxruntime as ort

    _, fp32_bundle = tiny
    fp32 = npcam.load(fp32_bundle)
    model = tmp_path / "trunk.onnx"
    model.write_bytes(fp32.bundle.trunk)
    calibration = [fp32.preprocess(p) for p in sorted((folders / "calibration").iterdir())]
    held_out = [fp32.preprocess(p) for p in sorted((folders / "check").iterdir())]
    errors = []
    for setting in ("u8s8 reduce_range", "u8s8 reduce_range gptq"):
        quantize.quantize_trunk(model, calibration, tmp_path / "q.onnx", setting)
        session = ort.InferenceSession((tmp_path / "q.onnx").read_bytes(), providers=["CPUExecutionProvider"])
        errors.append(np.mean([(session.run(["features"], {"image": x})[0] - fp32.features(x)) ** 2 for x in held_out]))
    assert errors[1] < errors[0], errors
