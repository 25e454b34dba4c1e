"""npcam: Class Activation Maps for ImageNet CNNs, without PyTorch.

The data flows image -> tensor -> features -> CAM -> overlay::

    import npcam
    model = npcam.load()                    # a bundle written by `python -m export`
    pred = model.predict("photo.jpg")       # one onnxruntime call
    pred.top(5)                             # [(index, label, probability), ...]
    cam = model.cam(pred, size=pred.image.shape[:2])   # float32 [H, W] in [0, 1]
    picture = model.overlay(pred, alpha=0.5)            # uint8 [H, W, 3]

The pieces are plain functions on arrays and can be used alone: see
:mod:`npcam.cam`, :mod:`npcam.upsample`, :mod:`npcam.render`, :mod:`npcam.image`.
"""

from .cam import class_activation_maps, logits, softmax
from .errors import NpcamError
from .image import preprocess, read_image
from .model import Model, Prediction, default_model_dir, load
from .render import JET, colorize, overlay
from .upsample import upsample

__version__ = "0.1.0"

__all__ = [
    "JET",
    "Model",
    "NpcamError",
    "Prediction",
    "class_activation_maps",
    "colorize",
    "default_model_dir",
    "load",
    "logits",
    "overlay",
    "preprocess",
    "read_image",
    "softmax",
    "upsample",
]
