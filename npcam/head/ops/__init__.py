"""The head engine's ops: one :class:`~.rule.Rule` per ONNX op, holding its forward, its vector-Jacobian product
and its output shape (conventions in :mod:`.rule`). To add an op, add one entry to the ``RULES`` of the module
whose kind it is; :data:`OPS` gathers them.
"""

from __future__ import annotations

from . import indexing, layout, normalization, pointwise, products, quantize, reduce, resize, windows
from .rule import MAX_VALUES, Rule

OPS: dict[str, Rule] = {}
for _module in (pointwise, products, normalization, reduce, layout, indexing, quantize, windows, resize):
    OPS.update(_module.RULES)

__all__ = ["MAX_VALUES", "OPS", "Rule"]
