"""A YOLOv8n-sized detector in torch, with seeded random weights, and its npcam bundle made by hand.

For the benchmarks (scripts/bench_detect.py): the layout of ultralytics' YOLOv8n (backbone of strided convolutions
and C2f blocks, SPPF; a neck that upsamples and concatenates; a decoupled head per stride with a DFL box branch
of 16 bins), 80 classes, 3.2 M parameters, written here from the published architecture (no ultralytics code).

:func:`bundle` writes it the way a detection bundle is laid out (docs/formats.md, "Detection bundles"): the
trunk is the network up to the three maps the head reads (``p3``, ``p4``, ``p5``), exported by torch's ONNX
exporter; the head is the Detect module's convolutions (BatchNorm folded), DFL and box decode, written as npcam
ops from the same weights, its output ``[1, 84, N]`` flattened. This stands in for the exporter's detector route
(``npcam-export`` has none yet on this branch).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSES = 80
BINS = 16  # DFL's reg_max
STRIDES = (8, 16, 32)
WIDTHS = (64, 128, 256)  # the maps p3, p4, p5
# The class branch's last convolution: its weights' scale and its bias (see make()).
CLASS_SCALE, CLASS_BIAS = 10.0, -7.0


class Conv(nn.Module):
    """Conv2d (no bias), BatchNorm, SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """A 1x1 conv split in two halves, n bottlenecks on the second, every output joined by a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.cv1, self.cv2 = Conv(c_in, c_in // 2), Conv(c_in // 2 * 4, c_out)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Trunk(nn.Module):
    """Backbone and neck: the image to the maps p3, p4, p5 (strides 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1, True))
        self.b3 = nn.Sequential(Conv(32, 64, 3, 2), C2f(64, 64, 2, True))
        self.b4 = nn.Sequential(Conv(64, 128, 3, 2), C2f(128, 128, 2, True))
        self.b5 = nn.Sequential(Conv(128, 256, 3, 2), C2f(256, 256, 1, True), SPPF(256, 256))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4 = C2f(384, 128)
        self.n3 = C2f(192, 64)
        self.d3 = Conv(64, 64, 3, 2)
        self.n4b = C2f(192, 128)
        self.d4 = Conv(128, 128, 3, 2)
        self.n5 = C2f(384, 256)

    def forward(self, x):
        c3 = self.b3(self.stem(x))
        c4 = self.b4(c3)
        c5 = self.b5(c4)
        t4 = self.n4(torch.cat([self.up(c5), c4], 1))
        p3 = self.n3(torch.cat([self.up(t4), c3], 1))
        p4 = self.n4b(torch.cat([self.d3(p3), t4], 1))
        p5 = self.n5(torch.cat([self.d4(p4), c5], 1))
        return p3, p4, p5


class Detect(nn.Module):
    """YOLOv8's decoupled head: per stride a box branch (4 x 16 DFL bins) and a class branch (80 logits); boxes
    decoded as centre, size in input pixels; class scores through a sigmoid. Output ``[n, 84, N]``."""

    def __init__(self):
        super().__init__()
        c2, c3 = max(16, WIDTHS[0] // 4, 4 * BINS), max(WIDTHS[0], min(CLASSES, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * BINS, 1)) for c in WIDTHS
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, CLASSES, 1)) for c in WIDTHS
        )

    def forward(self, maps):
        n = maps[0].shape[0]
        raw = torch.cat(
            [
                torch.cat([b(m), c(m)], 1).reshape(n, 4 * BINS + CLASSES, -1)
                for m, b, c in zip(maps, self.cv2, self.cv3)
            ],
            2,
        )
        centres, strides = anchors([tuple(m.shape[2:]) for m in maps])
        box, cls = raw[:, : 4 * BINS], raw[:, 4 * BINS :]
        bins = box.reshape(n, 4, BINS, -1).softmax(2)
        distance = (bins * torch.arange(BINS, dtype=bins.dtype)[None, None, :, None]).sum(2)  # [n, 4, N]
        lt, rb = distance[:, :2], distance[:, 2:]
        centres, strides = torch.from_numpy(centres), torch.from_numpy(strides)
        x0y0, x1y1 = centres - lt, centres + rb
        xywh = torch.cat([(x0y0 + x1y1) / 2, x1y1 - x0y0], 1) * strides
        return torch.cat([xywh, cls.sigmoid()], 1)


class YoloLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.detect = Trunk(), Detect()

    def forward(self, x):
        return self.detect(self.trunk(x))


def anchors(grids: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's centre (in cells, +0.5) ``[1, 2, N]`` and its stride ``[1, 1, N]``, float32, stride by stride."""
    centres, strides = [], []
    for (h, w), s in zip(grids, STRIDES):
        y, x = np.divmod(np.arange(h * w), w)
        centres.append(np.stack([x + 0.5, y + 0.5]).astype(np.float32))
        strides.append(np.full(h * w, s, np.float32))
    return np.concatenate(centres, axis=1)[None], np.concatenate(strides)[None, None]


def make(seed: int = 0, class_scale: float = CLASS_SCALE, class_bias: float = CLASS_BIAS) -> YoloLike:
    """The detector with seeded random weights: He-normal convolutions (activations of order 1 through the
    depth, as in a trained network), BatchNorm statistics away from (0, 1), and the class logits' last
    convolution scaled by ``class_scale`` with bias ``class_bias``, so that a photo gives some tens to hundreds
    of candidates above 0.25 (ultralytics starts those biases low, at about log(5 / 80 / cells), for the same
    reason)."""
    torch.manual_seed(seed)
    net = YoloLike()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    for branch in net.detect.cv3:
        branch[-1].weight.data *= class_scale
        branch[-1].bias.data.fill_(class_bias)
    return net.eval()


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _folded(conv: Conv) -> tuple[np.ndarray, np.ndarray]:
    """A Conv's convolution with its BatchNorm folded in: weight ``[M, C, k, k]``, bias ``[M]``, float64."""
    bn = conv.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    weight = conv.conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.detach().numpy(), bias.detach().numpy()


def head_ops(net: YoloLike, size: tuple[int, int]):
    """The Detect module as npcam ops from ``p3``, ``p4``, ``p5`` to the flat output ``outputs`` ``[n, 84 N]``."""
    from npcam.head import Op

    arrays: dict[str, np.ndarray] = {}
    ops: list = []

    def conv(x: str, name: str, weight, bias, k: int, silu: bool) -> str:
        arrays[f"{name}.w"], arrays[f"{name}.b"] = weight, bias
        pad = [k // 2] * 4
        ops.append(Op("Conv", (x, f"{name}.w", f"{name}.b"), f"{name}.z", {"pads": pad, "kernel_shape": [k, k]}))
        if not silu:
            return f"{name}.z"
        ops.append(Op("Sigmoid", (f"{name}.z",), f"{name}.s"))
        ops.append(Op("Mul", (f"{name}.z", f"{name}.s"), f"{name}.y"))
        return f"{name}.y"

    flats = []
    for i, stride in enumerate(STRIDES):
        x = f"p{i + 3}"
        outs = []
        for kind, branch in (("box", net.detect.cv2[i]), ("cls", net.detect.cv3[i])):
            y = x
            for j, layer in enumerate(branch):
                name = f"{kind}{stride}.{j}"
                if isinstance(layer, Conv):
                    y = conv(y, name, *_folded(layer), 3, True)
                else:
                    w, b = layer.weight.double().detach().numpy(), layer.bias.double().detach().numpy()
                    y = conv(y, name, w, b, 1, False)
            outs.append(y)
        ops.append(Op("Concat", tuple(outs), f"raw{stride}", {"axis": 1}))
        ops.append(Op("Reshape", (f"raw{stride}",), f"flat{stride}", {"shape": [0, 4 * BINS + CLASSES, -1]}))
        flats.append(f"flat{stride}")
    grids = [(-(-size[0] // s), -(-size[1] // s)) for s in STRIDES]
    centres, strides = anchors(grids)
    arrays.update(
        centres=centres.astype(np.float64),
        strides=strides.astype(np.float64),
        bins=np.arange(BINS, dtype=np.float64)[None, None, :, None],
        half=np.array(0.5),
    )
    ops += [
        Op("Concat", tuple(flats), "raw", {"axis": 2}),
        Op("Slice", ("raw",), "box", {"starts": [0], "ends": [4 * BINS], "axes": [1]}),
        Op("Slice", ("raw",), "logits", {"starts": [4 * BINS], "ends": [4 * BINS + CLASSES], "axes": [1]}),
        Op("Reshape", ("box",), "sides", {"shape": [0, 4, BINS, -1]}),
        Op("Softmax", ("sides",), "spread", {"axis": 2}),
        Op("Mul", ("spread", "bins"), "weighted"),
        Op("ReduceSum", ("weighted",), "distance", {"axes": [2], "keepdims": 0}),
        Op("Slice", ("distance",), "lt", {"starts": [0], "ends": [2], "axes": [1]}),
        Op("Slice", ("distance",), "rb", {"starts": [2], "ends": [4], "axes": [1]}),
        Op("Sub", ("centres", "lt"), "x0y0"),
        Op("Add", ("centres", "rb"), "x1y1"),
        Op("Add", ("x0y0", "x1y1"), "twice"),
        Op("Mul", ("twice", "half"), "centre"),
        Op("Sub", ("x1y1", "x0y0"), "extent"),
        Op("Concat", ("centre", "extent"), "cells", {"axis": 1}),
        Op("Mul", ("cells", "strides"), "xywh"),
        Op("Sigmoid", ("logits",), "scores"),
        Op("Concat", ("xywh", "scores"), "output0", {"axis": 1}),
        Op("Reshape", ("output0",), "outputs", {"shape": [0, -1]}),
    ]
    return ops, arrays, grids


def trunk_onnx(net: YoloLike, size: tuple[int, int]) -> bytes:
    """The trunk as ONNX (torch's TorchScript exporter, opset 17): ``image`` ``[N, 3, H, W]`` to ``p3, p4, p5``."""
    buffer = io.BytesIO()
    dummy = torch.zeros(1, 3, *size)
    names = ["p3", "p4", "p5"]
    with torch.no_grad():
        torch.onnx.export(
            net.trunk, (dummy,), buffer, input_names=["image"], output_names=names, opset_version=17,
            dynamic_axes={"image": {0: "N"}, **{n: {0: "N"} for n in names}}, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    return buffer.getvalue()


def bundle(net: YoloLike, directory: Path, size: tuple[int, int] = (640, 640), precision: str | None = None) -> Path:
    """Write ``net`` as a detection bundle (letterboxed input, ``yolo`` decode) into ``directory``; returns it.

    ``precision``: the head's (None: what :func:`npcam.head.graph.recommended_precision` picks for its size).
    """
    from npcam import bundle as bundle_format
    from npcam.head import GraphHead
    from npcam.head.graph import recommended_precision

    ops, arrays, grids = head_ops(net, size)
    inputs = {f"p{i + 3}": (-1, c, h, w) for i, (c, (h, w)) in enumerate(zip(WIDTHS, grids))}
    head = GraphHead(ops, arrays, None, output="outputs", layout="spatial", inputs=inputs)
    chosen = precision or recommended_precision(head, "spatial")
    if chosen != head.precision:
        head = GraphHead(ops, arrays, None, output="outputs", layout="spatial", inputs=inputs, precision=chosen)
    count = sum(h * w for h, w in grids)
    meta = {
        "arch": "yolov8n_like",
        "input_size": list(size),
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "stride": 32,
        "fixed_size": True,
        "task": "detect",
        "letterbox": [114, 114, 114],
        "layer": "p3, p4, p5",
        "detect": {
            "decode": "yolo",
            "classes": CLASSES,
            "layout": "channels_first",
            "outputs": [{"name": "output0", "offset": 0, "shape": [1, 4 + CLASSES, count]}],
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    bundle_format.write(directory, trunk_onnx(net, size), head, [f"class{c}" for c in range(CLASSES)], meta)
    return directory


if __name__ == "__main__":
    print(f"{parameters(make()) / 1e6:.2f} M parameters")
