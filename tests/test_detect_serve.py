"""`npcam serve` with a detector, over real HTTP on loopback: the detections in JSON, overlays with their boxes.

On the tiny detector of tests/tiny_detector.py (no torch). Each answer is compared with what the library gives
for the same bytes and options (``npcam.explain``, ``describe``, ``draw``); PNG answers pixel for pixel.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tiny_detector as td
from conftest import Server, http, synthetic_image
from PIL import Image

pytest.importorskip("starlette", reason="npcam serve needs the serve extra: pip install '.[serve]'")
pytest.importorskip("uvicorn", reason="npcam serve needs the serve extra: pip install '.[serve]'")

import npcam  # noqa: E402


@pytest.fixture(scope="module")
def server(detector_bundle):
    running = Server(detector_bundle)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def photo() -> bytes:
    out = io.BytesIO()
    Image.fromarray(synthetic_image(120, 160)).save(out, format="PNG")
    return out.getvalue()


def post(server, query: str, body: bytes):
    return http(f"{server.url}/explain{query}", body, method="POST")


def library(model, body: bytes, **options):
    checked = npcam.Options(**options).checked(model)
    return npcam.explain(model, body, checked, name="upload"), checked


def test_model_says_it_is_a_detector_with_its_thresholds(server, detector):
    status, _, body = http(f"{server.url}/model")
    about = json.loads(body)
    assert status == 200 and about["task"] == "detect" and about["labels"] == td.LABELS
    assert about["detect"] == {"conf": 0.25, "iou": 0.7, "max_det": 300} and about["default_method"] == "hirescam"


def test_json_answers_list_the_detections_as_the_library_does(server, detector, photo):
    status, kind, body = post(server, "?conf=0.5&iou=0.3&max_det=5&top=2", photo)
    assert status == 200 and kind == "application/json"
    record = json.loads(body)
    explanation, options = library(detector, photo, conf=0.5, iou=0.3, max_det=5, top=2)
    assert record == npcam.describe(explanation, options)
    assert len(record["detections"]) == 5 and [m["detection"] for m in record["maps"]] == [0, 1]
    status, _, body = post(server, "?detection=3&conf=0.5&iou=0.3&max_det=5", photo)
    assert status == 200 and [m["detection"] for m in json.loads(body)["maps"]] == [3]


@pytest.mark.parametrize("query", ["", "&boxes=0", "&detection=2"], ids=["boxes", "no-boxes", "detection-2"])
def test_the_image_answer_is_the_overlay_with_its_boxes(server, detector, photo, query):
    status, kind, body = post(server, f"?format=png&conf=0.5&iou=0.3&max_det=5{query}", photo)
    assert status == 200 and kind == "image/png"
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    options = dict(conf=0.5, iou=0.3, max_det=5, boxes="boxes=0" not in query)
    if "detection" in query:
        options["detection"] = 2
    explanation, checked = library(detector, photo, **options)
    np.testing.assert_array_equal(got, npcam.draw(explanation, 0, checked))
    plain = npcam.overlay(explanation.prediction.image, explanation.full(0), 0.5)
    assert (got != plain).any() == ("boxes=0" not in query)  # boxes=0: the map's overlay alone


def test_no_detection_is_an_empty_list_and_the_photo(server, photo):
    status, _, body = post(server, "?conf=1", photo)
    record = json.loads(body)
    assert status == 200 and record["detections"] == [] and record["maps"] == []
    status, kind, body = post(server, "?conf=1&format=png", photo)
    assert status == 200 and kind == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(Image.open(io.BytesIO(photo))))


@pytest.mark.parametrize(
    "query, status, message",
    [
        ("?detection=9&max_det=5", 400, "upload: no detection 9: this image has 5 (0 to 4)"),
        ("?conf=2", 422, "conf must be between 0 and 1, not 2.0"),
        ("?iou=x", 422, "iou must be a float, not 'x'"),
        ("?max_det=0", 422, "max_det must be between 1 and 30000, not 0"),
        ("?class=cat", 422, "this model is a detector: it explains detections (detection=K, top=K), not classes"),
        ("?detection=1&top=2", 422, "detection and top cannot both be given"),
    ],
)
def test_bad_detector_parameters_are_one_line(server, photo, query, status, message):
    got, kind, body = post(server, query, photo)
    error = json.loads(body)["error"]
    assert (got, kind) == (status, "application/json") and error.startswith(message) and "\n" not in error
