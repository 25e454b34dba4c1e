"""Shared by the TFLite and Keras routes: a model converted to ONNX by tf2onnx goes through the ONNX route.

The converted graph is split by the same head finder (:func:`export.split.split`) and written by the same
checked bundle writer (:func:`export.build.export`) as ``npcam-export onnx``; what differs is the
reference the self-check compares with: the original model in its own runtime (the TFLite interpreter,
Keras' ``predict``), not the converted graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from npcam.bundle import sha256_file

from .archs import IMAGENET_MEAN, IMAGENET_STD
from .errors import ExportError

if TYPE_CHECKING:
    from .hybrid import Hybrid
    from .quantize import Int8

OPSET = 17  # tf2onnx tests opsets 14-18; 17 is what the other routes write

# reference(x) -> the original's output for float32 inputs in the model's own layout ([N,H,W,C] or [N,C,H,W])
Reference = Callable[[np.ndarray], np.ndarray]


def import_tensorflow(extra: str):
    """TensorFlow and tf2onnx, with TensorFlow's start-up logging off; a one-line hint when they are missing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO/WARNING lines (oneDNN, CUDA probing)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # tf2onnx converts TensorFlow graphs
    try:
        with quiet():
            import tensorflow as tf
            import tf2onnx
    except ImportError as e:
        raise ExportError(
            f"this route needs TensorFlow and tf2onnx ({e}): pip install 'npcam[{extra}]' (see docs)"
        ) from None
    import logging

    for name in ("tensorflow", "tf2onnx", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)
    return tf, tf2onnx


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide what TensorFlow, tf2onnx and LiteRT print while converting (C++ INFO lines, deprecation notes).

    File descriptor 2 goes to a temporary file, dropped afterwards: the route reports failures in its own
    words. With ``NPCAM_EXPORT_DEBUG`` set, the last lines captured before a failure are shown.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(log.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                log.seek(0)
                lines = [x for x in log.read().decode(errors="replace").splitlines() if x.strip()]
                if lines and os.environ.get("NPCAM_EXPORT_DEBUG"):
                    print("\n".join(lines[-20:]), file=sys.stderr)


def export_converted(
    source: Path,
    kind: str,
    converted: onnx.ModelProto,
    reference: Reference,
    versions: dict,
    out: Path | None = None,
    labels: Path | None = None,
    mean=None,
    std=None,
    input_size=None,
    int8: Path | Int8 | None = None,
    int8_bound: dict | None = None,
    hybrid: Hybrid | None = None,
) -> Path:
    """The ONNX route (split, write, self-check, report) for ``converted``, checked against ``reference``.

    ``int8_bound`` (an int8 original's): ``bound``, the self-check's absolute limit, replaces the split's
    one output step; the whole dict goes into bundle.json's ``source`` (see docs: the int8 TFLite bound).
    ``hybrid`` (a dynamic-range original's, :func:`export.hybrid.reproduce`): its fully connected layer's
    bound, if it has one, is the self-check's limit for each input; it goes into ``source.dynamic_range``.
    """
    from . import api as route  # the ONNX route's helpers (default directory, grey normalization)

    # tf2onnx keeps ops it cannot map, under their TensorFlow/TFLite names: onnxruntime cannot run those
    unknown = sorted({n.op_type for n in converted.graph.node if not onnx.defs.has(n.op_type, n.domain or "")})
    if unknown:
        raise ExportError(f"{source}: tf2onnx has no ONNX equivalent for {', '.join(unknown)}; nothing was written")
    parts = route._split(str(source), converted, input_size)
    if int8_bound is not None:
        parts.output_step = int8_bound["bound"]
    if hybrid is not None and hybrid.dense is not None:
        parts.output_step = _pooled_limit(hybrid, parts, source)
    digest = sha256_file(source)
    meta = {
        "arch": f"{kind}:{source.stem}",
        "mean": list(mean or IMAGENET_MEAN),
        "std": list(std or IMAGENET_STD),
        "source": {
            "kind": kind,
            "name": source.name,
            "sha256": digest,
            "channels": parts.channels,
            **({"int8_bound": int8_bound} if int8_bound else {}),
            **({"dynamic_range": hybrid.meta()} if hybrid else {}),
        },
        "versions": versions,
    }
    if parts.channels == 1:
        meta["mean"], meta["std"] = route._grey_normalization(mean, std)

    def own_layout(x: np.ndarray) -> np.ndarray:  # npcam feeds [N,C,H,W]
        return reference(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if parts.layout == "NHWC" else x)

    checked = route._fed_by_npcam(own_layout, parts.channels)
    sizes = route._onnx_sizes(converted, parts)
    return route._export(parts, route._out(out, source.stem, digest, int8), labels, meta, checked, sizes, int8)


def _pooled_limit(hybrid: Hybrid, parts, source: Path):
    """``limit(model, x)``: the hybrid dense layer's bound for each input, from the bundle's pooled features."""
    from .hybrid import OUTPUT_FACTOR

    if parts.head.layout != "pooled" or parts.output not in OUTPUT_FACTOR:
        raise ExportError(f"{source}: its int8 fully connected layer is not a classifier on pooled features")
    dense = dataclasses.replace(hybrid.dense, factor=OUTPUT_FACTOR[parts.output])

    def limit(model, x: np.ndarray) -> np.ndarray:
        layer, _ = model.trunk(x)
        return dense(layer.mean(axis=(2, 3)))

    limit.rule = dense.rule
    return limit


def check_file(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if path.suffix.lower() not in suffixes:
        raise ExportError(f"{path}: expected a {what} file ({', '.join(suffixes)})")


def first_line(e: BaseException) -> str:
    """An exception as ``Type: first line``, for a one-line error."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
