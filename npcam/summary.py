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
    localization: bool = False  # over the photos with boxes (a detector's: the detections matched to a box)


METRICS = (
    Metric("top1_loc", "Top-1 Loc", "higher", True, True),
    Metric("gt_known", "GT-known Loc", "higher", True, True),
    Metric("maxboxacc", "MaxBoxAccV2", "higher", True, True),
    Metric("pointing", "Pointing game", "higher", True, True),
    Metric("energy", "Energy pointing", "higher", False, True),
    Metric("energy_box", "Energy in own box", "higher"),  # a detector's: every detection
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
    """What the table and the report show. ``values[method][key] = (estimate, low, high)`` (None: no photos).

    A detector's summary (``task`` "detect") is over its evaluated detections: ``detections`` of them,
    ``matched`` of them matched to an annotated box, and ``baseline`` names the box-shaped baseline among the
    ``methods`` (never marked best).
    """

    methods: list[str]
    photos: int
    located: int  # photos with boxes (a detector's: with annotations)
    top1: float | None  # classification accuracy on the labelled photos
    values: dict[str, dict[str, tuple[float, float, float] | None]]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # mean curves per method
    fractions: list[float] = field(default_factory=list)  # the deletion and insertion curves' x
    errors: list[str] = field(default_factory=list)
    ms: dict[str, float] = field(default_factory=dict)  # median ms per photo of each method
    task: str = "classify"
    detections: int = 0
    matched: int = 0
    baseline: str | None = None

    def ranked(self) -> list[str]:
        """The methods that compete for a column's best (all but the baseline)."""
        return [m for m in self.methods if m != self.baseline]

    def best(self, key: str, better: str) -> float | None:
        """The best estimate of metric ``key`` among :meth:`ranked` (None: none has it)."""
        estimates = [self.values[x][key][0] for x in self.ranked() if self.values[x].get(key)]
        return (max if better == "higher" else min)(estimates) if estimates else None


CLASSIFIER_KEYS = ("top1_loc", "gt_known", "pointing", "energy", "drop", "increase", "deletion", "insertion")
DETECTION_KEYS = ("pointing", "energy", "energy_box", "drop", "increase", "deletion", "insertion")
ROAD_KEYS = ("road_morf", "road_lerf")


def _columns(rows: list[dict], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each metric's per-row terms, float64 ``[len(rows)]``, NaN where a row has none; ROAD's are the means of
    its curves (none without ROAD, ``--no-road``)."""
    columns = {key: np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows]) for key in keys}
    road = {key: np.array([np.nan if not r.get(key) else np.mean(r[key]) for r in rows]) for key in ROAD_KEYS}
    columns.update(road, road=(road["road_lerf"] - road["road_morf"]) / 2)
    return columns


def _mean_curves(rows: list[dict]) -> dict[str, list[float]]:
    """The mean deletion, insertion and (when computed) ROAD curves of some rows."""
    curves = {"deletion": np.mean([r["deletion_curve"] for r in rows], axis=0).tolist(),
              "insertion": np.mean([r["insertion_curve"] for r in rows], axis=0).tolist()}  # fmt: skip
    if all(r.get("road_morf") for r in rows):
        curves.update({key: np.mean([r[key] for r in rows], axis=0).tolist() for key in ROAD_KEYS})
    return curves


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

        for key, v in _columns(mine, CLASSIFIER_KEYS).items():
            values[key] = _mean_interval(v, weights)
        ious = np.array([r["box_ious"] for r, ok in zip(mine, located) if ok], dtype=np.float64)
        values["maxboxacc"] = _maxboxacc_interval(ious, weights[:, located]) if located.any() else None
        summary.ms[method] = float(np.median([r["ms"] for r in mine])) if n else float("nan")
        if n:
            summary.fractions = list(np.linspace(0, 1, len(mine[0]["deletion_curve"])))
            summary.curves[method] = _mean_curves(mine)
            if located.any():
                summary.curves[method]["boxacc"] = loc.box_accuracy(ious).tolist()
    return summary


def summarize_detections(rows: list[dict], methods: list[str], photos: list[str], resamples: int = BOOTSTRAP,
                         seed: int = 0, baseline: str | None = None) -> Summary:  # fmt: skip
    """A detector's summary: each metric's mean over the evaluated detections (a localization metric's: over
    those matched to an annotated box), with 95% percentile-bootstrap intervals over photos.

    Every method is scored on the same photos, those with rows for every method, and so on the same
    detections. A resample draws photos with replacement (the same draws for every method) and takes all
    their detections: a photo's detections are not independent of each other.
    """
    by_photo: dict[str, dict[str, list[dict]]] = {}
    errors = []
    for row in rows:
        if row.get("error"):
            errors.append(row["error"])
        elif row["method"] in methods:
            by_photo.setdefault(row["image"], {}).setdefault(row["method"], []).append(row)
    kept = [p for p in photos if len(by_photo.get(p, {})) == len(methods)]
    n = len(kept)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64) if n else np.zeros((0, 0))

    def detections(photo: str, method: str) -> list[dict]:
        found = [r for r in by_photo[photo][method] if r.get("detection") is not None]
        return sorted(found, key=lambda r: r["detection"])

    counts = [len(detections(p, methods[0])) for p in kept]
    owner = np.repeat(np.arange(n), counts)  # each detection's photo
    drawn = weights[:, owner] if n else np.zeros((0, 0))
    first = [r for p in kept for r in detections(p, methods[0])]
    summary = Summary(list(methods), n, sum(any(r.get("annotated") for r in by_photo[p][methods[0]]) for p in kept),
                      None, {}, errors=errors, task="detect", detections=len(first),
                      matched=sum(r.get("pointing") is not None for r in first), baseline=baseline)  # fmt: skip
    for method in methods:
        mine = [r for p in kept for r in detections(p, method)]
        summary.values[method] = values = {}
        for key, v in _columns(mine, DETECTION_KEYS).items():
            values[key] = _mean_interval(v, drawn)
        times = [by_photo[p][method][0]["ms"] for p, k in zip(kept, counts) if k]
        summary.ms[method] = float(np.median(times)) if times else float("nan")
        if mine:
            summary.fractions = list(np.linspace(0, 1, len(mine[0]["deletion_curve"])))
            summary.curves[method] = _mean_curves(mine)
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
    if not shown:  # a detector that detected nothing: a table without columns would be no table
        return "No metric has a value" + (": no photo had a detection" if summary.task == "detect" else "") + "."
    best = {m.key: summary.best(m.key, m.better) for m in shown}
    head = "| method | " + " | ".join(f"{m.name} {'↑' if m.better == 'higher' else '↓'}" for m in shown) + " |"
    lines = [head, "|---" * (len(shown) + 1) + "|"]
    for method in summary.methods:
        cells = []
        for m in shown:
            value = summary.values[method].get(m.key)
            text = cell(m, value)
            ranked = method != summary.baseline
            cells.append(f"**{text}**" if ranked and value and value[0] == best[m.key] else text)
        name = f"`{method}` (baseline)" if method == summary.baseline else f"`{method}`"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_run(summary: Summary, arch: str) -> str:
    if summary.task == "detect":
        return (
            f"{arch}: {summary.photos} photos ({summary.located} annotated), {summary.detections} detections "
            f"evaluated ({summary.matched} matched to an annotated box of their class at IoU ≥ {loc.MATCH_IOU:g}); "
            "localization against the matched box and inside the detection's own box, faithfulness on each "
            f"detection's D-RISE similarity; `{summary.baseline}` is the box-shaped baseline; 95% bootstrap "
            "intervals over photos; ↑ higher is better, ↓ lower"
        )
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
