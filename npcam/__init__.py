"""npcam: Class Activation Maps for ImageNet CNNs, without PyTorch.

The data flows image -> tensor -> features -> CAM -> overlay::

    import npcam
    model = npcam.load()                    # a bundle written by `npcam-export`
    pred = model.predict("photo.jpg")       # one onnxruntime call
    pred.top(5)                             # [(index, label, probability), ...]
    cam = model.cam(pred, size=pred.image.shape[:2])   # float32 [H, W] in [0, 1]
    picture = npcam.overlay(pred.image, cam, alpha=0.5)  # uint8 [H, W, 3]
    npcam.compare(model, "photo.jpg", methods=["cam", "layercam"])  # the maps side by side (a notebook shows it)

The pieces are plain functions on arrays and can be used alone: see
:mod:`npcam.cam`, :mod:`npcam.upsample`, :mod:`npcam.render`, :mod:`npcam.image`.
"""

import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    # NumPy's OpenBLAS threads busy-wait after each matrix product and take the cores
    # onnxruntime needs next; npcam's products are tiny. Measured: ResNet-18 trunk 29 ms
    # between npcam's NumPy steps with the default BLAS threads, 19 ms with one. This can
    # only be set before NumPy loads, and a value the user set wins.
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .boxes import cam_box  # noqa: E402
from .cam import class_activation_maps, logits, softmax  # noqa: E402
from .errors import NpcamError  # noqa: E402
from .explain import Explanation, Options, describe, draw, explain  # noqa: E402
from .image import open_image, preprocess, read_image  # noqa: E402
from .methods import METHODS  # noqa: E402
from .model import Model, Prediction, default_model_dir, load  # noqa: E402
from .notebook import Picture, compare  # noqa: E402
from .render import JET, colorize, overlay  # noqa: E402
from .upsample import upsample  # noqa: E402
from .version import __version__  # noqa: E402, F401  (npcam.__version__)

__all__ = [
    "Explanation",
    "JET",
    "METHODS",
    "Model",
    "NpcamError",
    "Options",
    "Picture",
    "cam_box",
    "Prediction",
    "class_activation_maps",
    "colorize",
    "compare",
    "default_model_dir",
    "describe",
    "draw",
    "explain",
    "load",
    "logits",
    "open_image",
    "overlay",
    "preprocess",
    "read_image",
    "softmax",
    "upsample",
]
