"""A tiny YOLO-style detector made with ``onnx.helper``, no torch: for the runtime's detection tests (fast tier).

Two maps (strides 8 and 16) from a trunk of strided convolutions; a head that, per map, predicts 4 box values and
C class logits with a 1x1 convolution, decodes the boxes in the graph (centre ``(sigmoid(t) + cell) * stride``,
size ``exp(t) * stride * 2``) and joins everything as YOLOv8 does, ``[1, 4 + C, N]``. :func:`whole_onnx` is
the same network as one ONNX graph, the reference the runtime is checked against; :func:`bundle` writes it as a
detection bundle (trunk, head graph of two inputs, decode spec) the way the exporter would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from npcam import bundle as bundle_format
from npcam.head import GraphHead, Op

SIZE = (64, 96)  # height, width: not square
CLASSES = 3
STRIDES = (8, 16)
WIDTH = 6  # channels of each map
LABELS = ["cat", "dog", "kite"]


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "c0": rng.normal(0, 0.4, (WIDTH, 3, 8, 8)).astype(np.float32),  # stride 8
        "c1": rng.normal(0, 0.4, (WIDTH, WIDTH, 2, 2)).astype(np.float32),  # stride 16
    }
    for s in STRIDES:
        w[f"h{s}"] = rng.normal(0, 0.5, (4 + CLASSES, WIDTH, 1, 1)).astype(np.float32)
        w[f"hb{s}"] = rng.normal(0, 0.3, 4 + CLASSES).astype(np.float32)
        w[f"hb{s}"][4:] += 0.5  # some classes above the 0.25 threshold
    return w


def grid_constants() -> dict[str, np.ndarray]:
    """Per candidate: its cell's (x, y) and its stride, ``[1, 2, N]`` and ``[1, 1, N]``."""
    cells, strides = [], []
    for s in STRIDES:
        h, w = SIZE[0] // s, SIZE[1] // s
        y, x = np.divmod(np.arange(h * w), w)
        cells.append(np.stack([x, y]).astype(np.float32))
        strides.append(np.full(h * w, s, np.float32))
    return {"cells": np.concatenate(cells, axis=1)[None], "strides": np.concatenate(strides)[None, None]}


def head_ops(w: dict[str, np.ndarray]) -> tuple[list[Op], dict[str, np.ndarray]]:
    """The head as npcam ops from the maps ``p8``, ``p16`` to the flat output ``outputs``."""
    arrays = {k: v.astype(np.float64) for k, v in w.items() if k.startswith("h")}
    arrays.update({k: v.astype(np.float64) for k, v in grid_constants().items()})
    arrays["two"] = np.array(2.0)
    ops = []
    for s in STRIDES:
        ops += [
            Op("Conv", (f"p{s}", f"h{s}", f"hb{s}"), f"raw{s}"),
            Op("Reshape", (f"raw{s}",), f"flat{s}", {"shape": [0, 4 + CLASSES, -1]}),
        ]
    ops += [
        Op("Concat", tuple(f"flat{s}" for s in STRIDES), "raw", {"axis": 2}),
        Op("Slice", ("raw",), "txy", {"starts": [0], "ends": [2], "axes": [1]}),
        Op("Slice", ("raw",), "twh", {"starts": [2], "ends": [4], "axes": [1]}),
        Op("Slice", ("raw",), "tcls", {"starts": [4], "ends": [4 + CLASSES], "axes": [1]}),
        Op("Sigmoid", ("txy",), "sxy"),
        Op("Add", ("sxy", "cells"), "gxy"),
        Op("Mul", ("gxy", "strides"), "xy"),
        Op("Exp", ("twh",), "ewh"),
        Op("Mul", ("ewh", "strides"), "swh"),
        Op("Mul", ("swh", "two"), "wh"),
        Op("Sigmoid", ("tcls",), "cls"),
        Op("Concat", ("xy", "wh", "cls"), "output0", {"axis": 1}),
        Op("Reshape", ("output0",), "outputs", {"shape": [0, -1]}),
    ]
    return ops, arrays


def trunk_nodes() -> list:
    return [
        helper.make_node("Conv", ["image", "c0"], ["c0out"], strides=[8, 8]),
        helper.make_node("Relu", ["c0out"], ["p8"]),
        helper.make_node("Conv", ["p8", "c1"], ["c1out"], strides=[2, 2]),
        helper.make_node("Relu", ["c1out"], ["p16"]),
    ]


def trunk_onnx(w: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(
        trunk_nodes(),
        "tiny_detector_trunk",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE[0], SIZE[1]])],
        [helper.make_tensor_value_info(f"p{s}", TensorProto.FLOAT, ["N", WIDTH, SIZE[0] // s, SIZE[1] // s])
         for s in STRIDES],
        initializer=[numpy_helper.from_array(w[k], k) for k in ("c0", "c1")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def whole_onnx(w: dict[str, np.ndarray]) -> bytes:
    """The whole detector in one ONNX graph, image -> ``output0`` ``[1, 4 + C, N]``: the reference."""
    consts = {**{k: v for k, v in w.items()}, **grid_constants(), "two": np.array(2.0, np.float32)}
    nodes = trunk_nodes()
    for s in STRIDES:
        nodes += [
            helper.make_node("Conv", [f"p{s}", f"h{s}", f"hb{s}"], [f"raw{s}"]),
            helper.make_node("Reshape", [f"raw{s}", "shape"], [f"flat{s}"]),
        ]
    nodes += [
        helper.make_node("Concat", [f"flat{s}" for s in STRIDES], ["raw"], axis=2),
        helper.make_node("Split", ["raw", "split"], ["txy", "twh", "tcls"], axis=1),
        helper.make_node("Sigmoid", ["txy"], ["sxy"]),
        helper.make_node("Add", ["sxy", "cells"], ["gxy"]),
        helper.make_node("Mul", ["gxy", "strides"], ["xy"]),
        helper.make_node("Exp", ["twh"], ["ewh"]),
        helper.make_node("Mul", ["ewh", "strides"], ["swh"]),
        helper.make_node("Mul", ["swh", "two"], ["wh"]),
        helper.make_node("Sigmoid", ["tcls"], ["cls"]),
        helper.make_node("Concat", ["xy", "wh", "cls"], ["output0"], axis=1),
    ]
    consts["shape"] = np.array([1, 4 + CLASSES, -1], np.int64)
    consts["split"] = np.array([2, 2, CLASSES], np.int64)
    graph = helper.make_graph(
        nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE[0], SIZE[1]])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def candidates() -> int:
    return sum((SIZE[0] // s) * (SIZE[1] // s) for s in STRIDES)


def bundle(directory: Path, seed: int = 0) -> Path:
    """Write the detector as a bundle into ``directory`` (created); returns it."""
    w = weights(seed)
    ops, arrays = head_ops(w)
    inputs = {f"p{s}": (-1, WIDTH, SIZE[0] // s, SIZE[1] // s) for s in STRIDES}
    head = GraphHead(ops, arrays, None, output="outputs", layout="spatial", inputs=inputs)
    n = candidates()
    meta = {
        "arch": "tiny_detector",
        "input_size": list(SIZE),
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "stride": 16,
        "fixed_size": True,
        "task": "detect",
        "letterbox": [114, 114, 114],
        "layer": "p8, p16",
        "detect": {
            "decode": "yolo",
            "classes": CLASSES,
            "layout": "channels_first",
            "outputs": [{"name": "output0", "offset": 0, "shape": [1, 4 + CLASSES, n]}],
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    bundle_format.write(directory, trunk_onnx(w), head, LABELS, meta)
    return directory
