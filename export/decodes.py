"""A detector's decode, read from its outputs: one builder per shape of output, and the flags for what they cannot say.

A builder takes the model's outputs (:class:`Outputs`: their names and shapes at the export size, their values
on two random inputs, the file's metadata) and the flags (:class:`export.detector.Options`). It returns a
:class:`Decode`: bundle.json's ``detect`` spec (docs/formats.md, "Detection bundles"), which outputs, or parts of
them, the head's flat output is made of (:class:`Segment`), and how the model's package feeds it. It returns None
when the outputs are not of its shape, so that the next builder may try, and raises a one-line ExportError naming
the missing piece (a flag) when they are but something cannot be read. :data:`BUILDERS` is the order they are
tried in.

What the values tell: a class score that went through a sigmoid in the graph lies in [0, 1] for every candidate
of every input, a logit does not (random inputs put thousands of logits outside it), so the decode's ``scores``
activation is read from the values, whatever ops the exporter wrote; so is which columns of a joined output are
class scores (in [0, 1]) and which are raw box distributions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .errors import ExportError

if TYPE_CHECKING:
    from .detector import Options

# The strides a feature map may have, and the fewest maps a multi-scale detector has.
STRIDES = (4, 8, 16, 32, 64, 128)
# YOLOv5/v7 predict three anchors per cell; anchor-free models one candidate per cell.
ANCHORS_PER_CELL = (1, 3)
# A YOLOv8 output transposed to candidates first, on COCO: 4 box values and 80 classes, no objectness.
YOLOV8_COCO_CHANNELS = 84


@dataclass
class Outputs:
    """A model's outputs as the builders read them.

    Attributes
    ----------
    names : the outputs, in the graph's order
    shapes : each one's shape for one image at ``size``
    size : the input ``(height, width)`` the model is exported at
    run : computes every output on two random inputs: ``{name: float [2, ...]}`` (called once, when needed)
    metadata : the file's metadata (ultralytics writes ``task``, ``names``, ``imgsz``)
    forced : ``--task detect``, or the file says it is a detector: a shape that is nearly right is refused with
        the missing piece instead of being passed to the classifier route
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    size: tuple[int, int]
    run: Callable[[], dict[str, np.ndarray]]
    metadata: dict[str, str] = field(default_factory=dict)
    forced: bool = False

    @cached_property
    def values(self) -> dict[str, np.ndarray]:
        return self.run()

    def of_rank(self, rank: int) -> list[str]:
        return [name for name in self.names if len(self.shapes[name]) == rank and self.shapes[name][0] == 1]

    def describe(self) -> str:
        return ", ".join(f"{name} {list(self.shapes[name])}" for name in self.names)


@dataclass(frozen=True)
class Segment:
    """One part of the head's flat output: a model output, or a box of it.

    ``name`` is its name in ``detect.outputs`` (``output0``, ``scores.8``, ``boxes.8``), ``tensor`` the model output
    it is (part of), ``shape`` its shape ``[1, ...]``, and ``box`` the ``[start, stop)`` kept of each axis after the
    batch (None: the whole output).
    """

    name: str
    tensor: str
    shape: tuple[int, ...]
    box: tuple[tuple[int, int], ...] | None = None

    def take(self, value: np.ndarray) -> np.ndarray:
        """This segment of the output ``value`` ``[n, ...]``, flattened: ``[n, prod(shape)]``."""
        if self.box is not None:
            value = value[(slice(None), *(slice(a, b) for a, b in self.box))]
        return value.reshape(len(value), -1)


@dataclass
class Decode:
    """What a builder read: the decode, the flat output's parts, and how the model's package feeds the model.

    Attributes
    ----------
    spec : bundle.json's ``detect`` without ``outputs`` (added by :meth:`detect_spec`)
    segments : the flat output's parts, in order
    letterbox : the package letterboxes its input (YOLO); else it stretches it
    unit_scale : the package feeds pixels / 255 with no mean or std (YOLO); else the exporter's default (ImageNet's)
    strides : the strides the outputs say (a distribution decode's), else empty (read from the cut)
    notes : what was decided without a flag, for the export's line
    arrays : the decode's arrays (decode.npz)
    normalization : the package's ``(mean, std)`` when it is neither of ``unit_scale``'s (SSD exports: [-1, 1])
    """

    spec: dict
    segments: list[Segment]
    letterbox: bool
    unit_scale: bool
    strides: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    normalization: tuple[list[float], list[float]] | None = None

    @property
    def size(self) -> int:
        """T: the flat output's length for one image."""
        return sum(math.prod(s.shape) for s in self.segments)

    def detect_spec(self) -> dict:
        """bundle.json's ``detect``: the spec with each segment's place in the flat output (and its tensor)."""
        outputs, offset = [], 0
        for s in self.segments:
            outputs.append({"name": s.name, "offset": offset, "shape": list(s.shape), "tensor": s.tensor})
            offset += math.prod(s.shape)
        return {**self.spec, "outputs": outputs}

    def arrange(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The flat output ``[n, T]`` from the model's outputs ``{name: [n, ...]}``, as the head joins them."""
        return np.concatenate([s.take(np.asarray(values[s.tensor])) for s in self.segments], axis=1)


def cells(size: tuple[int, int], stride: int) -> int:
    """Cells of a map at ``stride`` for an input of ``size``: each side divided by the stride, rounded up (a 3x3
    convolution of stride 2 and padding 1 halves a side rounding up)."""
    return math.ceil(size[0] / stride) * math.ceil(size[1] / stride)


def stride_runs(options: Options) -> list[tuple[int, ...]]:
    """The stride sets a multi-scale output may have: ``--strides``, else every run of two or more consecutive
    strides of :data:`STRIDES`."""
    if options.strides:
        return [tuple(options.strides)]
    return [STRIDES[i:j] for i in range(len(STRIDES)) for j in range(i + 2, len(STRIDES) + 1)]


def strides_of_count(count: int, size: tuple[int, int], options: Options, per_cell: int = 1) -> tuple[int, ...] | None:
    """The stride set whose maps hold ``count`` candidates (``per_cell`` a cell), or None."""
    for run in stride_runs(options):
        if per_cell * sum(cells(size, s) for s in run) == count:
            return run
    return None


def unit_interval(values: np.ndarray) -> bool:
    """Every value finite and in [0, 1]: probabilities (a sigmoid in the graph), not logits."""
    return bool(values.size) and bool(np.isfinite(values).all()) and bool((values >= 0).all() and (values <= 1).all())


def activation(values: np.ndarray) -> str:
    """The decode's activation of these class values: ``identity`` for probabilities, else ``sigmoid``."""
    return "identity" if unit_interval(values) else "sigmoid"


# The builders


def yolo(outputs: Outputs, options: Options) -> Decode | None:
    """YOLO-style, boxes decoded in the graph: one output ``[1, 4+C, N]`` (YOLOv8/v11: centre x, centre y, width,
    height in input pixels, then C class scores) or ``[1, N, 5+C]`` (YOLOv5/v7: an objectness after the box).

    The candidates' axis is the one whose length is the candidate count of a stride set at this input size (one
    or three anchors a cell); with ``--task detect``, the longer axis. An output whose count fits no stride set
    (post-processed, such as YOLOv10's ``[1, 300, 6]``) is not read without ``--task detect``.
    """
    found = outputs.of_rank(3)
    if len(found) != 1:
        return None
    name = found[0]
    _, a, b = outputs.shapes[name]
    fits = {axis: _candidates(count, outputs.size, options) for axis, count in ((1, a), (2, b))}
    if fits[2] and not fits[1]:
        first = True
    elif fits[1] and not fits[2]:
        first = False
    elif options.task == "detect":  # said so: the longer axis holds the candidates
        first = a < b
    else:  # (a file that calls itself a detector, with post-processed outputs such as [1, 300, 6], is refused)
        return None
    count, channels = (b, a) if first else (a, b)
    per_cell = (fits[2] if first else fits[1]) or (None, None)
    notes = []
    if options.objectness is not None:
        objectness = options.objectness
    elif first:
        objectness = False  # YOLOv8/v11
    else:  # YOLOv5/v7 and YOLOX put the candidates first and have one; a YOLOv8 output transposed does not
        objectness = not (per_cell[1] == 1 and channels == YOLOV8_COCO_CHANNELS)
        notes.append("objectness " + ("read after the box (--no-objectness if not)" if objectness else "none"))
    classes = channels - 4 - objectness
    if classes < 1:
        raise ExportError(
            f"output {name!r} {list(outputs.shapes[name])} holds {channels} values a candidate: too few for a box"
            + (", an objectness" if objectness else "")
            + " and a class"
        )
    values = outputs.values[name]
    values = values if first else values.transpose(0, 2, 1)  # [n, channels, N]
    spec = {
        "decode": "yolo",
        "classes": classes,
        "layout": "channels_first" if first else "anchors_first",
        "objectness": objectness,
        "box": "cxcywh",
        "scores": activation(values[:, 4 + objectness :]),
    }
    if objectness:
        spec["objectness_scores"] = activation(values[:, 4])
    return Decode(spec, [Segment(name, name, (1, a, b))], letterbox=True, unit_scale=True, notes=notes)


def _candidates(count: int, size: tuple[int, int], options: Options) -> tuple[tuple[int, ...], int] | None:
    """``(strides, anchors a cell)`` when ``count`` candidates fit the maps of a stride set, else None."""
    for per_cell in ANCHORS_PER_CELL:
        run = strides_of_count(count, size, options, per_cell)
        if run:
            return run, per_cell
    return None


def distribution(outputs: Outputs, options: Options) -> Decode | None:
    """Anchor-free, raw per-stride outputs of a GFL/DFL head: for each stride, class scores ``[1, N_s, C]`` and box
    distributions ``[1, N_s, 4 (R+1)]`` (PP-PicoDet through paddle2onnx, NanoDet before its Plus), or all of them
    joined into one ``[1, N, C + 4 (R+1)]``, the strides in turn (NanoDet-Plus's export)."""
    found = outputs.of_rank(3)
    if len(found) >= 2:
        return _per_stride(outputs, options, found)
    if len(found) == 1:
        return _joined(outputs, options, found[0])
    return None


def _per_stride(outputs: Outputs, options: Options, found: list[str]) -> Decode | None:
    groups: dict[int, list[str]] = {}
    for name in found:
        groups.setdefault(outputs.shapes[name][1], []).append(name)
    if any(len(pair) != 2 for pair in groups.values()) or len(groups) < 2:
        return None
    counts = sorted(groups, reverse=True)  # the finest map first
    size = outputs.size
    if options.strides:
        strides = tuple(options.strides)
        if len(strides) != len(counts) or any(cells(size, s) != n for s, n in zip(strides, counts)):
            raise ExportError(
                f"--strides {','.join(map(str, strides))} do not fit the outputs' {', '.join(map(str, counts))} "
                f"cells at {size[0]}x{size[1]}"
            )
    else:
        strides = tuple(next((s for s in STRIDES if cells(size, s) == n), 0) for n in counts)
        if not all(strides):
            raise ExportError(
                f"cannot tell the strides of outputs of {', '.join(map(str, counts))} cells at {size[0]}x{size[1]}: "
                "give them with --strides (e.g. --strides 8,16,32,64)"
            )
    widths = {tuple(sorted(outputs.shapes[name][2] for name in groups[n])) for n in counts}
    if len(widths) != 1:
        raise ExportError(f"the per-stride outputs do not all have the same widths ({sorted(widths)})")
    pairs = [groups[n] for n in counts]
    boxes = [_box_of_pair(outputs, options, pair) for pair in pairs]
    classes = outputs.shapes[[n for n in pairs[0] if n != boxes[0]][0]][2]
    bins = outputs.shapes[boxes[0]][2] // 4
    segments = []
    scores_values = []
    for stride, pair, box in zip(strides, pairs, boxes):
        score = next(n for n in pair if n != box)
        segments += [
            Segment(f"scores.{stride}", score, tuple(outputs.shapes[score])),
            Segment(f"boxes.{stride}", box, tuple(outputs.shapes[box])),
        ]
        scores_values.append(outputs.values[score].reshape(-1))
    offset = 0.5 if options.grid_offset is None else options.grid_offset
    spec = {
        "decode": "distribution",
        "classes": classes,
        "strides": list(strides),
        "bins": bins,
        "offset": offset,
        "scores": activation(np.concatenate(scores_values)),
    }
    notes = [] if options.grid_offset is not None else ["cell centres at (x + 0.5, y + 0.5) * stride (--grid-offset)"]
    return Decode(spec, segments, letterbox=False, unit_scale=False, strides=strides, notes=notes)


def _box_of_pair(outputs: Outputs, options: Options, pair: list[str]) -> str:
    """Which of a stride's two outputs holds the box distributions (4 (R+1) values a cell)."""
    widths = {name: outputs.shapes[name][2] for name in pair}
    if options.bins:
        boxes = [name for name in pair if widths[name] == 4 * options.bins]
        if len(boxes) != 1:
            raise ExportError(f"--bins {options.bins}: no single output of {pair} is 4 x {options.bins} wide")
        return boxes[0]
    boxes = [name for name in pair if widths[name] % 4 == 0 and widths[name] >= 8]
    if len(boxes) == 1:
        return boxes[0]
    probabilities = [name for name in pair if unit_interval(outputs.values[name])]
    if len(probabilities) == 1:
        return next(name for name in pair if name != probabilities[0])
    raise ExportError(
        f"cannot tell which of {pair[0]!r} and {pair[1]!r} holds the box distributions: give the bins per side "
        "with --bins (R + 1, e.g. --bins 8)"
    )


def _joined(outputs: Outputs, options: Options, name: str) -> Decode | None:
    _, count, width = outputs.shapes[name]
    values = outputs.values[name]
    if options.bins:
        classes = width - 4 * options.bins
        if classes < 1:
            raise ExportError(f"--bins {options.bins}: output {name!r} {[1, count, width]} has no room for a class")
    else:
        # The class scores lead, through a sigmoid; the raw box distributions follow.
        column_ok = [unit_interval(values[:, :, c]) for c in range(width)]
        classes = column_ok.index(False) if False in column_ok else width
        rest = width - classes
        if not (0 < classes and rest >= 8 and rest % 4 == 0 and not any(column_ok[classes:])):
            return None
    bins = (width - classes) // 4
    strides = strides_of_count(count, outputs.size, options)
    if strides is None:
        if not (outputs.forced or options.bins):
            return None
        raise ExportError(
            f"cannot tell the strides of output {name!r}'s {count} cells at {outputs.size[0]}x{outputs.size[1]}: "
            "give them with --strides (e.g. --strides 8,16,32,64)"
        )
    segments, start = [], 0
    for stride in strides:
        n = cells(outputs.size, stride)
        rows = (start, start + n)
        segments += [
            Segment(f"scores.{stride}", name, (1, n, classes), (rows, (0, classes))),
            Segment(f"boxes.{stride}", name, (1, n, 4 * bins), (rows, (classes, width))),
        ]
        start += n
    offset = 0.0 if options.grid_offset is None else options.grid_offset
    spec = {
        "decode": "distribution",
        "classes": classes,
        "strides": list(strides),
        "bins": bins,
        "offset": offset,
        "scores": activation(values[:, :, :classes]),
    }
    notes = [] if options.grid_offset is not None else ["cell centres at (x, y) * stride (--grid-offset)"]
    notes.append(f"{classes} classes and {bins} bins a side")
    return Decode(spec, segments, letterbox=False, unit_scale=False, strides=strides, notes=notes)


# SSD-style decodes (``--anchor-decode``): how the box regressors are read against the anchors. MediaPipe divides the
# offsets and sizes by the input's size (its x_scale .. h_scale) and takes sizes linearly against unit anchors; the
# TF Object Detection API (faster_rcnn_box_coder) writes (ty, tx, th, tw), scaled by (10, 10, 5, 5), exponential
# sizes, and a background class in column 0 of its class predictions.
ANCHOR_DECODES = ("mediapipe", "tf")
# Names that mark an SSD's box regressor output (MediaPipe's "regressors", the TF OD API's "box_encodings").
BOX_NAME = re.compile(r"box|regress|loc|coord", re.IGNORECASE)
# Both MediaPipe's and the TF Object Detection API's SSD exports take pixels scaled to [-1, 1].
SIGNED_UNIT = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def anchors(outputs: Outputs, options: Options) -> Decode | None:
    """SSD-style raw outputs, against anchors the model's package generates (``--anchors``): box regressors
    ``[1, N, 4+K]`` (K extra values, such as keypoints, not read) and class scores ``[1, N, C]`` (or ``C+1`` with a
    background column), the same N candidates.

    Two outputs of rank 3 with as many rows each, one at least 4 wide, are SSD-shaped; without ``--anchors`` they
    are refused in one line naming the flag (the anchors are not in the graph) when one is at most 4 wide (boxes, or
    a few classes) or the model is said to be a detector, as they are without ``--anchor-decode`` (their
    convention cannot be read from the values).
    """
    found = outputs.of_rank(3)
    rows = {outputs.shapes[name][1] for name in found}
    if len(found) != 2 or len(rows) != 1 or max(outputs.shapes[name][2] for name in found) < 4:
        if options.anchors is not None:
            raise ExportError(
                f"--anchors given, but its outputs ({outputs.describe()}) are not SSD-style box regressors "
                "[1, N, 4+K] and class scores [1, N, C]"
            )
        return None
    (count,) = rows
    if options.anchors is None:
        # A pair of as many rows, neither narrow (a box's 4 values, or a few classes), is left to the other routes
        # unless the model is said to be a detector: two hidden-state outputs are not an SSD's.
        if outputs.forced or min(outputs.shapes[name][2] for name in found) <= 4:
            _refuse_without_anchors(outputs, count)
        return None
    table = load_anchors(options.anchors)
    if len(table) != count:
        raise ExportError(f"{'the anchors' if isinstance(options.anchors, np.ndarray) else options.anchors}: {len(table)} anchors, the outputs hold {count} candidates")
    if options.anchor_decode is None:
        raise ExportError(
            "the SSD decode's convention cannot be read from the outputs: give it with --anchor-decode mediapipe "
            "(offsets and sizes over the input size, linear sizes) or --anchor-decode tf (scales 10,10,5,5, "
            "exponential sizes, a background column)"
        )
    boxes = _box_output(outputs, options, found)
    scores = next(name for name in found if name != boxes)
    width = outputs.shapes[scores][2]
    mediapipe = options.anchor_decode == "mediapipe"
    background = (None if mediapipe else 0) if options.background is None else options.background
    background = None if background is not None and background < 0 else background
    if background is not None and not 0 <= background < width:
        raise ExportError(f"--background {background}: output {scores!r} has {width} columns")
    classes = width - (background is not None)
    if classes < 1:
        raise ExportError(f"output {scores!r} {list(outputs.shapes[scores])} has no column for a class after the background")
    rows_in, cols_in = outputs.size
    order = options.box_order or ("xywh" if mediapipe else "yxhw")
    # The scales divide the regressors' values in their own order: MediaPipe's are the input's sides.
    sides = [cols_in, rows_in] if order == "xywh" else [rows_in, cols_in]
    default_scales = sides * 2 if mediapipe else [10.0, 10.0, 5.0, 5.0]
    scales = [float(v) for v in (options.box_scales or default_scales)]
    spec = {
        "decode": "anchors",
        "classes": classes,
        "order": order,
        "scales": scales,
        "sizes": "linear" if mediapipe else "exp",
        "scores": options.scores or activation(outputs.values[scores]),
    }
    if background is not None:
        spec["background"] = background
    notes = [f"boxes in {boxes!r}, class scores in {scores!r}"]
    if options.scores is None:
        notes.append(f"class scores {'are probabilities' if spec['scores'] == 'identity' else 'through a sigmoid'} (--scores)")
    notes.append("inputs scaled to [-1, 1] (--mean/--std)")
    segments = [Segment("boxes", boxes, tuple(outputs.shapes[boxes])), Segment("scores", scores, tuple(outputs.shapes[scores]))]
    return Decode(spec, segments, letterbox=False, unit_scale=False, notes=notes, arrays={"anchors": table},
                  normalization=SIGNED_UNIT)  # fmt: skip


def _refuse_without_anchors(outputs: Outputs, count: int) -> None:
    """Two outputs of one candidate count, one at least 4 wide: an SSD's raw outputs, whose anchors are not in the
    graph. (Per-stride pairs of several strides have been read before.)"""
    if count > 1:
        raise ExportError(
            f"its outputs ({outputs.describe()}) look like an SSD's box regressors and class scores, decoded against "
            "anchors the model's package makes: give them with --anchors anchors.npy ([N, 4]: centre x, centre y, "
            "width, height, on the input's 0-1 scale) and the convention with --anchor-decode mediapipe|tf"
        )


def _box_output(outputs: Outputs, options: Options, found: list[str]) -> str:
    """Which of the two outputs holds the box regressors: ``--box-output``; else the only one at least 4 wide; else
    the only one exactly 4 wide; else the only one named as boxes are (MediaPipe's ``regressors``, the TF OD API's
    ``box_encodings``)."""
    if options.box_output is not None:
        if options.box_output not in found:
            raise ExportError(f"--box-output {options.box_output!r}: not one of the outputs {found}")
        return options.box_output
    for fits in (lambda width: width >= 4, lambda width: width == 4):
        chosen = [name for name in found if fits(outputs.shapes[name][2])]
        if len(chosen) == 1:
            return chosen[0]
    named = [name for name in found if BOX_NAME.search(name)]
    if len(named) == 1:
        return named[0]
    raise ExportError(
        f"cannot tell which of {found[0]!r} and {found[1]!r} holds the box regressors: name it with --box-output"
    )


def load_anchors(path) -> np.ndarray:
    """``--anchors``: a ``.npy`` of ``[N, 4]`` finite anchors (centre x, centre y, width, height), normalized to the
    input's 0-1 scale; float64 ``[N, 4]``."""
    if isinstance(path, np.ndarray):  # read from the file itself (TFLite_Detection_PostProcess's anchors)
        path, table = "the file's anchors", path
    else:
        table = None
    try:
        table = np.load(path, allow_pickle=False) if table is None else table
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise ExportError(f"{path}: not a .npy array ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if table.ndim != 2 or table.shape[1] != 4 or table.dtype.kind not in "fiu" or not len(table):
        raise ExportError(f"{path}: anchors must be an [N, 4] number array (centre x, centre y, w, h), not {table.dtype} {list(table.shape)}")
    table = table.astype(np.float64)
    if not np.isfinite(table).all():
        raise ExportError(f"{path}: the anchors hold NaN or infinite values")
    if np.abs(table[:, :2]).max() > 2:
        raise ExportError(f"{path}: anchor centres reach {np.abs(table[:, :2]).max():g}; they are on the input's 0-1 "
                          "scale (divide pixels by the input's width and height)")  # fmt: skip
    return table


# Tried in this order: the joined distribution output needs the stronger evidence (leading columns of
# probabilities, trailing raw ones), which a YOLO output (box coordinates first) never gives. Per-stride pairs of
# several strides are read before an SSD's one pair.
BUILDERS: tuple[Callable[[Outputs, Options], Decode | None], ...] = (distribution, anchors, yolo)
