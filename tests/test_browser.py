"""The page at / in a real browser: headless Chromium (Debian's package) driven by Selenium.

Uploads a photo, waits for the map, clicks another class and checks through
the DOM and the pixels that the picture changed; moves the opacity slider,
toggles the box and downloads the overlay. A screenshot is saved as a test
artifact (``$NPCAM_ARTIFACTS``, default the test's temporary directory).
Skips with a message where no browser can be had.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, Server, chromium_here
from PIL import Image

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (it is in the test extra)")
pytest.importorskip("starlette", reason="npcam serve needs the serve extra: pip install '.[serve]'")
if not chromium_here():
    pytest.skip("no Chromium and ChromeDriver here (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(bundle):
    running = Server(bundle)
    yield running
    running.stop()


# The heat map's pixels as the page shows them, summed per channel: changes when the picture does.
PIXELS = """
const img = document.getElementById('heat');
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d'); g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data;
const s = [0, 0, 0];
for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
return [c.width, c.height, ...s];
"""


def settled(driver, timeout=60):
    """Wait until the page is not working on a request."""
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return !document.body.dataset.busy"))


def test_upload_click_another_class_slider_box_and_download(server, browser, tmp_path):
    browser.get(f"{server.url}/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert browser.find_element(By.ID, "method").get_attribute("value") == "cam"
    browser.find_element(By.ID, "file").send_keys(str(SAMPLE))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "heat").get_attribute("data-class"))
    settled(browser)
    buttons = browser.find_elements(By.CSS_SELECTOR, "#top5 button")
    assert len(buttons) == 5 and "active" in buttons[0].get_attribute("class")
    first_class = buttons[0].get_attribute("data-class")
    assert browser.find_element(By.ID, "heat").get_attribute("data-class") == first_class
    before = browser.execute_script(PIXELS)
    assert before[:2] == [451, 300]

    buttons[2].click()
    second_class = buttons[2].get_attribute("data-class")
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "heat").get_attribute("data-class") == second_class
    )
    settled(browser)
    after = browser.execute_script(PIXELS)
    assert after[:2] == [451, 300] and after[2:] != before[2:]  # another class, another picture
    assert "active" in browser.find_elements(By.CSS_SELECTOR, "#top5 button")[2].get_attribute("class")

    browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = '0.8'; s.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element(By.ID, "heat").value_of_css_property("opacity") == "0.8"
    assert browser.find_element(By.ID, "opacity-value").text == "0.80"

    browser.find_element(By.ID, "box-toggle").click()
    settled(browser)
    box = browser.find_element(By.ID, "box")
    assert box.is_displayed() and float(box.find_element(By.TAG_NAME, "rect").get_attribute("width")) > 0

    artifacts = Path(os.environ.get("NPCAM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "npcam_serve_page.png"))
    assert Image.open(artifacts / "npcam_serve_page.png").size[0] > 0

    browser.find_element(By.ID, "download").click()
    target = tmp_path / "downloads" / f"chelsea_cam_{second_class}.jpg"
    deadline = time.monotonic() + 30
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Image.open(target).size == (451, 300) and browser.find_element(By.ID, "status").text == ""


def test_a_bad_file_shows_the_servers_message(server, browser, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    browser.get(f"{server.url}/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    status = browser.find_element(By.ID, "status")
    assert "not an image Pillow can read" in status.text and status.get_attribute("class") == "error"
