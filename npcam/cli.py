"""``npcam IMAGE [IMAGE|DIR ...]``: write a CAM overlay for each image. Parsing and printing only.

The options are in the README ("Command line"), the naming of outputs in
docs/cli.md, the exit codes in docs/robustness-and-testing.md. Only complete
files are ever left. ``npcam serve`` and ``npcam dataset`` are subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from contextlib import closing
from pathlib import Path

from . import __version__
from .boxes import DEFAULT_THRESHOLD, PAPER_THRESHOLD, parse_threshold
from .errors import NpcamError
from .explain import Options, explain_files
from .files import find_images, plan_outputs
from .image import MAX_PIXELS, parse_size
from .methods import ALIASES, METHODS
from .model import Model, default_model_dir
from .record import error as error_record

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141
SUBCOMMANDS = ("serve", "dataset")


def _threshold(text: str) -> float | str:
    try:
        return parse_threshold(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'mean' or a fraction of the max in (0, 1], e.g. {PAPER_THRESHOLD}; not {text!r}"
        ) from None


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def input_size(text: str) -> tuple[int, int]:
    """An argparse type: ``S`` or ``HxW`` as ``(H, W)``."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 (the photo) and 1 (the heat map alone), not {value}")
    return value


def _method(text: str) -> str:
    name = ALIASES.get(text.lower(), text.lower())
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(METHODS)} (or gradcam++), not {text!r}")
    return name


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


def seconds(text: str) -> float:
    """An argparse type: a duration, more than 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, not {text}")
    return value


MAX_THREADS = 1024  # onnxruntime starts them all at load


def add_explanation_options(p: argparse.ArgumentParser) -> None:
    """The options that choose what is explained and how; shared with ``npcam dataset``."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_", metavar="IDX|LABEL", help="explain this class (default: the top-1)")
    which.add_argument("--top", type=_at_least(1), default=1, metavar="K", help="explain each of the top K classes")
    p.add_argument(
        "--method", type=_method, help="explanation method (default: cam, or gradcam for a non-affine head; see below)"
    )
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
        metavar="S|HxW",
        help="network input size, S (S x S) or height x width, e.g. 48x192 (default: the bundle's)",
    )
    p.add_argument("--bbox", action="store_true", help="find each map's bounding box (drawn, and in the record)")
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        help=f"box threshold: 'mean' (the map's mean, default) or a fraction of its max (the paper's is {PAPER_THRESHOLD})",
    )
    p.add_argument(
        "--max-pixels", type=_at_least(1), default=MAX_PIXELS, help=f"refuse larger images (default {MAX_PIXELS:,})"
    )


def options_from(args: argparse.Namespace, **extra) -> Options:
    """The library's :class:`Options` from parsed arguments."""
    return Options(
        classes=(args.class_,) if args.class_ is not None else (),
        top=args.top,
        method=args.method,
        bbox=args.bbox,
        threshold=args.threshold,
        keep_aspect=args.keep_aspect,
        size=args.size,
        max_pixels=args.max_pixels,
        **extra,
    )


def methods_help() -> str:
    width = max(map(len, METHODS))
    return "methods:\n" + "\n".join(f"  {name:<{width}}  {m.summary}" for name, m in METHODS.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="npcam",
        description="Class Activation Maps for CNN classifiers, without PyTorch. Writes the jet-coloured map "
        "of the top class blended over each image. Subcommands: `npcam serve` (HTTP service), "
        "`npcam dataset` (Parquet at scale, on Ray).",
        epilog=methods_help() + "\n\nexit codes: 0 all done, 1 some images failed, 2 bad arguments or model, "
        "130 interrupted, 141 output closed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files, or directories searched recursively")
    p.add_argument(
        "-m",
        "--model",
        type=Path,
        help="model bundle directory (default: $NPCAM_MODEL, else ~/.cache/npcam/resnet18, "
        "else ~/.cache/npcam/efficientnet_lite0)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="a directory (existing, or ending in /) for <stem>_cam.jpg files, or the output file of a single "
        "image, its extension picking the format (default: <stem>_cam.jpg in the current directory)",
    )
    add_explanation_options(p)
    p.add_argument(
        "--alpha", type=fraction, default=0.5, help="heat-map opacity from 0 (photo) to 1 (heat map) (default 0.5)"
    )
    p.add_argument("--save-cam", action="store_true", help="also write each full-resolution map as float32 .npy")
    p.add_argument(
        "--max-side",
        type=_at_least(1),
        metavar="N",
        help="write overlays at most N pixels on their long side (records and .npy maps keep the photo's size)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON record per image on stdout (JSON Lines)")
    p.add_argument(
        "--no-overlay",
        action="store_true",
        help="write no overlay images, only the record (--json) and --save-cam maps; JPEGs then decode "
        "at the reduced scale the network needs",
    )
    p.add_argument(
        "--threads",
        type=between(1, MAX_THREADS),
        help="onnxruntime threads per image (default: every core for one image; one for several, "
        "which then run side by side, one per core)",
    )
    p.add_argument("--version", action="version", version=f"npcam {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:  # `npcam serve …`, `npcam dataset …`: their own modules and options
        return importlib.import_module(f"{__package__}.{argv[0]}").main(argv[1:])
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a file name that is not valid UTF-8 must not crash a print
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    progress = Progress()
    try:
        return run(args, progress)
    except KeyboardInterrupt:
        progress.clear()
        _error("interrupted; files already written are complete")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`npcam … | head`): stop quietly, like any Unix filter.
        progress.clear()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE


def run(args: argparse.Namespace, progress: Progress) -> int:
    try:
        found = find_images(args.inputs)
        jobs = plan_outputs(found.images, args.output, per_class=args.top > 1)
        # Several images run side by side, one onnxruntime thread each: on few cores that beats
        # splitting each image's trunk across threads (measured: Lite0 7.2 vs 11.8 ms an image).
        threads = args.threads or (1 if len(jobs) > 1 else None)
        model = Model(args.model or default_model_dir(), threads=threads)
        options = options_from(args, alpha=args.alpha, save_cam=args.save_cam).checked(model)
    except NpcamError as e:
        _error(str(e))
        return EXIT_USAGE
    if found.skipped:
        print(f"npcam: skipped {found.skipped} image(s) npcam wrote in an earlier run", file=sys.stderr)
    for path, message in found.missing:
        _error(message)
        if args.json:
            print(json.dumps(error_record(str(path), message)), flush=True)
    failed = len(found.missing)
    workers = 1 if len(jobs) == 1 else max(1, (os.cpu_count() or 1) // (args.threads or 1))

    def passes(done: int, total: int) -> None:
        progress.show(done, total, f"{options.method} passes", unit="passes")

    # A method with extra network passes (Score-CAM) shows them for a single image; several show the image count.
    extra = passes if len(jobs) == 1 and METHODS[options.method].extra_passes else None
    results = explain_files(model, jobs, options, workers, extra, overlays=not args.no_overlay, max_side=args.max_side)
    with closing(results):
        for n, (job, result) in enumerate(results, 1):
            progress.show(n, len(jobs), job.image)
            if isinstance(result, str):
                failed += 1
                progress.clear()
                _error(result)
                if args.json:
                    print(json.dumps(error_record(str(job.image), result)), flush=True)
                continue
            progress.clear()
            print(json.dumps(result) if args.json else _describe(result, verbose=len(jobs) == 1), flush=True)
    progress.clear()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _describe(record: dict, verbose: bool) -> str:
    written = [m["output"] for m in record["maps"] if m.get("output")]
    if not verbose:
        outputs = f" -> {', '.join(written)}" if written else ""
        return f"{record['image']}: {record['label']} ({record['score']:.1%}){outputs}"
    lines = [f"{record['image']} ({record['width']}x{record['height']}), top-5:"]
    lines += [f"  {t['score']:6.1%}  {t['class']:>4}  {t['label']}" for t in record["top5"]]
    name = "CAM" if record["method"] == "cam" else record["method"]
    lines += [
        f"{name} of {m['class']} ({m['label']})" + (f" -> {m['output']}" if m.get("output") else "")
        for m in record["maps"]
    ]
    return "\n".join(lines)


def _error(message: str) -> None:
    print(f"npcam: error: {message}", file=sys.stderr, flush=True)


class Progress:
    """A one-line progress display on stderr, when stderr is a terminal: count, rate and time left."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.shown = False

    def show(self, n: int, total: int, label: object, unit: str = "img") -> None:
        if total <= 1 or not self.stream.isatty():
            return
        elapsed = time.monotonic() - self.start
        rate = n / elapsed if elapsed > 0 else 0.0
        left = (total - n) / rate if rate > 0 else 0.0
        self.stream.write(f"\r\x1b[K[{n}/{total}] {rate:.1f} {unit}/s, {_clock(left)} left  {label}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )
