"""From a split model to a checked bundle on disk; shared by every export route (needs no torch).

The bundle is built in a staging directory (:func:`npcam.bundle.staged`),
checked against the original model on random inputs, optionally quantized,
and only then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime

import npcam
from npcam import bundle as bundle_format
from npcam.cam import probabilities, softmax
from npcam.image import as_size

from .errors import ExportError
from .split import Split

if TYPE_CHECKING:
    from .detector import DetectorSplit
    from .quantize import Int8

TOLERANCE = 1e-4  # relative: max |npcam - original| / max |original|
IMAGENET_LABELS = Path(__file__).with_name("imagenet_classes.txt")
COCO_LABELS = Path(__file__).with_name("coco_classes.txt")  # COCO's 80 detection classes, in the YOLO tools' order
# A detector's self-check (detector_self_check): every candidate's class scores (and objectness) within DETECT_TOLERANCE
# absolute, its box within DETECT_TOLERANCE of the input's longer side. Both models compute in float32 (24 bits, 6e-8
# relative): the bundle's head repeats the original's last layers in float64 (or float32 in another order), so the
# two differ by the original's own rounding, a few 1e-7 of a value's scale, a few 1e-6 after a head of many layers.
# 1e-4 leaves ~30x above that; a wrong op, stride or cell centre moves a box by a pixel or more (1.6e-3 at 640 px).
DETECT_TOLERANCE = 1e-4

# reference(x) -> the original model's output for float32 [N,3,H,W] RGB normalized inputs
Reference = Callable[[np.ndarray], np.ndarray]



def _provenance(trunk: onnx.ModelProto, meta: dict) -> dict:
    """What made the bundle: the trunk's opset, the versions of npcam and its stack (``meta``'s own added), when."""
    return {
        "opset": max((o.version for o in trunk.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "versions": {
            "npcam": npcam.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
            **meta.get("versions", {}),
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

def read_labels(path: Path | None, classes: int) -> list[str]:
    """Class names: from ``path`` (one per line, or a JSON list), else ImageNet's for 1000 classes, else ``class i``."""
    if path is None:
        if classes == 1000:
            return IMAGENET_LABELS.read_text(encoding="utf-8").splitlines()
        return [f"class {i}" for i in range(classes)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: cannot read labels ({getattr(e, 'strerror', None) or e})") from None
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except ValueError as e:
            raise ExportError(f"{path}: not valid JSON ({e})") from None
        if not all(isinstance(x, str) for x in labels):
            raise ExportError(f"{path}: a JSON label file must be a list of strings")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) != classes:
        raise ExportError(f"{path}: {len(labels)} labels, but the model has {classes} classes")
    return labels


def detector_labels(path: Path | None, classes: int, metadata: dict[str, str]) -> list[str]:
    """A detector's C class names: from ``path``; else the file's own (ultralytics' ``names``); else COCO's for 80
    classes (what the YOLO tools, PP-PicoDet and NanoDet publish their detectors trained on, in that order);
    else ``class i``."""
    from .detector import metadata_labels

    if path is not None:
        return read_labels(path, classes)
    own = metadata_labels(metadata, classes)
    if own is not None:
        return own
    if classes == 80:
        return COCO_LABELS.read_text(encoding="utf-8").splitlines()
    return [f"class {i}" for i in range(classes)]


def default_out(name: str, source_sha256: str) -> Path:
    """``~/.cache/npcam/NAME``, refusing to replace a bundle made from other weights."""
    out = (bundle_format.CACHE_DIR / name).expanduser()
    if bundle_format.is_bundle(out):
        source = (bundle_format.peek_meta(out) or {}).get("source")
        if not isinstance(source, dict) or source.get("sha256") != source_sha256:
            raise ExportError(f"{out} holds a bundle of another model; choose a directory with --out (or delete it)")
    return out


def export(
    split: Split,
    out: Path,
    labels: Sequence[str],
    meta: dict,
    reference: Reference,
    reference_sizes: Sequence[tuple[int, int, int]] | None = None,
    int8: Path | Int8 | None = None,
) -> dict:
    """Write ``split`` as a bundle at ``out`` and check it against ``reference``; returns bundle.json's content.

    ``meta`` holds the model's name (``arch``), ``mean``, ``std`` and
    ``source``. The check runs ``reference_sizes`` (batch, height, width),
    default a batch of 2 at the input size and, for a trunk of dynamic size,
    one non-square input. ``int8``: the images to calibrate an int8 trunk on, or an
    :class:`export.quantize.Int8` that also names the images to check it on and the settings to try.
    """
    if split.trunk.ByteSize() >= 2**31:
        # One protobuf holds at most 2 GiB; a bundle's trunk is always one self-contained file (no external data).
        raise ExportError(f"the trunk is {split.trunk.ByteSize():,} bytes, over ONNX's 2 GiB limit for one file")
    sizes = reference_sizes or check_sizes(split.input_size, not split.fixed_size)
    with bundle_format.staged(out) as tmp:
        meta = bundle_format.write(
            tmp,
            split.trunk.SerializeToString(),
            split.head,
            labels,
            {
                **meta,
                "input_size": split.input_size,
                "fixed_size": split.fixed_size,
                "stride": split.stride,
                "output": split.output,
                "layout": split.layout,
                "precision": "fp32",
                **_provenance(split.trunk, meta),
            },
        )
        meta["check"] = self_check(tmp, reference, split.output, sizes, split.output_step)
        if int8 is not None:
            from .quantize import Int8, quantize_bundle

            int8 = int8 if isinstance(int8, Int8) else Int8(int8)
            meta = quantize_bundle(tmp, meta, int8.images, int8.check, int8.settings)
        meta = bundle_format.seal(tmp, meta)
    return meta


def check_sizes(size: int | tuple[int, int], dynamic: bool, batch: int = 2) -> list[tuple[int, int, int]]:
    """The self-check's inputs ``(batch, height, width)``: a batch at the input size ``(H, W)`` and, for a
    trunk of dynamic size, one image of another shape (taller, and narrower where the width allows)."""
    height, width = as_size(size)
    return [(batch, height, width)] + ([(1, height + 48, width - 40 if width > 80 else width + 40)] if dynamic else [])


def self_check(
    bundle: Path,
    reference: Reference,
    output: str,
    sizes: Sequence[tuple[int, int, int]],
    step: float | Callable[[npcam.Model, np.ndarray], np.ndarray] = 0.0,
) -> dict:
    """Compare the bundle (onnxruntime trunk + NumPy head) with the original model on random inputs.

    Raises above ``TOLERANCE`` (relative to the largest output), or, for an
    original whose probabilities are quantized with ``step``, above one step
    (its rounding, plus a value that lands on the other side of a rounding boundary).
    A callable ``step(model, x)`` gives each input's own absolute limit (float ``[N]``, an original that
    quantizes on the fly: export.hybrid), to which the float tolerance is added; its ``rule`` says what it is.
    """
    try:
        model = npcam.load(bundle)
    except npcam.NpcamError as e:
        raise ExportError(f"the written bundle does not load: {e}") from None
    rng = np.random.default_rng(0)
    worst, worst_abs, checked = 0.0, 0.0, []
    per_input = callable(step)
    worst_ratio = 0.0  # per_input: the largest |npcam - original| / limit
    for n, h, w in sizes:
        x = rng.standard_normal((n, 3, h, w), dtype=np.float32)
        try:
            want = np.asarray(reference(x), dtype=np.float64).reshape(n, -1)
        except Exception as e:  # the user's model may fail in any way
            if checked:  # it runs at its own size only; npcam's trunk and head run at this one too
                print(f"note: the original model does not run on {h}x{w} inputs; checked at its own", file=sys.stderr)
                continue
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise ExportError(f"the original model fails on a random {n}x3x{h}x{w} input ({why})") from None
        checked.append([n, h, w])
        got = model.scores(x).astype(np.float64)
        if output in ("probabilities", "sigmoid"):
            got = probabilities(got, multi_label=output == "sigmoid")
        elif output == "log_probabilities":
            got = np.log(softmax(got, axis=1))
        worst = max(worst, relative_error(got, want))
        worst_abs = max(worst_abs, float(np.abs(got - want).max()) if got.shape == want.shape else np.inf)
        if per_input and got.shape == want.shape:
            limit = np.asarray(step(model, x), np.float64).reshape(n, 1) + TOLERANCE * np.abs(want).max()
            worst_ratio = max(worst_ratio, float((np.abs(got - want) / limit).max()))
        elif per_input:
            worst_ratio = np.inf
    if per_input:
        if not worst_ratio <= 1:
            raise ExportError(
                f"self-check failed: the bundle's {output} differ from the original model's by {worst_ratio:.2f} "
                f"times the limit ({step.rule}, plus {TOLERANCE:g} of the largest)"
            )
        return {"scores_relative_error": worst, "inputs": checked, "of_limit": worst_ratio}
    if not (worst <= TOLERANCE or worst_abs <= step):
        by = (
            f"{worst_abs:.2e} (limit, from the original's quantization steps: {step:.1e})"
            if step
            else f"{worst:.2e} (relative, limit {TOLERANCE})"
        )
        raise ExportError(f"self-check failed: the bundle's {output} differ from the original model's by {by}")
    return {"scores_relative_error": worst, "inputs": checked, **({"output_step": step} if step else {})}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def report(meta: dict, out: Path) -> None:
    """One line on stderr saying what was exported and how well it matched."""
    head = "affine head: CAM" if meta["head"] == "affine" else "graph head: Grad-CAM"
    size = "{}x{} px".format(*meta["input_size"]) + (" fixed" if meta.get("fixed_size") else "")
    check = meta["check"]
    match = (
        f"within one step ({check['output_step']:.1e}) of the original's quantized ones"
        if check.get("output_step")
        else f"within {check['scores_relative_error']:.1e} of the original"
    )
    if "of_limit" in check:  # a dynamic-range TFLite model's per-input bound
        rule = meta.get("source", {}).get("dynamic_range", {}).get("bound", "its bound")  # export.hybrid
        match = f"within {check['of_limit']:.1e} of the limit ({rule}) of the original's"
    bound = meta.get("source", {}).get("int8_bound")  # an int8 TFLite model's, from its quantization steps
    if bound and check.get("output_step"):
        match = f"within {check['output_step']:.1e} ({bound['rule']}) of the original's int8 ones"
    print(
        f"exported {meta['arch']} ({meta['classes']} classes, {meta['channels']} channels, {head}, {size}) to {out} "
        f"(self-check: {meta['output']} {match})",
        file=sys.stderr,
    )
    if meta.get("precision") == "int8":
        q = meta["int8"]
        speed = f"trunk {q['trunk_ms']:.1f} ms vs fp32 {q['fp32_trunk_ms']:.1f} ms"
        print(
            f"int8 trunk ({q['settings']}) calibrated on {q['images']} images; on {q['checked_on']}: top-1 agrees "
            f"with fp32 on {q['top1_agreement']:.1%}, CAM correlation {q['cam_pearson']:.3f}, {speed} on {q['cpu']}"
            + (
                f"; {q['clipped_biases']} biases clipped to int32 (channels with near-zero weights)"
                if q.get("clipped_biases")
                else ""
            )
            + ("" if q["faster_than_fp32"] else "; no faster than fp32 on this CPU: consider the fp32 bundle"),
            file=sys.stderr,
        )


# Detectors

# reference(x) -> the original detector's outputs {name: [N, ...]} for float32 [N,3,H,W] RGB normalized inputs
OutputsReference = Callable[[np.ndarray], dict]


def export_detector(split: DetectorSplit, out: Path, labels: Sequence[str], meta: dict, reference: OutputsReference,
                    steps: np.ndarray | None = None) -> dict:  # fmt: skip
    """Write ``split`` as a detection bundle at ``out`` and check it against ``reference``; returns bundle.json's
    content. ``meta`` holds ``arch``, ``mean``, ``std``, ``source`` and ``layer``; ``steps``: an int8 detector's
    bound (:func:`detector_self_check`)."""
    if split.trunk.ByteSize() >= 2**31:
        raise ExportError(f"the trunk is {split.trunk.ByteSize():,} bytes, over ONNX's 2 GiB limit for one file")
    detect = {
        "task": "detect",
        "detect": split.decode.detect_spec(),
        **({"letterbox": split.letterbox} if split.letterbox else {}),
    }
    with bundle_format.staged(out) as tmp:
        meta = bundle_format.write(
            tmp,
            split.trunk.SerializeToString(),
            split.head,
            labels,
            {
                **meta,
                **detect,
                "input_size": split.input_size,
                "fixed_size": True,
                "stride": max(split.strides),
                "layout": split.layout,
                "precision": "fp32",
                **_provenance(split.trunk, meta),
            },
            split.decode.arrays or None,
        )
        meta["check"] = detector_self_check(tmp, split, reference, steps=steps)
        meta = bundle_format.seal(tmp, meta)
    return meta


def detector_self_check(bundle: Path, split: DetectorSplit, reference: OutputsReference, inputs: int = 2,
                        steps: np.ndarray | None = None) -> dict:  # fmt: skip
    """Compare the bundle's raw outputs with the original's on random inputs, one image at a time: every candidate's
    class scores and objectness (absolute) and its box (relative to the input's longer side), decoded by the
    bundle's own decoder from both; raises above :data:`DETECT_TOLERANCE`.

    ``steps`` (an int8 detector, float ``[T]``): each raw value's bound instead, in quantization steps
    (export.qdq.output_steps and DETECT_STEPS derive it). Each raw value must be within it of the original's,
    plus :data:`DETECT_TOLERANCE` for the float32 product ``(q - z) s``; ``of_bound`` records the largest
    ``|npcam - original| / limit``."""
    try:
        model = npcam.load(bundle)
    except npcam.NpcamError as e:
        raise ExportError(f"the written bundle does not load: {e}") from None
    decoder = model.bundle.decoder
    height, width = split.input_size
    rng = np.random.default_rng(0)
    scores = boxes = raw = of_bound = 0.0
    for _ in range(inputs):
        x = rng.standard_normal((1, 3, height, width), dtype=np.float32)
        try:
            want = split.arrange({k: np.asarray(v, dtype=np.float64) for k, v in reference(x).items()})
        except Exception as e:  # the user's model may fail in any way
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise ExportError(f"the original model fails on a random 1x3x{height}x{width} input ({why})") from None
        layer, sides = model.trunk(x)
        got = model.head.forward_float64(layer, sides)
        if got.shape != want.shape:
            raise ExportError(f"self-check failed: the bundle gives {got.shape[1]:,} values, the original {want.shape[1]:,}")
        mine, theirs = decoder.decode(got)[0], decoder.decode(want)[0]
        scores = max(scores, float(np.abs(mine.scores - theirs.scores).max()))
        if mine.objectness is not None:
            scores = max(scores, float(np.abs(mine.objectness - theirs.objectness).max()))
        boxes = max(boxes, float(np.abs(mine.boxes - theirs.boxes).max()) / max(height, width))
        raw = max(raw, relative_error(got, want))
        if steps is not None:
            of_bound = max(of_bound, float((np.abs(got - want) / (steps + DETECT_TOLERANCE)).max()))
    if steps is not None:
        if not of_bound <= 1:
            raise ExportError(
                f"self-check failed: the bundle's raw outputs differ from the int8 original's by {of_bound:.2f} times "
                "the bound (export.qdq.DETECT_STEPS steps of the tensor each value is read from)"
            )
        return {"scores_max_error": scores, "boxes_max_error": boxes, "raw_relative_error": raw,
                "of_bound": of_bound, "inputs": [[1, height, width]] * inputs}  # fmt: skip
    if not (scores <= DETECT_TOLERANCE and boxes <= DETECT_TOLERANCE):
        raise ExportError(
            f"self-check failed: the bundle's candidates differ from the original's by {scores:.2e} in their scores "
            f"and {boxes:.2e} of the input's side in their boxes (limit {DETECT_TOLERANCE} each)"
        )
    return {
        "scores_max_error": scores,
        "boxes_max_error": boxes,
        "raw_relative_error": raw,
        "inputs": [[1, height, width]] * inputs,
    }


def report_detector(meta: dict, out: Path, notes: Sequence[str] = ()) -> None:
    """One line on stderr saying what detector was exported, what was read without a flag, and how well it matched."""
    detect, check = meta["detect"], meta["check"]
    size = "{}x{} px".format(*meta["input_size"])
    feed = f"letterbox {meta['letterbox'][0]}" if meta.get("letterbox") else "stretched"
    layers = meta.get("layer", "").count(",") + 1
    side = max(meta["input_size"])
    print(
        f"exported {meta['arch']} (detector: {detect['decode']}, {meta['classes']} classes, {layers} "
        f"layer{'s' if layers > 1 else ''}, {size} {feed}) to {out} (self-check: scores within {check['scores_max_error']:.1e}, "
        f"boxes within {check['boxes_max_error'] * side:.1e} px of the original)"
        + (f"; read without a flag: {'; '.join(notes)}" if notes else ""),
        file=sys.stderr,
    )
