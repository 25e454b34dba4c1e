"""The report of ``npcam evaluate`` in a real browser (headless Chromium, as the serve page's test).

A small run on the tiny bundle writes the page; Chromium opens it from a file:// URL with the network
off in the page's own terms (every resource must be inline). Each part must be visible: computed style
and rendered size of the table, each plot and its lines, each picture of the grid and its boxes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import chromium_here, synthetic_image
from PIL import Image

pytestmark = pytest.mark.slow  # Chromium

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (it is in the test extra)")
pytest.importorskip("pyarrow", reason="npcam evaluate needs the dataset extra (pyarrow)")
if not chromium_here():
    pytest.skip("no Chromium and ChromeDriver here (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402

from npcam.evaluate import main as evaluate_main  # noqa: E402

METHODS = ["cam", "layercam", "eigencam"]

# The rendered box and computed visibility of every element matching a selector.
SHOWN = """
return Array.from(document.querySelectorAll(arguments[0])).map(e => {
  const r = e.getBoundingClientRect(), s = getComputedStyle(e);
  return {w: r.width, h: r.height, display: s.display, visibility: s.visibility, opacity: parseFloat(s.opacity)};
});
"""


@pytest.fixture(scope="module")
def report(tiny_bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    photos = folder / "photos"
    photos.mkdir()
    lines = ["file,class,bboxes_xyxy"]
    for i in range(4):
        Image.fromarray(synthetic_image(90, 120, seed=20 + i)).save(photos / f"p{i}.png")
        lines.append(f'p{i}.png,{i},"{5 + i},{10 + i},{60 + i},{70 + i}"')
    (folder / "a.csv").write_text("\n".join(lines) + "\n")
    code = evaluate_main([str(photos), "-m", str(tiny_bundle), "--out", str(folder / "rows"), "--annotations",
                          str(folder / "a.csv"), "--size", "64", "--methods", ",".join(METHODS), "--samples", "3",
                          "--bootstrap", "50"])  # fmt: skip
    assert code == 0
    return folder / "rows.html"


def visible(entries: list[dict], what: str, min_size: float = 1.0) -> None:
    assert entries, f"no {what}"
    for e in entries:
        assert e["display"] != "none" and e["visibility"] == "visible" and e["opacity"] > 0, (what, e)
        assert e["w"] >= min_size and e["h"] >= min_size, (what, e)


def test_the_report_shows_its_table_plots_and_grid_offline(report, browser, tmp_path):
    browser.get(report.as_uri())
    assert browser.title == "npcam evaluate: tiny"
    # Nothing fetched: every picture and style is in the page.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0

    visible(browser.execute_script(SHOWN, "table#metrics"), "table", 50)
    methods = [r.get_attribute("data-method") for r in browser.find_elements(By.CSS_SELECTOR, "#metrics tbody tr")]
    assert methods == METHODS
    headers = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#metrics th")]
    assert headers[1:4] == ["Top-1 Loc ↑", "GT-known Loc ↑", "MaxBoxAccV2 ↑"] and "ROAD ↑" in headers
    cells = browser.find_elements(By.CSS_SELECTOR, "#metrics tbody td[data-key]")
    assert len(cells) == 3 * 12 and all(c.text.strip() for c in cells)
    assert browser.find_elements(By.CSS_SELECTOR, "#metrics td.best")  # each column's best is marked

    plots = ["deletion", "insertion", "road_morf", "road_lerf", "boxacc30", "boxacc50", "boxacc70"]
    visible(browser.execute_script(SHOWN, "svg.plot"), "plots", 150)
    for name in plots:
        lines = browser.find_elements(By.CSS_SELECTOR, f"#plot-{name} polyline.series")
        assert [line.get_attribute("data-method") for line in lines] == METHODS, name
        # a line with some extent (a flat line has a height of 0 but a width)
        extents = browser.execute_script(f"return Array.from(document.querySelectorAll('#plot-{name} polyline'))"
                                         ".map(p => p.getBBox().width)")  # fmt: skip
        assert all(w > 100 for w in extents), (name, extents)
    visible(browser.execute_script(SHOWN, "#legend > span"), "legend entries")

    rows = browser.find_elements(By.CSS_SELECTOR, "#grid tbody tr")
    assert len(rows) == 3
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('#grid img')).map(i => [i.complete, i.naturalWidth])"
    )
    assert len(images) == 3 * len(METHODS) and all(done and width == 120 for done, width in images)
    visible(browser.execute_script(SHOWN, "#grid img"), "grid pictures", 50)
    visible(browser.execute_script(SHOWN, "#grid rect.truth"), "annotated boxes", 5)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid rect.truth")) == 3 * len(METHODS)
    found = browser.execute_script(SHOWN, "#grid rect.found")
    visible(found, "the maps' boxes", 2)

    artifacts = Path(os.environ.get("NPCAM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "npcam_evaluate_report.png"))
    assert Image.open(artifacts / "npcam_evaluate_report.png").size[0] > 0


@pytest.fixture(scope="module")
def detector_report(tmp_path_factory) -> Path:
    """A detector's run: on a.png a cat box on detection 0 (matched), on b.png a kite (no detection is one)."""
    import tiny_detector as td

    import npcam
    from npcam.detect import Thresholds

    folder = tmp_path_factory.mktemp("detector_report")
    bundle = td.bundle(folder / "bundle")
    photos = folder / "photos"
    photos.mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(synthetic_image(90, 120, seed=i)).save(photos / name)
    thresholds = Thresholds(conf=0.97, iou=0.3)
    box = npcam.Model(bundle, threads=1).predict(str(photos / "a.png"), thresholds=thresholds).detections[0].box
    x0, y0, x1, y1 = (round(v) for v in box)
    (folder / "a.csv").write_text(f'file,class,bboxes_xyxy\na.png,cat,"{x0},{y0},{x1 - 1},{y1 - 1}"\n'
                                  'b.png,kite,"5,5,30,30"\n')  # fmt: skip
    code = evaluate_main([str(photos), "-m", str(bundle), "--out", str(folder / "rows"), "--annotations",
                          str(folder / "a.csv"), "--methods", "hirescam,gradcam", "--top", "2", "--conf", "0.97",
                          "--iou", "0.3", "--samples", "2", "--bootstrap", "50", "--no-road"])  # fmt: skip
    assert code == 0
    return folder / "rows.html"


def test_a_detectors_report_shows_its_detections_baseline_and_matched_boxes(detector_report, browser):
    browser.get(detector_report.as_uri())
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    visible(browser.execute_script(SHOWN, "table#metrics"), "table", 50)
    rows = browser.find_elements(By.CSS_SELECTOR, "#metrics tbody tr")
    assert [r.get_attribute("data-method") for r in rows] == ["hirescam", "gradcam", "box"]
    assert rows[2].get_attribute("class") == "baseline" and not rows[2].find_elements(By.CSS_SELECTOR, "td.best")
    assert rows[2].text.startswith("box (baseline)")
    headers = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#metrics th")]
    assert "Energy in own box ↑" in headers and "Pointing game ↑" in headers
    assert not {"MaxBoxAccV2 ↑", "ROAD ↑", "GT-known Loc ↑"} & set(headers)  # a classifier's; --no-road
    assert [p.get_attribute("id") for p in browser.find_elements(By.CSS_SELECTOR, "svg.plot")] == [
        "plot-deletion", "plot-insertion"]  # fmt: skip

    grid = browser.find_elements(By.CSS_SELECTOR, "#grid tbody tr")
    assert [(r.get_attribute("data-photo").rsplit("/", 1)[-1], r.get_attribute("data-detection")) for r in grid] == [
        ("a.png", "0"), ("a.png", "1"), ("b.png", "0"), ("b.png", "1")]  # fmt: skip
    visible(browser.execute_script(SHOWN, "#grid img"), "grid pictures", 50)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid img")) == 4 * 3
    # In every cell, both evaluated detections' boxes, the explained one emphasized
    explained = browser.execute_script(SHOWN, "#grid rect.detection.explained")
    visible(explained, "explained detections' boxes", 2)
    assert len(explained) == 4 * 3 and len(browser.find_elements(By.CSS_SELECTOR, "#grid rect.detection")) == 4 * 3 * 2
    for row in grid:
        for rect in row.find_elements(By.CSS_SELECTOR, "rect.detection.explained"):
            assert rect.get_attribute("data-detection") == row.get_attribute("data-detection")
    # The matched box: on a.png's detection 0 only (b.png's kite matches nothing)
    truth = browser.execute_script(SHOWN, "#grid rect.truth")
    visible(truth, "matched boxes", 5)
    assert len(truth) == 3 and len(grid[0].find_elements(By.CSS_SELECTOR, "rect.truth")) == 3
