"""Small classifiers shaped like real families, for the "bring your own model" tests.

Each has ``features(x)`` (the tensor its last global pooling reads, NCHW) and
``scores(features)`` (pooling and everything after it, up to the class scores
before any softmax); ``forward`` is ``scores o features``, followed by a
softmax where ``probabilities`` is set. Tests compute torch's own CAM and
autograd Grad-CAM from these. Weights are seeded
and random, with BN statistics away from their defaults. Importable as
``models:NAME`` from the tests folder, which is how ``npcam-export torch``
takes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 10


class Classifier(nn.Module):
    probabilities = False  # does forward end in a softmax?

    def output(self, scores):
        return torch.softmax(scores, dim=-1) if self.probabilities else scores


def _seeded(cls):
    def build(seed: int = 0, **kwargs) -> nn.Module:
        torch.manual_seed(seed)
        net = cls(**kwargs)
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        return net.eval()

    return build


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False):
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1, act=act)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.skip else out


class SqueezeExcite(nn.Module):
    """MobileNetV3's: a global pooling *inside* the trunk, which the exporter must not take for the head's."""

    def __init__(self, channels, reduce=4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduce, 1)
        self.fc2 = nn.Conv2d(channels // reduce, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MobileNetV2ish(Classifier):
    """Depthwise convs, ReLU6, Dropout before the Linear, and a Softmax output (probabilities)."""

    probabilities = True

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 48, 2, 4), InvertedResidual(48, 48, 1, 4), InvertedResidual(48, 64, 2, 4),
        )  # fmt: skip
        self.last = _conv_bn(64, 128, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, CLASSES))

    def features(self, x):
        return self.last(self.blocks(self.stem(x)))

    def scores(self, f):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1))

    def forward(self, x):
        return self.output(self.scores(self.features(x)))


class DenseNetish(Classifier):
    """DenseNet's ending: a functional ReLU after the last BN, then pooling, Flatten and Linear (Gemm)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            _conv_bn(32, 48, 3, 2, act=nn.ReLU), _conv_bn(48, 64, 3, 2, act=nn.ReLU),
            nn.Conv2d(64, 96, 3, 2, 1, bias=False), nn.BatchNorm2d(96),
        )  # fmt: skip
        self.classifier = nn.Linear(96, CLASSES)

    def features(self, x):
        return F.relu(self.body(x))

    def scores(self, f):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1))

    def forward(self, x):
        return self.output(self.scores(self.features(x)))


class MultiLabel(DenseNetish):
    """A multi-label tagger: each class a yes/no question, a sigmoid per class instead of one softmax."""

    def forward(self, x):
        return torch.sigmoid(self.scores(self.features(x)))


class Grey(DenseNetish):
    """DenseNet's ending on one grey channel (an X-ray or document classifier, say)."""

    def __init__(self):
        super().__init__()
        self.body[0] = nn.Conv2d(1, 32, 7, 2, 3, bias=False)


class KerasNHWC(Classifier):
    """A Keras-style graph: input [N,H,W,3], channels-last pooling (ReduceMean over axes 1,2), MatMul + Add, Softmax."""

    probabilities = True

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(3, 16, 3, 2, act=nn.ReLU), _conv_bn(16, 32, 3, 2, act=nn.ReLU),
                                  _conv_bn(32, 48, 3, 2, act=nn.ReLU), _conv_bn(48, 64, 3, 2, act=nn.ReLU),
                                  _conv_bn(64, 64, 3, 2, act=nn.ReLU))  # fmt: skip
        self.kernel = nn.Parameter(torch.randn(64, CLASSES) * 0.1)
        self.bias = nn.Parameter(torch.randn(CLASSES) * 0.1)

    def features(self, x_nhwc):
        return self.body(x_nhwc.permute(0, 3, 1, 2))  # NCHW

    def scores(self, f_nchw):
        pooled = f_nchw.permute(0, 2, 3, 1).mean(dim=(1, 2))  # as Keras pools NHWC
        return pooled @ self.kernel + self.bias

    def forward(self, x_nhwc):
        return self.output(self.scores(self.features(x_nhwc)))


class MobileNetV3ish(Classifier):
    """Squeeze-excitation with inner poolings, HardSwish, then GAP -> 1x1 conv -> HardSwish -> Dropout -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 2, 3, act=nn.ReLU), InvertedResidual(24, 32, 2, 3, act=nn.Hardswish, se=True),
            InvertedResidual(32, 48, 2, 3, act=nn.Hardswish, se=True), InvertedResidual(48, 64, 2, 3, act=nn.Hardswish, se=True),
        )  # fmt: skip
        self.last = _conv_bn(64, 96, 1, act=nn.Hardswish)
        self.conv_head = nn.Conv2d(96, 160, 1)
        self.classifier = nn.Linear(160, CLASSES)

    def features(self, x):
        return self.last(self.blocks(self.stem(x)))

    def scores(self, f):
        x = F.hardswish(self.conv_head(F.adaptive_avg_pool2d(f, 1)))
        return self.classifier(F.dropout(torch.flatten(x, 1), 0.2, self.training))

    def forward(self, x):
        return self.output(self.scores(self.features(x)))


class ConvNeXtish(Classifier):
    """ConvNeXt's ending: GAP -> LayerNorm -> Linear (GELU in the trunk)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.GELU(), nn.Conv2d(32, 64, 2, 2), nn.GELU(),
                                  nn.Conv2d(64, 96, 2, 2), nn.GELU(), nn.Conv2d(96, 128, 2, 2))  # fmt: skip
        self.norm = nn.LayerNorm(128)
        self.fc = nn.Linear(128, CLASSES)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.2, 0.2)

    def features(self, x):
        return self.body(x)

    def scores(self, f):
        return self.fc(self.norm(f.mean(dim=(2, 3))))

    def forward(self, x):
        return self.output(self.scores(self.features(x)))


class MLPHead(Classifier):
    """A ResNet-style trunk with an MLP head: GAP -> Flatten -> Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(3, 32, 3, 2, act=nn.ReLU), _conv_bn(32, 48, 3, 2, act=nn.ReLU),
                                  _conv_bn(48, 64, 3, 2, act=nn.ReLU), _conv_bn(64, 96, 3, 2, act=nn.ReLU),
                                  _conv_bn(96, 128, 3, 2, act=nn.ReLU))  # fmt: skip
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, CLASSES)

    def features(self, x):
        return self.body(x)

    def scores(self, f):
        return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))))

    def forward(self, x):
        return self.output(self.scores(self.features(x)))


class TwoLinear(MLPHead):
    """GAP -> Linear -> Linear with nothing between: still affine, so it folds to CAM."""

    def scores(self, f):
        return self.fc2(self.fc1(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)))


class CosineHead(MLPHead):
    """A cosine classifier: normalized features against normalized class vectors, times a scale (Grad-CAM)."""

    def scores(self, f):
        pooled = F.normalize(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1), dim=1)
        return 16.0 * pooled @ F.normalize(self.fc2.weight @ self.fc1.weight, dim=1).t()


class PReLUHead(MLPHead):
    """GAP -> Linear -> PReLU -> ELU -> Linear: activations with a learned slope and an exponential (Grad-CAM)."""

    def __init__(self):
        super().__init__()
        self.act = nn.PReLU(64, init=0.2)

    def scores(self, f):
        return self.fc2(F.elu(self.act(self.fc1(f.mean(dim=(2, 3))))))


class GeMPool(MLPHead):
    """Generalized-mean pooling (image retrieval's GeM): the pooling reads ``x**3``, the head takes the cube root."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(128, CLASSES)

    def features(self, x):
        return self.body(x).clamp(min=1e-6).pow(3)

    def scores(self, f):
        return self.fc2(F.adaptive_avg_pool2d(f, 1).pow(1 / 3).flatten(1))


class SqueezeNetish(Classifier):
    """The classifier is a 1x1 conv *before* the pooling, as in SqueezeNet and NiN: an empty head, the identity."""

    def __init__(self):
        super().__init__()
        self.body = MLPHead().body
        self.classifier = nn.Conv2d(128, CLASSES, 1)

    def features(self, x):
        return F.relu(self.classifier(self.body(x)))

    def scores(self, f):
        return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)

    def forward(self, x):
        return self.output(self.scores(self.features(x)))


class TwoOutputs(MLPHead):
    """Returns (class scores, an auxiliary output): the first is the classifier's."""

    def forward(self, x):
        pooled = self.features(x).mean(dim=(2, 3))
        return self.scores(self.features(x)), pooled[:, :2]


class FixedPool(MLPHead):
    """``avg_pool2d`` with a fixed kernel that covers the map at 128 px only (the module fails at other sizes)."""

    def scores(self, f):
        return self.fc2(F.relu(self.fc1(F.avg_pool2d(f, 4).view(f.size(0), -1))))  # f's batch, not the pooled


class ConcatPool(MLPHead):
    """fastai's head: average and max pooling side by side. The max branch does not spread its gradient evenly."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 64)

    def scores(self, f):
        pooled = torch.cat([F.adaptive_avg_pool2d(f, 1), F.adaptive_max_pool2d(f, 1)], 1).flatten(1)
        return self.fc2(F.relu(self.fc1(pooled)))


class VGGish(nn.Module):
    """No global pooling: Flatten over the whole map, then a Linear. CAM does not apply."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(3, 16, 3, 4, act=nn.ReLU), _conv_bn(16, 32, 3, 4, act=nn.ReLU))
        self.fc = nn.Linear(32 * 8 * 8, CLASSES)  # for 128x128 inputs

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


class SkipIntoHead(MLPHead):
    """A head that also reads a tensor from before the pooling: not a function of the pooled vector alone."""

    def scores(self, f):
        return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)))) + f[:, :CLASSES, 0, 0]


mobilenet_v2ish = _seeded(MobileNetV2ish)
densenetish = _seeded(DenseNetish)
keras_nhwc = _seeded(KerasNHWC)
mobilenet_v3ish = _seeded(MobileNetV3ish)
convnextish = _seeded(ConvNeXtish)
mlp_head = _seeded(MLPHead)
two_linear = _seeded(TwoLinear)
vggish = _seeded(VGGish)
skip_into_head = _seeded(SkipIntoHead)
cosine_head = _seeded(CosineHead)
prelu_head = _seeded(PReLUHead)
gem_pool = _seeded(GeMPool)
squeezenetish = _seeded(SqueezeNetish)
two_outputs = _seeded(TwoOutputs)
fixed_pool = _seeded(FixedPool)
concat_pool = _seeded(ConcatPool)
multi_label = _seeded(MultiLabel)
grey = _seeded(Grey)
