"""The HTML report of ``npcam evaluate``: one self-contained page, openable offline.

It holds the table of methods by metrics, the mean deletion, insertion and
ROAD curves, BoxAcc against the map threshold, and a grid of sample photos by
methods: each map over its photo, with the map's box and the annotated boxes.
A detector's grid has a row per sample photo and evaluated detection: the
detection's map, the photo's evaluated detections' boxes (the explained one
thicker) and the annotated box it is matched to.
Plots are small SVGs written here (lines, axes, ticks: no plotting library in
the runtime), pictures are JPEG data URIs made with npcam's own colormap, and
nothing is fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .image import open_image
from .localization import MAXBOXACC_IOUS, MAXBOXACC_THRESHOLDS
from .render import overlay
from .summary import METRICS, cell, describe_run, spread
from .upsample import upsample

THUMB = 200  # the grid's pictures: at most this many pixels on their long side
BASELINE_COLOR = "#888888"  # a detector's box-shaped baseline's lines
# Distinct colours for the methods' lines (Tableau 10, then darker variants).
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1f4e79", "#8c2d04", "#3f007d")  # fmt: skip

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.context { color: #555; } code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
table.metrics { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics td.best { font-weight: 700; background: #eef6ee; }
.ci { display: block; color: #777; font-size: 11px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
svg.plot { width: 340px; height: 240px; background: #fff; border: 1px solid #eee; }
svg.plot text { font: 11px system-ui, sans-serif; fill: #333; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 8px 0; }
.legend span.swatch { display: inline-block; width: 18px; height: 4px; vertical-align: middle; margin-right: 4px; }
table.grid { border-collapse: collapse; }
table.grid th { font-weight: 600; padding: 4px; vertical-align: bottom; }
.scroll { overflow-x: auto; max-width: 100%; }
table.grid th.photo { text-align: left; font-weight: 400; font-size: 12px; min-width: 130px; max-width: 160px;
  word-break: break-all; }
.cell { position: relative; display: inline-block; line-height: 0; }
.cell img { display: block; }
.cell svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
rect.truth { fill: none; stroke: #00e000; stroke-width: 2; vector-effect: non-scaling-stroke; }
rect.found { fill: none; stroke: #fff; stroke-width: 2; stroke-dasharray: 5 3; vector-effect: non-scaling-stroke; }
rect.detection { fill: none; stroke: #ffd000; stroke-width: 1; vector-effect: non-scaling-stroke; }
rect.detection.explained { stroke: #ff2bd0; stroke-width: 3; }
tr.baseline .note { color: #777; font-size: 12px; }
.key span { display: inline-block; width: 18px; height: 0; border-top: 2px solid; margin: 0 4px 3px 12px; }
"""


def write_report(path: str | Path, summary, rows: list[dict], context: dict, samples: int) -> None:
    """Write the page for ``summary`` (:class:`npcam.summary.Summary`) and its ``rows`` to ``path``, atomically."""
    from .files import atomic_write

    page = render_page(summary, rows, context, samples)
    atomic_write(Path(path), lambda f: f.write(page.encode("utf-8")))


def render_page(summary, rows: list[dict], context: dict, samples: int) -> str:

    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(summary.ranked())}
    if summary.baseline:
        colors[summary.baseline] = BASELINE_COLOR
    e = html.escape
    detector = summary.task == "detect"
    rule = context["selection"] if detector else f"box rule: threshold {context['threshold']}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>npcam evaluate: {e(context['arch'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>npcam evaluate: {e(context['arch'])}</h1>",
        f"<p class='context' id='context'>{e(describe_run(summary, context['arch']))}.<br>"
        f"{e(context['date'])}, {e(context['cpu'])}, npcam {e(context['npcam'])}, {e(rule)}.<br>"
        f"Command: <code>{e(context['command'])}</code></p>",
        "<h2>Methods by metrics</h2>",
        f"<div class='scroll'>{_table(summary, METRICS, cell)}</div>",
        "<p class='context'>Definitions and papers: docs/methods.md, \"The metrics\". Intervals: 95% percentile "
        "bootstrap over photos.</p>",
        "<h2>Curves</h2>",
        _legend(summary.methods, colors),
        "<div class='plots' id='curves'>",
    ]
    curves = summary.curves
    fractions = summary.fractions
    if curves:
        parts += [
            _plot("deletion", "Deletion: score as pixels are deleted", "fraction deleted", "score",
                  {m: (fractions, c["deletion"]) for m, c in curves.items()}, colors),
            _plot("insertion", "Insertion: score as pixels are restored", "fraction inserted", "score",
                  {m: (fractions, c["insertion"]) for m, c in curves.items()}, colors),
        ]  # fmt: skip
    if curves and all("road_morf" in c for c in curves.values()):  # not with --no-road
        percents = [p / 100 for p in _road_percents(curves)]
        parts += [
            _plot("road_morf", "ROAD MoRF: most relevant removed", "fraction removed", "score",
                  {m: (percents, c["road_morf"]) for m, c in curves.items()}, colors),
            _plot("road_lerf", "ROAD LeRF: least relevant removed", "fraction removed", "score",
                  {m: (percents, c["road_lerf"]) for m, c in curves.items()}, colors),
        ]  # fmt: skip
        for i, level in enumerate(MAXBOXACC_IOUS):
            series = {m: (MAXBOXACC_THRESHOLDS, c["boxacc"][i]) for m, c in curves.items() if "boxacc" in c}
            if series:
                parts.append(_plot(f"boxacc{round(level * 100)}", f"BoxAcc at IoU {level:.0%} against the threshold",
                                   "map threshold", "BoxAcc", series, colors))  # fmt: skip
    parts.append("</div>")
    if detector:
        parts += ["<h2>Sample detections by methods</h2>",
                  "<p class='key'>The explained detection<span style='border-color:#ff2bd0;border-top-width:3px'>"
                  "</span> the photo's other evaluated detections<span style='border-color:#ffd000'></span> "
                  "the annotated box it is matched to<span style='border-color:#00e000'></span></p>",
                  f"<div class='scroll'>{_detection_grid(summary, rows, samples, spread)}</div>",
                  "</body></html>"]  # fmt: skip
        return "\n".join(parts)
    parts += ["<h2>Sample photos by methods</h2>",
              "<p class='key'>Annotated boxes<span style='border-color:#00e000'></span> the map's box at the box "
              "rule<span style='border-color:#999;border-top-style:dashed'></span> (white on the picture)</p>",
              f"<div class='scroll'>{_grid(summary, rows, samples, spread)}</div>"]  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def _road_percents(curves: dict) -> list[int]:
    from .metrics import ROAD_PERCENTS

    n = len(next(iter(curves.values()))["road_morf"])
    return list(ROAD_PERCENTS) if n == len(ROAD_PERCENTS) else list(np.linspace(10, 90, n))


def _table(summary, metrics: Sequence, cell) -> str:
    shown = [m for m in metrics if any(summary.values[x].get(m.key) for x in summary.methods)]
    e = html.escape
    out = ["<table class='metrics' id='metrics'><thead><tr><th>method</th>"]
    out += [f"<th title='{e(m.better)} is better'>{e(m.name)} {'↑' if m.better == 'higher' else '↓'}</th>" for m in shown]
    out.append("<th>map ms (median)</th></tr></thead><tbody>")
    for method in summary.methods:
        if method == summary.baseline:
            out.append(f"<tr data-method='{e(method)}' class='baseline'><td><code>{e(method)}</code> "
                       "<span class='note'>(baseline)</span></td>")  # fmt: skip
        else:
            out.append(f"<tr data-method='{e(method)}'><td><code>{e(method)}</code></td>")
        for m in shown:
            value = summary.values[method].get(m.key)
            best = method != summary.baseline and value is not None and value[0] == summary.best(m.key, m.better)
            text = cell(m, value)
            main, _, rest = text.partition(" ")
            out.append(f"<td class='{'best' if best else ''}' data-key='{m.key}'>{e(main)} "
                       f"<span class='ci'>{e(rest)}</span></td>")  # fmt: skip
        out.append(f"<td>{summary.ms.get(method, float('nan')):.1f}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _legend(methods: Sequence[str], colors: dict) -> str:
    items = "".join(f"<span><span class='swatch' style='background:{colors[m]}'></span>{html.escape(m)}</span>"
                    for m in methods)  # fmt: skip
    return f"<div class='legend' id='legend'>{items}</div>"


def _plot(name: str, title: str, xlabel: str, ylabel: str, series: dict, colors: dict) -> str:
    """A line plot as SVG: x in [0, 1], y from 0 to the largest value (rounded up), one polyline per method."""
    width, height, left, right, top, bottom = 340, 240, 44, 10, 24, 36
    top_value = max((max(ys) for _, ys in series.values() if len(ys)), default=1.0)
    y_max = max(0.2, float(np.ceil(top_value * 5 - 1e-9) / 5))  # a multiple of 0.2: ticks at multiples of 0.05
    sx = lambda v: left + v * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - v / y_max * (height - top - bottom)  # noqa: E731
    out = [f"<svg class='plot' id='plot-{name}' viewBox='0 0 {width} {height}' role='img' "
           f"aria-label='{html.escape(title)}'>",
           f"<text x='{left}' y='15' font-weight='600'>{html.escape(title)}</text>",
           f"<line x1='{left}' y1='{sy(0)}' x2='{width - right}' y2='{sy(0)}' stroke='#444'/>",
           f"<line x1='{left}' y1='{top}' x2='{left}' y2='{sy(0)}' stroke='#444'/>"]  # fmt: skip
    for t in np.linspace(0, 1, 5):
        out.append(f"<line x1='{sx(t):.1f}' y1='{sy(0)}' x2='{sx(t):.1f}' y2='{sy(0) + 4}' stroke='#444'/>"
                   f"<text x='{sx(t):.1f}' y='{sy(0) + 15}' text-anchor='middle'>{t:g}</text>")  # fmt: skip
    for t in np.linspace(0, y_max, 5):
        out.append(f"<line x1='{left - 4}' y1='{sy(t):.1f}' x2='{width - right}' y2='{sy(t):.1f}' stroke='#eee'/>"
                   f"<text x='{left - 6}' y='{sy(t) + 4:.1f}' text-anchor='end'>{t:.2g}</text>")  # fmt: skip
    out.append(f"<text x='{(left + width - right) / 2}' y='{height - 4}' text-anchor='middle'>{html.escape(xlabel)}</text>")
    out.append(f"<text x='12' y='{(top + height - bottom) / 2}' text-anchor='middle' "
               f"transform='rotate(-90 12 {(top + height - bottom) / 2})'>{html.escape(ylabel)}</text>")  # fmt: skip
    for method, (xs, ys) in series.items():
        points = " ".join(f"{sx(float(x)):.1f},{sy(float(y)):.1f}" for x, y in zip(xs, ys))
        out.append(f"<polyline class='series' data-method='{html.escape(method)}' fill='none' stroke-width='1.6' "
                   f"stroke='{colors[method]}' points='{points}'/>")  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def _grid(summary, rows: list[dict], samples: int, spread) -> str:
    """The photos x methods table of overlays, with boxes; photos with boxes first choice, spread over the run."""
    by_photo: dict[str, dict[str, dict]] = {}
    for row in rows:
        if not row.get("error") and row["method"] in summary.methods:
            by_photo.setdefault(row["image"], {})[row["method"]] = row
    complete = [p for p, r in by_photo.items() if len(r) == len(summary.methods)]
    located = [p for p in complete if by_photo[p][summary.methods[0]].get("boxes")]
    chosen = spread(located or complete, samples) if samples else []
    e = html.escape
    out = ["<table class='grid' id='grid'><thead><tr><th></th>"]
    out += [f"<th>{e(m)}</th>" for m in summary.methods]
    out.append("</tr></thead><tbody>")
    for photo in chosen:
        first = by_photo[photo][summary.methods[0]]
        try:
            thumb = _thumbnail(photo)
        except Exception as error:  # the photo moved since the run: the row says so, the page still opens
            out.append(f"<tr><th class='photo'>{e(photo)}: {e(str(error))}</th></tr>")
            continue
        verdict = "" if first.get("correct") is None else (" (top-1 right)" if first["correct"] else " (top-1 wrong)")
        out.append(f"<tr><th class='photo'>{e(Path(photo).name)}<br>class {first.get('label')}{verdict}</th>")
        for method in summary.methods:
            out.append(f"<td>{_cell(thumb, by_photo[photo][method])}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _detection_grid(summary, rows: list[dict], samples: int, spread) -> str:
    """A detector's table of overlays: a row per sample photo and evaluated detection, a column per method.

    The sample photos are spread over those with detections, annotated ones first choice."""
    by_photo: dict[str, dict[str, dict[int, dict]]] = {}
    for row in rows:
        if not row.get("error") and row["method"] in summary.methods and row.get("detection") is not None:
            by_photo.setdefault(row["image"], {}).setdefault(row["method"], {})[row["detection"]] = row
    complete = [p for p, r in by_photo.items() if len(r) == len(summary.methods)]
    annotated = [p for p in complete if any(r.get("annotated") for r in by_photo[p][summary.methods[0]].values())]
    chosen = spread(annotated or complete, samples) if samples else []
    e = html.escape
    out = ["<table class='grid' id='grid'><thead><tr><th></th>"]
    out += [f"<th>{e(m)}</th>" for m in summary.methods]
    out.append("</tr></thead><tbody>")
    for photo in chosen:
        try:
            thumb = _thumbnail(photo)
        except Exception as error:  # the photo moved since the run: the row says so, the page still opens
            out.append(f"<tr><th class='photo'>{e(photo)}: {e(str(error))}</th></tr>")
            continue
        first = by_photo[photo][summary.methods[0]]
        boxes = {i: r["detection_box"] for i, r in first.items()}
        for i in sorted(first):
            row = first[i]
            out.append(f"<tr data-photo='{e(photo)}' data-detection='{i}'><th class='photo'>{e(Path(photo).name)}"
                       f"<br>detection {i}: {e(row['detection_label'])} {row['detection_score']:.2f}</th>")  # fmt: skip
            for method in summary.methods:
                out.append(f"<td>{_cell(thumb, by_photo[photo][method][i], boxes)}</td>")
            out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _thumbnail(photo: str) -> np.ndarray:
    from .dataset import read_bytes

    image = open_image(read_bytes(photo))
    image.thumbnail((THUMB, THUMB), Image.BILINEAR)
    return np.asarray(image.convert("RGB"))


def _cell(thumb: np.ndarray, row: dict, detections: dict[int, list[float]] | None = None) -> str:
    """One overlay as a JPEG data URI under an SVG of the boxes (scaled from the photo's pixels).

    ``detections``: a detector's evaluated detections' boxes (continuous photo pixels), by their place; the
    row's own detection is drawn last, emphasized."""
    h, w = thumb.shape[:2]
    shape, values = row["lowres"]["shape"], row["lowres"]["values"]
    cam = upsample(np.asarray(values, dtype=np.float32).reshape(shape), (h, w))
    buffer = io.BytesIO()
    Image.fromarray(overlay(thumb, cam, 0.5)).save(buffer, "JPEG", quality=85)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    sx, sy = w / row["width"], h / row["height"]

    def rect(box, kind):
        x0, y0, x1, y1 = box
        return (f"<rect class='{kind}' x='{x0 * sx:.1f}' y='{y0 * sy:.1f}' width='{(x1 - x0 + 1) * sx:.1f}' "
                f"height='{(y1 - y0 + 1) * sy:.1f}'/>")  # fmt: skip

    truth = row.get("boxes") or ([row["match"]] if row.get("match") else [])  # a detection's: its matched box
    boxes = "".join(rect(b, "truth") for b in truth)
    if row.get("box"):
        boxes += rect(row["box"], "found")
    if detections:
        mine = row["detection"]
        for i in sorted(detections, key=lambda i: i == mine):
            x0, y0, x1, y1 = detections[i]
            kind = "detection explained" if i == mine else "detection"
            boxes += (f"<rect class='{kind}' data-detection='{i}' x='{x0 * sx:.1f}' y='{y0 * sy:.1f}' "
                      f"width='{(x1 - x0) * sx:.1f}' height='{(y1 - y0) * sy:.1f}'/>")  # fmt: skip
    alt = html.escape(f"{row['method']} on {Path(row['image']).name}")
    return (f"<div class='cell' data-method='{html.escape(row['method'])}'><img src='{uri}' width='{w}' height='{h}' "
            f"alt='{alt}'><svg viewBox='0 0 {w} {h}' preserveAspectRatio='none'>{boxes}</svg></div>")  # fmt: skip
