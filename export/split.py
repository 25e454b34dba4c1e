"""Split any ONNX image classifier into npcam's trunk and head (needs onnx, not torch): the stages in order.

1. :func:`export.graph.inline_constant_ifs`: If nodes with a constant condition become the branch they take.
2. :class:`export.graph.GraphIndex`: producers, consumers, constants and chain matching, built once.
3. :mod:`export.head_finder`: the image input, the scores (a final Softmax or Sigmoid set aside), the last
   global pooling and the head's nodes.
4. :mod:`export.head_ops`: the head as a short list of npcam ops on the pooled vector, its shape arithmetic
   evaluated (:class:`npcam.head.GraphHead`).
5. :mod:`export.trunk`: everything the pooling's input needs, in npcam's contract, and the sizes it runs at.
6. :mod:`export.fold`: an all-affine head folded into ``W p + b`` (:class:`npcam.head.AffineHead`): the paper's CAM.

Anything else is refused with one line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from npcam.head import AffineHead, GraphHead

from .errors import ExportError
from .fold import fold
from .graph import Values, index, inline_constant_ifs
from .graph import dims as _dims  # export.api reads it from here
from .graph import session as _session  # noqa: F401  (and this)
from .head_finder import find_head, image_input, pool_layout, scores
from .head_ops import head_ops
from .sizes import native_size
from .trunk import LUMA, check_trunk, input_stride, trunk

__all__ = ["LUMA", "Split", "split"]


@dataclass
class Split:
    """A classifier split at its last global pooling.

    Attributes
    ----------
    trunk : the trunk as an ONNX model in npcam's contract
    head : the head, affine (folded) or a graph of ops
    input_size : the input ``(height, width)`` the model was made for
    fixed_size : True when the trunk only runs at ``input_size``
    stride : input pixels per feature cell
    output : what the model's output is: "logits", "probabilities", "log_probabilities" or "sigmoid"
    layout : the original input layout, "NCHW" or "NHWC"
    channels : the original input's channels: 3, or 1 for a grey model (the trunk takes the luma of RGB)
    output_step : the step of the original's quantized probabilities (0: not quantized)
    """

    trunk: onnx.ModelProto
    head: AffineHead | GraphHead
    input_size: tuple[int, int]
    fixed_size: bool
    stride: int
    output: str
    layout: str
    channels: int = 3
    output_step: float = 0.0


def split(
    model: onnx.ModelProto,
    input_size: int | tuple[int, int] | None = None,
    bgr: bool = False,
    output: str | None = None,
) -> Split:
    """Split ``model`` (an image classifier) into a trunk and a head; raises :class:`ExportError` with the reason."""
    model = inline_constant_ifs(model)
    g = index(model)
    image = image_input(model.graph)
    layout = "NCHW" if _dims(image)[1] in (1, 3) else "NHWC"
    channels = _dims(image)[1 if layout == "NCHW" else 3]
    if channels == 1 and bgr:
        raise ExportError("--bgr does not apply: the model takes one (grey) channel")
    static_hw = _dims(image)[2:] if layout == "NCHW" else _dims(image)[1:3]
    size = native_size(static_hw, input_size)  # (height, width)
    scores_name, output_kind, output_step = scores(g, output)
    values = Values(model, image.name, layout, size, channels)
    pool, head_nodes, kinds = find_head(g, scores_name, values)
    ops, arrays, pooled_shape, scores_name = head_ops(g, model, pool, head_nodes, kinds, scores_name, values)
    cut = trunk(g, model, image.name, pool.input[0], layout, bgr, pool_layout(pool, g), channels)
    # An AveragePool's kernel covers the whole map at this size only: elsewhere the model computes something else.
    features, fixed_size = check_trunk(cut, size, pooled_shape, any_size=pool.op_type != "AveragePool")
    head = fold(GraphHead(ops, arrays, pooled_shape, pool.output[0], scores_name))
    stride = input_stride(size, features)
    return Split(cut, head, size, fixed_size, stride, output_kind, layout, channels, output_step)
