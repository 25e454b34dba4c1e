"""The page at / with a detector, in headless Chromium (as tests/test_browser.py): its detections drawn and picked.

Uploads a photo to ``npcam serve`` on the tiny detector of tests/tiny_detector.py and checks, through the DOM
and the pixels: one list entry and one box per detection of the server's record, the best one explained first
and its box drawn thicker; a click on another detection explains it (another map, its box thicker); the score
slider keeps fewer detections, and at 1 none: no map, no box, "no detection"; the download is that detection's
overlay. A screenshot is saved as a test artifact (``$NPCAM_ARTIFACTS``, default the test's temporary
directory). Skips with a message where no browser can be had.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import test_browser  # skips this module as it skips itself, where there is no browser
from conftest import SAMPLE, Server, http
from PIL import Image

pytestmark = pytest.mark.slow  # Chromium

settled, PIXELS = test_browser.settled, test_browser.PIXELS  # the browser fixture is conftest's

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(detector_bundle):
    running = Server(detector_bundle)
    yield running
    running.stop()


def detections(server, conf: float) -> list[dict]:
    status, _, body = http(f"{server.url}/explain?conf={conf}", SAMPLE.read_bytes(), method="POST")
    assert status == 200
    return json.loads(body)["detections"]


def boxes(browser) -> list[tuple[int, float]]:
    """The boxes drawn over the map: (detection, stroke width), in drawing order."""
    rects = browser.find_elements(By.CSS_SELECTOR, "#dets rect")
    return [(int(r.get_attribute("data-detection")), float(r.get_attribute("stroke-width"))) for r in rects]


def set_conf(browser, value: str) -> None:
    browser.execute_script(
        "const s = document.getElementById('conf'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));",
        value,
    )


def test_the_detections_are_drawn_listed_and_picked(server, browser, tmp_path):
    browser.get(f"{server.url}/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert browser.find_element(By.ID, "conf-row").is_displayed()
    assert browser.find_element(By.ID, "conf").get_attribute("value") == "0.25"  # the YOLO tools' default
    set_conf(browser, "0.9")  # no image yet: nothing to ask
    # HiResCAM: the tiny detector's 1x1 head gives the candidates of a class and stride one Grad-CAM map
    Select(browser.find_element(By.ID, "method")).select_by_value("hirescam")
    want = detections(server, 0.9)
    assert 3 <= len(want) < len(detections(server, 0.25))
    browser.find_element(By.ID, "file").send_keys(str(SAMPLE))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "heat").get_attribute("data-detection") == "0")
    settled(browser)
    buttons = browser.find_elements(By.CSS_SELECTOR, "#top5 button")
    assert len(buttons) == len(want) and "active" in buttons[0].get_attribute("class")
    assert browser.find_element(By.ID, "list-title").text == f"DETECTIONS ({len(want)})"  # h2: upper case
    assert [b.text.split("\n")[0] for b in buttons] == [f"{i}: {d['label']}" for i, d in enumerate(want)]
    drawn = boxes(browser)
    assert sorted(i for i, _ in drawn) == list(range(len(want))) and drawn[-1] == (0, 5.0)  # the explained: last
    assert all(width == 2.0 for _, width in drawn[:-1])
    rect = browser.find_element(By.CSS_SELECTOR, "#dets rect[data-detection='1']")
    assert float(rect.get_attribute("x")) == pytest.approx(want[1]["box"][0])
    assert float(rect.get_attribute("width")) == pytest.approx(want[1]["box"][2] - want[1]["box"][0])
    assert browser.execute_script("return document.getElementById('dets').getAttribute('viewBox')") == "0 0 451 300"
    before = browser.execute_script(PIXELS)
    assert before[:2] == [451, 300]

    buttons[2].click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "heat").get_attribute("data-detection") == "2")
    settled(browser)
    assert browser.execute_script(PIXELS) != before  # another detection, another map
    buttons = browser.find_elements(By.CSS_SELECTOR, "#top5 button")
    assert boxes(browser)[-1] == (2, 5.0) and "active" in buttons[2].get_attribute("class")
    assert browser.find_element(By.ID, "caption").text.startswith("hirescam map of detection 2: ")

    artifacts = Path(os.environ.get("NPCAM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "npcam_serve_page_detect.png"))

    browser.find_element(By.ID, "download").click()
    target = tmp_path / "downloads" / "chelsea_cam_det2.jpg"
    deadline = time.monotonic() + 30
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Image.open(target).size == (451, 300)

    set_conf(browser, "1")  # nothing scores 1: no detection
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "heat").get_attribute("data-detection") == "none")
    settled(browser)
    assert browser.find_element(By.ID, "top5").text == "no detection" and not boxes(browser)
    shown = {name: browser.find_element(By.ID, name).is_displayed() for name in ("heat", "dets", "photo")}
    assert shown == {"heat": False, "dets": False, "photo": True}
    assert browser.find_element(By.ID, "download").get_attribute("disabled")
    assert browser.find_element(By.ID, "status").text == ""
