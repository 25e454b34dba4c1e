"""The explanation record: what ``npcam --json`` prints, ``npcam serve`` returns and
``npcam.dataset`` stores as Parquet rows. Made here and nowhere else.

One record per input image: ``image``, ``width``, ``height``, ``method``,
``layer``, ``top5``, ``maps`` (one entry per explained class) and the first map's keys at
the top level; ``{image, error}`` for an image that failed. A detector's record
has ``detections`` (every detection) instead of ``top5``, and its maps explain
detections. Every key is documented in docs/formats.md ("The record");
:func:`arrow_schema` is the same record as Parquet stores it, and
:func:`rows` a detector's record as ``npcam dataset`` stores it, a row per
detection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .detect import Detection
from .model import Prediction

IMAGE_KEYS = ("image", "width", "height", "method", "layer")


def top5(prediction: Prediction) -> list[dict[str, Any]]:
    return [{"class": c, "label": label, "score": score} for c, label, score in prediction.top(5)]


def map_entry(prediction: Prediction, index: int, **extra: Any) -> dict[str, Any]:
    """One explained class: ``class``, ``label``, ``score`` and the optional keys given."""
    return {"class": index, "label": prediction.labels[index], "score": float(prediction.probs[index]), **extra}


def detection_entry(detection: Detection) -> dict[str, Any]:
    """One detection: ``box`` ``[x0, y0, x1, y1]`` in the photo's pixels (to 0.01 px), ``class``, ``label``,
    ``score``."""
    box = [round(float(v), 2) for v in detection.box]
    return {"box": box, "class": detection.class_index, "label": detection.label, "score": float(detection.score)}


def detection_map_entry(prediction: Prediction, index: int, **extra: Any) -> dict[str, Any]:
    """One explained detection: ``detection`` (its index in the record's ``detections``), its keys, and ``extra``."""
    return {"detection": index, **detection_entry(prediction.detections[index]), **extra}


def lowres(cam: np.ndarray) -> dict[str, Any]:
    """A feature-resolution map as ``{"shape": [h, w], "values": [...]}`` (float16 precision)."""
    return {"shape": list(cam.shape), "values": cam.astype(np.float16).astype(float).ravel().tolist()}


def make(
    image: str,
    prediction: Prediction,
    method: str,
    maps: list[dict[str, Any]],
    layer: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """The record of one explained image; ``layer`` names the explained layer (:attr:`npcam.bundle.Bundle.layer`).

    A detector's ``maps`` may be empty (nothing detected): ``output`` then names the overlay written (the photo).
    """
    height, width = prediction.size  # the photo's own pixels, also when decoded smaller
    found = (
        {"top5": top5(prediction)}
        if prediction.detections is None
        else {"detections": [detection_entry(d) for d in prediction.detections]}
    )
    first = maps[0] if maps else {} if output is None else {"output": output}
    return {"image": image, "width": width, "height": height, "method": method, "layer": layer, **found, **first,
            "maps": maps}  # fmt: skip


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The Parquet rows of a record: the record itself for a classifier (or an error); for a detector, a row per
    detection (one with ``detection`` null when there is none): the image's keys, ``detection`` (its index), its
    keys, ``explained``, and its map's keys when it was explained (:func:`detection_row_schema`)."""
    if "detections" not in record:
        return [record]
    image = {k: record[k] for k in IMAGE_KEYS}
    if not record["detections"]:
        return [{**image, "detection": None, "explained": False, "output": record.get("output")}]
    maps = {m["detection"]: m for m in record["maps"]}
    return [
        {**maps.get(i, {}), **image, "detection": i, **d, "explained": i in maps}
        for i, d in enumerate(record["detections"])
    ]


def error(image: str, message: str) -> dict[str, str]:
    """The record of an image that failed."""
    return {"image": image, "error": message}


def _map_fields():
    import pyarrow as pa

    return [
        ("output", pa.string()),
        ("bbox", pa.list_(pa.int64())),
        ("cam", pa.string()),
        ("lowres", pa.struct([("shape", pa.list_(pa.int64())), ("values", pa.list_(pa.float16()))])),
    ]


def arrow_schema(task: str = "classify"):
    """The rows' schema as Parquet stores them (imports pyarrow; for :mod:`npcam.dataset`): a classifier's records,
    or a detector's rows (:func:`detection_row_schema`)."""
    import pyarrow as pa

    if task == "detect":
        return detection_row_schema()
    scored = [("class", pa.int64()), ("label", pa.string()), ("score", pa.float64())]
    extra = _map_fields()
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


def detection_row_schema():
    """A detector's rows (:func:`rows`) as Parquet stores them: one per detection."""
    import pyarrow as pa

    return pa.schema(
        [
            *((k, pa.int64() if k in ("width", "height") else pa.string()) for k in IMAGE_KEYS),
            ("detection", pa.int64()),
            ("box", pa.list_(pa.float64())),
            ("class", pa.int64()),
            ("label", pa.string()),
            ("score", pa.float64()),
            ("explained", pa.bool_()),
            *_map_fields(),
            ("error", pa.string()),
        ]
    )
