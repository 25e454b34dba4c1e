"""Small SSD-like torch detectors written for the tests (not imported from any detection library): raw box
regressors and class logits, decoded against anchors the tests make (:func:`anchors`), as MediaPipe's face and hand
detectors and the TF Object Detection API's SSD exports give them.

A backbone of strided convolutions gives maps at strides 8, 16 and 32 (modules ``s8``, ``s16``, ``s32``: the
detection head's inputs); at each, a 3x3 convolution predicts ``A`` anchors a cell's box values and another their
class values, permuted to cells-last and joined over the strides: ``boxes [1, N, 4+K]`` and ``scores [1, N, C']``,
N = A x (cells at 8, 16 and 32), the cells row-major and a cell's anchors in turn.

- :func:`ssd_mediapipe`: MediaPipe-like: (x, y, w, h) in input pixels against unit anchors, K = 4 (two keypoints),
  two classes, sigmoid logits, no background.
- :func:`ssd_tf`: TF Object Detection API-like: (ty, tx, th, tw) to be scaled by (10, 10, 5, 5), exponential
  sizes, five classes after a background column 0, softmax over the six columns.
"""

from __future__ import annotations

import numpy as np
import torch
from detectors import Conv, _randomize
from torch import nn

SIZE = (96, 128)  # height, width: not square
STRIDES = (8, 16, 32)
PER_CELL = 2  # anchors a cell
CONVENTIONS = {
    # name: (box values a candidate, class columns, background column)
    "mediapipe": (4 + 4, 2, None),
    "tf": (4, 5 + 1, 0),
}


class SSD(nn.Module):
    def __init__(self, convention: str, w: int = 8, seed: int = 3):
        super().__init__()
        self.values, self.columns, _ = CONVENTIONS[convention]
        self.s8 = nn.Sequential(Conv(3, w, 3, 2), Conv(w, w, 3, 2), Conv(w, 2 * w, 3, 2))
        self.s16 = nn.Sequential(Conv(2 * w, 2 * w, 3, 2), Conv(2 * w, 2 * w, 3))
        self.s32 = Conv(2 * w, 2 * w, 3, 2)
        self.box = nn.ModuleList(nn.Conv2d(2 * w, PER_CELL * self.values, 3, padding=1) for _ in STRIDES)
        self.cls = nn.ModuleList(nn.Conv2d(2 * w, PER_CELL * self.columns, 3, padding=1) for _ in STRIDES)
        _randomize(self, seed)
        with torch.no_grad():
            for conv in self.box:
                if convention == "mediapipe":  # sizes are linear, in pixels: around 24 px, never negative here
                    conv.weight.mul_(0.5)
                    conv.bias.view(PER_CELL, self.values)[:, 2:4] = 24.0
                else:  # exponential sizes: a scale of exp(0.2 t) around the anchor's
                    conv.weight.mul_(0.5)
            for conv in self.cls:  # most candidates below a score of 0.25, some above
                conv.bias.fill_(-1.5)
                if convention == "tf":  # the background leads
                    conv.bias.view(PER_CELL, self.columns)[:, 0] = 1.0

    def forward(self, x):
        f8 = self.s8(x)
        f16 = self.s16(f8)
        f32 = self.s32(f16)
        n = x.shape[0]
        boxes, scores = [], []
        for f, box, cls in zip((f8, f16, f32), self.box, self.cls):
            boxes.append(box(f).permute(0, 2, 3, 1).reshape(n, -1, self.values))
            scores.append(cls(f).permute(0, 2, 3, 1).reshape(n, -1, self.columns))
        return torch.cat(boxes, 1), torch.cat(scores, 1)


def ssd_mediapipe() -> nn.Module:
    return SSD("mediapipe")


def ssd_tf() -> nn.Module:
    return SSD("tf", seed=4)


def anchors(convention: str, size: tuple[int, int] = SIZE) -> np.ndarray:
    """The anchors ``[N, 4]`` (centre x, centre y, width, height, on the input's 0-1 scale) in the nets' candidate
    order: MediaPipe's unit-sized ones (its fixed_anchor_size), or sizes growing with the stride, two aspects."""
    rows = []
    for s in STRIDES:
        h, w = -(-size[0] // s), -(-size[1] // s)
        for y in range(h):
            for x in range(w):
                for a in range(PER_CELL):
                    if convention == "mediapipe":
                        width = height = 1.0
                    else:
                        aspect = (1.0, 2.0)[a]
                        width, height = 3 * s * aspect**0.5 / size[1], 3 * s / aspect**0.5 / size[0]
                    rows.append(((x + 0.5) / w, (y + 0.5) / h, width, height))
    return np.array(rows, dtype=np.float32)


# The modules whose outputs are the detection head's inputs, finest first.
LAYERS = ["s8", "s16", "s32"]
