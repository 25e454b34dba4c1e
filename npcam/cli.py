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
from contextlib import closing
from pathlib import Path

from .arguments import (
    MAX_THREADS,
    OneLineParser,
    add_explanation_options,
    between,
    flag_words,
    fraction,
    methods_help,
    options_from,
)
from .errors import NpcamError
from .explain import explain_files
from .files import find_images, plan_outputs
from .methods import METHODS
from .model import Model, default_model_dir
from .progress import Progress
from .record import error as error_record
from .version import __version__

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141
SUBCOMMANDS = ("serve", "dataset", "evaluate")
MAX_LISTED = 20  # a detector's detections listed in the summary of one image (--json has them all)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="npcam",
        description="Class Activation Maps for CNN classifiers and detectors, without PyTorch. Writes the "
        "jet-coloured map of the top class (a detector's: of its best detection, with every detection's box) "
        "blended over each image. Subcommands: `npcam serve` (HTTP service), "
        "`npcam dataset` (Parquet at scale, on Ray), `npcam evaluate` (every method on every metric, with a report).",
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
    if argv and argv[0] in SUBCOMMANDS:  # `npcam serve …`, `npcam dataset …`, `npcam evaluate …`: their own modules
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
        _error(flag_words(str(e)))
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
    results = explain_files(model, jobs, options, workers, extra, overlays=not args.no_overlay)
    with closing(results):
        for n, (job, result) in enumerate(results, 1):
            progress.show(n, len(jobs), job.image)
            if isinstance(result, str):
                failed += 1
                progress.clear()
                result = flag_words(result)
                _error(result)
                if args.json:
                    print(json.dumps(error_record(str(job.image), result)), flush=True)
                continue
            progress.clear()
            print(json.dumps(result) if args.json else _describe(result, verbose=len(jobs) == 1), flush=True)
    progress.clear()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _describe(record: dict, verbose: bool) -> str:
    if "detections" in record:
        return _describe_detections(record, verbose)
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


def _describe_detections(record: dict, verbose: bool) -> str:
    found = record["detections"]
    written = [m["output"] for m in record["maps"] if m.get("output")] or (
        [record["output"]] if record.get("output") else []
    )
    outputs = f" -> {', '.join(written)}" if written else ""
    count = f"{len(found)} detection{'s' if len(found) != 1 else ''}"
    if not verbose:
        best = f", best {found[0]['label']} ({found[0]['score']:.1%})" if found else ""
        return f"{record['image']}: {count}{best}{outputs}"
    lines = [f"{record['image']} ({record['width']}x{record['height']}), {count}" + (":" if found else outputs)]
    shown = found[:MAX_LISTED]
    lines += [
        f"  {i:>3}  {d['score']:6.1%}  {d['class']:>4}  {d['label']}  [{', '.join(f'{v:.0f}' for v in d['box'])}]"
        for i, d in enumerate(shown)
    ]
    if len(found) > len(shown):
        lines.append(f"  ... {len(found) - len(shown)} more (--json lists them all)")
    lines += [
        f"{record['method']} of detection {m['detection']} ({m['label']})"
        + (f" -> {m['output']}" if m.get("output") else "")
        for m in record["maps"]
    ]
    return "\n".join(lines)


def _error(message: str) -> None:
    print(f"npcam: error: {message}", file=sys.stderr, flush=True)
