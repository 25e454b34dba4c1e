"""An int8 trunk: onnxruntime static quantization (QDQ), calibrated on the user's images, checked on others.

The export calibrates on one set of images and measures agreement with fp32
on images it did not calibrate on: the second folder given (``--int8-check``),
else the other half of the folder (its images in sorted order, alternately).

A setting is a string of words, which ``bundle.json`` records as given and
:func:`parse_setting` reads:

- the kernels: ``u8s8`` (uint8 activations, int8 weights), ``u8u8``, ``s8s8``;
- ``unsigned`` (with ``u8s8``): the int8 weights stored as uint8 around a zero point of 128
  (:func:`unsigned_weights`), which every CPU multiplies without saturating;
- ``reduce_range``: 7-bit weights;
- the calibration: ``minmax`` (default), ``entropy``, ``percentile``;
- ``per_tensor`` weights (default: per channel);
- ``symmetric`` activations;
- ``float=first+depthwise+last+add``: layers left in float (the first conv, or
  ``firstN`` the first N, at most a quarter of them; the depthwise convs, the last conv, the residual additions);
- ``gptq``: round the conv weights by GPTQ (:mod:`export.gptq`) instead of to nearest, from the second
  moments of their inputs on up to ``GPTQ_IMAGES`` of the calibration images;
- ``images=N``: calibrate on up to N images (default ``CALIBRATION_IMAGES``);
- ``fixed``: fix the input's shape to one image at the bundle's input size before quantizing, then fold
  each zero Pad into the Conv it feeds (:func:`export.graph.fuse_pads`). onnxruntime then folds the shape arithmetic of
  dynamic "SAME" padding (EfficientNet-Lite's) into constants, and the int8 convolutions run back to back
  instead of around float Pads. The bundle then takes that size only (``fixed_size``). The export adds it
  for trunks that compute from their input's shape (:func:`shape_dependent`).

A bundle travels between machines, so its int8 trunk should compute the same on every CPU. Measured
(docs/export.md, "Portability"): 7-bit weights (``reduce_range``) and ``u8u8`` give the same integers
everywhere; 8-bit ``u8s8`` the same on x86 with VNNI and on aarch64, but it saturates in the
``vpmaddubsw`` kernels of x86 CPUs without VNNI; ``s8s8`` differs between x86 and aarch64.
``bundle.json`` records ``int8.portable``, the CPU family measured on and the families that compute the
same (``same_on``); the runtime warns once when a bundle is loaded on another.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx.numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

import npcam
from npcam import bundle as bundle_format
from npcam.files import find_images

from . import cpuinfo, gptq
from .errors import ExportError
from .graph import float_nodes, fuse_pads

CALIBRATION_IMAGES = 128
GPTQ_IMAGES = 32  # GPTQ's second moments: 22 photos and 176 crops and flips of them did as well (docs/performance.md)
CHECK_IMAGES = 512
MIN_AGREEMENT = 0.8
# The settings tried (the fastest of the best-agreeing ones is kept, :func:`choose`). One by default: chosen on
# dev photos that neither calibrate nor check (docs/performance.md), it computes the same integers on every CPU,
# and the export's own check (a few photos) then only measures it; a choice among candidates on so few photos
# would keep the fastest, whatever its error.
SETTINGS = ("u8s8 unsigned gptq float=first3",)
KERNELS = {
    "u8s8": (QuantType.QUInt8, QuantType.QInt8),
    "u8u8": (QuantType.QUInt8, QuantType.QUInt8),
    "s8s8": (QuantType.QInt8, QuantType.QInt8),
}
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
FLOAT_WORD = r"first\d*|depthwise|last|add"  # the words of float=; firstN: the first N convs


class Int8(NamedTuple):
    """What ``--int8`` asks for: the images to calibrate on, those to check on (default: the held-out half),
    and the settings to try (default: ``SETTINGS``)."""

    images: Path
    check: Path | None = None
    settings: tuple[str, ...] | None = None


def parse_setting(setting: str) -> dict:
    """The quantizer's options that a setting string names (the module docstring lists the words).

    Raises ExportError for an unknown word.
    """
    words = setting.split()
    if not words or words[0] not in KERNELS:
        raise ExportError(f"int8 setting {setting!r}: must start with one of {', '.join(KERNELS)}")
    activations, weights = KERNELS[words[0]]
    options = {
        "activation_type": activations,
        "weight_type": weights,
        "reduce_range": False,
        "per_channel": True,
        "calibrate_method": CalibrationMethod.MinMax,
        "symmetric": False,
        "float": (),
        "images": CALIBRATION_IMAGES,
        "fixed": False,
        "gptq": False,
        "unsigned": False,
    }
    for word in words[1:]:
        key, _, value = word.partition("=")
        if word == "reduce_range":
            options["reduce_range"] = True
        elif word == "per_tensor":
            options["per_channel"] = False
        elif word == "fixed":
            options["fixed"] = True
        elif word == "gptq":
            options["gptq"] = True
        elif word == "unsigned" and words[0] == "u8s8":
            options["unsigned"] = True
        elif word == "symmetric":
            options["symmetric"] = True
        elif word in METHODS:
            options["calibrate_method"] = METHODS[word]
        elif key == "float" and value and all(re.fullmatch(FLOAT_WORD, v) for v in value.split("+")):
            options["float"] = tuple(value.split("+"))
        elif key == "images" and value.isdigit() and int(value) > 0:
            options["images"] = int(value)
        else:
            raise ExportError(f"int8 setting {setting!r}: unknown word {word!r}")
    return options


def portable(setting: str) -> bool:
    """Whether the setting's integers are the same on every CPU: no 8-bit signed weights meeting ``vpmaddubsw``.

    ``u8u8``, ``unsigned`` and 7-bit weights are; measured bit-identical on x86 with and without VNNI and on aarch64
    (docs/export.md).
    """
    options = parse_setting(setting)
    return options["reduce_range"] or options["unsigned"] or options["weight_type"] == QuantType.QUInt8


# CPU families whose int8 kernels gave bit-identical integers for every setting measured (x86 VNNI, and
# aarch64 with and without dot-product instructions; docs/export.md). x86 without VNNI saturates 8-bit weights.
EXACT_FAMILIES = ("x86_64 vnni", "aarch64")


def same_on(setting: str, family: str) -> list[str]:
    """The CPU families on which a trunk quantized with ``setting`` and measured on ``family`` computes the
    same integers: all for a portable setting (``["*"]``); for 8-bit ``u8s8``, the exact families when it was
    measured on one of them; otherwise ``family`` alone (``s8s8`` differs between x86 and aarch64)."""
    if portable(setting):
        return ["*"]
    if setting.split()[0] == "u8s8" and family in EXACT_FAMILIES:
        return list(EXACT_FAMILIES)
    return [family]


def image_sets(directory: Path, check: Path | None = None) -> tuple[list[Path], list[Path], str]:
    """The calibration images and the held-out ones, and a description of the held-out ones.

    Without ``check``: the images under ``directory`` in sorted order, even positions for calibration and
    odd ones held out (interleaved, so both halves sample the whole folder). With ``check``: all of
    ``directory`` for calibration, ``check``'s images held out.
    """
    images = [image.path for image in find_images([directory]).images]
    if not images:
        raise ExportError(f"{directory}: no images to calibrate the int8 trunk on")
    if check is not None:
        held_out = [image.path for image in find_images([check]).images]
        if not held_out:
            raise ExportError(f"{check}: no images to check the int8 trunk on")
        return images, held_out, f"{check} (a folder not calibrated on)"
    if len(images) < 2:
        raise ExportError(f"{directory}: one image cannot be split into calibration and held-out halves")
    return images[0::2], images[1::2], f"the held-out half of {directory} (odd positions in sorted order)"


def network_inputs(paths: list[Path], model: npcam.Model, limit: int) -> list[np.ndarray]:
    """Network inputs of up to ``limit`` of ``paths``, evenly spaced; unreadable files are skipped."""
    step = max(1, len(paths) // limit)
    inputs = []
    for path in paths[::step][:limit]:
        try:
            inputs.append(model.preprocess(path))
        except npcam.NpcamError:
            continue  # a bad file among the images is skipped, not fatal
    if not inputs:
        raise ExportError(f"{paths[0].parent}: none of the images could be read")
    return inputs


class _Inputs(CalibrationDataReader):
    """The calibration inputs, in ranges: onnxruntime then collects statistics a range at a time
    (``CalibStridedMinMax``, which every calibrator honours), so a histogram calibration does not hold every
    image's intermediate tensors at once."""

    def __init__(self, inputs: list[np.ndarray]):
        self._all = inputs
        self.set_range(0, len(inputs))

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._inputs = iter(self._all[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._inputs, None)
        return None if x is None else {"image": x}


def _stride(count: int, most: int = 16) -> int:
    """The largest divisor of ``count`` up to ``most`` (onnxruntime needs ranges of equal length)."""
    return max(d for d in range(1, min(count, most) + 1) if count % d == 0)


class _Quiet(logging.Filter):
    """Holds back the quantizer's warnings (errors still pass), counting the biases it clips; npcam reports
    what matters once, in the int8 line."""

    def __init__(self):
        super().__init__()
        self.clipped_biases: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR:
            return True
        if "exceeds the range of a int32" in record.getMessage():
            self.clipped_biases.add(record.getMessage().split("`")[1] if "`" in record.getMessage() else "")
        return False


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs through the root logger (``logging.warning``: one line per bias it clips)
    and opens sessions with onnxruntime's default logger: both are held back while it runs."""
    import onnxruntime

    quiet = _Quiet()
    root = logging.getLogger()
    # logging.warning() installs a stderr handler on a root logger that has none: give it one that drops all.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder:
        root.addHandler(placeholder)
    root.addFilter(quiet)
    named = logging.getLogger("onnxruntime")
    level = named.level
    named.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(None):  # the histogram calibrators print their progress
            yield quiet
    finally:
        onnxruntime.set_default_logger_severity(2)  # onnxruntime's own default
        named.setLevel(level)
        root.removeFilter(quiet)
        if placeholder:
            root.removeHandler(placeholder)


def quantize_trunk(trunk: Path, inputs: list[np.ndarray], out: Path, setting: str, cache: Path | None = None) -> int:
    """Write the statically quantized version of the fp32 ONNX file ``trunk`` to ``out``.

    ``cache``: onnxruntime's calibration cache file (the activation ranges, reused by settings that calibrate
    alike; :mod:`scripts.int8_sweep` uses it). Returns how many biases the quantizer clipped to the int32
    range (a channel whose weights are all near zero has a weight scale too small for its bias).
    """
    options = parse_setting(setting)
    unsigned = options["unsigned"]
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer() as quiet:
        prepared = Path(tmp) / "prepared.onnx"
        if options["fixed"]:
            # Before the pre-processing, whose graph optimization then folds the padding's shape arithmetic.
            # All four dims: with a free batch, Shape's output is not constant (measured: no gain).
            model = onnx.load(trunk)
            for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, *inputs[0].shape[1:])):
                dim.Clear()
                dim.dim_value = size
            del model.graph.value_info[:]  # re-inferred for the fixed shape
            trunk = Path(tmp) / "fixed.onnx"
            onnx.save(model, trunk)
        # Symbolic shape inference cannot follow dynamic "SAME" padding arithmetic; ONNX's own can.
        quant_pre_process(str(trunk), str(prepared), skip_symbolic_shape=True)
        model = fuse_pads(onnx.load(prepared))
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"  # nodes_to_exclude names nodes
        onnx.save(model, prepared)
        quantize_static(
            str(prepared),
            str(out),
            _Inputs(inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=options["per_channel"],
            activation_type=options["activation_type"],
            weight_type=options["weight_type"],
            reduce_range=options["reduce_range"],
            calibrate_method=options["calibrate_method"],
            nodes_to_exclude=float_nodes(model, options["float"]),
            extra_options={"ActivationSymmetric": options["symmetric"], "CalibStridedMinMax": _stride(len(inputs))},
            calibration_cache_path=cache,
        )
        if options["gptq"] or unsigned:
            quantized = onnx.load(out)
            if options["gptq"]:
                step = max(1, len(inputs) // GPTQ_IMAGES)
                gptq.round_weights(quantized, model, inputs[::step][:GPTQ_IMAGES], options["reduce_range"])
            if unsigned:
                unsigned_weights(quantized)
            onnx.save(quantized, out)
    return len(quiet.clipped_biases)


def unsigned_weights(model: onnx.ModelProto) -> int:
    """Store, in place, every int8 weight that a DequantizeLinear feeds to a Conv as uint8 ``q + 128`` with its
    zero point moved by 128 too: the same values, which onnxruntime then multiplies in its u8u8 kernels. x86
    CPUs without VNNI saturate in the u8s8 ones when 8-bit weights meet large activations (``vpmaddubsw``
    adds two products in int16); the u8u8 ones do not, and neither does any other CPU. This is what
    onnxruntime's ``session.x64quantprecision`` does at load time, made part of the trunk. Returns how many
    weights were converted.
    """
    initializers = {i.name: i for i in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    converted = 0
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1):
        dq = made_by.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        stored, zero = initializers.get(dq.input[0]), initializers.get(dq.input[2])
        if stored is None or zero is None or {stored.data_type, zero.data_type} != {onnx.TensorProto.INT8}:
            continue
        for tensor in (stored, zero):
            values = onnx.numpy_helper.to_array(tensor).astype(np.int16) + 128
            tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.uint8), tensor.name))
        converted += 1
    return converted


def quantize_bundle(
    bundle: Path, meta: dict, images: Path, check: Path | None = None, settings: tuple[str, ...] | None = None
) -> dict:
    """Replace the bundle's fp32 trunk with an int8 one (:func:`choose`); returns the updated metadata.

    Agreement is measured on held-out images (:func:`image_sets`). A trunk that computes from its input's
    shape is quantized at the bundle's input size (``fixed``, :func:`shape_dependent`). Refuses (ExportError)
    when even the best agrees with fp32 on fewer than ``MIN_AGREEMENT`` of them.
    """
    settings = settings or SETTINGS
    fp32 = npcam.load(bundle)
    calibration, held_out, described = image_sets(images, check)
    checks = network_inputs(held_out, fp32, CHECK_IMAGES)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "fp32.onnx"
        original.write_bytes(fp32.bundle.trunk)  # the bytes the fp32 model checked and runs
        candidates = {}
        if shape_dependent(onnx.load_from_string(fp32.bundle.trunk)) and not fp32.bundle.fixed_size:
            settings = tuple(s if parse_setting(s)["fixed"] else f"{s} fixed" for s in settings)
        for name in settings:
            inputs = network_inputs(calibration, fp32, parse_setting(name)["images"])
            candidate = Path(tmp) / f"{len(candidates)}.onnx"
            clipped = quantize_trunk(original, inputs, candidate, name)
            candidates[name] = candidate.read_bytes()
            bundle_format.replace_trunk(bundle, candidates[name], _sized(meta, name))
            int8 = npcam.load(bundle)
            fp32_ms, int8_ms = trunk_ms([fp32, int8], checks)
            results[name] = {
                **agreement(fp32, int8, checks),
                "trunk_ms": int8_ms,
                "fp32_trunk_ms": fp32_ms,
                "images": len(inputs),
                "clipped_biases": clipped,
            }
        faster = [n for n in results if results[n]["trunk_ms"] < results[n]["fp32_trunk_ms"]]
        best = choose(results, faster, len(checks))
    if results[best]["top1_agreement"] < MIN_AGREEMENT:
        raise ExportError(
            f"int8 trunk agrees with fp32 on only {results[best]['top1_agreement']:.0%} of {len(checks)} held-out "
            f"images (best of {', '.join(settings)}); keep the fp32 bundle"
        )
    meta = {
        **_sized(meta, best),
        "precision": "int8",
        "int8": {
            "settings": best,
            **results[best],
            "checked_on": f"{len(checks)} images: {described}",
            "check_images": len(checks),
            "tried": results,
            "faster_than_fp32": best in faster,
            "portable": portable(best),
            "cpu": cpu_name(),
            "cpu_family": npcam.cpu.cpu_family(),
            "same_on": same_on(best, npcam.cpu.cpu_family()),
            "format": "QDQ, onnxruntime quantize_static",
        },
    }
    return bundle_format.replace_trunk(bundle, candidates[best], meta)


def choose(results: dict[str, dict], faster: list[str], images: int) -> str:
    """The setting to keep: of those faster than fp32 (all when none is), the fastest of those whose top-1
    agreement is within one held-out image of the best one's.

    One image is the resolution of the measure; the speed is compared as the ratio to fp32 measured
    alongside, so a load that changed between candidates does not decide.
    """
    pool = faster or list(results)
    best = max(results[n]["top1_agreement"] for n in pool)
    equal = [n for n in pool if results[n]["top1_agreement"] >= best - 1.5 / images]
    return min(equal, key=lambda n: results[n]["trunk_ms"] / results[n]["fp32_trunk_ms"])


def shape_dependent(model: onnx.ModelProto) -> bool:
    """Whether the trunk computes from its input's shape (a Shape node: dynamic "SAME" padding, say).

    Such a trunk is quantized ``fixed``: at a free input size onnxruntime runs that arithmetic and the
    Pads it feeds in float between the int8 convolutions (Lite0: 2.0x slower int8 trunk, measured).
    """
    return any(node.op_type in ("Shape", "Size") for node in model.graph.node)


def _sized(meta: dict, setting: str) -> dict:
    """``meta`` for a trunk quantized with ``setting``: one that fixed the input size takes that size only."""
    return {**meta, "fixed_size": True} if parse_setting(setting)["fixed"] else meta


def trunk_ms(models: list[npcam.Model], inputs: list[np.ndarray]) -> list[float]:
    """Median ms of one trunk call of each model, over ``inputs``, the models taking turns on each input
    (after one warm-up call each), so that a load on the machine weighs on all alike."""
    for model in models:
        model.features(inputs[0])
    times = [[] for _ in models]
    for x in inputs:
        for model, spent in zip(models, times):
            start = time.perf_counter()
            model.features(x)
            spent.append(time.perf_counter() - start)
    return [float(np.median(t) * 1000) for t in times]


def agreement(fp32: npcam.Model, int8: npcam.Model, inputs: list[np.ndarray]) -> dict[str, float]:
    """How closely the int8 trunk follows fp32: top-1 agreement and mean correlation of fp32's top-1 CAM."""
    agree, correlation = [], []
    for x in inputs:
        features = [model.features(x)[0] for model in (fp32, int8)]
        top1 = [int(np.argmax(fp32.head.forward(f.mean(axis=(1, 2))[None]))) for f in features]
        agree.append(top1[0] == top1[1])
        cams = [
            npcam.cam.weighted_maps(f, fp32.head.gradient(f.mean(axis=(1, 2)), [top1[0]])).ravel() for f in features
        ]
        if cams[0].std() > 0 and cams[1].std() > 0:
            correlation.append(np.corrcoef(cams[0], cams[1])[0, 1])
    return {"top1_agreement": float(np.mean(agree)), "cam_pearson": float(np.mean(correlation) if correlation else 0.0)}


def cpu_name() -> str:
    """The CPU's name and the instructions that decide the int8 kernels (VNNI on x86, dot products on ARM)."""
    return cpuinfo.this_cpu()
