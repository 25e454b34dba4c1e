"""The argparse pieces that ``npcam``, ``npcam serve``, ``npcam dataset`` and ``npcam evaluate`` share.

A one-line-error parser, range types, the explanation options and the
builder that turns them into :class:`npcam.explain.Options`. The ranges come
from the constants beside ``Options``, so every front-end has the same limits;
:func:`flag_words` puts a library message's option names into flags.
"""

from __future__ import annotations

import argparse
import re

from .boxes import DEFAULT_THRESHOLD, PAPER_THRESHOLD, parse_threshold
from .detect import CONF, IOU, MAX_DET
from .errors import NpcamError
from .explain import ALPHA, MAX_DETECTIONS, MAX_TOP, Options
from .image import FINE, MAX_PIXELS, parse_size
from .methods import METHODS, names, resolve
from .probe import MAX_MASK_CELLS, MAX_MASKS, MethodOptions

EXIT_USAGE = 2
MAX_THREADS = 1024  # onnxruntime starts them all at load


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit 2): the usage is for ``--help`` to print."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def between(low: int, high: int | None = None):
    """An argparse type: a whole number in ``[low, high]`` (no upper bound for None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
        return value

    return parse


def count(low: int, high: int):
    """An argparse type: a whole number in ``[low, high]``, the error naming the side that was crossed."""

    def parse(text: str) -> int:
        value = between(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, not {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a duration, more than 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, not {text}")
    return value


def input_size(text: str) -> tuple[int, int] | str:
    """An argparse type: ``S`` or ``HxW`` as ``(H, W)``, or ``fine`` as it is (:func:`npcam.image.fine_size`)."""
    if text.strip().lower() == FINE:
        return FINE
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fraction(text: str) -> float:
    """An argparse type: the overlay's alpha, a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, not {text!r}") from None
    low, high = ALPHA
    if not low <= value <= high:  # refused here too, so that the mistake exits before the model loads
        raise argparse.ArgumentTypeError(
            f"must be between {low:g} (the photo) and {high:g} (the heat map alone), not {value}"
        )
    return value


def unit(text: str) -> float:
    """An argparse type: a number in [0, 1] (a detector's score or IoU threshold)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, not {text!r}")
    return value


def _threshold(text: str) -> float | str:
    try:
        return parse_threshold(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'mean' or a fraction of the max in (0, 1], e.g. {PAPER_THRESHOLD}; not {text!r}"
        ) from None


def _method(text: str) -> str:
    try:
        return resolve(text).name
    except NpcamError:
        raise argparse.ArgumentTypeError(f"must be one of {names()}, not {text!r}") from None


def add_explanation_options(p: argparse.ArgumentParser) -> None:
    """The options that choose what is explained and how; shared by ``npcam`` and ``npcam dataset``."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_", metavar="IDX|LABEL", help="explain this class (default: the top-1)")
    which.add_argument(
        "--top",
        type=count(1, MAX_TOP),
        default=1,
        metavar="K",
        help=f"explain each of the top K classes, or a detector's K best detections (K <= {MAX_TOP})",
    )
    which.add_argument(
        "--detection",
        type=between(0),
        metavar="K",
        help="a detector: explain its detection K (0, the best, by default; they are listed best first)",
    )
    p.add_argument(
        "--method", type=_method, help="explanation method (default: cam, or gradcam for a non-affine head; see below)"
    )
    add_input_options(p)
    p.add_argument("--bbox", action="store_true", help="find each map's bounding box (drawn, and in the record)")
    add_threshold_option(p)
    add_detection_options(p)
    p.add_argument(
        "--max-pixels", type=between(1), default=MAX_PIXELS, help=f"refuse larger images (default {MAX_PIXELS:,})"
    )
    p.add_argument(
        "--max-side",
        type=between(1),
        metavar="N",
        help="write overlays at most N pixels on their long side (records, boxes and .npy maps keep the photo's size)",
    )
    masks = p.add_argument_group("D-RISE (--method drise, or rise): its random masks")
    masks.add_argument(
        "--masks",
        type=count(1, MAX_MASKS),
        default=MethodOptions.masks,
        metavar="N",
        help=f"how many masks: one network pass each (default {MethodOptions.masks})",
    )
    masks.add_argument(
        "--mask-cells",
        type=count(1, MAX_MASK_CELLS),
        default=MethodOptions.mask_cells,
        metavar="S",
        help=f"each mask is a grid of S x S cells over the photo (default {MethodOptions.mask_cells})",
    )
    masks.add_argument(
        "--seed",
        type=between(0, 2**63 - 1),
        default=MethodOptions.seed,
        metavar="K",
        help=f"the masks' random seed: the same seed, the same map (default {MethodOptions.seed})",
    )


def add_detection_options(p: argparse.ArgumentParser) -> None:
    """``--conf``, ``--iou``, ``--max-det``: which of a detector's candidates are kept
    (:class:`npcam.detect.Thresholds`)."""
    p.add_argument(
        "--conf", type=unit, default=CONF, help=f"a detector: keep detections scoring at least this (default {CONF})"
    )
    p.add_argument(
        "--iou",
        type=unit,
        default=IOU,
        help=f"a detector: a detection overlapping a better one of its class by more than this IoU is dropped "
        f"(default {IOU})",
    )
    p.add_argument(
        "--max-det",
        type=between(1, MAX_DETECTIONS),
        default=MAX_DET,
        metavar="N",
        help=f"a detector: keep at most N detections an image (default {MAX_DET})",
    )


def add_input_options(p: argparse.ArgumentParser) -> None:
    """``--keep-aspect`` and ``--size``: how a photo becomes the network input (every front-end that reads photos)."""
    p.add_argument(
        "--keep-aspect",
        action="store_true",
        help="keep the photo's aspect instead of squashing it to the input size: scale it to the smallest size "
        "that covers the input (a square model's: the short side to S; a 48x192 model's: the height to 48 for "
        "photos wider than 4:1), each side at most 4x the input's",
    )
    p.add_argument(
        "--size",
        type=input_size,
        metavar="S|HxW|fine",
        help="network input size, S (S x S) or height x width, e.g. 48x192; or 'fine': 9/7 of the bundle's, "
        "rounded to whole feature cells (288 for a 224 model), whose maps localize better on photos at their own "
        "resolution, for about 1.6x the trunk's compute (default: the bundle's)",
    )


def add_threshold_option(p: argparse.ArgumentParser) -> None:
    """``--threshold``: the box rule (:func:`npcam.boxes.cam_box`)."""
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        help=f"box threshold: 'mean' (the map's mean, default) or a fraction of its max (the paper's is {PAPER_THRESHOLD})",
    )


def add_ray_options(p: argparse.ArgumentParser, connect_timeout: float, batch_size: int, rows_per_file: int) -> None:
    """Where a Parquet run (``npcam dataset``, ``npcam evaluate``) runs: Ray's cluster, actors, driver threads."""
    p.add_argument("--address", help="a Ray cluster: auto or HOST:PORT (default: $RAY_ADDRESS, else Ray in-process)")
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        default=connect_timeout,
        metavar="SECONDS",
        help=f"give up on a cluster that does not answer within this time (default {connect_timeout:g})",
    )
    p.add_argument("--actors", type=between(1), help="model actors (default: one per CPU of the cluster)")
    p.add_argument(
        "--driver-threads",
        type=between(0, MAX_THREADS),
        metavar="N",
        help="embedded Ray: threads of this process that work while Ray starts and beside its actors "
        "(default: one per core; 0: Ray's actors alone)",
    )
    p.add_argument("--batch-size", type=between(1), default=batch_size,
                   help=f"images per actor call (default {batch_size})")  # fmt: skip
    p.add_argument(
        "--rows-per-file",
        type=between(1),
        default=rows_per_file,
        help=f"rows per Parquet file at least (default {rows_per_file})",
    )


def options_from(args: argparse.Namespace, **extra) -> Options:
    """The library's :class:`Options` from parsed arguments (still to be :meth:`~Options.checked`)."""
    return Options(
        classes=(args.class_,) if args.class_ is not None else (),
        top=args.top,
        method=args.method,
        bbox=args.bbox,
        threshold=args.threshold,
        keep_aspect=args.keep_aspect,
        size=args.size,
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        detection=args.detection,
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        masks=args.masks,
        mask_cells=args.mask_cells,
        seed=args.seed,
        **extra,
    )


def methods_help() -> str:
    width = max(map(len, METHODS))
    return "methods:\n" + "\n".join(f"  {name:<{width}}  {m.summary}" for name, m in METHODS.items())


# A library message names an option as its Options field: ``max_pixels``, or ``size=100x100``.
_FIELD = re.compile(
    r"\b(keep_aspect|max_pixels|max_side|save_cam|max_det)\b"
    r"|\b(size|method|alpha|top|threshold|detection|conf|iou|masks|mask_cells|seed)=(\S+)"
)


def flag_words(message: str) -> str:
    """A library message in the CLI's words: ``keep_aspect`` -> ``--keep-aspect``, ``size=S`` -> ``--size S``."""

    def flag(m: re.Match) -> str:
        if m.group(1):
            return "--" + m.group(1).replace("_", "-")
        return f"--{m.group(2).replace('_', '-')} {m.group(3)}"

    return _FIELD.sub(flag, message)
