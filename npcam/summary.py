"""The results of ``npcam evaluate``: its metrics, each method's estimates with bootstrap intervals over photos,
and how they print (the table on stdout, the report's cells).

:mod:`npcam.evaluate` makes the rows and :func:`summarize` sums them up; :mod:`npcam.report` and the table show
the :class:`Summary`. The metrics' definitions are in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import localization as loc

BOOTSTRAP = 1000  # resamples of the photos for the 95% intervals


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    better: str  # "higher" or "lower"
    percent: bool = False
    localization: bool = False  # over the photos with boxes (else: every photo)


METRICS = (
    Metric("top1_loc", "Top-1 Loc", "higher", True, True),
    Metric("gt_known", "GT-known Loc", "higher", True, True),
    Metric("maxboxacc", "MaxBoxAccV2", "higher", True, True),
    Metric("pointing", "Pointing game", "higher", True, True),
    Metric("energy", "Energy pointing", "higher", False, True),
    Metric("drop", "Average Drop", "lower", True),
    Metric("increase", "Increase in Confidence", "higher", True),
    Metric("deletion", "Deletion AUC", "lower"),
    Metric("insertion", "Insertion AUC", "higher"),
    Metric("road_morf", "ROAD MoRF", "lower"),
    Metric("road_lerf", "ROAD LeRF", "higher"),
    Metric("road", "ROAD", "higher"),
)


@dataclass
class Summary:
    """What the table and the report show. ``values[method][key] = (estimate, low, high)`` (None: no photos)."""

    methods: list[str]
    photos: int
    located: int  # photos with boxes
    top1: float | None  # classification accuracy on the labelled photos
    values: dict[str, dict[str, tuple[float, float, float] | None]]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # mean curves per method
    fractions: list[float] = field(default_factory=list)  # the deletion and insertion curves' x
    errors: list[str] = field(default_factory=list)
    ms: dict[str, float] = field(default_factory=dict)  # median ms per photo of each method


def summarize(rows: list[dict], methods: list[str], photos: list[str], resamples: int = BOOTSTRAP,
              seed: int = 0) -> Summary:  # fmt: skip
    """The summary of the rows of ``photos``: estimates and 95% percentile-bootstrap intervals over photos.

    Every method is scored on the same photos: those with a row for every method. A bootstrap
    resample draws photos with replacement (the same draws for every method); a localization
    metric takes the drawn photos that have boxes.
    """
    by_photo: dict[str, dict[str, dict]] = {}
    errors = []
    for row in rows:
        if row.get("error"):
            errors.append(row["error"])
        elif row["method"] in methods:
            by_photo.setdefault(row["image"], {})[row["method"]] = row
    kept = [p for p in photos if len(by_photo.get(p, {})) == len(methods)]
    n = len(kept)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64) if n else np.zeros((0, 0))
    located = np.array([by_photo[p][methods[0]].get("box_ious") is not None for p in kept], dtype=bool)
    labelled = [by_photo[p][methods[0]] for p in kept if by_photo[p][methods[0]].get("label") is not None]
    summary = Summary(list(methods), n, int(located.sum()),
                      float(np.mean([r["correct"] for r in labelled])) if labelled else None, {}, errors=errors)  # fmt: skip
    for method in methods:
        mine = [by_photo[p][method] for p in kept]
        summary.values[method] = values = {}

        def per_photo(key, mine=mine):
            return np.array([np.nan if r.get(key) is None else float(r[key]) for r in mine])

        road_morf = np.array([np.mean(r["road_morf"]) for r in mine]) if n else np.zeros(0)
        road_lerf = np.array([np.mean(r["road_lerf"]) for r in mine]) if n else np.zeros(0)
        columns = {key: per_photo(key) for key in ("top1_loc", "gt_known", "pointing", "energy", "drop", "increase",
                                                    "deletion", "insertion")}  # fmt: skip
        columns.update(road_morf=road_morf, road_lerf=road_lerf, road=(road_lerf - road_morf) / 2)
        for key, v in columns.items():
            values[key] = _mean_interval(v, weights)
        ious = np.array([r["box_ious"] for r, ok in zip(mine, located) if ok], dtype=np.float64)
        values["maxboxacc"] = _maxboxacc_interval(ious, weights[:, located]) if located.any() else None
        summary.ms[method] = float(np.median([r["ms"] for r in mine])) if n else float("nan")
        if n:
            summary.fractions = list(np.linspace(0, 1, len(mine[0]["deletion_curve"])))
            summary.curves[method] = {
                "deletion": np.mean([r["deletion_curve"] for r in mine], axis=0).tolist(),
                "insertion": np.mean([r["insertion_curve"] for r in mine], axis=0).tolist(),
                "road_morf": np.mean([r["road_morf"] for r in mine], axis=0).tolist(),
                "road_lerf": np.mean([r["road_lerf"] for r in mine], axis=0).tolist(),
            }
            if located.any():
                summary.curves[method]["boxacc"] = loc.box_accuracy(ious).tolist()
    return summary


def _mean_interval(v: np.ndarray, weights: np.ndarray) -> tuple[float, float, float] | None:
    """The mean of the defined values, and the 2.5 and 97.5 percentiles of its bootstrap resamples."""
    ok = ~np.isnan(v)
    if not ok.any():
        return None
    w = weights[:, ok]
    drawn = w.sum(axis=1)
    means = (w @ v[ok])[drawn > 0] / drawn[drawn > 0]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(v[ok].mean()), float(low), float(high)


def _maxboxacc_interval(ious: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """MaxBoxAccV2 and its bootstrap interval: each resample takes its own best threshold per IoU level."""
    drawn = weights.sum(axis=1)
    weights = weights[drawn > 0] / drawn[drawn > 0, None]
    accuracy = np.stack([weights @ (ious >= level) for level in loc.MAXBOXACC_IOUS])  # [levels, B, T]
    resampled = accuracy.max(axis=2).mean(axis=0)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return loc.max_box_acc_v2(ious), float(low), float(high)


def cell(metric: Metric, value: tuple[float, float, float] | None) -> str:
    """A table cell: the estimate and its 95% interval (percent points for rates)."""
    if value is None:
        return "–"
    scale, digits = (100, 1) if metric.percent else (1, 3)
    estimate, low, high = (v * scale for v in value)
    return f"{estimate:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def markdown(summary: Summary) -> str:
    """The summary as a Markdown table: methods as rows, metrics as columns, best of each column in bold."""
    shown = [m for m in METRICS if any(summary.values[x].get(m.key) for x in summary.methods)]
    best = {}
    for m in shown:
        estimates = [summary.values[x][m.key][0] for x in summary.methods if summary.values[x].get(m.key)]
        best[m.key] = (max if m.better == "higher" else min)(estimates)
    head = "| method | " + " | ".join(f"{m.name} {'↑' if m.better == 'higher' else '↓'}" for m in shown) + " |"
    lines = [head, "|---" * (len(shown) + 1) + "|"]
    for method in summary.methods:
        cells = []
        for m in shown:
            value = summary.values[method].get(m.key)
            text = cell(m, value)
            cells.append(f"**{text}**" if value and value[0] == best[m.key] else text)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_run(summary: Summary, arch: str) -> str:
    top1 = f", top-1 classification {summary.top1:.1%}" if summary.top1 is not None else ""
    return (
        f"{arch}: {summary.photos} photos ({summary.located} with boxes{top1}); localization on the annotated "
        "class, faithfulness on the top-1 class; 95% bootstrap intervals over photos; ↑ higher is better, ↓ lower"
    )


def spread(items: list, limit: int | None) -> list:
    """``limit`` items spread over the list, in list order; all of them without a limit.

    They are the first ``limit`` positions in bit-reversed order (0, 1/2, 1/4, 3/4, 1/8, …
    of the list), so a larger limit keeps the items of a smaller one: a run resumed with
    a larger ``--limit`` adds photos to those it has.
    """
    if limit is None or limit >= len(items):
        return list(items)
    bits = max(1, (len(items) - 1).bit_length())
    order = sorted(range(len(items)), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [items[i] for i in sorted(order[:limit])]
