"""Class lookup on a model's label list: a class given by index or by name.

A label may hold several comma-separated names (ImageNet's ``"tabby, tabby
cat"``); any one of them, or the whole label, names the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import NpcamError


def class_index(labels: Sequence[str], spec: int | str) -> int:
    """The index of a class given as an index (int or digits) or a label, case-insensitive.

    One-line errors for an index out of range, a name no label has, and a
    name more than one label has (listing them).
    """
    classes = len(labels)
    if isinstance(spec, (int, np.integer)) or str(spec).strip().isdigit():
        index = int(spec)
        if not 0 <= index < classes:
            raise NpcamError(f"class {index} is out of range: this model has classes 0..{classes - 1}")
        return index
    wanted = str(spec).strip().lower()
    matches = [i for i, label in enumerate(labels) if wanted == label.lower() or wanted in _names(label)]
    if not matches:
        raise NpcamError(f"no class is named {spec!r}")
    if len(matches) > 1:
        names = "; ".join(f"{i} = {labels[i]}" for i in matches)
        raise NpcamError(f"class {spec!r} is ambiguous ({names}): give the index")
    return matches[0]


def _names(label: str) -> list[str]:
    """A label's comma-separated names, stripped and lower-cased."""
    return [name.strip().lower() for name in label.split(",")]
