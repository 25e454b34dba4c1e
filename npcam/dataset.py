"""Explain whole datasets into Parquet: ``python -m npcam.dataset SRC --model DIR --out DEST`` (or ``npcam dataset``).

Each image becomes one row of Parquet in ``DEST``: the same record that
``npcam --json`` prints (:mod:`npcam.record`), or ``{image, error}`` for an
image that failed. A detector's image becomes a row per detection
(:func:`npcam.record.rows`), all written in the same file, so that the image
is the unit that resumes. The work runs on :mod:`npcam.engine`: with no
``--address``, on this machine's cores (the driver's threads, and Ray started
inside this process when actors are asked for); ``--address auto|HOST:PORT``
(or ``RAY_ADDRESS``) runs the same job on an existing cluster with Ray Data.

The sources it takes, resuming and the refusal of mixed results are described
in docs/dataset-and-serve.md. This module lists and reads the sources and turns
an image into its row; the engine shares the images out and writes the rows.

Needs the ``dataset`` extra (``pip install .[dataset]``: Ray Data and pyarrow;
Ray only for runs with actors); ``import npcam`` never imports Ray.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from . import record as records
from .engine import CONNECT_TIMEOUT, done_images, make_stamp, require_extra, run_items, worker_class
from .errors import NpcamError
from .explain import DETECTOR_DEFAULTS, Options
from .files import IMAGE_SUFFIXES, find_images, plan_outputs


def list_images(src: str) -> list[str]:
    """The images ``src`` names, in a stable order (see the module's docstring)."""
    if "://" in src:
        return _list_uri(src)
    path = Path(src)
    if path.is_dir():
        return [str(i.path) for i in find_images([path]).images]
    if path.suffix.lower() in (".txt", ".lst") and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if glob.has_magic(src):
        return sorted(p for p in glob.glob(src, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if path.is_file():
        return [src]
    raise NpcamError(f"{src}: no such file, directory or pattern")


def _list_uri(src: str) -> list[str]:
    from pyarrow import fs

    pattern = src if glob.has_magic(src) else None
    base = src.split("*", 1)[0].rsplit("/", 1)[0] if pattern else src
    filesystem, root = fs.FileSystem.from_uri(base)
    scheme = src.split("://", 1)[0]
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    uris = [f"{scheme}://{i.path}" for i in infos if i.type == fs.FileType.File]
    uris = [u for u in uris if Path(u).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(fnmatch.filter(uris, pattern) if pattern else uris)


def read_bytes(source: str) -> bytes:
    """A local path's or a URI's content (``s3://``, ``gs://``... through pyarrow's filesystems)."""
    if "://" not in source:
        with open(source, "rb") as f:
            return f.read()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(source)
    with filesystem.open_input_file(path) as f:
        return f.read()


def explain_row(model, image: str, overlay: str, options: Options, should_stop: Callable[[], bool] | None = None) -> dict:
    """One image's row: its record (its overlays written when ``overlay`` names a file), or ``{image, error}``.

    The actors and the driver both explain through here. :class:`npcam.cancel.Cancelled`
    (``should_stop``) passes through: the image gets no row.
    """
    from .explain import describe, explain, write
    from .files import Job

    try:
        explanation = explain(model, read_bytes(image), options, name=image, pixels=bool(overlay),
                              should_stop=should_stop)  # fmt: skip
        if overlay:
            return write(explanation, Job(Path(image), Path(overlay), options.top > 1), options)
        return describe(explanation, options)
    except NpcamError as e:
        return records.error(image, str(e))
    except (OSError, MemoryError) as e:
        return records.error(image, f"{image}: {type(e).__name__}: {e}")


def explain_rows(options: Options, model, item: dict, should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """The engine's work for ``npcam dataset``: one item ``{image, overlay, index}`` to its rows (one, or a
    detector's one per detection, :func:`npcam.record.rows`)."""
    return records.rows(explain_row(model, item["image"], item["overlay"], options, should_stop))


def explainer_class(model_dir: str, options: Options, claims: str | None = None, task: str = "classify"):
    """``npcam dataset``'s actor class (:func:`worker_class` explaining ``{image, overlay, index}`` items), for a
    bundle of ``task``."""
    return worker_class(model_dir, partial(explain_rows, options), partial(records.arrow_schema, task), claims)


def run(
    src: str,
    model_dir: str,
    dest: str,
    options: Options,
    overlays: str | None = None,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int = 16,
    rows_per_file: int = 1000,
    connect_timeout: float = CONNECT_TIMEOUT,
    driver_threads: int | None = None,
) -> dict:
    """Explain every image of ``src`` not yet in ``dest``; returns a summary (counts, seconds).

    A cluster (``address``, or ``$RAY_ADDRESS``) that does not answer within ``connect_timeout`` seconds
    ends the process with exit code 2 and one line on stderr (Ray's connect cannot be interrupted).
    Embedded, the driver explains images too (:class:`HeadStart`): ``driver_threads`` threads
    (default: one per core) while Ray starts and beside Ray's ``actors`` (default: one per core
    the driver leaves; with none, Ray is not started). ``driver_threads=0``: Ray's actors alone.
    """
    from .model import Model

    require_extra("npcam dataset")
    started = time.monotonic()
    model = Model(model_dir, threads=1)
    options = options.checked(model)
    # max_side (and boxes) set only how the overlays look, as --overlays sets whether there are any; a classifier's
    # options are as before detectors came (so that its earlier runs resume)
    detector = model.bundle.task == "detect"
    chosen = {
        k: v
        for k, v in asdict(options).items()
        if k not in ("max_pixels", "max_side", "boxes") and (detector or k not in DETECTOR_DEFAULTS)
    }
    stamp = make_stamp(model, chosen)
    images = list_images(src)
    done = done_images(dest, stamp)
    todo = [i for i in images if i not in done]
    if overlays and todo:
        root = src if Path(src).is_dir() else None
        jobs = plan_outputs([_input(i, root) for i in todo], overlays.rstrip("/") + "/", per_class=options.top > 1)
        outputs = [str(j.output) for j in jobs]
    else:
        outputs = [""] * len(todo)
    items = [{"image": i, "overlay": o, "index": n} for n, (i, o) in enumerate(zip(todo, outputs))]
    schema = partial(records.arrow_schema, model.bundle.task)
    summary = run_items(model, items, dest, stamp, partial(explain_rows, options), schema, address, actors,
                        batch_size, rows_per_file, connect_timeout, driver_threads)  # fmt: skip
    summary.update(images=len(images), already_done=len(images) - len(todo), seconds=time.monotonic() - started)
    return summary


def _input(image: str, root: str | None):
    from .files import Input

    return Input(Path(image), Path(root) if root else None)


def main(argv: list[str] | None = None) -> int:
    from .arguments import (
        OneLineParser,
        add_explanation_options,
        add_ray_options,
        flag_words,
        fraction,
        methods_help,
        options_from,
    )

    p = OneLineParser(
        prog="npcam dataset",
        description="Explain a whole dataset into Parquet, one row per image, on Ray Data "
        "(embedded by default, a cluster with --address).",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="a directory, a glob, a list file (.txt), or a URI (s3://…)")
    p.add_argument("--model", "-m", required=True, help="model bundle directory")
    p.add_argument("--out", required=True, metavar="DEST", help="Parquet directory (local or URI); re-runs resume")
    add_explanation_options(p)
    p.add_argument("--save-cam", action="store_true", help="store each map at feature resolution (float16) in its row")
    p.add_argument("--overlays", metavar="DIR", help="also write overlay JPEGs here (off by default at this scale)")
    p.add_argument("--alpha", type=fraction, default=0.5, help="overlay opacity from 0 to 1 (with --overlays)")
    add_ray_options(p, CONNECT_TIMEOUT, batch_size=16, rows_per_file=1000)
    args = p.parse_args(argv)
    options = options_from(args, alpha=args.alpha, lowres=args.save_cam)
    try:
        summary = run(args.src, args.model, args.out, options, args.overlays, args.address, args.actors,
                      args.batch_size, args.rows_per_file, args.connect_timeout, args.driver_threads)  # fmt: skip
    except NpcamError as e:
        print(f"npcam dataset: error: {flag_words(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npcam dataset: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    print(
        f"{summary['images']} images: {summary['already_done']} already in {args.out}, {summary['explained']} explained "
        f"now ({summary['errors']} failed; {summary.get('driver', 0)} in this process, "
        f"{summary['explained'] - summary.get('driver', 0)} by {summary.get('actors', 0)} Ray actor(s)) "
        f"in {summary['seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
