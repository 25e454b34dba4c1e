"""An int8 trunk: onnxruntime static quantization (QDQ, MinMax), calibrated on the user's images.

A bundle travels between machines, so its int8 trunk must compute the same
on every CPU. Two settings avoid the saturation of onnxruntime's u8s8 kernels
on x86 without VNNI (``vpmaddubsw``): ``u8s8 reduce_range`` (7-bit weights, so
two products always fit in int16) and ``u8u8`` (unsigned weights). Why, and
the agreement measured on each kind of CPU, are in docs/export.md ("int8").

The export quantizes with both, times each trunk against fp32 on the
calibration inputs, and keeps the best-agreeing one that is faster than fp32
(the best-agreeing one, saying so, when neither is). The bundle records the
settings, every candidate's agreement and speed, and the CPU they were measured on.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import npcam
from npcam import bundle as bundle_format
from npcam.files import find_images

from . import cpuinfo
from .errors import ExportError

CALIBRATION_IMAGES = 64
MIN_AGREEMENT = 0.8
SETTINGS = {
    "u8s8 reduce_range": {"weight_type": QuantType.QInt8, "reduce_range": True},
    "u8u8": {"weight_type": QuantType.QUInt8, "reduce_range": False},
}


def calibration_inputs(directory: Path, model: npcam.Model) -> list[np.ndarray]:
    """Up to ``CALIBRATION_IMAGES`` network inputs from the images under ``directory``, evenly spaced."""
    images = find_images([directory]).images
    if not images:
        raise ExportError(f"{directory}: no images to calibrate the int8 trunk on")
    step = max(1, len(images) // CALIBRATION_IMAGES)
    inputs = []
    for image in images[::step][:CALIBRATION_IMAGES]:
        try:
            inputs.append(model.preprocess(image.path))
        except npcam.NpcamError:
            continue  # a bad file among the calibration images is skipped, not fatal
    if not inputs:
        raise ExportError(f"{directory}: none of the images could be read")
    return inputs


class _Inputs(CalibrationDataReader):
    def __init__(self, inputs: list[np.ndarray]):
        self._inputs = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._inputs, None)
        return None if x is None else {"image": x}


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
        yield quiet
    finally:
        onnxruntime.set_default_logger_severity(2)  # onnxruntime's own default
        named.setLevel(level)
        root.removeFilter(quiet)
        if placeholder:
            root.removeHandler(placeholder)


def quantize_trunk(trunk: Path, inputs: list[np.ndarray], out: Path, settings: str) -> int:
    """Write the statically quantized version of the fp32 ONNX file ``trunk`` to ``out``.

    Returns how many biases the quantizer clipped to the int32 range (a channel whose weights are all
    near zero has a weight scale too small for its bias).
    """
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer() as quiet:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow dynamic "SAME" padding arithmetic; ONNX's own can.
        quant_pre_process(str(trunk), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _Inputs(inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            **SETTINGS[settings],
        )
    return len(quiet.clipped_biases)


def quantize_bundle(bundle: Path, meta: dict, images: Path) -> dict:
    """Replace the bundle's fp32 trunk with the best-agreeing int8 one; returns the updated metadata.

    Refuses (ExportError) when even the best agrees with fp32 on fewer than
    ``MIN_AGREEMENT`` of the calibration images.
    """
    fp32 = npcam.load(bundle)
    inputs = calibration_inputs(images, fp32)
    results = {}
    fp32_ms = trunk_ms(fp32, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "fp32.onnx"
        original.write_bytes(fp32.bundle.trunk)  # the bytes the fp32 model checked and runs
        candidates = {}
        for name in SETTINGS:
            candidate = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            clipped = quantize_trunk(original, inputs, candidate, name)
            candidates[name] = candidate.read_bytes()
            bundle_format.replace_trunk(bundle, candidates[name], meta)
            int8 = npcam.load(bundle)
            results[name] = {
                **agreement(fp32, int8, inputs),
                "trunk_ms": trunk_ms(int8, inputs),
                "clipped_biases": clipped,
            }
        faster = [n for n in results if results[n]["trunk_ms"] < fp32_ms]
        best = max(faster or results, key=lambda n: (results[n]["top1_agreement"], results[n]["cam_pearson"]))
    if results[best]["top1_agreement"] < MIN_AGREEMENT:
        raise ExportError(
            f"int8 trunk agrees with fp32 on only {results[best]['top1_agreement']:.0%} of the calibration images "
            f"(best of {', '.join(SETTINGS)}); keep the fp32 bundle"
        )
    meta = {
        **meta,
        "precision": "int8",
        "int8": {
            "settings": best,
            "images": len(inputs),
            **results[best],
            "tried": results,
            "fp32_trunk_ms": fp32_ms,
            "faster_than_fp32": best in faster,
            "cpu": cpu_name(),
            "format": "QDQ, per-channel weights, MinMax calibration",
        },
    }
    return bundle_format.replace_trunk(bundle, candidates[best], meta)


def trunk_ms(model: npcam.Model, inputs: list[np.ndarray]) -> float:
    """Median ms of one trunk call, over the calibration inputs (after one warm-up call)."""
    model.features(inputs[0])
    times = []
    for x in inputs:
        start = time.perf_counter()
        model.features(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


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
