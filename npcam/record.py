"""The explanation record: what ``npcam --json`` prints, ``npcam serve`` returns and
``npcam.dataset`` stores as Parquet rows. Made here and nowhere else.

One record per input image: ``image``, ``width``, ``height``, ``method``,
``layer``, ``top5``, ``maps`` (one entry per explained class) and the first map's keys at
the top level; ``{image, error}`` for an image that failed. Every key is
documented in docs/formats.md ("The record"); :func:`arrow_schema` is the same
record as Parquet stores it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import Prediction


def top5(prediction: Prediction) -> list[dict[str, Any]]:
    return [{"class": c, "label": label, "score": score} for c, label, score in prediction.top(5)]


def map_entry(prediction: Prediction, index: int, **extra: Any) -> dict[str, Any]:
    """One explained class: ``class``, ``label``, ``score`` and the optional keys given."""
    return {"class": index, "label": prediction.labels[index], "score": float(prediction.probs[index]), **extra}


def lowres(cam: np.ndarray) -> dict[str, Any]:
    """A feature-resolution map as ``{"shape": [h, w], "values": [...]}`` (float16 precision)."""
    return {"shape": list(cam.shape), "values": cam.astype(np.float16).astype(float).ravel().tolist()}


def make(
    image: str, prediction: Prediction, method: str, maps: list[dict[str, Any]], layer: str | None = None
) -> dict[str, Any]:
    """The record of one explained image; ``layer`` names the explained layer (:attr:`npcam.bundle.Bundle.layer`)."""
    height, width = prediction.size  # the photo's own pixels, also when decoded smaller
    return {
        "image": image,
        "width": width,
        "height": height,
        "method": method,
        "layer": layer,
        "top5": top5(prediction),
        **maps[0],
        "maps": maps,
    }


def error(image: str, message: str) -> dict[str, str]:
    """The record of an image that failed."""
    return {"image": image, "error": message}


def arrow_schema():
    """The records' schema as Parquet stores them (imports pyarrow; for :mod:`npcam.dataset`)."""
    import pyarrow as pa

    scored = [("class", pa.int64()), ("label", pa.string()), ("score", pa.float64())]
    extra = [
        ("output", pa.string()),
        ("bbox", pa.list_(pa.int64())),
        ("cam", pa.string()),
        ("lowres", pa.struct([("shape", pa.list_(pa.int64())), ("values", pa.list_(pa.float16()))])),
    ]
    return pa.schema(
        [
            ("image", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("method", pa.string()),
            ("layer", pa.string()),
            ("top5", pa.list_(pa.struct(scored))),
            *scored,
            *extra,
            ("maps", pa.list_(pa.struct(scored + extra))),
            ("error", pa.string()),
        ]
    )
