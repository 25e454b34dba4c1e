"""The TFLite and Keras routes, against the original model in its own runtime on the same inputs.

Small classifiers are built here with Keras (conv, BN, ReLU, a strided conv, global average pooling, Dense),
converted by TensorFlow's own TFLite converter (float, and full-integer int8 calibrated on a representative
set, per-channel weights) and saved as ``.keras`` and ``.h5``; each file is exported with the real command.
References: LiteRT's interpreter (``ai-edge-litert``) for ``.tflite`` files, Keras' ``predict`` and a Keras
sub-model of the last conv features for Keras files. The CAM reference is computed from the reference's own
features and Dense weights: ``relu(sum_c W[k, c] f_c) / max``.

Tolerances:
- float models: scores (probabilities or logits) within 1e-4 relative to the largest (build.TOLERANCE; two
  float32 runtimes summing in different orders differ by ~1e-6, while a wrong layout, normalization,
  channel order or dropped op gives errors of order 1); maps within 1e-4 on their [0, 1] scale.
- int8 models: probabilities within ``s_out + s_z`` (one output step and two logit steps through the softmax,
  read from the interpreter's own tensors; the derivation is in export.from_tflite._int8_bound and the docs),
  logits within two steps; last conv features within one step ``s_f`` of TFLite's (TFLite's fixed-point
  requantization rounds twice, onnxruntime's once: a fraction of the cells is one step apart), and maps within
  the change one feature step in every cell can make.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import PHOTOS, record

try:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf2onnx  # noqa: F401  (the converter the routes use)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
except ImportError as e:
    if os.environ.get("CI"):  # CI installs the extras: a missing one must fail there, not skip
        raise
    pytest.skip(
        f"the TFLite/Keras routes need the tflite and keras extras ({e}): pip install -e '.[tflite,keras]'",
        allow_module_level=True,
    )

import onnx

import npcam
from export import hybrid as export_hybrid
from export.__main__ import main as export_main

SIZE = 32
CLASSES = 5
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, what npcam's trunk computes for a grey model
# name: (channels, batch, output)
KINDS = {
    "rgb": (3, None, "softmax"),  # any batch; the softmax inside the Dense layer
    "grey": (1, 1, "softmax"),  # [1, H, W, 1]; a separate Softmax layer
    "batch1": (3, 1, "logits"),  # made for one image at a time; no softmax
}


def classifier(kind: str) -> keras.Model:
    """A seeded small CNN with BN statistics and a Dense bias away from their defaults (else untested)."""
    channels, batch, output = KINDS[kind]
    keras.utils.set_random_seed(list(KINDS).index(kind))
    inp = keras.Input((SIZE, SIZE, channels), batch_size=batch)
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    softmax_in_dense = kind == "rgb"
    x = keras.layers.Dense(CLASSES, activation="softmax" if softmax_in_dense else None, name="fc")(x)
    if output == "softmax" and not softmax_in_dense:
        x = keras.layers.Softmax()(x)
    net = keras.Model(inp, x)
    rng = np.random.default_rng(7)
    bn = next(layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization))
    bn.set_weights(
        [rng.uniform(0.5, 1.5, 8), rng.uniform(-0.2, 0.2, 8), rng.uniform(-0.2, 0.2, 8), rng.uniform(0.5, 2, 8)]
    )
    kernel, _ = net.get_layer("fc").get_weights()
    net.get_layer("fc").set_weights([kernel * 4, rng.uniform(-0.5, 0.5, CLASSES)])  # logits of a few units
    return net


def calibration(channels: int):
    """The representative set for int8 calibration: normalized-scale random images."""
    rng = np.random.default_rng(3)
    for _ in range(16):
        yield [rng.standard_normal((1, SIZE, SIZE, channels)).astype(np.float32)]


def to_tflite(net: keras.Model, mode: str) -> bytes:
    """TFLite's converter: ``float``; ``int8`` full-integer (int8 input and output); ``int8_float_io`` int8 ops
    between float input and output (the converter's default I/O); ``dynamic``: int8 weights only (per channel,
    the converter's default); ``dynamic_per_tensor``: one scale per weight tensor."""
    converter = tf.lite.TFLiteConverter.from_keras_model(net)
    if mode != "float":  # int8 kernels; per-channel weights are the converter's default
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic_per_tensor":
        converter._experimental_disable_per_channel = True
    if mode.startswith("int8"):
        converter.representative_dataset = lambda: calibration(net.inputs[0].shape[-1])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if mode == "int8":
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each kind as a Keras model and as float and int8 ``.tflite`` files, ``.keras`` and ``.h5`` files."""
    root = tmp_path_factory.mktemp("tf")
    made = {}
    for kind in KINDS:
        net = classifier(kind)
        (root / f"{kind}.tflite").write_bytes(to_tflite(net, "float"))
        (root / f"{kind}_int8.tflite").write_bytes(to_tflite(net, "int8"))
        net.save(root / f"{kind}.keras")
        net.save(root / f"{kind}.h5")
        made[kind] = net
    (root / "rgb_int8_float_io.tflite").write_bytes(to_tflite(made["rgb"], "int8_float_io"))
    return root, made


def export(path, out, capfd) -> npcam.Model:
    """The real command; a successful export prints one line (no TensorFlow or LiteRT lines, fd-level too)."""
    capfd.readouterr()
    route = "tflite" if path.suffix == ".tflite" else "keras"
    assert export_main([route, str(path), "--out", str(out)]) == 0
    err = capfd.readouterr().err
    err = [line for line in err.splitlines() if line.strip()]  # onnxruntime's probe sessions are quiet too
    assert len(err) == 1 and err[0].startswith("exported "), err
    return npcam.load(out)


class TFLite:
    """A ``.tflite`` file in LiteRT's reference kernels (no XNNPACK delegate, so every tensor can be read)."""

    def __init__(self, path):
        self.it = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            experimental_preserve_all_tensors=True,
        )
        self.it.allocate_tensors()
        self.all_ops = self.it._get_ops_details()
        self.ops = {op["op_name"]: op for op in self.all_ops}  # MEAN, FULLY_CONNECTED, SOFTMAX: one each
        self.details = {t["index"]: t for t in self.it.get_tensor_details()}

    def quant(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.details[index]["quantization_parameters"]
        return q["scales"], q["zero_points"]

    def tensor(self, index: int) -> np.ndarray:
        """A tensor's values, dequantized (per channel on the first axis for weights)."""
        value = self.it.get_tensor(index)
        if value.dtype == np.float32:
            return value.astype(np.float64)
        scales, zeros = self.quant(index)
        shape = (-1,) + (1,) * (value.ndim - 1) if len(scales) > 1 else ()
        return (value.astype(np.float64) - zeros.reshape(shape)) * scales.reshape(shape)

    def run(self, nchw: np.ndarray, grey: bool) -> tuple[np.ndarray, np.ndarray]:
        """npcam's normalized RGB input ``[1,3,H,W]`` -> (dequantized output ``[K]``, last conv features ``[h,w,C]``)."""
        x = nchw.astype(np.float64).transpose(0, 2, 3, 1)
        x = (x @ LUMA)[..., None] if grey else x
        (inp,), (out,) = self.it.get_input_details(), self.it.get_output_details()
        if inp["dtype"] != np.float32:
            (scale,), (zero,) = self.quant(inp["index"])
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        self.it.set_tensor(inp["index"], x.astype(inp["dtype"]))
        self.it.invoke()
        return self.tensor(out["index"])[0], self.tensor(self.ops["MEAN"]["inputs"][0])[0]


def reference_cam(features_hwc: np.ndarray, weight_kc: np.ndarray, k: int) -> np.ndarray:
    cam = np.maximum(np.einsum("hwc,c->hw", features_hwc, weight_kc[k]), 0)
    return cam / cam.max() if cam.max() > 0 else cam


def inputs(model: npcam.Model):
    """npcam's own preprocessed photos, and two random normalized images."""
    rng = np.random.default_rng(11)
    photos = [model.predict(p).input for p in PHOTOS]
    return photos + [rng.standard_normal((1, 3, SIZE, SIZE), dtype=np.float32) for _ in range(2)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_float_tflite_against_the_interpreter(kind, models, tmp_path, capfd):
    root, _ = models
    model = export(root / f"{kind}.tflite", tmp_path / "b", capfd)
    assert model.head.kind == "affine" and npcam.methods.default_name(model.head.kind) == "cam"
    reference = TFLite(root / f"{kind}.tflite")
    fc = reference.ops["FULLY_CONNECTED"]
    weight = reference.tensor(fc["inputs"][1])  # [K, C]
    for x in inputs(model):
        want, features = reference.run(x, grey=kind == "grey")
        scores = model.scores(x)[0].astype(np.float64)
        got = scores if KINDS[kind][2] == "logits" else model.probabilities(scores)
        error = np.abs(got - want).max() / np.abs(want).max()
        assert record(f"TFLite float {kind}: scores, relative", error) <= 1e-4
        pred = model.classify([np.zeros((SIZE, SIZE, 3), np.uint8)], [x])[0]
        for k in range(CLASSES):
            got_map = model.cam(pred, k)
            assert (
                record(f"TFLite float {kind}: CAM, abs", np.abs(got_map - reference_cam(features, weight, k)).max())
                <= 1e-4
            )


@pytest.mark.parametrize("kind", [*KINDS, "rgb_float_io"])
def test_int8_tflite_within_its_quantization_bound(kind, models, tmp_path, capfd):
    """Full-integer models (int8 input and output), and one with float input and output around int8 ops."""
    root, _ = models
    path = root / (f"{kind}_int8.tflite" if kind in KINDS else "rgb_int8_float_io.tflite")
    kind = kind.removesuffix("_float_io")
    reference = TFLite(path)
    for conv in [op for op in reference.all_ops if op["op_name"] == "CONV_2D"]:  # per-channel weights
        weights = conv["inputs"][1]
        assert len(reference.quant(weights)[0]) == reference.details[weights]["shape"][0] > 1
    model = export(path, tmp_path / "b", capfd)
    assert model.head.kind == "graph" and npcam.methods.default_name(model.head.kind) == "gradcam"  # the head's Q/DQ pairs
    logits = float(reference.quant(reference.ops["FULLY_CONNECTED"]["outputs"][0])[0][0])  # s_z
    if KINDS[kind][2] == "softmax":
        s_out = float(reference.quant(reference.ops["SOFTMAX"]["outputs"][0])[0][0])
        bound = s_out + logits  # one output step (rounding, fixed-point exp) + two logit steps through the softmax
    else:
        bound = 2 * logits  # the int8 logits themselves: one step inherited from the pooled vector, one their own
    mean = reference.ops["MEAN"]
    s_f = float(reference.quant(mean["inputs"][0])[0][0])
    fc = reference.ops["FULLY_CONNECTED"]
    weight = reference.tensor(fc["inputs"][1])  # [K, C], dequantized per output channel
    for x in inputs(model):
        want, features = reference.run(x, grey=kind == "grey")
        scores = model.scores(x)[0].astype(np.float64)
        got = scores if KINDS[kind][2] == "logits" else model.probabilities(scores)
        assert record(f"TFLite int8 {kind}: scores, in bounds", np.abs(got - want).max() / bound) <= 1 + 1e-5  # float32
        pred = model.classify([np.zeros((SIZE, SIZE, 3), np.uint8)], [x])[0]
        ours = pred.features.transpose(1, 2, 0).astype(np.float64)
        steps = np.abs(ours - features) / s_f  # whole steps, up to float32 rounding of the dequantized values
        assert record(f"TFLite int8 {kind}: features, steps", steps.max()) <= 1.001
        record(f"TFLite int8 {kind}: feature cells one step off, fraction", np.mean(steps > 0.5))
        for k in range(CLASSES):
            want_map = reference_cam(features, weight, k)
            raw_max = np.maximum(np.einsum("hwc,c->hw", features, weight[k]), 0).max()
            # one feature step in a cell moves that cell's raw map by <= s_f * sum|W_k|, and the max by as much
            tol = 2 * s_f * np.abs(weight[k]).sum() / raw_max + 1e-5 if raw_max > 0 else 1e-5
            assert np.abs(model.cam(pred, k) - want_map).max() <= tol
            record(f"TFLite int8 {kind}: map, abs", np.abs(model.cam(pred, k) - want_map).max())


def mobile(depthwise: bool = True) -> keras.Model:
    """Every weight tensor large enough for dynamic-range quantization (1024 values or more), so that the conv,
    the depthwise conv, the 1x1 conv and the Dense layer are all hybrid in TFLite; logits out."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(128, 3, padding="same")(inp)))
    if depthwise:
        x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu")(x)
    else:  # LiteRT's own per-tensor hybrid depthwise kernel gives values of order 1e30 (ai-edge-litert 2.3.0)
        x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    net = keras.Model(inp, keras.layers.Dense(40, name="fc")(x))
    bn = next(layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization))
    rng = np.random.default_rng(8)
    bn.set_weights([rng.uniform(0.5, 1.5, 128), rng.uniform(-0.2, 0.2, 128), rng.uniform(-0.2, 0.2, 128),
                    rng.uniform(0.5, 2, 128)])  # fmt: skip
    return net


# name: (model, converter mode); what is hybrid in TFLite
DYNAMIC = {
    "rgb": (lambda: classifier("rgb"), "dynamic"),  # the last conv (the first and the Dense are too small)
    "mobile": (mobile, "dynamic"),  # conv, depthwise, 1x1 conv, Dense: the converter's default, per channel
    # the same with every hybrid convolution in ConvInteger, as for convolutions whose integer sums can pass
    # 2**24 (a 3x3 conv over hundreds of channels): these small ones would be summed in float32 otherwise
    "mobile_int32": (mobile, "dynamic"),
    "per_tensor": (lambda: mobile(depthwise=False), "dynamic_per_tensor"),  # symmetric hybrid convolutions
}


class Hybrid(TFLite):
    """A dynamic-range ``.tflite`` file in LiteRT's built-in kernels, with the limits its hybrid kernels set
    for the bundle (derived in export/hybrid.py, DenseBound):

    - the output: the bundle and TFLite each round the hybrid Dense layer's input ``p`` (the pooled features,
      equal to float32 rounding) to the nearest step ``s`` of its per-row int8 range, so the quantized inputs
      are at most one step apart and the logits at most ``s * max_k sum_c |W[k, c]|`` (times 1/2 through the
      softmax), plus the float tolerance 1e-4 of the largest output; a model without a hybrid Dense layer has
      the float tolerance alone. The step and the weights are LiteRT's own tensors.
    - the last conv's features, the same way: its input (equal to float32 rounding) quantized by both sides
      to steps ``s_u`` at most one step apart, so output channel ``o`` moves by at most ``s_u * sum |W_o|``,
      plus 1e-5 of the largest feature for float32 rounding.
    """

    def __init__(self, path, per_tensor: bool = False):
        super().__init__(path)
        self.per_tensor = per_tensor
        fc = self.ops["FULLY_CONNECTED"]
        self.hybrid_fc = self.details[fc["inputs"][1]]["dtype"] == np.int8
        self.weight = self.tensor(fc["inputs"][1])  # [K, C], dequantized per output channel
        self.softmax = "SOFTMAX" in self.ops
        self.last = next(op for op in self.all_ops if op["outputs"][0] == self.ops["MEAN"]["inputs"][0])
        assert self.details[self.last["inputs"][1]]["dtype"] == np.int8  # the last conv is hybrid
        self.last_l1 = np.abs(self.tensor(self.last["inputs"][1])).sum(axis=(1, 2, 3))  # [O]; weights [O,kh,kw,C]

    def limits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """npcam's input ``[1,3,H,W]`` -> (output ``[K]``, last conv features ``[h,w,C]``, the output's limit,
        the features' limit ``[C]``)."""
        want, features = self.run(x, grey=False)
        bound = 0.0
        if self.hybrid_fc:
            p = self.tensor(self.ops["FULLY_CONNECTED"]["inputs"][0])[0]
            step = (max(p.max(), 0) - min(p.min(), 0)) / 255  # asymmetric_quantize_inputs (the converter's)
            bound = step * np.abs(self.weight).sum(axis=1).max() * (0.5 if self.softmax else 1)
        u = self.tensor(self.last["inputs"][0])[0]
        step_u = np.abs(u).max() / 127 if self.per_tensor else (max(u.max(), 0) - min(u.min(), 0)) / 255
        feature_limit = step_u * self.last_l1 + 1e-5 * np.abs(features).max()
        return want, features, bound + 1e-4 * np.abs(want).max(), feature_limit


@pytest.mark.parametrize("kind", list(DYNAMIC))
def test_dynamic_range_tflite_computes_as_the_hybrid_kernels(kind, tmp_path, capfd, monkeypatch):
    """A dynamic-range model (int8 weights, float activations; TFLite's converter's default without a
    representative dataset) within the limits of :class:`Hybrid` of LiteRT's built-in hybrid kernels, whose
    integer arithmetic the bundle reproduces (export.hybrid). Grad-CAM's gradient through the Dense layer's
    quantization is the straight-through one: the dequantized weights, to float32 rounding of the weights."""
    make, mode = DYNAMIC[kind]
    path = tmp_path / f"{kind}_dynamic.tflite"
    path.write_bytes(to_tflite(make(), mode))
    if kind == "mobile_int32":
        monkeypatch.setattr(export_hybrid, "EXACT_IN_FLOAT32", 0)
    model = export(path, tmp_path / "b", capfd)
    trunk_ops = {n.op_type for n in onnx.load(model.bundle.path / "trunk.onnx").graph.node}
    if kind.startswith("mobile"):  # every conv hybrid: summed in float32 (exactly), or all in ConvInteger
        assert trunk_ops & {"Conv", "ConvInteger"} == {"ConvInteger" if kind == "mobile_int32" else "Conv"}
    reference = Hybrid(path, per_tensor=mode == "dynamic_per_tensor")
    default = Interpreter(model_path=str(path))  # XNNPACK, LiteRT's default
    default.allocate_tensors()
    source = model.bundle.meta["source"]["dynamic_range"]
    assert source["fully_connected"] == ("asymmetric" if reference.hybrid_fc else None)
    assert source["hybrid_convolutions"] == sum(
        reference.details[op["inputs"][1]]["dtype"] == np.int8
        for op in reference.all_ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")
    )  # fmt: skip
    for x in inputs(model):
        want, features, limit, feature_limit = reference.limits(x)
        scores = model.scores(x)[0].astype(np.float64)
        got = model.probabilities(scores) if reference.softmax else scores
        error = np.abs(got - want).max() / limit
        assert record(f"TFLite dynamic {kind}: output vs built-in kernels, of the limit", error) <= 1
        # Measured, not bounded: XNNPACK quantizes a hybrid 1x1 conv's input per pixel, not per image, and
        # per-tensor hybrid convs otherwise too (docs/tflite-keras.md); the bound above is the built-in kernels'.
        (i,), (o,) = default.get_input_details(), default.get_output_details()
        default.set_tensor(i["index"], x.transpose(0, 2, 3, 1).astype(np.float32))
        default.invoke()
        error = np.abs(got - default.get_tensor(o["index"])[0]).max() / limit
        record(f"TFLite dynamic {kind}: output vs default (XNNPACK), of the limit", error)
        pred = model.classify([np.zeros((SIZE, SIZE, 3), np.uint8)], [x])[0]
        ours = pred.features.transpose(1, 2, 0).astype(np.float64)
        error = (np.abs(ours - features) / feature_limit).max()
        assert record(f"TFLite dynamic {kind}: features, of the limit", error) <= 1
        weight = reference.weight
        if model.head.kind == "graph":
            classes = list(range(len(scores)))
            gradient = model.probe(pred, classes).gradient().sum(axis=(2, 3))  # [K, C]: the pooled vector's gradient
            assert np.abs(gradient - weight).max() <= 1e-6 * np.abs(weight).max()
        else:
            assert np.abs(model.head.weight - weight).max() <= 1e-6 * np.abs(weight).max()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_keras_against_predict_and_its_own_features(kind, suffix, models, tmp_path, capfd):
    root, nets = models
    net = nets[kind]
    model = export(root / f"{kind}{suffix}", tmp_path / "b", capfd)
    assert model.head.kind == "affine"
    trunk = keras.Model(net.inputs, net.get_layer("last_conv").output)
    weight = net.get_layer("fc").get_weights()[0].T.astype(np.float64)  # [K, C]
    grey = kind == "grey"
    for x in inputs(model):
        nhwc = x.astype(np.float64).transpose(0, 2, 3, 1)
        nhwc = ((nhwc @ LUMA)[..., None] if grey else nhwc).astype(np.float32)
        want = net.predict(nhwc, verbose=0)[0].astype(np.float64)
        scores = model.scores(x)[0].astype(np.float64)
        got = scores if KINDS[kind][2] == "logits" else model.probabilities(scores)
        assert record(f"Keras {kind}: scores, relative", np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
        features = trunk.predict(nhwc, verbose=0)[0].astype(np.float64)
        pred = model.classify([np.zeros((SIZE, SIZE, 3), np.uint8)], [x])[0]
        for k in range(CLASSES):
            error = np.abs(model.cam(pred, k) - reference_cam(features, weight, k)).max()
            assert record(f"Keras {kind}: CAM, abs", error) <= 1e-4


def test_keras2_file_through_tf_keras(tmp_path, capfd):
    """A ``.keras`` file that Keras 2 (tf-keras) wrote: Keras 3 cannot read it, so tf-keras loads it."""
    import tf_keras

    tf_keras.utils.set_random_seed(5)
    inp = tf_keras.Input((SIZE, SIZE, 3))
    x = tf_keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="last_conv")(inp)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    x = tf_keras.layers.Dense(CLASSES, bias_initializer="glorot_uniform", name="fc")(x)
    net = tf_keras.Model(inp, x)
    net.save(tmp_path / "k2.keras")
    model = export(tmp_path / "k2.keras", tmp_path / "b", capfd)
    assert model.bundle.meta["versions"]["keras"].startswith("tf-keras ")
    trunk = tf_keras.Model(net.inputs, net.get_layer("last_conv").output)
    weight = net.get_layer("fc").get_weights()[0].T.astype(np.float64)
    for x in inputs(model):
        nhwc = x.transpose(0, 2, 3, 1)
        want = net.predict(nhwc, verbose=0)[0].astype(np.float64)
        got = model.scores(x)[0].astype(np.float64)
        assert record("Keras 2 (tf-keras): logits, relative", np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
        features = trunk.predict(nhwc, verbose=0)[0].astype(np.float64)
        pred = model.classify([np.zeros((SIZE, SIZE, 3), np.uint8)], [x])[0]
        for k in range(CLASSES):
            assert np.abs(model.cam(pred, k) - reference_cam(features, weight, k)).max() <= 1e-4


def flatten_head() -> keras.Model:
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    return keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def mlp_on_pixels() -> keras.Model:
    """Dense layers on the flattened image: no map or tokens in front of the scores, nothing to explain."""
    inp = keras.Input((16, 16, 3))
    return keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(inp))))


@pytest.mark.parametrize("route", ["keras", "tflite"])
def test_a_flatten_head_is_explained_at_its_map_channels_first(route, tmp_path):
    """Keras flattens its NHWC map; tf2onnx runs the conv in NCHW and transposes back for the Flatten. The layer
    is the conv's map channels first (4 channels on a 14x14 grid, not 14 on 14x4), the Transpose in the head,
    and its gradient is TensorFlow's: features within 1e-5, Grad-CAM's gradient within 1e-4 of its largest."""
    keras.utils.set_random_seed(7)
    net = flatten_head()
    path = tmp_path / f"flat.{route}"
    if route == "keras":
        net.save(path)
    else:
        path.write_bytes(to_tflite(net, "float"))
    assert export_main([route, str(path), "--out", str(tmp_path / "b")]) == 0
    model = npcam.load(tmp_path / "b")
    assert model.head.layout == "spatial" and model.head.input_shape == (-1, 4, 14, 14)
    pred = model.predict(PHOTOS[0])
    x = tf.constant(pred.input.transpose(0, 2, 3, 1))  # what npcam fed the trunk, as Keras takes it
    with tf.GradientTape() as tape:
        a = net.layers[1](x)  # the conv's NHWC map
        tape.watch(a)
        scores = net.layers[3](net.layers[2](a))
        score = scores[0, pred.top1]
    want_a = a.numpy()[0].transpose(2, 0, 1)
    want_g = tape.gradient(score, a).numpy()[0].transpose(2, 0, 1)
    assert record("Keras Flatten head features, abs", np.abs(pred.features - want_a).max()) <= 1e-5
    got_g = model.probe(pred, [pred.top1]).gradient()[0]
    error = np.abs(got_g - want_g).max() / np.abs(want_g).max()
    assert record(f"Keras Flatten head gradient ({route}), relative", error) <= 1e-4


def two_dense() -> keras.Model:
    """Two Dense layers after the pooling, each large enough for the converter's dynamic-range quantization
    (it leaves tensors of fewer than 1024 values float): npcam reproduces one hybrid Dense layer, the last."""
    inp = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(64, 3, activation="relu")(inp))
    return keras.Model(inp, keras.layers.Dense(40)(keras.layers.Dense(64, activation="relu")(x)))


REFUSED = {
    "not a flatbuffer": ("tflite", "junk.tflite", lambda p: p.write_bytes(b"\x00 not a model " * 8), "not a TensorFlow Lite model"),
    "missing": ("tflite", "none.tflite", lambda p: None, "no such file"),
    "wrong suffix": ("tflite", "m.onnx", lambda p: p.write_bytes(b"x"), "expected a TensorFlow Lite file"),
    "two int8 dense layers": ("tflite", "mlp.tflite", lambda p: p.write_bytes(to_tflite(two_dense(), "dynamic")), "2 fully connected layers with int8 weights"),
    "not a zip": ("keras", "junk.keras", lambda p: p.write_bytes(b"nope" * 8), "not a .keras file"),
    "not HDF5": ("keras", "junk.h5", lambda p: p.write_bytes(b"nope" * 8), "Keras cannot load it"),
    "no map before the scores": ("keras", "mlp.keras", lambda p: mlp_on_pixels().save(p), "no trunk before it"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_are_one_line_and_write_nothing(case, tmp_path, capfd):
    route, name, make, message = REFUSED[case]
    make(tmp_path / name)
    capfd.readouterr()
    assert export_main([route, str(tmp_path / name), "--out", str(tmp_path / "b")]) == 1
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and err[0].startswith("export: error: "), err
    assert not (tmp_path / "b").exists()


def test_int8_model_refuses_another_quantization(models, tmp_path, capfd):
    root, _ = models
    capfd.readouterr()
    assert (
        export_main(["tflite", str(root / "rgb_int8.tflite"), "--int8", str(tmp_path), "--out", str(tmp_path / "b")])
        == 1
    )
    assert "already int8" in capfd.readouterr().err and not (tmp_path / "b").exists()
