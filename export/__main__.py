"""``npcam-export``: turn a classifier into an npcam model bundle.

    npcam-export ARCH [--weights FILE] [--labels FILE] [--out DIR]      a built-in architecture
    npcam-export auto                                                   the demo's model
    npcam-export onnx MODEL.onnx [--labels FILE] [--mean R G B --std R G B] [--input-size S|HxW] [--layer T] [--out DIR]
                     [--task detect] [--strides S,S,..] [--bins N] [--letterbox [L] | --stretch]   (a detector)
                     [--anchors ANCHORS.npy --anchor-decode mediapipe|tf]                       (an SSD)
    npcam-export torch MODULE:CALLABLE [--weights FILE] [--labels FILE] [--input-size S|HxW] [--layer M] [--out DIR]
    npcam-export tflite MODEL.tflite [--labels FILE] [--mean R G B --std R G B] [--out DIR] [detector flags]
    npcam-export keras MODEL.keras|MODEL.h5 [--labels FILE] [--mean R G B --std R G B] [--out DIR]

The ``onnx`` route needs only the runtime's packages and ``onnx``; ``tflite`` and ``keras`` need TensorFlow
and tf2onnx (the ``tflite`` and ``keras`` extras); the others need torch. This module only parses arguments
and prints errors; the routes themselves are :mod:`export.api`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from npcam import NpcamError
from npcam.arguments import OneLineParser, between
from npcam.bundle import CACHE_DIR

from .archs import ARCHS
from .errors import ExportError
from .sizes import input_size_argument

AUTO = "auto"
# Every route reads or writes ONNX; without the package the exporter says so in one line.
NEEDS_ONNX = (
    "npcam-export: the exporter needs the onnx package: pip install 'npcam[onnx]' for the ONNX route, "
    "'npcam[export]' for the torch routes"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import onnx

    from .api import OPSET
    from .detector import Options, background_argument, box_scales_argument, strides_argument

    opsets = between(7, onnx.defs.onnx_opset_version())  # what onnx knows; torch may support fewer, and says so
    parser = OneLineParser(
        prog="npcam-export",
        description="Turn a classifier into an npcam model bundle (see the README, 'Your own model').",
    )
    routes = parser.add_subparsers(dest="route", required=True, metavar="{ARCH,auto,onnx,torch,tflite,keras}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help=f"bundle directory (default: {CACHE_DIR}/NAME)")
    common.add_argument("--labels", type=Path, help="class names: a text file with one per line, or a JSON list")
    common.add_argument(
        "--int8", metavar="IMAGES", type=Path, help="also quantize the trunk to int8, calibrated on these images"
    )
    common.add_argument(
        "--int8-check",
        metavar="IMAGES",
        type=Path,
        help="measure the int8 trunk's agreement on these images (default: half of --int8's, not calibrated on)",
    )
    common.add_argument(
        "--int8-setting",
        metavar="WORDS",
        action="append",
        help='an int8 setting to try instead of the defaults, e.g. "u8s8 reduce_range float=first3" (repeatable)',
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
    detection = argparse.ArgumentParser(add_help=False)
    group = detection.add_argument_group("detectors (docs/export.md, Detectors)")
    group.add_argument("--task", choices=("detect", "classify"), help="what the model is (default: read from its outputs)")
    group.add_argument("--strides", type=strides_argument, metavar="S,S,...", help="the maps' strides, e.g. 8,16,32,64")
    group.add_argument("--bins", type=between(2, 1024), metavar="R+1", help="values of a box side's distribution")
    group.add_argument(
        "--objectness",
        action=argparse.BooleanOptionalAction,
        help="a YOLO output has an objectness after the box (default: read from its layout)",
    )
    group.add_argument(
        "--letterbox",
        type=between(0, 255),
        nargs="?",
        const=114,
        metavar="LEVEL",
        help="feed the photo letterboxed, padded with this grey (default for YOLO: 114)",
    )
    group.add_argument("--stretch", action="store_true", help="feed the photo stretched to the input (no letterbox)")
    group.add_argument("--grid-offset", type=float, metavar="F", help="a cell's centre in cells (PicoDet 0.5, NanoDet 0)")
    group.add_argument("--anchors", metavar="ANCHORS.npy", help="an SSD's anchors: [N, 4] centre x, centre y, w, h, 0-1")
    group.add_argument(
        "--anchor-decode",
        choices=("mediapipe", "tf"),
        help="how an SSD's regressors are read: MediaPipe's, or the TF Object Detection API's",
    )
    group.add_argument("--box-scales", type=box_scales_argument, metavar="S,S,S,S", help="the regressors' divisors, in their order")
    group.add_argument("--box-order", choices=("xywh", "yxhw"), help="the regressors' order (mediapipe xywh, tf yxhw)")
    group.add_argument("--background", type=background_argument, metavar="K|none", help="the background class column")
    group.add_argument("--scores", choices=("identity", "sigmoid", "softmax"), help="the class values' activation")
    group.add_argument("--box-output", metavar="NAME", help="the output that holds an SSD's box regressors")
    for name, arch in sorted(ARCHS.items()):
        p = routes.add_parser(name, parents=[common], help=f"built-in {name} ({arch.input_size}px)")
        p.add_argument("--weights", type=Path, help="state-dict .pth (default: the official weights; see the README)")
        p.add_argument("--opset", type=opsets, default=OPSET, help=f"ONNX opset (default {OPSET})")
    routes.add_parser(AUTO, help="the demo's model: an existing default bundle, else resnet18, else efficientnet_lite0")
    p = routes.add_parser(
        "onnx", parents=[common, preprocessing, detection], help="any ONNX image classifier or detector (no torch needed)"
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument(
        "--bgr", action="store_true", help="the model takes BGR images (the channel flip goes into the trunk)"
    )
    p.add_argument("--output", metavar="NAME", help="which model output holds the class scores (default: the only one)")
    p.add_argument(
        "--layer",
        metavar="TENSOR",
        action="append",
        help="the ONNX tensor to explain (default: see docs/export.md); a detector's maps: once for each",
    )
    p = routes.add_parser("torch", parents=[common, preprocessing, detection], help="a torch module from MODULE:CALLABLE")
    p.add_argument("spec", metavar="MODULE:CALLABLE", help="e.g. mypkg.models:build (run from where it imports)")
    p.add_argument("--weights", type=Path, help="a state dict to load into the module (strict)")
    p.add_argument("--opset", type=opsets, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument(
        "--layer",
        metavar="MODULE",
        action="append",
        help="the module to explain, e.g. blocks.3.norm1 (default: see docs/export.md); a detector's maps: once for each",
    )
    p = routes.add_parser(
        "tflite", parents=[common, preprocessing, detection], help="a TensorFlow Lite classifier (float or int8) or detector"
    )
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
    if getattr(args, "letterbox", None) is not None and getattr(args, "stretch", False):
        parser.error("--letterbox and --stretch exclude each other")
    if getattr(args, "route", None) in ("onnx", "torch", "tflite"):
        args.detect = Options(
            task=args.task,
            strides=args.strides,
            bins=args.bins,
            objectness=args.objectness,
            letterbox=args.letterbox,
            stretch=args.stretch,
            grid_offset=args.grid_offset,
            anchors=args.anchors,
            anchor_decode=args.anchor_decode,
            box_scales=args.box_scales,
            box_order=args.box_order,
            background=args.background,
            scores=args.scores,
            box_output=args.box_output,
        )
    # `auto` takes none of the common options
    if getattr(args, "int8_check", None) is not None or getattr(args, "int8_setting", None):
        if args.int8 is None:
            parser.error("--int8-check and --int8-setting need --int8 (the images to calibrate on)")
        from .quantize import Int8, parse_setting

        for setting in args.int8_setting or ():
            try:
                parse_setting(setting)
            except ExportError as e:
                parser.error(str(e))
        args.int8 = Int8(args.int8, args.int8_check, tuple(args.int8_setting) if args.int8_setting else None)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        import onnx  # noqa: F401
    except ImportError:
        print(NEEDS_ONNX, file=sys.stderr)
        return 2
    from .api import auto, run, run_onnx, run_torch

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
                args.layer,
                args.detect,
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
                args.layer,
                args.detect,
            )
        elif args.route in ("tflite", "keras"):
            from .from_keras import run_keras
            from .from_tflite import run_tflite

            if args.route == "tflite":
                run_tflite(args.model, args.out, args.labels, args.mean, args.std, args.input_size, args.int8, args.detect)
            else:
                run_keras(args.model, args.out, args.labels, args.mean, args.std, args.input_size, args.int8)
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
