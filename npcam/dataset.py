"""Explain whole datasets on Ray Data: ``python -m npcam.dataset SRC --model DIR --out DEST`` (or ``npcam dataset``).

Each image becomes one row of Parquet in ``DEST``: the same record that
``npcam --json`` prints (:mod:`npcam.record`), or ``{image, error}`` for an
image that failed. With no ``--address``, Ray starts inside this process on
this machine's cores; ``--address auto|HOST:PORT`` (or ``RAY_ADDRESS``) runs
the same job on an existing cluster.

The sources it takes, resuming and the refusal of mixed results are described
in docs/dataset-and-serve.md. Each actor (one onnxruntime session, one thread)
asks for half a CPU, so that Ray's Parquet writers always find room: with whole
CPUs, two actors on two cores starve them and the job hangs.

Needs the ``dataset`` extra (``pip install .[dataset]``: Ray Data and pyarrow);
``import npcam`` never imports Ray.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from . import __version__
from . import bundle as bundle_format
from . import record as records
from .errors import NpcamError
from .explain import Options
from .files import IMAGE_SUFFIXES, find_images, plan_outputs

META_KEY = b"npcam"
ACTOR_CPUS = 0.5
CONNECT_TIMEOUT = 30.0  # seconds to reach a cluster (--connect-timeout); Ray alone would retry for minutes


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


def done_images(dest: str, stamp: dict) -> set[str]:
    """The images ``dest`` already holds rows for; removes files a killed run cut short.

    Refuses (NpcamError) when ``dest`` holds results of another model or other options.
    """
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, root = (
        fs.FileSystem.from_uri(dest) if "://" in dest else (fs.LocalFileSystem(), str(Path(dest).absolute()))
    )
    if filesystem.get_file_info(root).type == fs.FileType.NotFound:
        return set()
    done: set[str] = set()
    for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        if info.type != fs.FileType.File or not info.path.endswith(".parquet"):
            continue
        try:
            with filesystem.open_input_file(info.path) as f:
                table = pq.ParquetFile(f)
                theirs = json.loads((table.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
                images = table.read(columns=["image"]).column("image").to_pylist()
        except Exception:  # no footer, or not Parquet: written by a run that was killed
            filesystem.delete_file(info.path)
            continue
        if theirs != stamp:
            what = "another model" if theirs.get("bundle") != stamp["bundle"] else "other options"
            raise NpcamError(f"{dest}: holds results made with {what} ({info.path}); choose another --out")
        done.update(images)
    return done


def explainer_class(model_dir: str, options: Options):
    """The actor class: one model per actor, explaining a batch of ``{image, overlay}`` rows into records."""

    class Explainer:
        def __init__(self):
            from .model import Model

            self.model = Model(model_dir, threads=1)  # one core per actor; Ray runs one actor per half CPU
            self.schema = records.arrow_schema()

        def __call__(self, batch: dict):
            import pyarrow as pa

            from .explain import describe, explain, write
            from .files import Job

            rows = []
            for image, overlay in zip(batch["image"], batch["overlay"]):
                image = str(image)
                try:
                    explanation = explain(self.model, read_bytes(image), options, name=image, pixels=bool(overlay))
                    if overlay:
                        rows.append(write(explanation, Job(Path(image), Path(overlay), options.top > 1), options))
                    else:
                        rows.append(describe(explanation, options))
                except NpcamError as e:
                    rows.append(records.error(image, str(e)))
                except (OSError, MemoryError) as e:
                    rows.append(records.error(image, f"{image}: {type(e).__name__}: {e}"))
            return pa.Table.from_pylist(rows, schema=self.schema)

    return Explainer


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
) -> dict:
    """Explain every image of ``src`` not yet in ``dest``; returns a summary (counts, seconds).

    A cluster (``address``, or ``$RAY_ADDRESS``) that does not answer within ``connect_timeout`` seconds
    ends the process with exit code 2 and one line on stderr (Ray's connect cannot be interrupted).
    """
    from .model import Model

    _require_extra()
    started = time.monotonic()
    model = Model(model_dir, threads=1)
    options = options.checked(model)
    stamp = json.loads(
        json.dumps(
            {
                "bundle": bundle_format.digest(model.bundle.meta),
                "arch": model.bundle.arch,
                "options": {k: v for k, v in asdict(options).items() if k != "max_pixels"},
                "npcam": __version__.split(".")[0],
            }
        )
    )  # as it reads back from the files' metadata
    images = list_images(src)
    done = done_images(dest, stamp)
    todo = [i for i in images if i not in done]
    summary = {"images": len(images), "already_done": len(images) - len(todo), "explained": 0, "errors": 0}
    if not todo:
        summary["seconds"] = time.monotonic() - started
        return summary
    if overlays:
        root = src if Path(src).is_dir() else None
        jobs = plan_outputs([_input(i, root) for i in todo], overlays.rstrip("/") + "/", per_class=options.top > 1)
        outputs = [str(j.output) for j in jobs]
    else:
        outputs = [""] * len(todo)
    ray = _start_ray(address, connect_timeout)
    try:
        import ray.data

        cpus = int(ray.cluster_resources().get("CPU", 1))
        pool = actors or max(1, cpus)
        schema = records.arrow_schema().with_metadata({META_KEY: json.dumps(stamp).encode()})
        items = [{"image": i, "overlay": o} for i, o in zip(todo, outputs)]
        blocks = min(len(items), max(pool, min(len(items) // batch_size, 10_000)))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        dataset = dataset.map_batches(
            explainer_class(str(model.bundle.path), options),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=ACTOR_CPUS,
        )
        dataset.write_parquet(
            dest,
            min_rows_per_file=rows_per_file,
            ray_remote_args={"num_cpus": 0.25},
            schema=schema,
        )
    finally:
        if address is None:
            ray.shutdown()
    rows = _count(dest, set(todo))
    summary.update(explained=rows["rows"], errors=rows["errors"], seconds=time.monotonic() - started, actors=pool)
    return summary


def _input(image: str, root: str | None):
    from .files import Input

    return Input(Path(image), Path(root) if root else None)


def _count(dest: str, wanted: set[str]) -> dict:
    import pyarrow.dataset as pds

    table = pds.dataset(dest, format="parquet").to_table(columns=["image", "error"])
    mine = [e for i, e in zip(table.column("image").to_pylist(), table.column("error").to_pylist()) if i in wanted]
    return {"rows": len(mine), "errors": sum(e is not None for e in mine)}


def _require_extra() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise NpcamError("npcam dataset needs Ray Data and pyarrow: pip install 'npcam[dataset]'") from None


def _start_ray(address: str | None, connect_timeout: float = CONNECT_TIMEOUT):
    """Ray in this process (own temp dir, this machine's cores, quiet), or connected to ``address``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a single-user local instance: no token warning
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    if embedded:
        # Ray's services have no authentication by default: the embedded instance listens on loopback only.
        # Ray does that where it runs without clusters (macOS, Windows); this flag asks for it here, and the
        # processes Ray starts inherit it.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray.data

    if embedded:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray was imported: earlier, if this process did

    # Ray Data sets up its loggers when imported: quiet them after that (progress bars stay on a terminal).
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if embedded:
        temp = tempfile.mkdtemp(prefix="npcam-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _temp_dir=temp,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
        )
    else:
        _connect(ray, address or os.environ["RAY_ADDRESS"], connect_timeout)
    return ray


def _connect(ray, address: str, timeout: float) -> None:
    """``ray.init(address)``, bounded: one NpcamError line, or exit 2 once ``timeout`` seconds have passed.

    Ray retries an unreachable cluster for minutes, printing its own warnings; a plain TCP connection
    first answers at once for a port where nothing listens. Ray's connect runs in C++ and cannot be
    interrupted, so the watchdog ends the process (nothing has been written by then). Ray's warnings
    during the attempt go to a file, not the terminal.
    """
    started = time.monotonic()
    _probe(address, timeout)
    stderr = os.dup(2)

    def give_up():
        os.write(stderr, f"npcam dataset: error: no Ray cluster answered at {address} within {timeout:g} s "
                 f"(--connect-timeout)\n".encode())  # fmt: skip
        os._exit(2)

    watchdog = threading.Timer(max(0.0, timeout - (time.monotonic() - started)), give_up)
    watchdog.daemon = True
    with tempfile.TemporaryFile() as ray_says:
        os.dup2(ray_says.fileno(), 2)
        try:
            watchdog.start()
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError... for a bad address
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NpcamError(f"cannot connect to the Ray cluster at {address} ({first})") from None
        finally:
            watchdog.cancel()
            os.dup2(stderr, 2)
            os.close(stderr)


def _probe(address: str, timeout: float) -> None:
    """For ``HOST:PORT`` (or ``ray://HOST:PORT``): refuse at once when nothing accepts TCP connections there."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray parses itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except socket.timeout:
        raise NpcamError(f"cannot reach a Ray cluster at {address}: no answer within {timeout:g} s") from None
    except (OSError, OverflowError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise NpcamError(f"cannot reach a Ray cluster at {address} ({reason})") from None


def main(argv: list[str] | None = None) -> int:
    from .arguments import (
        OneLineParser,
        add_explanation_options,
        between,
        flag_words,
        fraction,
        methods_help,
        options_from,
        seconds,
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
    p.add_argument("--address", help="a Ray cluster: auto or HOST:PORT (default: $RAY_ADDRESS, else Ray in-process)")
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a cluster that does not answer within this time (default {CONNECT_TIMEOUT:g})",
    )
    p.add_argument("--actors", type=between(1), help="model actors (default: one per CPU of the cluster)")
    p.add_argument("--batch-size", type=between(1), default=16, help="images per actor call (default 16)")
    p.add_argument(
        "--rows-per-file", type=between(1), default=1000, help="rows per Parquet file at least (default 1000)"
    )
    args = p.parse_args(argv)
    options = options_from(args, alpha=args.alpha, lowres=args.save_cam)
    try:
        summary = run(args.src, args.model, args.out, options, args.overlays, args.address, args.actors,
                      args.batch_size, args.rows_per_file, args.connect_timeout)  # fmt: skip
    except NpcamError as e:
        print(f"npcam dataset: error: {flag_words(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npcam dataset: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    print(
        f"{summary['images']} images: {summary['already_done']} already in {args.out}, {summary['explained']} explained "
        f"now ({summary['errors']} failed) in {summary['seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
