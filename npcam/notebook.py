"""Explanations and method comparisons as pictures that show themselves in a notebook.

Jupyter shows any object with a ``_repr_png_`` or ``_repr_html_`` method;
that protocol needs no import of IPython, and npcam has none::

    explanation = npcam.explain(model, "photo.jpg", npcam.Options(top=3).checked(model))
    explanation                      # in a notebook: the overlays, the top classes, the method
    grid = npcam.compare(model, "photo.jpg", methods=["cam", "layercam", "eigencam"])
    grid.shape                       # (strip + H, 3 * W + 2 * GAP, 3): a uint8 array, shown as a picture

Every panel is :func:`npcam.overlay` of a map from :meth:`npcam.Model.cam`,
on the photo scaled to at most ``max_side`` pixels on its long side, under a
caption strip that names the method and the class.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from .image import ImageLike
from .labels import class_index
from .render import overlay
from .upsample import upsample

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

    from .explain import Explanation
    from .model import Model, Prediction

DISPLAY_SIDE = 512  # pixels on a panel's long side by default: a notebook cell's width, not a 12 MP photo
GAP = 4  # white pixels between panels
BACKGROUND = 255  # white, behind the captions and in the gaps
INK = (29, 35, 48)  # the caption's colour (the serve page's ink)
TOP = 5  # classes in an explanation's HTML table


class Panel(NamedTuple):
    """Where one map is in a :class:`Picture`: rows ``top:top + height``, columns ``left:left + width``."""

    method: str
    cls: int
    top: int
    left: int
    height: int
    width: int


class Picture(np.ndarray):
    """A uint8 RGB picture ``[H, W, 3]``: an ndarray that a notebook shows as an image.

    ``panels`` says where each map is (:class:`Panel`); it is empty on any
    array derived from the picture (a slice, a sum), which is a Picture too but
    no longer laid out so.
    """

    panels: list[Panel]

    def __array_finalize__(self, obj) -> None:
        self.panels = []

    def _repr_png_(self) -> bytes | None:
        if self.ndim != 3 or self.shape[2] != 3 or self.dtype != np.uint8 or 0 in self.shape:
            return None  # not a picture (a slice of one, say): the notebook shows the text instead
        return png(np.asarray(self))


def png(picture: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG", compress_level=3)
    return out.getvalue()


def fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` scaled down (bilinear) to at most ``max_side`` pixels on its long side; None: as is."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=3.0))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont  # here, not at the top: `import npcam` (every CLI run) need not load it

    try:
        return ImageFont.load_default(size=13)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the built-in bitmap font, one size
        return ImageFont.load_default()


def _fitted(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (ending in "...") to ``width`` pixels; in Latin-1 for a bitmap font, which has no other."""
    from PIL import ImageFont

    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid(cells: Sequence[Sequence[tuple[str, int, str, np.ndarray]]]) -> Picture:
    """Panels in rows, each under its caption: ``cells[r][c]`` is ``(method, class, caption, uint8 [h, w, 3])``.

    All panels have the same size. Returns the picture, uint8
    ``[rows * (strip + h) + (rows - 1) * GAP, cols * w + (cols - 1) * GAP, 3]``
    (``strip``: the caption's height), with ``panels`` saying where each is.
    """
    from PIL import ImageDraw

    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, above, _, below = measure.textbbox((0, 0), "Ag", font=font)  # the text's rows, from where it is drawn
    pad = 4
    strip = below - above + 2 * pad
    h, w = cells[0][0][3].shape[:2]
    rows, cols = len(cells), max(len(row) for row in cells)
    out = np.full((rows * (strip + h) + (rows - 1) * GAP, cols * w + (cols - 1) * GAP, 3), BACKGROUND, np.uint8)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    panels = []
    for r, row in enumerate(cells):
        for c, (method, cls, caption, panel) in enumerate(row):
            if panel.shape[:2] != (h, w):
                raise ValueError(f"panel {r},{c} is {panel.shape[:2]}, not {(h, w)} as the first")
            top, left = r * (strip + h + GAP), c * (w + GAP)
            draw.text((left + pad, top + pad - above), _fitted(draw, caption, font, w - 2 * pad), INK, font)
            panels.append(Panel(method, cls, top + strip, left, h, w))
    out = np.array(canvas)  # the captions drawn; then the panels, untouched by the drawing
    for panel, (_, _, _, pixels) in zip(panels, (cell for row in cells for cell in row)):
        out[panel.top : panel.top + h, panel.left : panel.left + w] = pixels
    picture = out.view(Picture)
    picture.panels = panels
    return picture


def _caption(method: str, cls: int, prediction: Prediction) -> str:
    label = prediction.labels[cls].split(",")[0]
    return f"{method}: {cls} {label} ({100 * float(prediction.probs[cls]):.1f}%)"


def picture_of(explanation: Explanation, alpha: float = 0.5, max_side: int | None = DISPLAY_SIDE) -> Picture:
    """An explanation's overlays side by side, one per explained class, each captioned with its method and class.

    The photo is scaled to at most ``max_side`` pixels on its long side
    (None: as :attr:`Prediction.image` is). Returns a :class:`Picture`.
    """
    prediction = explanation.prediction
    image = fit(prediction.image, max_side)
    row = [
        (explanation.method, c, _caption(explanation.method, c, prediction),
         overlay(image, upsample(explanation.maps[i], image.shape[:2]), alpha))
        for i, c in enumerate(explanation.classes)
    ]  # fmt: skip
    return grid([row])


def explanation_png(explanation: Explanation) -> bytes:
    """:func:`picture_of` as PNG bytes: :meth:`npcam.Explanation._repr_png_`."""
    return png(np.asarray(picture_of(explanation)))


def explanation_html(explanation: Explanation, top: int = TOP) -> str:
    """The overlays, the method and the top classes as HTML: :meth:`npcam.Explanation._repr_html_`.

    The picture is :func:`picture_of` as an inline PNG; the table lists the
    ``top`` most probable classes and marks the explained ones.
    """
    prediction = explanation.prediction
    picture = base64.b64encode(explanation_png(explanation)).decode("ascii")
    explained = set(explanation.classes)
    shown = [(c, label, p) for c, label, p in prediction.top(top)]
    shown += [(c, prediction.labels[c], float(prediction.probs[c])) for c in explanation.classes if c not in
              {s[0] for s in shown}]  # fmt: skip
    rows = "".join(
        f"<tr><td style='text-align:right'>{c}</td><td>{'<b>' if c in explained else ''}{html.escape(label)}"
        f"{'</b>' if c in explained else ''}</td><td style='text-align:right'>{100 * p:.1f}%</td></tr>"
        for c, label, p in shown
    )
    layer = f", layer {html.escape(explanation.layer)}" if explanation.layer else ""
    return (
        "<div class='npcam-explanation'>"
        f"<img src='data:image/png;base64,{picture}' alt='{html.escape(explanation.method)} maps' "
        "style='max-width:100%'>"
        f"<p><b>{html.escape(explanation.name)}</b>: method <code>{html.escape(explanation.method)}</code>{layer}; "
        "explained classes in bold</p>"
        "<table><tr><th>class</th><th>label</th><th>probability</th></tr>"
        f"{rows}</table></div>"
    )


def compare(
    model: Model,
    photo: Prediction | ImageLike,
    methods: Sequence[str],
    classes: int | str | Sequence[int | str] | None = None,
    alpha: float = 0.5,
    max_side: int | None = DISPLAY_SIDE,
) -> Picture:
    """Several methods' maps of the same photo side by side: one column per method, one row per class.

    Parameters
    ----------
    model : the loaded bundle
    photo : a :class:`Prediction`, or an image as :meth:`Model.predict` takes it
    methods : method names (:data:`npcam.METHODS`), one column each
    classes : one class (index or label), a list (one row each), or None for the top-1
    alpha : the heat map's opacity, as for :func:`npcam.overlay`
    max_side : each panel's long side at most (the photo scaled down); None: the photo's size

    Returns
    -------
    :class:`Picture`, uint8 ``[rows * (strip + H) + (rows - 1) * GAP, cols * W + (cols - 1) * GAP, 3]``
    with ``H, W`` the scaled photo's size: each panel is
    ``npcam.overlay(image, model.cam(prediction, c, size=(H, W), method=m), alpha)`` under a caption
    strip naming the method and the class; ``panels`` says where each is. A notebook shows it as an image.
    """
    from .model import Prediction

    if isinstance(methods, str) or not methods:
        raise ValueError("methods must be a list of method names, such as ['cam', 'layercam']")
    prediction = photo if isinstance(photo, Prediction) else model.predict(photo)
    wanted = [prediction.top1] if classes is None else [classes] if isinstance(classes, (int, str, np.integer)) \
        else list(classes)  # fmt: skip
    indices = [class_index(model.labels, c) for c in wanted]
    image = fit(prediction.image, max_side)
    columns = []
    for method in methods:
        maps = model.cam(prediction, indices, size=image.shape[:2], method=method)  # float32 [k, H, W]
        columns.append([overlay(image, m, alpha) for m in maps])
    cells = [
        [(m, c, _caption(m, c, prediction), columns[j][i]) for j, m in enumerate(methods)]
        for i, c in enumerate(indices)
    ]
    return grid(cells)
