"""The head: from the explained layer to the network's output (a classifier's class scores), in NumPy.

A head starts at the *pooled* vector of a global average pooling, or at a spatial map or a token tensor
(Flatten/FC and max-pooled CNNs, vision transformers: the head is then the rest of the network after the cut).

- :class:`AffineHead` (:mod:`.affine`): ``f(p) = W p + b`` after global average pooling. This is where CAM is
  defined (Zhou et al. 2016): the map ``W_c . A`` averages to the score.
- :class:`GraphHead` (:mod:`.graph`): any small function of the head's input (a 1x1 conv and HardSwish as in
  MobileNetV3, LayerNorm as in ConvNeXt, an MLP, VGG's Flatten and fully connected layers, a transformer's last
  block), kept as a list of ONNX ops (:class:`Op`). npcam evaluates it and its exact gradient here, by reverse
  mode, with no autograd framework: ``d target / d A`` at every position and channel is what the gradient CAM
  methods need (Selvaraju et al. 2017).

Both take the same arguments: ``forward(x, sides) -> output``, ``vjp(x, seed, sides) -> d target / d x`` for
cotangents ``seed`` of the output (:mod:`npcam.targets` makes them), and ``gradient(x, classes, sides)``, the
one-hot case. The parts:

- :mod:`.ops`: one rule per ONNX op, each holding its forward, its VJP and its output shape;
- :mod:`.shapes`: static shape inference over the rules (hostile heads are refused before they allocate);
- :mod:`.rewrite`: graph rewrites that compute the same function faster (a ViT's CLS token taken early);
- :mod:`.graph` also holds the layouts (pooled, spatial, tokens) and the precision policy.

The graph format is written by the exporter (``head.json`` + ``head.npz``) and documented in docs/formats.md
("The head graph").
"""

from __future__ import annotations

from typing import Union

from .affine import AffineHead, one_hot
from .graph import FLOAT32_WORK, LAYOUTS, PRECISIONS, GraphHead, recommended_precision
from .op import Op
from .ops import MAX_VALUES, OPS, Rule
from .ops.indexing import BIG
from .ops.quantize import dequantize, quantize
from .shapes import infer_shapes

Head = Union[AffineHead, GraphHead]

__all__ = [
    "BIG",
    "FLOAT32_WORK",
    "LAYOUTS",
    "MAX_VALUES",
    "OPS",
    "PRECISIONS",
    "AffineHead",
    "GraphHead",
    "Head",
    "Op",
    "Rule",
    "dequantize",
    "infer_shapes",
    "one_hot",
    "quantize",
    "recommended_precision",
]
