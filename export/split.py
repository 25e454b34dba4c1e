"""Split any ONNX image classifier into npcam's trunk and head (needs onnx, not torch): the stages in order.

1. :func:`export.graph.inline_constant_ifs`: If nodes with a constant condition become the branch they take.
2. :class:`export.graph.GraphIndex`: producers, consumers, constants and chain matching, built once.
3. :mod:`export.head_finder`: the image input, the scores (a final Softmax or Sigmoid set aside), the last
   global pooling and the head's nodes; :mod:`export.layer`: the cut beyond it (a max or concat pooling's
   input, a Flatten's, a transformer's last block; or ``--layer``), and the side inputs the head reads.
4. :mod:`export.head_ops`: the head as a short list of npcam ops on the pooled vector (or the layer), its
   shape arithmetic evaluated (:class:`npcam.head.GraphHead`).
5. :mod:`export.trunk`: everything the layer and the side inputs need, in npcam's contract, and the sizes it
   runs at.
6. :mod:`export.fold`: an all-affine pooled head folded into ``W p + b`` (:class:`npcam.head.AffineHead`): the
   paper's CAM.

Anything else is refused with one line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from npcam.head import AffineHead, GraphHead, recommended_precision

from .errors import ExportError
from .fold import fold
from .graph import Values, dims, index, inline_constant_ifs
from .head_finder import image_input, scores
from .head_ops import head_ops
from .layer import find_cut
from .sizes import native_size
from .trunk import check_trunk, input_stride, trunk

__all__ = ["Split", "split"]


@dataclass
class Split:
    """A classifier split at the layer it is explained at.

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
    layer : the ONNX tensor the maps are made of (:class:`export.layer.Cut`)
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
    layer: str = "features"


def split(
    model: onnx.ModelProto,
    input_size: int | tuple[int, int] | None = None,
    bgr: bool = False,
    output: str | None = None,
    layer: str | None = None,
) -> Split:
    """Split ``model`` (an image classifier) into a trunk and a head, at ``layer`` (an ONNX tensor name) or at
    the default layer of its family (:func:`export.layer.find_cut`); raises :class:`ExportError` with the reason."""
    model = inline_constant_ifs(model)
    g = index(model)
    image = image_input(model.graph)
    layout = "NCHW" if dims(image)[1] in (1, 3) else "NHWC"
    channels = dims(image)[1 if layout == "NCHW" else 3]
    if channels == 1 and bgr:
        raise ExportError("--bgr does not apply: the model takes one (grey) channel")
    static_hw = dims(image)[2:] if layout == "NCHW" else dims(image)[1:3]
    size = native_size(static_hw, input_size)  # (height, width)
    scores_name, output_kind, output_step = scores(g, output)
    values = Values(model, image.name, layout, size, channels)
    cut = find_cut(g, scores_name, values, layer)
    try:
        ops, arrays, start_shape, scores_name = head_ops(
            g, model, cut.start, cut.start_shape, cut.nodes, cut.kinds, scores_name, values, cut.sides
        )
    except ExportError as e:
        if not cut.fallback:
            raise
        raise ExportError(f"{cut.fallback}; and the head from {cut.layer!r} cannot be taken: {e}") from None
    rank = 3 if cut.layout == "tokens" else 4
    part = trunk(
        g, model, image.name, cut.layer, layout, bgr, cut.trunk_layout, channels, list(cut.sides), cut.grid, rank
    )
    if cut.layout == "pooled":
        # An AveragePool's kernel covers the whole map at this size only: elsewhere the model computes something
        # else; a token mean is laid on a grid of one size.
        any_size = cut.pool.op_type != "AveragePool" and cut.trunk_layout != "tokens"
        features, fixed_size = check_trunk(part, size, start_shape, any_size=any_size)
        head = GraphHead(ops, arrays, start_shape, cut.start, scores_name)
        check_batch(head)
        head = fold(head)
        stride = input_stride(size, features)
    else:
        # The head's input has the layer's exact shape: the model runs at its own size only.
        features, fixed_size = check_trunk(part, size, start_shape, any_size=False, layer_shape=start_shape)
        head = _graph_head(ops, arrays, cut, scores_name)
        check_batch(head)
        stride = size[1] // cut.grid[1] if cut.layout == "tokens" else input_stride(size, features)
    return Split(part, head, size, fixed_size, stride, output_kind, layout, channels, output_step, cut.layer)


def _graph_head(ops, arrays, cut, scores_name: str) -> GraphHead:
    """The head of a spatial or token cut, in the precision its size calls for."""
    options = {"sides": cut.sides, "layout": cut.layout, "grid": cut.grid, "prefix": cut.prefix}
    try:
        head = GraphHead(ops, arrays, cut.start_shape, cut.start, scores_name, **options)
        precision = recommended_precision(head, cut.layout)
        if precision != head.precision:
            head = GraphHead(ops, arrays, cut.start_shape, cut.start, scores_name, precision=precision, **options)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ExportError(f"the head from {cut.layer!r} cannot run in npcam ({e})") from None
    return head


def check_batch(head: GraphHead) -> None:
    """Refuse a head whose rows of a batch are not each image's own scores, whatever batch the original model was
    exported with: the check of where :mod:`export.batch_axis` put the batch."""
    rng = np.random.default_rng(7)
    inputs = {name: rng.standard_normal((3, *shape[1:])) for name, shape in head.inputs.items()}
    sides = {name: rng.standard_normal((3, *shape[1:])) for name, shape in head.sides.items()}

    def row(values: dict, i: int | slice):
        return {k: v[i : i + 1] if isinstance(i, int) else v for k, v in values.items()}

    def x(i: int | slice):  # one array for a head of one input, a dict for several (a detector's maps)
        return row(inputs, i) if len(inputs) > 1 else row(inputs, i)[head.input]

    try:
        together = head.forward_float64(x(slice(None)), sides)
        alone = np.concatenate([head.forward_float64(x(i), row(sides, i)) for i in range(3)])
    except ValueError as e:
        raise ExportError(f"the head does not run on a batch of 3 ({e}); export the model with a dynamic batch") from None
    scale = max(np.abs(alone).max(), 1e-12)
    # float32 heads round differently in a batch (BLAS blocking): far below a mixed-up batch's error.
    if together.shape != alone.shape or np.abs(together - alone).max() > 1e-4 * scale:
        raise ExportError("the head mixes the images of a batch; export the model with a dynamic batch axis")
