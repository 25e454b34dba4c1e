"""How explanations and method comparisons show themselves in a notebook (npcam.notebook), on the tiny bundle.

The notebook protocol is plain methods (``_repr_png_``, ``_repr_html_``), so
these tests call them as Jupyter would, and check the pictures against the
public API that each panel is documented to be: ``npcam.overlay`` of
``model.cam`` (or of an explanation's map, upsampled) on the photo.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SAMPLE, synthetic_image
from PIL import Image, ImageDraw, ImageFont

import npcam
from npcam import NpcamError, notebook

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

PHOTO = (300, 451)  # SAMPLE's height and width: under DISPLAY_SIDE, so shown at its own size


def decoded(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def assert_laid_out(picture: np.ndarray, panels: list, height: int, width: int, columns: int, rows: int = 1) -> None:
    """Panels of ``height x width`` in ``rows x columns``, each under a caption with some ink, GAP apart, tiling it."""
    assert len(panels) == rows * columns
    strip = panels[0].top
    assert 0 < strip < 40  # a caption line, not a second picture
    assert picture.shape == (rows * (strip + height) + (rows - 1) * notebook.GAP,
                             columns * width + (columns - 1) * notebook.GAP, 3)  # fmt: skip
    for k, panel in enumerate(panels):
        r, c = divmod(k, columns)
        assert (panel.top, panel.left, panel.height, panel.width) == (
            r * (strip + height + notebook.GAP) + strip, c * (width + notebook.GAP), height, width)  # fmt: skip
        caption = picture[panel.top - strip : panel.top, panel.left : panel.left + width]
        assert (caption < 128).any(), f"no caption drawn over panel {k}"
        if c + 1 < columns:  # the gap to the next panel is background
            assert (picture[panel.top : panel.top + height, panel.left + width : panel.left + width + notebook.GAP]
                    == notebook.BACKGROUND).all()  # fmt: skip


def region(picture: np.ndarray, panel) -> np.ndarray:
    return np.asarray(picture)[panel.top : panel.top + panel.height, panel.left : panel.left + panel.width]


@pytest.fixture(scope="module")
def explanation(tiny_model):
    return npcam.explain(tiny_model, SAMPLE, npcam.Options(top=2).checked(tiny_model))


def test_an_explanation_shows_itself_as_a_png_of_its_overlays(explanation):
    shown = decoded(explanation._repr_png_())
    picture = notebook.picture_of(explanation)
    assert np.array_equal(shown, np.asarray(picture))
    assert_laid_out(shown, picture.panels, *PHOTO, columns=2)
    for i, panel in enumerate(picture.panels):
        assert (panel.method, panel.cls) == (explanation.method, explanation.classes[i])
        expected = npcam.overlay(explanation.prediction.image, explanation.full(i), alpha=0.5)
        assert np.array_equal(region(shown, panel), expected)


def test_a_large_photo_is_shown_scaled_to_the_display_side(tiny_model):
    image = synthetic_image(700, 1100)
    explanation = npcam.explain(tiny_model, image, npcam.Options().checked(tiny_model))
    shown = decoded(explanation._repr_png_())
    panel = notebook.picture_of(explanation).panels[0]
    # The long side becomes DISPLAY_SIDE; the short one keeps the aspect, rounded to a pixel.
    assert (panel.width, panel.height) == (notebook.DISPLAY_SIDE, round(700 * notebook.DISPLAY_SIDE / 1100))
    assert shown.shape == (panel.top + panel.height, panel.width, 3)
    small = notebook.fit(explanation.prediction.image, notebook.DISPLAY_SIDE)
    assert np.array_equal(region(shown, panel), npcam.overlay(small, npcam.upsample(explanation.maps[0], small.shape[:2])))


def test_an_explanation_shows_itself_as_html_with_the_top_classes_and_the_method(explanation):
    page = explanation._repr_html_()
    assert f"<code>{explanation.method}</code>" in page
    for c, label, p in explanation.prediction.top(5):
        row = re.search(rf"<tr><td[^>]*>{c}</td><td>(<b>)?{re.escape(html.escape(label))}(</b>)?</td>"
                        rf"<td[^>]*>{100 * p:.1f}%</td></tr>", page)  # fmt: skip
        assert row, f"class {c} ({label}) is not in the table"
        assert (row.group(1) is not None) == (c in explanation.classes)  # the explained ones in bold
    inline = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert inline and np.array_equal(decoded(base64.b64decode(inline.group(1))), decoded(explanation._repr_png_()))


def test_html_escapes_the_name_and_lists_an_explained_class_beyond_the_top(tiny_model):
    rare = int(np.argsort(tiny_model.predict(SAMPLE).probs)[0])  # the least probable class
    options = npcam.Options(classes=(rare,)).checked(tiny_model)
    explanation = npcam.explain(tiny_model, SAMPLE, options, name="<cat & dog>.png")
    page = explanation._repr_html_()
    assert "&lt;cat &amp; dog&gt;.png" in page and "<cat" not in page
    assert f"<b>{html.escape(tiny_model.labels[rare])}</b>" in page


def test_compare_puts_each_methods_overlay_side_by_side(tiny_model):
    methods = ["cam", "layercam", "eigencam"]
    prediction = tiny_model.predict(SAMPLE)
    grid = npcam.compare(tiny_model, SAMPLE, methods=methods)
    assert isinstance(grid, np.ndarray) and grid.dtype == np.uint8
    assert_laid_out(grid, grid.panels, *PHOTO, columns=3)
    panels = []
    assert len(grid.panels) == len(methods)
    for panel, method in zip(grid.panels, methods):
        assert (panel.method, panel.cls) == (method, prediction.top1)
        cam = tiny_model.cam(prediction, prediction.top1, size=PHOTO, method=method)
        panels.append(region(grid, panel))
        assert np.array_equal(panels[-1], npcam.overlay(prediction.image, cam, alpha=0.5))
    assert not np.array_equal(panels[0], panels[2])  # the methods differ here, so a mix-up would show
    assert np.array_equal(decoded(grid._repr_png_()), np.asarray(grid))


def test_compare_takes_a_prediction_classes_by_label_alpha_and_max_side(tiny_model):
    prediction = tiny_model.predict(SAMPLE)
    second = prediction.top(2)[1][0]
    label = tiny_model.labels[second].split(",")[0]
    grid = npcam.compare(tiny_model, prediction, methods=["gradcam", "cam"], classes=[0, label], alpha=0.7,
                         max_side=200)  # fmt: skip
    size = (round(300 * 200 / 451), 200)
    assert_laid_out(grid, grid.panels, *size, columns=2, rows=2)
    small = notebook.fit(prediction.image, 200)
    for panel in grid.panels:
        cam = tiny_model.cam(prediction, panel.cls, size=size, method=panel.method)
        assert np.array_equal(region(grid, panel), npcam.overlay(small, cam, alpha=0.7))
    assert [(p.method, p.cls) for p in grid.panels] == [("gradcam", 0), ("cam", 0), ("gradcam", second), ("cam", second)]


def test_compare_refuses_bad_arguments_in_one_line(tiny_model):
    with pytest.raises(ValueError, match="list of method names"):
        npcam.compare(tiny_model, SAMPLE, methods="cam")
    with pytest.raises(NpcamError, match="unknown method 'nope'"):
        npcam.compare(tiny_model, SAMPLE, methods=["cam", "nope"])
    with pytest.raises(NpcamError, match="no class is named"):
        npcam.compare(tiny_model, SAMPLE, methods=["cam"], classes="no such thing")


def test_a_picture_derived_from_a_grid_is_an_array_without_a_layout(tiny_model):
    grid = npcam.compare(tiny_model, SAMPLE, methods=["cam"])
    assert grid[0]._repr_png_() is None  # a row of pixels is no picture: the notebook shows its text
    assert (grid + 0).panels == [] and grid.panels
    assert type(np.asarray(grid)) is np.ndarray


def test_captions_fit_their_panel_and_the_bitmap_font_gets_latin1():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bitmap = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else None
    for font in filter(None, [notebook._font(), bitmap]):
        text = notebook._fitted(draw, "gradcam: 1 café ☕ " + "very long label " * 10, font, 120)
        assert text.endswith("...") and draw.textlength(text, font=font) <= 120
        if not isinstance(font, ImageFont.FreeTypeFont):
            text.encode("latin-1")  # the bitmap font draws Latin-1 only


def test_the_notebook_display_needs_no_ipython(tiny_bundle, tmp_path):
    """Rendering imports no notebook package: it runs where importing IPython fails."""
    blocker = tmp_path / "block"
    (blocker / "IPython").mkdir(parents=True)
    (blocker / "IPython" / "__init__.py").write_text("raise ImportError('IPython is blocked in this test')\n")
    (blocker / "ipykernel.py").write_text("raise ImportError('ipykernel is blocked in this test')\n")
    code = (
        "import sys, npcam\n"
        f"model = npcam.load({str(tiny_bundle)!r})\n"
        f"e = npcam.explain(model, {str(SAMPLE)!r}, npcam.Options().checked(model))\n"
        "assert e._repr_png_() and e._repr_html_()\n"
        f"assert npcam.compare(model, {str(SAMPLE)!r}, methods=['cam'])._repr_png_()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipykernel', 'matplotlib')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
