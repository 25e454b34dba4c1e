"""Affine folding: a head of affine ops becomes one ``W p + b`` (:class:`npcam.head.AffineHead`), the paper's CAM."""

from __future__ import annotations

import numpy as np

from npcam.head import AffineHead, GraphHead

# Head ops that keep the head affine, so that it folds into W p + b.
AFFINE = {"Gemm", "MatMul", "Add", "Sub", "BatchNormalization", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
          "Transpose", "Conv", "Neg", "ReduceMean", "ReduceSum", "Expand"}  # fmt: skip
# Mul and Div keep it affine when one side is a constant.
SCALING = {"Mul", "Div"}


def fold(head: GraphHead) -> AffineHead | GraphHead:
    """An affine head as ``W p + b`` (exact: its value at 0 and on each basis vector, in float64)."""
    variables = {head.input} | {op.output for op in head.ops}
    for op in head.ops:
        varying = [name in variables for name in op.inputs]
        scaling = op.op == "Mul" and sum(varying) == 1 or op.op == "Div" and varying == [True, False]
        if not (op.op in AFFINE or scaling):
            return head
    channels = head.channels
    probe = np.vstack([np.zeros(channels), np.eye(channels)])
    values = head.forward_float64(probe)
    bias = values[0]
    return AffineHead((values[1:] - bias).T.astype(np.float32), bias.astype(np.float32))
