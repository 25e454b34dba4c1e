"""Detectors: recognized from their outputs, split at the inputs of their detection head (one map per stride).

The detector's counterpart of :mod:`export.split`, on any ONNX detector (torch-free), in stages:

1. :func:`before_nms`: a graph that ends in NonMaxSuppression is cut before it, where its raw outputs are.
2. :func:`recognize`: the outputs are read by the builders of :mod:`export.decodes` in turn (anchor-free
   per-stride distributions, SSD-style against ``--anchors``, YOLO-style); the first that recognizes them gives the decode, the parts of the
   outputs the head's flat output is made of, and how the model's package feeds the model.
3. :func:`export.detector_cut.head_inputs`: the cut, one map per stride (the rule in its docstring, docs/export.md "Detectors"), or
   the tensors ``--layer`` names.
4. The head: everything from those maps to the raw outputs, whose parts are flattened and joined into one output
   ``[1, T]`` (:mod:`export.head_ops`; the joining nodes are added to a copy of the graph first, so that they
   convert like any other). The trunk: everything before the maps, one output per map (:mod:`export.trunk`).

Anything that cannot be read is refused with one line naming the missing piece (a flag).
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from npcam.head import GraphHead, recommended_precision

from . import decodes, detector_cut, head_finder, layer
from .decodes import Decode, Outputs
from .errors import ExportError
from .graph import GraphIndex, Values, dims, first_line, index, inline_constant_ifs, session, unique
from .head_ops import head_ops
from .sizes import native_size
from .split import check_batch
from .trunk import set_input_dims, trunk

# The input size of a detector whose file leaves it free (the YOLO tools' default), unless --input-size or the
# file's own metadata (ultralytics' imgsz) says otherwise.
DEFAULT_SIZE = (640, 640)
# The letterbox's grey, as the YOLO tools pad.
LETTERBOX = 114
# ultralytics' tasks that are not detection; their outputs look like a detector's but hold more.
OTHER_TASKS = ("segment", "pose", "obb")


@dataclass(frozen=True)
class Options:
    """The flags of a detector's export (each one what the outputs cannot say).

    Attributes
    ----------
    task : ``"detect"`` (a detector, whatever its outputs look like), ``"classify"`` (never one), None (read them)
    strides : the strides of the maps, finest first (``--strides 8,16,32,64``)
    bins : R + 1, the values a box side's distribution has (``--bins 8``)
    objectness : whether a YOLO output has an objectness after the box (None: read; see :mod:`export.decodes`)
    letterbox : the pad level of a letterbox (None: the shape's default); ``stretch``: no letterbox
    grid_offset : a cell's centre, in cells (0.5: PP-PicoDet; 0: NanoDet-Plus)
    layers : ONNX tensors to explain instead of the head's inputs (``--layer``)
    anchors : an SSD's anchors, a ``.npy`` of ``[N, 4]`` centre-size, normalized (``--anchors``), or the array a
        file holds (TFLite_Detection_PostProcess's)
    anchor_decode : how an SSD's regressors are read against them, ``"mediapipe"`` or ``"tf"`` (``--anchor-decode``)
    box_scales : the regressors' divisors, in their own order, instead of the convention's (``--box-scales``)
    box_order : ``"xywh"`` or ``"yxhw"`` instead of the convention's (``--box-order``)
    background : the class column that is background (``--background``; -1: none; None: the convention's)
    scores : the class values' activation, ``identity``, ``sigmoid`` or ``softmax`` (``--scores``; None: read)
    box_output : which output holds an SSD's box regressors (``--box-output``; None: read)
    """

    task: str | None = None
    strides: tuple[int, ...] | None = None
    bins: int | None = None
    objectness: bool | None = None
    letterbox: int | None = None
    stretch: bool = False
    grid_offset: float | None = None
    layers: tuple[str, ...] = ()
    anchors: str | np.ndarray | None = None
    anchor_decode: str | None = None
    box_scales: tuple[float, ...] | None = None
    box_order: str | None = None
    background: int | None = None
    scores: str | None = None
    box_output: str | None = None


@dataclass
class DetectorSplit:
    """A detector split at the maps it is explained at.

    Attributes
    ----------
    trunk : the trunk in npcam's contract: input ``image``, one output per map (``features`` for one map)
    head : the head, from the maps to the flat output ``[N, T]``
    decode : the decode read from the outputs (:class:`export.decodes.Decode`)
    input_size : ``(height, width)``, the only size the bundle takes (the head has the maps' exact shapes)
    layout, channels : the original input's layout ("NCHW" or "NHWC") and channels (3, or 1 for grey)
    layers : the ONNX tensors explained, finest first
    strides : each map's stride
    letterbox : the pad's ``[R, G, B]`` when the input is letterboxed, else None
    metadata : the file's metadata (ultralytics' names, task, imgsz)
    """

    trunk: onnx.ModelProto
    head: GraphHead
    decode: Decode
    input_size: tuple[int, int]
    layout: str
    channels: int
    layers: list[str]
    strides: list[int]
    letterbox: list[int] | None
    metadata: dict[str, str] = field(default_factory=dict)

    def arrange(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The original model's outputs ``{name: [n, ...]}`` as the bundle's flat output ``[n, T]``."""
        return self.decode.arrange(values)


def split_detector(
    model: onnx.ModelProto,
    input_size: int | tuple[int, int] | None = None,
    bgr: bool = False,
    options: Options = Options(),
) -> DetectorSplit | None:
    """Split ``model`` as a detector, or return None when it is not one (and ``--task detect`` was not given).

    Raises :class:`ExportError` in one line when it is a detector that cannot be split, naming what is missing.
    """
    if options.task == "classify":
        return None
    metadata = {p.key: p.value for p in model.metadata_props}
    task = metadata.get("task")
    if task in OTHER_TASKS:
        raise ExportError(f"an ultralytics '{task}' model: npcam explains detectors (task 'detect') and classifiers")
    # A graph that ends in NMS is a detector's, whatever its outputs are.
    nms = any(n.op_type == "NonMaxSuppression" for n in model.graph.node)
    forced = options.task == "detect" or task == "detect" or nms
    ranks = [len(dims(o)) for o in model.graph.output]
    if not forced and 3 not in ranks and all(ranks):
        return None  # no output of a detector's rank: a classifier
    model = inline_constant_ifs(model)
    image = head_finder.image_input(model.graph)
    layout = "NCHW" if dims(image)[1] in (1, 3) else "NHWC"
    channels = dims(image)[1 if layout == "NCHW" else 3]
    static_hw = dims(image)[2:] if layout == "NCHW" else dims(image)[1:3]
    free = not all(isinstance(d, int) and d > 0 for d in static_hw)
    size = native_size(static_hw, input_size or (_metadata_size(metadata) or DEFAULT_SIZE if free else None))
    values = Values(model, image.name, layout, size, channels)
    model, cut_note = before_nms(model, values)
    if cut_note:
        values = Values(model, image.name, layout, size, channels)
    g = index(model)
    names = [o.name for o in model.graph.output]
    shapes = {name: values.shape(name) for name in names}
    if any(shape is None for shape in shapes.values()):
        if not forced:
            return None
        raise ExportError(f"cannot tell the shapes of the outputs at {size[0]}x{size[1]}")
    outputs = Outputs(
        names, {k: tuple(v) for k, v in shapes.items()}, size, lambda: _sample(model, values), metadata, forced
    )
    decode = recognize(outputs, options)
    if decode is None:
        return None
    if cut_note:
        decode.notes.insert(0, cut_note)
    named = len(_metadata_names(metadata) or ())
    if named and named != decode.spec["classes"]:  # YOLOv5's segmentation models name 80 and hold 112 more values
        raise ExportError(
            f"the file names {named} classes, its outputs hold {decode.spec['classes']} after the box: not a detection "
            "output that npcam reads (a segmentation or pose model?)"
        )
    joined, out_name = with_joined_output(model, decode)
    g2 = index(joined)
    values2 = Values(joined, image.name, layout, size, channels)
    layers = list(options.layers) or detector_cut.head_inputs(g2, image.name, [s.tensor for s in decode.segments], values2, size)
    head, sides = _head(g2, joined, layers, out_name, values2)
    part = _trunk(g, model, image.name, layout, bgr, channels, layers, sides, head, size, values2.one_image)
    # Each map's stride (a map off the strides' grids, named by --layer: its cells' size on the longer side)
    strides = [detector_cut.grid_stride(values2.shape(name), size) or detector_cut.cell(values2.shape(name), size) for name in layers]
    if options.stretch or (options.letterbox is None and not decode.letterbox):
        letterbox = None
    else:
        letterbox = [LETTERBOX if options.letterbox is None else options.letterbox] * 3
    return DetectorSplit(part, head, decode, size, layout, channels, layers, strides, letterbox, metadata)


def before_nms(model: onnx.ModelProto, values: Values) -> tuple[onnx.ModelProto, str]:
    """``model`` cut before its NonMaxSuppression, where its raw outputs are, and a note saying where; ``model``
    itself and ``""`` without one.

    The raw outputs are the graph's outputs that do not depend on the NMS, when there are any (a file that gives
    both); else the one tensor of rank 3 both of the NMS's inputs (boxes and scores) are read from: the last one
    they share, walked up through ops that only move values (a transpose, a slice) to where it is computed (the
    YOLO tools' joined output before the NMS's slicing). Refused in one line when there is none (boxes decoded in
    the graph from other tensors than the scores, such as an SSD's against anchors held in the graph).
    """
    graph = model.graph
    found = [n for n in graph.node if n.op_type == "NonMaxSuppression"]
    if not found:
        return model, ""
    after = {o for n in found for o in n.output if o}
    for node in graph.node:  # graph order is topological
        if any(i in after for i in node.input):
            after.update(o for o in node.output if o)
    kept = [o.name for o in graph.output if o.name not in after]
    where = f"cut before NonMaxSuppression ({found[0].name or 'unnamed'})"
    if kept:
        return _pruned(model, kept), f"{where}: its outputs {', '.join(kept)}"
    g = index(model)
    image = values.image
    preds = detector_cut.value_graph(g, image)
    shared = None
    for node in found:
        boxes, scores = node.input[0], node.input[1]
        common = detector_cut.ancestors(preds, [boxes]) & detector_cut.ancestors(preds, [scores])
        ranked = [t for t in preds if t in common and t != image and _rank3(values.shape(t))]
        if not ranked:
            shared = None
            break
        top = ranked[-1]
        while (
            (producer := g.producers.get(top)) is not None
            and producer.op_type in MOVE_OPS
            and _rank3(values.shape(producer.input[0]))
        ):
            top = producer.input[0]
        if shared not in (None, top):
            shared = None
            break
        shared = top
    if shared is None:
        raise ExportError(
            f"the graph ends in NonMaxSuppression ({found[0].name or 'unnamed'}), whose boxes and scores come from no "
            "one raw output [1, ...] before it (boxes decoded in the graph from other tensors): export the model "
            "without NMS"
        )
    return _pruned(model, [shared]), f"{where}: its input {shared!r}"


# Ops that only move values (a transposed or sliced raw output is read through them up to where it is computed)
MOVE_OPS = ("Transpose", "Slice", "Split", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


def _rank3(shape) -> bool:
    return shape is not None and len(shape) == 3 and shape[0] == 1


def _pruned(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``outputs``, without the nodes and constants they do not need."""
    cut = copy.deepcopy(model)
    graph = cut.graph
    producers = {o: n for n in graph.node for o in n.output}
    needed, todo = set(), list(outputs)
    while todo:
        t = todo.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producers.get(t)
        if node is not None:
            todo += [i for i in node.input if i]
            todo += [o for o in node.output if o]
            for attribute in node.attribute:  # a subgraph's outer names
                for sub in [attribute.g, *attribute.graphs]:
                    todo += [i for n in sub.node for i in n.input if i]
    nodes = [n for n in graph.node if any(o in needed for o in n.output)]
    known = {o.name: o for o in graph.output}
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(known.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs)
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return cut


def recognize(outputs: Outputs, options: Options) -> Decode | None:
    """The decode of the first builder of :data:`export.decodes.BUILDERS` that recognizes ``outputs``; None when
    none does and the model is not said to be a detector, else a one-line refusal."""
    for build in decodes.BUILDERS:
        decode = build(outputs, options)
        if decode is not None:
            return decode
    if not outputs.forced:
        return None
    raise ExportError(
        f"its outputs ({outputs.describe()}) are not a detector's that npcam reads: one [1, 4+C, N] or [1, N, 5+C] "
        "output (YOLO), per-stride pairs [1, N_s, C] and [1, N_s, 4(R+1)] (or one [1, N, C+4(R+1)]), or an SSD's "
        "[1, N, 4+K] and [1, N, C] with --anchors"
    )


def with_joined_output(model: onnx.ModelProto, decode: Decode) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` with one more output: the decode's segments, each cut out, flattened, and joined
    ``[N, T]``. Returns the copy and the new output's name."""
    joined = copy.deepcopy(model)
    graph = joined.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    opset = next((o.version for o in joined.opset_import if o.domain in ("", "ai.onnx")), 17)
    flat = []
    for segment in decode.segments:
        source = segment.tensor
        if segment.box is not None:
            part = unique(f"npcam_{segment.name}", taken)
            taken.add(part)
            starts, ends = [a for a, _ in segment.box], [b for _, b in segment.box]
            axes = list(range(1, 1 + len(segment.box)))
            if opset >= 10:
                names = [unique(f"{part}_{k}", taken) for k in ("starts", "ends", "axes")]
                taken.update(names)
                for name, value in zip(names, (starts, ends, axes)):
                    graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
                graph.node.append(helper.make_node("Slice", [source, *names], [part], name=part))
            else:
                graph.node.append(helper.make_node("Slice", [source], [part], name=part, starts=starts, ends=ends, axes=axes))
            source = part
        name = unique(f"npcam_flat_{segment.name}", taken)
        taken.add(name)
        graph.node.append(helper.make_node("Flatten", [source], [name], name=name, axis=1))
        flat.append(name)
    out = unique("npcam_outputs", taken)
    graph.node.append(helper.make_node("Concat", flat, [out], name=out, axis=1))
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return joined, out


# The head and the trunk


def _head(g: GraphIndex, model: onnx.ModelProto, layers: list[str], out_name: str, values: Values):
    """The head from ``layers`` to the flat output, and the trunk tensors it also reads (side inputs)."""
    for name in layers:
        if name not in g.producers:
            known = "an initializer, not a layer" if name in g.constants else "no tensor of that name in the model"
            raise ExportError(f"--layer {name!r}: {known}")
    shapes = {}
    for name in layers:
        shape = values.shape(name)
        if shape is None or len(shape) != 4:
            raise ExportError(f"--layer {name!r} has shape {shape}: a detector is explained at maps [N, C, h, w]")
        if layer.nhwc_source(g, name) is not None:
            raise ExportError(f"--layer {name!r} is channels-last (a transpose of {layer.nhwc_source(g, name)!r}): name that one")
        shapes[name] = [-1, *shape[1:]]
    found = head_finder.kinds(g, layers[0], layers[1:])
    if found.get(out_name) not in ("data", "mixed"):
        raise ExportError(f"the outputs do not depend on {', '.join(map(repr, layers))}")
    sides = layer.side_inputs(g, out_name, layers, found)
    found = head_finder.kinds(g, layers[0], [*layers[1:], *sides])
    for name in layers:
        if head_finder.kinds(g, name).get(out_name) not in ("data", "mixed"):
            raise ExportError(f"--layer {name!r}: the outputs do not depend on it")
    nodes = layer.nodes_between(g, out_name, [*layers, *sides], found)
    side_shapes = {}
    for name in sides:
        shape = values.shape(name)
        if shape is None:
            raise ExportError(f"cannot tell the shape of the side input {name!r}")
        side_shapes[name] = [-1, *shape[1:]]
    others = {name: shapes[name] for name in layers[1:]}
    try:
        ops, arrays, _, output = head_ops(g, model, layers[0], shapes[layers[0]], nodes, found, out_name, values,
                                          {**others, **side_shapes})  # fmt: skip
    except ExportError as e:
        if values.one_image or "batch of 2" not in str(e):
            raise
        # A dynamic batch declared, a batch of 1 written into the head's reshapes (PP-PicoDet's [1, C, -1]): the
        # model runs one image at a time, and a 1 in those shapes is the batch.
        values.one_image = True
        ops, arrays, _, output = head_ops(g, model, layers[0], shapes[layers[0]], nodes, found, out_name, values,
                                          {**others, **side_shapes})  # fmt: skip
    options = {"sides": side_shapes, "layout": "spatial"}
    inputs = shapes if len(layers) > 1 else None
    try:
        head = GraphHead(ops, arrays, shapes[layers[0]], layers[0], output, inputs=inputs, **options)
        precision = recommended_precision(head, "spatial")
        if precision != head.precision:
            head = GraphHead(ops, arrays, shapes[layers[0]], layers[0], output, inputs=inputs, precision=precision,
                             **options)  # fmt: skip
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ExportError(f"the head from {', '.join(layers)} cannot run in npcam ({e})") from None
    check_batch(head)
    return head, list(sides)


def _trunk(g, model, image, layout, bgr, channels, layers, sides, head: GraphHead, size, one_image) -> onnx.ModelProto:
    """The trunk: ``features`` for one map, else each map under its own name; it runs at ``size`` only."""
    single = len(layers) == 1
    part = trunk(g, model, image, layers[0] if single else None, layout, bgr, "NCHW", channels,
                 sides if single else [*layers, *sides])  # fmt: skip
    wanted = {"features": head.input_shape} if single else dict(head.inputs)
    for output in part.graph.output:
        if output.name in wanted:
            output.CopyFrom(helper.make_tensor_value_info(output.name, TensorProto.FLOAT, ["N", *wanted[output.name][1:]]))
    names = list(wanted)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *size), dtype=np.float32)
    try:
        run = session(part)
        alone = [run.run(names, {"image": x[i : i + 1]}) for i in range(2)]
    except Exception as e:
        raise ExportError(f"the trunk cut from the model does not run ({first_line(e)})") from None
    for name, value in zip(names, alone[0]):
        if list(value.shape[1:]) != list(wanted[name][1:]):
            raise ExportError(f"the trunk gives {name} of shape {list(value.shape)}, the head expects {wanted[name]}")
    batch = False
    if not one_image:
        try:
            both = run.run(names, {"image": x})
            batch = all(
                b.shape == (2, *a.shape[1:])
                and np.allclose(b, np.concatenate([a, c]), rtol=1e-4, atol=1e-5 * max(np.abs(a).max(), 1e-12))
                for b, a, c in zip(both, alone[0], alone[1])
            )
        except Exception:  # a trunk made for batch 1 may refuse 2 in its own way
            batch = False
    set_input_dims(part, "N" if batch else 1, size[0], size[1])
    return part


# What the file and the model say


def _metadata_size(metadata: dict[str, str]) -> tuple[int, int] | None:
    """ultralytics' ``imgsz`` (``[640, 640]``): the size it exported a free-sized model for, or None."""
    try:
        value = ast.literal_eval(metadata.get("imgsz", ""))
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int):
        value = [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v >= 8 for v in value):
        return int(value[0]), int(value[1])
    return None


def _metadata_names(metadata: dict[str, str]) -> list[str] | None:
    """The class names the file's metadata holds (ultralytics and YOLOv5 write ``names``: ``{0: 'person', ...}``)."""
    try:
        names = ast.literal_eval(metadata.get("names", ""))  # literals only: nothing is executed
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if isinstance(names, list) and names and all(isinstance(v, str) for v in names):
        return names
    return None


def metadata_labels(metadata: dict[str, str], classes: int) -> list[str] | None:
    """The file's own class names (:func:`_metadata_names`) when there are ``classes`` of them, else None."""
    names = _metadata_names(metadata)
    return names if names is not None and len(names) == classes else None


def _sample(model: onnx.ModelProto, values: Values) -> dict[str, np.ndarray]:
    """Every output on two random inputs at the export size, one image at a time: ``{name: [2, ...]}``."""
    run = session(values.fixed_size_copy())
    names = [o.name for o in model.graph.output]
    results = [run.run(names, {values.image: values.input_array(1, seed)}) for seed in (1, 2)]
    return {name: np.concatenate([np.asarray(r[i]) for r in results]) for i, name in enumerate(names)}


def box_scales_argument(text: str) -> tuple[float, ...]:
    """``--box-scales 10,10,5,5``: four positive divisors of the regressors' values, in their own order."""
    import argparse

    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        scales = ()
    if len(scales) != 4 or not all(np.isfinite(v) and v > 0 for v in scales):
        raise argparse.ArgumentTypeError(f"expected four positive numbers such as 10,10,5,5, not {text!r}")
    return scales


def background_argument(text: str) -> int:
    """``--background K`` (the class column that is background) or ``--background none`` (-1)."""
    import argparse

    if text.lower() == "none":
        return -1
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a column index such as 0, or none, not {text!r}")
    return value


def strides_argument(text: str) -> tuple[int, ...]:
    """``--strides 8,16,32``: increasing powers of two."""
    import argparse

    try:
        strides = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected strides such as 8,16,32, not {text!r}") from None
    if not strides or any(s < 1 or s & (s - 1) for s in strides) or list(strides) != sorted(set(strides)):
        raise argparse.ArgumentTypeError(f"strides must be increasing powers of two, such as 8,16,32, not {text!r}")
    return strides


__all__ = ["DetectorSplit", "Options", "metadata_labels", "recognize", "split_detector"]
