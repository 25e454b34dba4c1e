"""Small torch detectors written for the tests (not imported from any detection library), in the three shapes the
exporter reads: each a backbone of strided convolutions, a neck that upsamples and concatenates, and the head and
decode of one family, written from how those families export.

- :func:`yolov8`: YOLOv8/v11-like. A PAN neck (nearest upsampling, concatenation); Detect's box and class
  branches per stride; the DFL decode (softmax over 16 bins, then a 1x1 convolution with arange weights), anchors
  and strides computed from the maps' shapes at every call, boxes ``(cx, cy, w, h)`` in pixels, class sigmoids:
  one output ``[1, 4 + C, N]``.
- :func:`yolov5`: YOLOv5-like. Three anchors a cell; each stride's 1x1 convolution, the 5-D view and permute, the
  sigmoid, ``xy = (2 s - 0.5 + cell) * stride``, ``wh = (2 s)^2 * anchor``: one output ``[1, 3 N, 5 + C]``;
  :func:`yolov5_inplace` writes the decode into the sigmoid's output, as YOLOv5 before 6.0 did (ScatterND).
- :func:`gfl`: PP-PicoDet-like GFL head at four strides (8 to 64): per stride a depthwise tower, class sigmoids
  ``[1, N_s, C]`` and raw box distributions ``[1, N_s, 4 * 8]`` as separate outputs, reshaped with a batch of 1
  written in as PicoDet does; :func:`nanodet`: the same joined into one ``[1, N, C + 32]`` (NanoDet-Plus's export).

The modules' names are what the tests hook: ``p3``, ``p4``, ``p5`` (and ``p6``), the detection head's inputs.
Weights are random but seeded; BatchNorm statistics are random too, so that folding them is exercised.
"""

from __future__ import annotations

import torch
from torch import nn

SIZE = (96, 128)  # height, width: not square, and 128 = 2 x 64 so that every stride's grid is whole
CLASSES = 3
REG_MAX = 16  # YOLOv8's bins
GFL_BINS = 8  # PP-PicoDet's and NanoDet's (reg_max 7)


class Conv(nn.Module):
    """Convolution, BatchNorm, SiLU (the YOLO tools' Conv); ``act=False`` leaves the activation out."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class C2f(nn.Module):
    """Split in two, a residual bottleneck on one half, concatenate the three, fuse (YOLOv8's block, small)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.c)
        self.m = nn.Sequential(Conv(self.c, self.c, 3), Conv(self.c, self.c, 3))
        self.cv2 = Conv(3 * self.c, c_out)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat((a, b, b + self.m(b)), 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1 = Conv(c, c // 2)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = Conv(c * 2, c)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Backbone(nn.Module):
    """Strides 8, 16 and 32 (widths ``w``, ``2w``, ``2w``)."""

    def __init__(self, w: int):
        super().__init__()
        self.stem = nn.Sequential(Conv(3, w, 3, 2), Conv(w, w, 3, 2), C2f(w, w), Conv(w, w, 3, 2))
        self.b4 = nn.Sequential(C2f(w, w), Conv(w, 2 * w, 3, 2))
        self.b5 = nn.Sequential(Conv(2 * w, 2 * w, 3, 2), SPPF(2 * w))

    def forward(self, x):
        b3 = self.stem(x)
        b4 = self.b4(b3)
        return b3, b4, self.b5(b4)


class PAN(nn.Module):
    """Top-down (nearest upsampling, concatenation), then bottom-up (strided convolutions): maps ``p3``, ``p4``,
    ``p5`` of widths ``w``, ``2w``, ``2w``."""

    def __init__(self, w: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4 = C2f(4 * w, 2 * w)
        self.p3 = C2f(3 * w, w)
        self.down3 = Conv(w, w, 3, 2)
        self.p4 = C2f(3 * w, 2 * w)
        self.down4 = Conv(2 * w, 2 * w, 3, 2)
        self.p5 = C2f(4 * w, 2 * w)

    def forward(self, b3, b4, b5):
        n4 = self.n4(torch.cat((self.up(b5), b4), 1))
        p3 = self.p3(torch.cat((self.up(n4), b3), 1))
        p4 = self.p4(torch.cat((self.down3(p3), n4), 1))
        p5 = self.p5(torch.cat((self.down4(p4), b5), 1))
        return p3, p4, p5


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, and BatchNorm statistics and affines away from the identity."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.weight.requires_grad:  # not DFL's fixed projection
            nn.init.normal_(m.weight, 0.0, (2.0 / (m.in_channels // m.groups * m.kernel_size[0] ** 2)) ** 0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.7, 1.3)
            m.bias.data.normal_(0.0, 0.1)
    return net.eval()


def make_anchors(maps: list[torch.Tensor], strides: list[int], offset: float = 0.5):
    """Each cell's centre in cells ``[1, 2, N]`` and its stride ``[1, 1, N]``, from the maps' shapes (at every call,
    as YOLOv8 exported with dynamic sizes)."""
    points, stride_of = [], []
    for x, s in zip(maps, strides):
        h, w = x.shape[2:]
        sx = torch.arange(w, dtype=x.dtype) + offset
        sy = torch.arange(h, dtype=x.dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_of.append(torch.full((h * w, 1), float(s), dtype=x.dtype))
    return torch.cat(points).transpose(0, 1)[None], torch.cat(stride_of).transpose(0, 1)[None]


class DFL(nn.Module):
    """A side's distance: the softmax expectation over its bins, as a 1x1 convolution with weights 0..R."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class DetectV8(nn.Module):
    def __init__(self, widths: list[int], classes: int, strides: list[int]):
        super().__init__()
        self.classes, self.strides, self.outputs = classes, strides, classes + 4 * REG_MAX
        c2, c3 = 16, max(widths[0], classes)
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1)) for c in widths)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, classes, 1)) for c in widths)
        self.dfl = DFL(REG_MAX)

    def forward(self, maps):
        maps = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(maps)]
        b = maps[0].shape[0]
        flat = torch.cat([x.view(b, self.outputs, -1) for x in maps], 2)
        anchors, strides = make_anchors(maps, self.strides)
        box, cls = flat.split((4 * REG_MAX, self.classes), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = anchors - lt, anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((boxes, cls.sigmoid()), 1)


class YOLOv8(nn.Module):
    def __init__(self, w: int = 8, classes: int = CLASSES, seed: int = 0):
        super().__init__()
        self.backbone = Backbone(w)
        self.neck = PAN(w)
        self.detect = DetectV8([w, 2 * w, 2 * w], classes, [8, 16, 32])
        _randomize(self, seed)
        for conv in self.detect.cv3:  # class logits below 0: some boxes above 0.25, most below
            nn.init.constant_(conv[-1].bias, -0.5)

    def forward(self, x):
        return self.detect(list(self.neck(*self.backbone(x))))


class DetectV5(nn.Module):
    ANCHORS = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]

    def __init__(self, widths: list[int], classes: int, strides: list[int]):
        super().__init__()
        self.classes, self.strides, self.outputs, self.na = classes, strides, classes + 5, 3
        self.inplace = False
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.outputs, 1) for c in widths)
        # In pixels, a quarter of YOLOv5's (the test images are a fifth of 640)
        self.register_buffer("anchors", torch.tensor(self.ANCHORS, dtype=torch.float) / 4)

    def grid(self, nx: int, ny: int, i: int, dtype):
        y, x = torch.arange(ny, dtype=dtype), torch.arange(nx, dtype=dtype)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2) - 0.5
        return grid, self.anchors[i].view(1, self.na, 1, 1, 2).expand(1, self.na, ny, nx, 2)

    def forward(self, maps):
        z = []
        for i, x in enumerate(maps):
            x = self.m[i](x)
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.outputs, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            grid, anchor_grid = self.grid(nx, ny, i, x.dtype)
            if self.inplace:  # YOLOv5 before 6.0: written into the sigmoid's output (ScatterND in ONNX)
                y = x.sigmoid()
                y[..., 0:2] = (y[..., 0:2] * 2 + grid) * self.strides[i]
                y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchor_grid
                z.append(y.view(bs, self.na * nx * ny, self.outputs))
                continue
            xy, wh, conf = x.sigmoid().split((2, 2, self.classes + 1), 4)
            xy = (xy * 2 + grid) * self.strides[i]
            wh = (wh * 2) ** 2 * anchor_grid
            z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.outputs))
        return torch.cat(z, 1)


class YOLOv5(nn.Module):
    def __init__(self, w: int = 8, classes: int = CLASSES, seed: int = 1):
        super().__init__()
        self.backbone = Backbone(w)
        self.neck = PAN(w)
        self.detect = DetectV5([w, 2 * w, 2 * w], classes, [8, 16, 32])
        _randomize(self, seed)

    def forward(self, x):
        return self.detect(list(self.neck(*self.backbone(x))))


class GFLHead(nn.Module):
    """Per stride: a depthwise tower, one 1x1 convolution to C class logits and 4 x bins box logits."""

    def __init__(self, w: int, classes: int, levels: int, joined: bool):
        super().__init__()
        self.classes, self.joined = classes, joined
        self.towers = nn.ModuleList(
            nn.Sequential(Conv(w, w, 5, groups=w), Conv(w, w), Conv(w, w, 5, groups=w), Conv(w, w)) for _ in range(levels)
        )
        self.heads = nn.ModuleList(nn.Conv2d(w, classes + 4 * GFL_BINS, 1) for _ in range(levels))

    def forward(self, maps):
        scores, boxes, joined = [], [], []
        for tower, head, x in zip(self.towers, self.heads, maps):
            cls, box = head(tower(x)).split((self.classes, 4 * GFL_BINS), 1)
            if self.joined:  # NanoDet-Plus: [sigmoid(cls), box] per cell, the strides in turn, cells last
                joined.append(torch.cat((cls.sigmoid(), box), 1).flatten(start_dim=2))
            else:  # PP-PicoDet without post-processing, batch 1 written in: [1, N_s, C] and [1, N_s, 4 bins]
                scores.append(cls.sigmoid().reshape(1, self.classes, -1).transpose(1, 2))
                boxes.append(box.reshape(1, 4 * GFL_BINS, -1).transpose(1, 2))
        if self.joined:
            return torch.cat(joined, 2).permute(0, 2, 1)
        return (*scores, *boxes)


class GFL(nn.Module):
    """An FPN + PAN over strides 8 to 32, a fourth map at 64 from the stride-32 one, and a GFL head."""

    def __init__(self, w: int = 8, classes: int = CLASSES, seed: int = 2, joined: bool = False):
        super().__init__()
        self.backbone = Backbone(w)
        self.reduce4, self.reduce5 = Conv(2 * w, w), Conv(2 * w, w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4 = Conv(2 * w, w, 3)
        self.p3 = Conv(2 * w, w, 3)
        self.down3 = Conv(w, w, 3, 2)
        self.p4 = Conv(2 * w, w, 3)
        self.down4 = Conv(w, w, 3, 2)
        self.p5 = Conv(2 * w, w, 3)
        self.p6 = Conv(w, w, 3, 2)
        self.head = GFLHead(w, classes, 4, joined)
        _randomize(self, seed)
        for head in self.head.heads:
            nn.init.constant_(head.bias[:classes], -0.5)

    def forward(self, x):
        b3, b4, b5 = self.backbone(x)
        n5 = self.reduce5(b5)
        n4 = self.n4(torch.cat((self.up(n5), self.reduce4(b4)), 1))
        p3 = self.p3(torch.cat((self.up(n4), b3), 1))
        p4 = self.p4(torch.cat((self.down3(p3), n4), 1))
        p5 = self.p5(torch.cat((self.down4(p4), n5), 1))
        return self.head([p3, p4, p5, self.p6(p5)])


def yolov8() -> nn.Module:
    return YOLOv8()


def yolov5() -> nn.Module:
    return YOLOv5()


def yolov5_inplace() -> nn.Module:
    """:func:`yolov5` with its decode written in place, as YOLOv5 before 6.0 exported it (ScatterND)."""
    net = YOLOv5()
    net.detect.inplace = True
    return net


def gfl() -> nn.Module:
    return GFL()


def nanodet() -> nn.Module:
    return GFL(joined=True)


# The modules whose outputs are the detection head's inputs (the default layers), finest first.
LAYERS = {
    "yolov8": ["neck.p3", "neck.p4", "neck.p5"],
    "yolov5": ["neck.p3", "neck.p4", "neck.p5"],
    "yolov5_inplace": ["neck.p3", "neck.p4", "neck.p5"],
    "gfl": ["p3", "p4", "p5", "p6"],
    "nanodet": ["p3", "p4", "p5", "p6"],
}
