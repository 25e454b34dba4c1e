"""The resumable engine of ``npcam dataset`` and ``npcam evaluate``: items in, Parquet rows out, on this machine's
cores or a Ray cluster, resumed where a run stopped.

A front-end hands :func:`run_items` its items (dicts with at least ``image`` and ``index``), a picklable
``rows_of(model, item, should_stop)`` that turns one item into rows, and the rows' Arrow schema. Every
Parquet file records the run's stamp (:func:`make_stamp`: bundle, options, version); a new run reads what
``DEST`` holds (:func:`done_images`), refuses results of another model or other options, and does the rest.

Embedded, the driver works on the items at once, from the end of the list (:class:`HeadStart`). Ray's
actors get only the cores its threads leave (none by default, and then Ray is not started: on one
machine they would add Ray's start-up and no capacity); they work from the start of the list while the
driver goes on. Each item is claimed first, by an ``O_EXCL`` file in the run's own folder, so none is done
twice; the driver's rows go to ``driver-*.parquet`` files of their own. Each actor (one onnxruntime
session, one thread) asks for half a CPU, so that Ray's Parquet writers always find room: with whole
CPUs, two actors on two cores starve them and the job hangs. With ``address`` (or ``RAY_ADDRESS``) the
same job runs on an existing cluster with Ray Data.

Needs pyarrow (the ``dataset`` extra), and Ray for runs with actors; ``import npcam`` imports neither.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import bundle as bundle_format
from . import record as records
from .errors import NpcamError
from .progress import Progress
from .version import __version__

# The engine's work: an item's rows, from the model, the item and a should_stop to check between passes.
RowsOf = Callable[..., list]
META_KEY = b"npcam"
ACTOR_CPUS = 0.5
CONNECT_TIMEOUT = 30.0  # seconds to reach a cluster (--connect-timeout); Ray alone would retry for minutes
LOG_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal
DRIVER_PREFIX = "driver-"  # the driver's own Parquet files; written as ".driver-….tmp", then renamed


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
        if info.type == fs.FileType.File and info.base_name.startswith("." + DRIVER_PREFIX):
            filesystem.delete_file(info.path)  # the driver was killed while writing it
            continue
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


def claim(claims: str | None, index: int) -> bool:
    """Take image ``index`` of this run: False if the driver or an actor has it already (always True without claims).

    A claim is a file made with ``O_EXCL`` in the run's ``claims`` folder: of any
    number of processes on this machine, exactly one creates it.
    """
    if claims is None:
        return True
    try:
        os.close(os.open(os.path.join(claims, str(index)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def worker_class(model_dir: str, rows_of: RowsOf, schema: Callable, claims: str | None = None):
    """The actor class: one model per actor, turning a batch of items into rows with ``rows_of``.

    ``rows_of(model, item, should_stop)`` gives an item's rows (any number); ``schema()`` is the
    rows' Arrow schema. With ``claims`` (an embedded run), an item the driver has claimed is skipped.
    """

    class Worker:
        def __init__(self):
            from .model import Model

            self.model = Model(model_dir, threads=1)  # one core per actor; Ray runs one actor per half CPU
            self.schema = schema()

        def __call__(self, batch: dict):
            import pyarrow as pa

            rows = []
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                item = {k: _plain(v) for k, v in zip(keys, values)}
                if claim(claims, int(item["index"])):
                    rows.extend(rows_of(self.model, item, None))
            return pa.Table.from_pylist(rows, schema=self.schema)

    return Worker


def _plain(value):
    """A value of a Ray Data batch (NumPy scalars and strings) as plain Python."""
    return value.item() if hasattr(value, "item") else value


class HeadStart:
    """The driver's share of an embedded run: images from the end of the list, while Ray starts and beside it.

    ``threads`` threads share the driver's model (onnxruntime, Pillow and NumPy
    release the GIL, as in the CLI). Each takes the last image not yet taken and
    claims it (:func:`claim`); the first claim that fails means Ray's actors,
    which go from the start, have got that far, and the driver stops. Its rows
    are written every ``rows_per_file`` rows and at :meth:`finish` to
    ``DEST/driver-<run>-<n>.parquet``, each first under a hidden name and then
    renamed, so a kill leaves no partial file in sight (the next run deletes
    the hidden one). ``items`` are dicts with at least ``image`` and ``index``; ``rows_of(model, item,
    should_stop)`` makes an item's rows (:func:`worker_class`).
    """

    def __init__(self, model, items: list[dict], rows_of: RowsOf, claims: str | None, dest: str, schema,
                 rows_per_file: int, threads: int):  # fmt: skip
        self.model, self.items, self.rows_of, self.claims = model, items, rows_of, claims
        self.schema, self.rows_per_file = schema, rows_per_file
        self.filesystem, self.root = filesystem_and_path(dest)
        self.run = uuid.uuid4().hex[:12]
        self.lock = threading.Lock()  # the next index, the rows, the counts
        self.writing = threading.Lock()  # one file at a time, numbered in order
        self.next = len(items) - 1
        self.rows: list[dict] = []
        self.files = 0
        self.explained = 0
        self.allowed = threads  # threads past this many stop at their next image (set_threads)
        self.halt = threading.Event()  # stop now: multi-pass methods between batches, no more images
        self.failure: BaseException | None = None
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> HeadStart:
        for thread in self.threads:
            thread.start()
        return self

    def front(self) -> int:
        """How many images, from the start of the list, the driver has not taken: Ray's actors' share."""
        with self.lock:
            return self.next + 1

    def set_threads(self, n: int) -> None:
        """Keep only ``n`` threads working (the rest stop after their image)."""
        self.allowed = n

    def wait(self) -> None:
        """Until every thread has stopped (interruptible: Ctrl-C reaches the caller, which stops them)."""
        for thread in self.threads:
            while thread.is_alive():
                thread.join(0.5)

    def finish(self, write: bool = True) -> None:
        """Wait for the threads, then write the remaining rows (none with ``write=False``); re-raise a thread's bug."""
        if not write:
            self.halt.set()
        for thread in self.threads:
            if thread.ident is not None:  # started (they are not when Ray failed to start)
                thread.join()
        if write and self.rows:
            self._write(self.rows)
            self.rows = []
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        """Stop at once: in-flight multi-pass methods between batches (those images get no row), nothing new."""
        self.halt.set()

    def _take(self, thread: int) -> dict | None:
        with self.lock:
            while self.next >= 0 and thread < self.allowed and not self.halt.is_set():
                item = self.items[self.next]
                self.next -= 1
                if claim(self.claims, item["index"]):
                    return item
                self.next = -1  # Ray's actors have got this far: what is left is theirs
            return None

    def _work(self, thread: int) -> None:
        from .cancel import Cancelled

        try:
            while (item := self._take(thread)) is not None:
                try:
                    rows = self.rows_of(self.model, item, self.halt.is_set)
                except Cancelled:
                    return  # interrupted: the next run does this image
                with self.lock:
                    self.rows.extend(rows)
                    self.explained += 1
                    full = len(self.rows) >= self.rows_per_file
                    rows, self.rows = (self.rows, []) if full else ([], self.rows)
                if rows:
                    self._write(rows)
        except BaseException as e:  # a bug, not a bad image: the run fails, as a failing actor fails Ray's job
            self.failure = e
            self.halt.set()

    def _write(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self.writing:
            name = f"{DRIVER_PREFIX}{self.run}-{self.files:05d}.parquet"
            self.files += 1
            hidden, final = f"{self.root}/.{name}.tmp", f"{self.root}/{name}"
            self.filesystem.create_dir(self.root, recursive=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), hidden, filesystem=self.filesystem)
            self.filesystem.move(hidden, final)


def filesystem_and_path(dest: str):
    """pyarrow's filesystem for ``dest`` and the path in it."""
    from pyarrow import fs

    if "://" in dest:
        return fs.FileSystem.from_uri(dest)
    return fs.LocalFileSystem(), str(Path(dest).absolute())


def make_stamp(model, options: dict) -> dict:
    """What every Parquet file of a run records, and what a resumed run must match: bundle, options, version."""
    stamp = {"bundle": bundle_format.digest(model.bundle.meta), "arch": model.bundle.arch, "options": options,
             "npcam": __version__.split(".")[0]}  # fmt: skip
    return json.loads(json.dumps(stamp))  # as it reads back from the files' metadata


def run_items(
    model,
    items: list[dict],
    dest: str,
    stamp: dict,
    rows_of: RowsOf,
    schema: Callable,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int = 16,
    rows_per_file: int = 1000,
    connect_timeout: float = CONNECT_TIMEOUT,
    driver_threads: int | None = None,
    prog: str = "npcam dataset",
    unit: str = "img",
) -> dict:
    """The engine: turn every item (``{image, index, …}``, ``index`` its position) into rows in ``dest``.

    ``rows_of(model, item, should_stop)`` makes an item's rows (picklable, for Ray's actors);
    ``schema()`` is their Arrow schema, stored with ``stamp`` in every file. The driver's
    threads and Ray's actors share the items as :func:`run` describes. Returns the counts:
    ``explained`` (items with rows), ``errors`` (items with an error row), ``driver``, ``actors``, ``recovered``.
    """
    summary = {"explained": 0, "errors": 0, "driver": 0, "actors": 0, "recovered": 0}
    if not items:
        return summary
    schema_with_stamp = schema().with_metadata({META_KEY: json.dumps(stamp).encode()})
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    cores = os.cpu_count() or 1
    threads = (cores if driver_threads is None else driver_threads) if embedded else 0
    # Embedded, Ray's actors would share this machine's cores with the driver's threads: by default they get
    # only the cores the driver leaves, and with none left Ray is not started at all (it would add its
    # start-up and no capacity; docs/performance.md has the measurements).
    pool = (actors if actors is not None else max(0, cores - threads)) if embedded else actors
    if threads == 0 and pool == 0:
        raise NpcamError("no driver threads and no actors: nothing would explain the images")
    if pool != 0 and importlib.util.find_spec("ray") is None:
        raise NpcamError(needs_ray(prog))
    # The run's own folder on this machine: Ray's session files and the claims, removed at the end.
    work = Path(tempfile.mkdtemp(prefix="npcam-run-", dir="/tmp" if Path("/tmp").is_dir() else None))
    head = None
    if threads > 0:
        (work / "claims").mkdir()
        head = HeadStart(model, items, rows_of, str(work / "claims"), dest, schema_with_stamp, rows_per_file, threads)
        if pool == 0:
            head.start()
    shown = _show_progress(len(items), work / "claims", head, unit) if head else None
    ray, ray_up = None, False
    try:
        if pool != 0:
            ray = _start_ray(address, connect_timeout, str(work / "ray"), prog)
            ray_up = True
            if head:
                # Only now: ray.init forks its processes, and a fork while another thread is inside OpenBLAS
                # (its pool busy) hangs both, in the fork and in the BLAS call (seen without OMP_NUM_THREADS=1).
                head.start()
        rest = items[: head.front()] if head and ray_up else [] if head else items
        if rest:
            import ray.data

            pool = pool or max(1, int(ray.cluster_resources().get("CPU", 1)))  # a cluster: one per CPU
            if head:
                ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts the driver's too
            blocks = min(len(rest), max(pool, min(len(rest) // batch_size, 10_000)))
            dataset = ray.data.from_items(rest, override_num_blocks=blocks)
            dataset = dataset.map_batches(
                worker_class(str(model.bundle.path), rows_of, schema, head.claims if head else None),
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool),
                num_cpus=ACTOR_CPUS,
            )
            dataset.write_parquet(
                dest,
                min_rows_per_file=rows_per_file,
                ray_remote_args={"num_cpus": 0.25},
                schema=schema_with_stamp,
            )
        if head:
            head.wait()  # here, not in finish(): Ctrl-C while waiting stops the threads and keeps their rows
    except BaseException:
        if head:
            head.stop()  # an interrupt or a failed job: finish the images in hand, take no more
        raise
    finally:
        if shown:
            shown.set()
        try:
            if head:
                # Rows of finished images are complete results, written whatever happened once Ray was up;
                # before that (Ray missing or broken) the run leaves no rows.
                head.finish(write=ray_up or pool == 0)
        finally:
            if ray is not None and ray_up and address is None:
                ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    wanted = {item["image"] for item in items}
    found = _count(dest, wanted, schema)
    missing = [item for item in items if item["image"] not in found["images"]]
    if missing:  # claimed by an actor's attempt that died (Ray retried it and the claim stood): done here
        HeadStart(model, missing, rows_of, None, dest, schema_with_stamp, rows_per_file, max(1, threads)).start().finish()
        found = _count(dest, wanted, schema)
    summary.update(explained=len(found["images"]), errors=found["errors"], actors=pool or 0,
                   driver=head.explained if head else 0, recovered=len(missing))  # fmt: skip
    return summary


def _show_progress(total: int, claims: Path, head: HeadStart, unit: str = "img") -> threading.Event | None:
    """A progress line counting the items taken (by the driver and the actors): on a terminal, updated in
    place; in a log, a line a minute. Set the event to stop it."""
    progress = Progress(every=LOG_EVERY)
    stop = threading.Event()

    def show():
        while not stop.wait(0.5):
            try:
                taken = len(os.listdir(claims))
            except OSError:
                break
            progress.show(taken, total, f"({head.explained} in this process)", unit=unit)
        progress.clear()

    threading.Thread(target=show, daemon=True).start()
    return stop


def _count(dest: str, wanted: set[str], schema: Callable = records.arrow_schema) -> dict:
    """The rows of ``wanted`` images in ``dest``: how many, the images with rows, and those with an error."""
    import pyarrow.dataset as pds

    filesystem, root = filesystem_and_path(dest)
    # The rows' schema, not one inferred from whichever file comes first (Ray's and the driver's files)
    files = pds.dataset(root, filesystem=filesystem, format="parquet", schema=schema())
    table = files.to_table(columns=["image", "error"])
    mine = [(i, e) for i, e in zip(table.column("image").to_pylist(), table.column("error").to_pylist()) if i in wanted]
    return {"rows": len(mine), "errors": len({i for i, e in mine if e is not None}), "images": {i for i, _ in mine}}


def needs_ray(prog: str) -> str:
    return f"{prog} needs Ray Data and pyarrow: pip install 'npcam[dataset]'"


def require_extra(prog: str) -> None:
    """Refuse at once where pyarrow is not installed (Ray, when a run needs it, is imported while the driver works)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise NpcamError(f"{prog} needs pyarrow: pip install 'npcam[dataset]'") from None


def _start_ray(address: str | None, connect_timeout: float = CONNECT_TIMEOUT, temp: str | None = None,
               prog: str = "npcam dataset"):
    """Ray in this process (temp dir ``temp`` or a new one, this machine's cores, quiet), or connected to ``address``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a single-user local instance: no token warning
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    if embedded:
        # Ray's services have no authentication by default: the embedded instance listens on loopback only.
        # Ray does that where it runs without clusters (macOS, Windows); this flag asks for it here, and the
        # processes Ray starts inherit it.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
        import ray.data
    except ImportError:
        raise NpcamError(needs_ray(prog)) from None

    if embedded:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray was imported: earlier, if this process did

    # Ray Data sets up its loggers when imported: quiet them after that (progress bars stay on a terminal).
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if embedded:
        temp = temp or tempfile.mkdtemp(prefix="npcam-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _temp_dir=temp,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
            # No idle workers started ahead: on a small machine each costs a core-second of imports, and
            # Ray Data starts the processes it needs (the actors, the writers) itself.
            _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
        )
    else:
        _connect(ray, address or os.environ["RAY_ADDRESS"], connect_timeout, prog)
    return ray


def _connect(ray, address: str, timeout: float, prog: str = "npcam dataset") -> None:
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
        os.write(stderr, f"{prog}: error: no Ray cluster answered at {address} within {timeout:g} s "
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
