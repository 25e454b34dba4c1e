"""Tiny torch classifiers beyond global average pooling (issue 19), written here: timm and torchvision are not
importable. Each builder returns a seeded, randomly initialised net in eval mode taking [N,3,32,32].

``LAYERS`` names, per builder, the module whose output is the documented default layer (what the torch tools'
users hook), so that tests compare npcam's layer and gradient with a forward hook on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 32
CLASSES = 7


def _seeded(build):
    def make():
        torch.manual_seed(0)
        net = build()
        for m in net.modules():  # BatchNorm statistics that are not the identity
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        return net.eval()

    make.__name__ = build.__name__
    return make


def _convs(widths=(3, 8, 16), linear_end=False):
    """conv -> BN -> ReLU -> MaxPool stages; ``linear_end``: then a 1x1 conv, so that a global max has no ties
    (ReLU's zeros tie, and which of them gets the gradient is each framework's own choice)."""
    layers = []
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
    if linear_end:
        layers.append(nn.Conv2d(widths[-1], widths[-1], 1))
    return nn.Sequential(*layers)


class VGGLike(nn.Module):
    """conv -> MaxPool (x2) -> Flatten -> Linear -> ReLU -> Dropout -> Linear, over the whole 8x8 map."""

    def __init__(self):
        super().__init__()
        self.features = _convs()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 8 * 8, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, CLASSES)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class GMPNet(nn.Module):
    """Global max pooling."""

    def __init__(self):
        super().__init__()
        self.features = _convs(linear_end=True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ConcatPoolNet(nn.Module):
    """fastai's head: concat(avg, max) pooling -> BatchNorm -> Dropout -> Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.features = _convs(linear_end=True)
        self.head = nn.Sequential(
            nn.Flatten(), nn.BatchNorm1d(32), nn.Dropout(0.25), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, CLASSES)
        )

    def forward(self, x):
        a = self.features(x)
        pooled = torch.cat([F.adaptive_avg_pool2d(a, 1), a.amax(dim=(2, 3), keepdim=True)], dim=1)
        return self.head(pooled)


class SkipNet(nn.Module):
    """The head adds a skip from before the last stage: fc(cat(gap(stage(y)), gap(y))) - y is a side input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(24, 12)
        self.out = nn.Linear(12, CLASSES)

    def forward(self, x):
        y = self.stem(x)
        a = self.stage(y)
        pooled = torch.cat([a.mean(dim=(2, 3)), y.mean(dim=(2, 3))], dim=1)
        return self.out(torch.tanh(self.fc(pooled)))


class SDPAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class MHAttention(nn.Module):
    """torch's nn.MultiheadAttention, self-attention, batch first."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, heads, attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (8 px), prefix tokens (CLS, and a distillation token for DeiT), position embedding,
    4 pre-norm blocks, final LayerNorm, Linear on the CLS token (DeiT: the mean of two heads), or on the mean
    of the tokens (``pool="mean"``, no prefix tokens)."""

    def __init__(self, prefix=1, pool="cls", attention=MHAttention, dim=16, heads=2, depth=4, patch=8):
        super().__init__()
        self.prefix, self.pool = prefix, pool
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (SIZE // patch) ** 2 + prefix
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if prefix >= 1 else None
        self.dist_token = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if prefix == 2 else None
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)
        self.head_dist = nn.Linear(dim, CLASSES) if prefix == 2 else None

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        n = x.shape[0]
        prefix = [t.expand(n, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.pool == "mean":
            return self.head(x.mean(dim=1))
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])


class SwinLike(nn.Module):
    """Swin's layout (timm >= 0.9): NHWC tokens, patch merging (2x2 neighbours -> Linear), pre-norm MLP
    blocks, final norm -> mean over the tokens -> Linear."""

    def __init__(self, dim=12):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm0 = nn.LayerNorm(dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.merge_norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, CLASSES)

    def forward(self, x):
        x = self.norm0(self.patch_embed(x).permute(0, 2, 3, 1))  # [N, 8, 8, C]
        x = x + self.block(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)  # [N, 4, 4, 4C]
        x = self.norm(self.reduction(self.merge_norm(x)))
        return self.head(x.mean(dim=(1, 2)))


@_seeded
def vgg_like():
    return VGGLike()


@_seeded
def gmp():
    return GMPNet()


@_seeded
def concat_pool():
    return ConcatPoolNet()


@_seeded
def skip():
    return SkipNet()


@_seeded
def vit_cls():
    return ViT(prefix=1)


@_seeded
def deit():
    return ViT(prefix=2, attention=SDPAttention)


@_seeded
def vit_meanpool():
    return ViT(prefix=0, pool="mean", attention=SDPAttention)


@_seeded
def swin_like():
    return SwinLike()


# DeiT and the mean-pooled ViT on torch's nn.MultiheadAttention (sequence first inside: it moves the batch axis),
# as vit_cls is: issue 25's files of a fixed batch of 1.


@_seeded
def deit_mha():
    return ViT(prefix=2)


@_seeded
def vit_meanpool_mha():
    return ViT(prefix=0, pool="mean")


# builder -> (the default layer's module, its layout)
LAYERS = {
    "vgg_like": ("features", "spatial"),
    "gmp": ("features", "spatial"),
    "concat_pool": ("features", "spatial"),
    "skip": ("stage", "spatial"),
    "vit_cls": ("blocks.3.norm1", "tokens"),
    "deit": ("blocks.3.norm1", "tokens"),
    "vit_meanpool": ("norm", "pooled"),
    "swin_like": ("norm", "pooled"),
    "deit_mha": ("blocks.3.norm1", "tokens"),
    "vit_meanpool_mha": ("norm", "pooled"),
}
