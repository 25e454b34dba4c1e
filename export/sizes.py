"""Input sizes at export: ``--input-size S|HxW`` and the size a model declares (needs onnx, not torch)."""

from __future__ import annotations

import argparse

from npcam.image import Size, as_size, format_size, parse_size

from .errors import ExportError

DEFAULT = (224, 224)
SMALLEST = 8  # per side: below this no classifier's trunk leaves a feature map


def input_size_argument(text: str) -> Size:
    """An argparse type for ``--input-size``: ``S`` (``S x S``) or ``HxW`` as ``(H, W)``, each side at least 8."""
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if min(size) < SMALLEST:
        raise argparse.ArgumentTypeError(f"each side must be at least {SMALLEST}, not {text!r}")
    return size


def native_size(declared: list[int | str], requested: int | Size | None) -> Size:
    """The input ``(H, W)`` to export at, from the model input's declared ``[H, W]`` and ``--input-size``.

    A side the model fixes is its own; ``requested`` must agree with it. A
    model that fixes only one side gets a square of that side, unless
    ``requested`` says otherwise; one that fixes none gets 224x224.
    """
    fixed = [d if isinstance(d, int) and d > 0 else None for d in declared]
    wanted = as_size(requested)
    if wanted is None:
        if len(fixed) == 2 and all(fixed):
            return fixed[0], fixed[1]
        side = next((d for d in fixed if d), None)
        return (side, side) if side else DEFAULT
    if any(f is not None and f != v for f, v in zip(fixed, wanted)):
        shown = "x".join(str(f) if f else n for f, n in zip(fixed, "HW"))
        raise ExportError(
            f"the model's input is {shown} (height x width); --input-size {format_size(wanted)} does not fit it"
        )
    return wanted
