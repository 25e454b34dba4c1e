"""Trunk surgery and probing: the nodes the pooling's input needs, in npcam's contract, and what sizes it runs at.

The trunk is extracted from the graph index (:mod:`export.graph`), never with
``onnx.utils.extract_model``: nodes whose subgraphs read outer tensors
(captured, as tf2onnx writes If branches) keep those tensors and the
initializers behind them. Its input is ``image`` float32 ``[N,3,H,W]`` RGB
(Transpose nodes for NHWC models, a channel flip for BGR ones, the luma for
grey ones) and its output ``features`` ``[N,C,h,w]``. Batch, height and
width are made dynamic where the trunk runs that way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .graph import GraphIndex, captured, first_line, rename_reads, session, subgraphs, unique

# A grey model sees the luma of npcam's RGB input (ITU-R BT.601, as Pillow's convert("L")).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def trunk(
    g: GraphIndex,
    model: onnx.ModelProto,
    image: str,
    features: str | None,
    layout: str,
    bgr: bool,
    pool_layout: str,
    channels: int = 3,
    sides: Sequence[str] = (),
    grid: tuple[int, int] | None = None,
    rank: int = 4,
) -> onnx.ModelProto:
    """The nodes the pooling's input needs, wrapped so that it reads ``image`` NCHW RGB and writes ``features`` NCHW.

    Identity nodes are rewired away (torch writes them to share equal
    constants, and the int8 quantizer wants constants as initializers), and
    every node gets a unique name (the quantizer keys on names). ``sides`` (trunk tensors the head also
    reads) become outputs of their own, under their own names. ``pool_layout`` ``"tokens"`` (a mean-pooled
    token model, ``[N, L, C]``) lays the tokens on their ``grid`` as ``features`` ``[N, C, gh, gw]``. ``features``
    None: no ``features`` output, only ``sides`` (a detector's maps, each under its own name).
    """
    if {"image", "features"} & set(sides):
        raise ExportError("the head reads a tensor named 'image' or 'features' from the trunk; rename it")
    if features == image:
        raise ExportError("the pooling reads the model input directly; there is no trunk")
    graph = model.graph
    nodes = [copy.deepcopy(n) for n in g.ancestors([name for name in (features, *sides) if name is not None])]
    same = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Identity"}

    def source(name: str) -> str:
        while name in same:
            name = same[name]
        return name

    nodes = [n for n in nodes if n.op_type != "Identity"]
    features = source(features) if features is not None else None
    if features == image:
        raise ExportError("the pooling reads the model input directly; there is no trunk")
    names = {o for n in nodes for o in n.output} | {i.name for i in graph.initializer} | {image}
    # Tensors that already bear the contract's names inside the model make way for them.
    contract = ("image", "features") if features is not None else ("image",)
    clashes = {n: unique(f"{n}_in_model", names) for n in contract if n in names - {image, features}}
    adapters, extra = [], []
    inner = "image"
    if bgr:
        inner = unique("npcam_rgb_to_bgr", names)
        # Gather along the channels: the same op in every opset (Slice takes its steps as inputs only from 10).
        order = unique("npcam_bgr_order", names)
        adapters.append(helper.make_node("Gather", ["image", order], [inner], name=inner, axis=1))
        extra.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), order))
    if channels == 1:
        inner = unique("npcam_luma", names)
        weights = unique("npcam_luma_weights", names)
        adapters.append(helper.make_node("Conv", ["image", weights], [inner], name=inner))
        extra.append(numpy_helper.from_array(LUMA.reshape(1, 3, 1, 1), weights))
    if layout == "NHWC":
        nhwc = unique("npcam_nchw_to_nhwc", names)
        adapters.append(helper.make_node("Transpose", [inner], [nhwc], name=nhwc, perm=[0, 2, 3, 1]))
        inner = nhwc
    out = "features" if pool_layout == "NCHW" else unique("npcam_nhwc_features", names)
    if image in map(source, sides):
        raise ExportError("the head reads the model's input directly")
    # A side that was an Identity's output keeps its name: the head reads it by that name.
    renamed_sides = [
        helper.make_node("Identity", [source(name)], [name], name=unique(f"npcam_side_{i}", names))
        for i, name in enumerate(sides)
        if source(name) != name
    ]
    rename = {**clashes, image: inner, **({features: out} if features is not None else {})}
    for node in nodes:  # what subgraphs capture is renamed too
        rename_reads(node, lambda name: rename.get(source(name), source(name)))
        node.output[:] = [rename.get(o, o) for o in node.output]
    if pool_layout == "NHWC":
        adapters.append(
            helper.make_node("Transpose", [out], ["features"], name="npcam_nhwc_to_nchw", perm=[0, 3, 1, 2])
        )
    tail = int(pool_layout != "NCHW")  # adapters after the nodes
    if pool_layout == "tokens":  # [N, L, C] -> [N, C, L] -> [N, C, gh, gw]
        channels_first, shape = unique("npcam_tokens_channels_first", names), unique("npcam_grid_shape", names)
        adapters.append(
            helper.make_node("Transpose", [out], [channels_first], name=channels_first, perm=[0, 2, 1])
        )
        adapters.append(helper.make_node("Reshape", [channels_first, shape], ["features"], name="npcam_tokens_to_grid"))
        extra.append(numpy_helper.from_array(np.array([0, 0, *grid], dtype=np.int64), shape))
        tail = 2
    used = {i for n in nodes + adapters + renamed_sides for i in [*n.input, *(c for sub in subgraphs(n) for c in captured(sub))]}
    initializers = [copy.deepcopy(i) for i in graph.initializer if rename.get(i.name, i.name) in used] + extra
    for i in initializers:
        i.name = rename.get(i.name, i.name)
    taken: set[str] = set()
    for n, node in enumerate(nodes + adapters + renamed_sides):
        if not node.name or node.name in taken:
            node.name = unique(f"{node.op_type}_{n}", taken)
        taken.add(node.name)
    dims = ["N", "C", "h", "w"] if rank == 4 else ["N", "L", "C"]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, dims)] if features is not None else []
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in sides]
    new_graph = helper.make_graph(
        adapters[: len(adapters) - tail] + nodes + adapters[len(adapters) - tail :] + renamed_sides,
        "npcam_trunk",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        outputs,
        initializers,
    )
    cut = helper.make_model(new_graph, opset_imports=model.opset_import, producer_name="npcam export")
    cut.ir_version = model.ir_version
    return cut


def set_input_dims(trunk: onnx.ModelProto, batch: int | str, height: int | str, width: int | str) -> None:
    """Set the trunk's ``image`` dimensions: numbers are fixed, strings are symbolic (dynamic)."""
    dims = trunk.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (batch, 3, height, width)):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v


def check_trunk(
    trunk: onnx.ModelProto,
    size: tuple[int, int],
    pooled_shape: list[int],
    any_size: bool = True,
    layer_shape: list[int] | None = None,
) -> tuple[np.ndarray, bool]:
    """Run the trunk at the native size, then find out whether it also takes other batches and sizes.

    Returns the native features and whether the size is fixed (always, unless
    ``any_size``). The batch stays fixed at 1 when a batch of 2 does not give
    the two single results. ``layer_shape`` (-1 for the batch): the exact shape the features must have (a
    head that starts at a map or tokens), instead of ``pooled_shape``'s channels.
    """
    channels = int(np.prod(pooled_shape[1:]))
    rng = np.random.default_rng(0)
    height, width = size
    x = rng.standard_normal((2, 3, height, width), dtype=np.float32)
    try:
        run = session(trunk)
        single = [run.run(["features"], {"image": x[i : i + 1]})[0] for i in range(2)]
    except Exception as e:
        raise ExportError(f"the trunk cut from the model does not run ({first_line(e)})") from None
    features = single[0]
    if layer_shape is not None:
        if list(features.shape[1:]) != list(layer_shape[1:]):
            raise ExportError(
                f"the trunk gives features of shape {list(features.shape)}, the head expects [N, {layer_shape[1:]}]"
            )
    elif features.ndim != 4 or features.shape[1] != channels:
        raise ExportError(
            f"the trunk gives features of shape {list(features.shape)}, the head expects {channels} channels"
        )
    try:
        both = run.run(["features"], {"image": x})[0]
        batch_ok = both.shape == (2, *features.shape[1:]) and np.allclose(
            both, np.concatenate(single), rtol=1e-4, atol=1e-5 * np.abs(features).max()
        )
    except Exception:
        batch_ok = False
    stride = input_stride(size, features) if any_size else 1
    dynamic = any_size
    for h, w in ((height + 2 * stride, width), (height, width + 3 * stride)) if any_size else ():
        try:
            out = run.run(["features"], {"image": rng.standard_normal((1, 3, h, w), dtype=np.float32)})[0]
            dynamic &= (
                out.shape[1] == channels and abs(out.shape[2] - h / stride) <= 1 and abs(out.shape[3] - w / stride) <= 1
            )
        except Exception:
            dynamic = False
    set_input_dims(trunk, "N" if batch_ok else 1, "H" if dynamic else height, "W" if dynamic else width)
    return features, not dynamic


def input_stride(size: tuple[int, int], features: np.ndarray) -> int:
    """Input pixels per feature cell, from the longer side (more cells: the closer estimate)."""
    side = int(size[1] >= size[0])
    return max(1, round(size[side] / features.shape[2 + side]))
