"""One node of a graph head."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Op:
    """One node of a graph head: ``output = op(*inputs, **attrs)``.

    An input names either an earlier op's output (or the head's input) or a
    constant array of the head.
    """

    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict = field(default_factory=dict)
