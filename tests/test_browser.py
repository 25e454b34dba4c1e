"""The page at / in a real browser: headless Chromium (Debian's package) driven by Selenium.

Uploads a photo, waits for the map, clicks another class and checks through
the DOM and the pixels that the picture changed; moves the opacity slider,
toggles the box and downloads the overlay. A screenshot is saved as a test
artifact (``$NPCAM_ARTIFACTS``, default the test's temporary directory).

In each state (no image yet, a map, the box on and off, a map on its way, a
bad file, a phone's width) the tests check what a person sees, not only what
the DOM holds: an element counts as seen when its computed ``display`` is not
``none``, its ``visibility`` is ``visible`` and its rendered box is not empty
(the box is empty inside a ``display: none`` parent too), and no image shown is
a broken one. A ``hidden`` attribute that a CSS ``display`` rule overrides, for
example, fails them. Skips with a message where no browser can be had.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, SAMPLES, Server, chromium_here
from PIL import Image

pytestmark = pytest.mark.slow  # Chromium

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (it is in the test extra)")
pytest.importorskip("starlette", reason="npcam serve needs the serve extra: pip install '.[serve]'")
if not chromium_here():
    pytest.skip("no Chromium and ChromeDriver here (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PHOTO_SIZE = (451, 300)  # SAMPLE's width and height
PICTURES = ("pictures", "photo-plain", "photo", "heat", "caption")  # what an explained image brings


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

# How each element looks: its computed display and visibility, and its rendered box in CSS pixels.
LOOKS = """
const looks = {};
for (const id of arguments[0]) {
  const element = document.getElementById(id);
  const style = getComputedStyle(element), box = element.getBoundingClientRect();
  looks[id] = { display: style.display, visibility: style.visibility,
                left: box.left, top: box.top, right: box.right, bottom: box.bottom, width: box.width, height: box.height };
}
return looks;
"""

# The images on screen that show no picture: the broken-image icon (no source, or one that failed to decode).
BROKEN = """
return [...document.images].filter((img) => {
  const box = img.getBoundingClientRect();
  return box.width > 0 && box.height > 0 && getComputedStyle(img).visibility === 'visible'
    && !(img.complete && img.naturalWidth > 0);
}).map((img) => img.id || img.alt);
"""


def looks(driver, *ids: str) -> dict:
    return driver.execute_script(LOOKS, list(ids))


def is_seen(look: dict) -> bool:
    """Rendered, not invisible, and at least a pixel each way (an element in a display:none parent has no box)."""
    return look["display"] != "none" and look["visibility"] == "visible" and look["width"] >= 1 and look["height"] >= 1


def assert_seen(driver, seen=(), unseen=()) -> dict:
    """Check that a person sees each of ``seen`` and none of ``unseen``, and no broken image; the looks."""
    got = looks(driver, *seen, *unseen)
    wrong = [f"{i} is not seen: {got[i]}" for i in seen if not is_seen(got[i])]
    wrong += [f"{i} is seen: {got[i]}" for i in unseen if is_seen(got[i])]
    broken = driver.execute_script(BROKEN)
    if broken:
        wrong.append(f"broken images on screen: {broken}")
    assert not wrong, "; ".join(wrong)
    return got


def settled(driver, timeout=60):
    """Wait until the page is not working on a request."""
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return !document.body.dataset.busy"))


def opened(driver, server) -> None:
    driver.get(f"{server.url}/")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "heat").get_attribute("data-class"))
    settled(driver)


def assert_empty_state(driver) -> None:
    """No image yet: the drop zone and the explanation, no picture frames, no box, nothing to download."""
    assert_seen(driver, seen=("drop", "empty", "top5"), unseen=(*PICTURES, "box"))
    assert not browser_enabled(driver, "download")


def browser_enabled(driver, id: str) -> bool:
    return driver.find_element(By.ID, id).is_enabled()


def assert_map_shown(driver, box: bool, size: tuple[int, int] = PHOTO_SIZE) -> dict:
    """The photo (``size``: width, height) and its map at its aspect, the map exactly over it; the box as toggled."""
    got = assert_seen(driver, seen=(*PICTURES, "drop"), unseen=("empty",) + (() if box else ("box",)))
    for id in ("photo-plain", "photo", "heat"):
        # The rendered height is the width times the aspect, rounded to a layout pixel or less.
        assert abs(got[id]["height"] - got[id]["width"] * size[1] / size[0]) <= 1, (id, got[id])
    for side in ("left", "top", "right", "bottom"):
        assert abs(got["heat"][side] - got["photo"][side]) <= 0.5, (side, got["heat"], got["photo"])
    if box:
        drawn = driver.execute_script("return document.querySelector('#box rect').getBoundingClientRect().toJSON()")
        heat = got["heat"]
        assert drawn["width"] >= 1 and drawn["height"] >= 1, drawn
        # The rect is drawn inside the map (1 px of slack: the box's stroke straddles its edge).
        assert heat["left"] - 1 <= drawn["left"] and drawn["right"] <= heat["right"] + 1, (drawn, heat)
        assert heat["top"] - 1 <= drawn["top"] and drawn["bottom"] <= heat["bottom"] + 1, (drawn, heat)
    assert browser_enabled(driver, "download")
    return got


def test_upload_click_another_class_slider_box_and_download(server, browser, tmp_path):
    opened(browser, server)
    assert browser.find_element(By.ID, "method").get_attribute("value") == "cam"
    assert_empty_state(browser)
    upload(browser, SAMPLE)
    assert_map_shown(browser, box=False)
    buttons = browser.find_elements(By.CSS_SELECTOR, "#top5 button")
    assert len(buttons) == 5 and "active" in buttons[0].get_attribute("class")
    first_class = buttons[0].get_attribute("data-class")
    assert browser.find_element(By.ID, "heat").get_attribute("data-class") == first_class
    before = browser.execute_script(PIXELS)
    assert before[:2] == list(PHOTO_SIZE)

    buttons[2].click()
    second_class = buttons[2].get_attribute("data-class")
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "heat").get_attribute("data-class") == second_class
    )
    settled(browser)
    after = browser.execute_script(PIXELS)
    assert after[:2] == list(PHOTO_SIZE) and after[2:] != before[2:]  # another class, another picture
    assert "active" in browser.find_elements(By.CSS_SELECTOR, "#top5 button")[2].get_attribute("class")

    browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = '0.8'; s.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element(By.ID, "heat").value_of_css_property("opacity") == "0.8"
    assert browser.find_element(By.ID, "opacity-value").text == "0.80"

    toggle = browser.find_element(By.ID, "box-toggle")
    toggle.click()
    settled(browser)
    assert toggle.is_selected()
    assert_map_shown(browser, box=True)

    artifacts = Path(os.environ.get("NPCAM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "npcam_serve_page.png"))
    assert Image.open(artifacts / "npcam_serve_page.png").size[0] > 0

    toggle.click()
    settled(browser)
    assert not toggle.is_selected()
    assert_map_shown(browser, box=False)
    toggle.click()
    settled(browser)
    assert_map_shown(browser, box=True)

    browser.find_element(By.ID, "download").click()
    target = tmp_path / "downloads" / f"chelsea_cam_{second_class}.jpg"
    deadline = time.monotonic() + 30
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Image.open(target).size == PHOTO_SIZE and browser.find_element(By.ID, "status").text == ""


# Holds every request the page makes until release() is called: the page's waiting state, for as long as a test needs.
HOLD = """
window.held = new Promise((resolve) => { window.release = resolve; });
const send = window.fetch;
window.fetch = async (...args) => { await window.held; return send(...args); };
"""


def test_a_map_on_its_way_shows_the_photo_without_the_old_map_or_box(server, browser):
    opened(browser, server)
    upload(browser, SAMPLE)
    browser.find_element(By.ID, "box-toggle").click()
    settled(browser)
    assert_map_shown(browser, box=True)
    browser.execute_script(HOLD)
    Select(browser.find_element(By.ID, "method")).select_by_value("gradcam")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.body.dataset.busy === '1'"))
    # The photo stays; the cam map and its box are not shown as if they were the gradcam ones, and no
    # broken image stands in for the map on its way.
    assert_seen(browser, seen=("pictures", "photo-plain", "photo", "status"), unseen=("heat", "box"))
    assert browser.find_element(By.ID, "status").text == "working…"
    assert not browser_enabled(browser, "download")
    browser.execute_script("window.release()")
    WebDriverWait(browser, 60).until(lambda d: "gradcam" in d.find_element(By.ID, "caption").text)
    settled(browser)
    assert_map_shown(browser, box=True)

    # Another photo on its way: the last photo's top 5 are gone (clicking one would map the wrong photo's class).
    browser.execute_script(HOLD)
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "coffee.jpg"))
    WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#top5 button"))
    assert_seen(browser, seen=("status",), unseen=("heat", "box"))
    browser.execute_script("window.release()")
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top5 button")) == 5)
    settled(browser)
    assert_map_shown(browser, box=True, size=(600, 400))


def test_a_bad_file_shows_the_servers_message_and_no_broken_picture(server, browser, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    opened(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    settled(browser)
    status = browser.find_element(By.ID, "status")
    assert "not an image Pillow can read" in status.text and status.get_attribute("class") == "error"
    assert_seen(browser, seen=("status",))
    assert_empty_state(browser)
    browser.execute_script("document.getElementById('status').textContent = ''")
    browser.find_element(By.ID, "file").send_keys(str(bad))  # the same file again is a new choice: the error again
    WebDriverWait(browser, 30).until(lambda d: "not an image" in d.find_element(By.ID, "status").text)

    upload(browser, SAMPLE)  # a good one after it: its map, and no trace of the error
    assert_map_shown(browser, box=False)
    assert browser.find_element(By.ID, "status").text == ""
    browser.find_element(By.ID, "file").send_keys(str(bad))  # and a bad one after a good one: the empty page again
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    settled(browser)
    assert_empty_state(browser)


def turned(path: Path, tmp_path: Path) -> tuple[Path, tuple[int, int]]:
    """SAMPLE's pixels in a JPEG whose EXIF orientation (6) says to turn them a quarter: upright it is 300 x 451."""
    target = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.open(path).convert("RGB").save(target, quality=95, exif=exif)
    return target, PHOTO_SIZE[::-1]


def tiff(path: Path, tmp_path: Path) -> tuple[Path, tuple[int, int]]:
    """SAMPLE as a TIFF: Pillow reads it, Chromium does not display it."""
    target = tmp_path / "chelsea.tiff"
    Image.open(path).convert("RGB").save(target)
    return target, PHOTO_SIZE


@pytest.mark.parametrize("make", [tiff, turned], ids=["tiff", "exif-turned"])
def test_the_photo_is_shown_as_the_server_reads_it(server, browser, tmp_path, make):
    # The map is drawn over the photo stretched to the photo's box: a photo shown otherwise than the server
    # read it (sideways, or not at all) would put the map on the wrong pixels without any other sign.
    path, size = make(SAMPLE, tmp_path)
    opened(browser, server)
    upload(browser, path)
    assert_map_shown(browser, box=False, size=size)
    natural = browser.execute_script(
        "return ['photo-plain', 'heat'].map((id) => document.getElementById(id))"
        ".map((img) => [img.naturalWidth, img.naturalHeight])"
    )
    assert natural == [list(size), list(size)]


PHONE = {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True}  # an iPhone X/11 Pro's CSS viewport


def test_at_a_phones_width_everything_fits_and_the_map_comes_first(server, browser):
    # Chromium's window is at least 500 px wide: the device emulation gives the page a phone's viewport.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    opened(browser, server)
    assert browser.execute_script("return window.innerWidth") == PHONE["width"]
    assert_empty_state(browser)
    upload(browser, SAMPLE)
    got = assert_map_shown(browser, box=False)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the phone's screen"
    for id in ("drop", "photo-plain", "heat"):
        assert 0 <= got[id]["left"] and got[id]["right"] <= PHONE["width"], (id, got[id])
    # One column: the map (the point of the page) above the plain photo, which repeats what is under the map.
    assert got["heat"]["bottom"] <= got["photo-plain"]["top"], (got["heat"], got["photo-plain"])
