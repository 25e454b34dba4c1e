"""``npcam serve``: the library pipeline over HTTP, and a web page to look at the maps.

    npcam serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--workers N]
                [--methods a,b] [--expensive-concurrency N] [--timeout SECONDS] [--token-file PATH]

``POST /explain`` takes an image (the raw body, or a multipart file) and
answers with the JSON record (:mod:`npcam.record`) or, with ``format=jpeg|png``,
the overlay; ``GET /model``, ``GET /health`` and the page at ``/``.
docs/dataset-and-serve.md has the API table, the status codes and the limits.

The bundle is loaded once. ``--workers`` requests are explained at once, each
with ``cores / workers`` onnxruntime threads, so the cores are used and never
oversubscribed; more requests wait their turn, up to ``--queue``. Multi-pass
methods (Score-CAM; Ablation-CAM and Recipro-CAM on a graph head) have their own limit and
queue (:class:`Admission`), so they never take the cheap requests' workers; a
full queue answers 503 at once. ``--timeout`` stops a request between the
batches of its passes. Ctrl-C or SIGTERM stop the
server after the requests in flight are answered. Needs the ``serve`` extra
(Starlette on uvicorn).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hmac
import io
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path

from .boxes import parse_threshold
from .detect import CONF, IOU, MAX_DET
from .errors import NpcamError
from .explain import Options, describe, draw, explain
from .files import encode_image
from .image import FINE, MAX_PIXELS, parse_size
from .methods import METHODS, allowed
from .methods import names as method_names
from .methods import resolve as resolve_method
from .version import __version__

MAX_BODY = 25 * 2**20  # bytes; a 12 MP JPEG is 3-8 MB
DRAIN = 64 * 2**20  # an oversized body up to this size is read to its end before the 413 goes out
log = logging.getLogger("npcam.serve")
GONE = "npcam.client_gone"  # scope key: a function telling whether the client has closed the connection
GRACE_MARGIN = 10  # seconds past --timeout that a stopping server waits for its last answers
CLIENT_CLOSED = 499  # the access log's status for a client that went away before its answer (as nginx logs it)


class BadRequest(Exception):
    """An HTTP error with a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


def options_from_query(query, max_pixels: int, max_side: int | None = None) -> tuple[Options, str]:
    """The explanation options and the response format from the query string; 422 for a bad value.

    ``max_side`` is the server's (``--max-side``): the default and the largest a request may ask for.
    """

    def number(name, kind, default):
        text = query.get(name)
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            raise BadRequest(422, f"{name} must be a {kind.__name__}, not {text!r}") from None
        return value  # its range is checked once, by Options.checked

    def input_size():
        text = query.get("size")
        if text is None:
            return None
        if text.strip().lower() == FINE:
            return FINE
        try:
            size = parse_size(text)
        except ValueError as e:
            raise BadRequest(422, f"size {e}") from None
        return size

    def flag(name, default=False):
        value = query.get(name)
        if value is None:
            return default
        return value.lower() in ("", "1", "true", "yes", "on")

    fmt = query.get("format", "json").lower()
    if fmt not in ("json", "jpeg", "jpg", "png"):
        raise BadRequest(422, f"format must be json, jpeg or png, not {fmt!r}")
    method = query.get("method")
    if method is not None:
        try:
            method = resolve_method(method).name
        except NpcamError:
            raise BadRequest(422, f"method must be one of {method_names()}, not {method!r}") from None
    try:
        threshold = parse_threshold(query.get("threshold", "mean"))
    except ValueError:
        raise BadRequest(
            422, f"threshold must be 'mean' or a fraction in (0, 1], not {query.get('threshold')!r}"
        ) from None
    options = Options(
        classes=(query["class"],) if query.get("class") else (),
        top=number("top", int, 1),
        method=method,
        alpha=number("alpha", float, 0.5),
        bbox=flag("bbox"),
        threshold=threshold,
        keep_aspect=flag("keep_aspect"),
        size=input_size(),
        max_pixels=max_pixels,
        max_side=_smaller(number("max_side", int, None), max_side),
        detection=number("detection", int, None),
        conf=number("conf", float, CONF),
        iou=number("iou", float, IOU),
        max_det=number("max_det", int, MAX_DET),
        boxes=flag("boxes", default=True),
        masks=number("masks", int, Options.masks),
        mask_cells=number("mask_cells", int, Options.mask_cells),
        seed=number("seed", int, Options.seed),
    )
    return options, {"jpg": "jpeg"}.get(fmt, fmt)


def _smaller(asked: int | None, cap: int | None) -> int | None:
    """The request's max_side within the server's; a bad value (< 1) is left for Options.checked to refuse."""
    if asked is None or cap is None:
        return cap if asked is None else asked
    return asked if asked < 1 else min(asked, cap)


def image_from_body(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The image bytes and a name for it: the raw body, or the first file of a multipart form."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body, "upload"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    if not message.is_multipart():
        raise BadRequest(400, "the multipart body cannot be parsed")
    for part in message.iter_parts():
        if part.get_filename() is not None or part.get_param("name", header="content-disposition") == "image":
            return part.get_payload(decode=True) or b"", part.get_filename() or "upload"
    raise BadRequest(400, "the multipart form holds no file")


class Admission:
    """Admission control for one class of requests: ``limit`` run at once, ``queue`` more may wait.

    A request beyond that is refused at once (503) with a Retry-After, rather
    than joining a queue that makes everyone wait. One per class (cheap,
    expensive), so expensive requests never hold the cheap ones' slots. Lives
    on the server's event loop: the counters need no lock.
    """

    def __init__(self, name: str, limit: int, queue: int, flags: str):
        import anyio

        self.name, self.limit, self.queue, self.flags = name, limit, queue, flags
        self.running = self.waiting = 0
        self.mean_seconds: float | None = None  # recent requests' time in a slot, for Retry-After
        self._slots = anyio.Semaphore(limit)

    def state(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "limit": self.limit, "queue": self.queue}

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent mean time per request."""
        per_request = self.mean_seconds or 1.0
        return max(1, math.ceil(per_request * (self.waiting + 1) / self.limit))

    async def run(self, deadline: float | None, timeout: float | None, start: Callable[[], Awaitable]):
        """``await start()`` in a slot; 503 if the queue is full, 504 if no slot frees before ``deadline``."""
        import anyio

        if self.running + self.waiting >= self.limit + self.queue:
            seconds = self.retry_after()
            raise BadRequest(
                503,
                f"busy: {self.running} {self.name} request(s) running and {self.waiting} waiting, as many as this "
                f"server takes ({self.flags}); retry in {seconds} s",
                {"Retry-After": str(seconds)},
            )
        self.waiting += 1
        try:
            with anyio.move_on_after(None if deadline is None else deadline - time.monotonic()) as waited:
                await self._slots.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:  # the acquire was cancelled: no slot is held
            raise _timed_out(timeout, "waiting for a free slot")
        self.running += 1
        began = time.monotonic()
        try:
            return await start()
        finally:
            self.running -= 1
            self._slots.release()
            seconds = time.monotonic() - began
            self.mean_seconds = seconds if self.mean_seconds is None else 0.8 * self.mean_seconds + 0.2 * seconds


def _timed_out(timeout: float | None, where: str) -> BadRequest:
    return BadRequest(504, f"the request took over the time limit of {timeout:g} s (--timeout), {where}")


def bearer_check(token: str | None):
    """A function of the request that raises 401 unless it carries ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode() if token else None

    def check(request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):  # constant time: no guessing it byte by byte
            message = "this server needs its token: send 'Authorization: Bearer <token>'"
            raise BadRequest(401, message if not given else "the token is wrong", {"WWW-Authenticate": "Bearer"})

    return check


def allowed_methods(model, names: str | None) -> list[str]:
    """The methods this deployment offers: those of ``--methods a,b,c`` (default: all the model's head allows)."""
    if names is None:
        return allowed(model.head.kind)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    if not wanted:
        raise NpcamError("--methods names no method")
    try:
        return list(dict.fromkeys(resolve_method(name, model.head.kind, model.bundle.path).name for name in wanted))
    except NpcamError as e:
        raise NpcamError(f"--methods: {e}") from None


def read_token(path: Path | None) -> str | None:
    """The bearer token from ``--token-file`` or else ``$NPCAM_TOKEN`` (never from argv, which others can read)."""
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise NpcamError(f"{path}: cannot read the token file ({getattr(e, 'strerror', None) or e})") from None
        where = str(path)
    else:
        token, where = os.environ.get("NPCAM_TOKEN", "").strip(), "NPCAM_TOKEN"
        if not token:
            return None
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise NpcamError(f"{where}: the token must be one line of printable ASCII without spaces")
    return token


def make_app(
    model,
    workers: int = 1,
    max_body: int = MAX_BODY,
    max_pixels: int = MAX_PIXELS,
    *,
    max_side: int | None = None,
    queue: int = 16,
    expensive_concurrency: int = 1,
    expensive_queue: int = 2,
    timeout: float | None = None,
    methods: list[str] | None = None,
    token: str | None = None,
):
    """The ASGI application (Starlette) serving ``model``."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from .cancel import Cancelled

    usable = allowed_methods(model, None)
    offered = methods or usable
    default_method = model.default_method
    default_method = default_method if default_method in offered else offered[0]
    expensive = [name for name in offered if METHODS[name].multi_pass(model.head.kind)]
    cheap_slots = Admission("cheap", workers, queue, f"--workers {workers}, --queue {queue}")
    expensive_slots = Admission(
        "multi-pass",
        expensive_concurrency,
        expensive_queue,
        f"--expensive-concurrency {expensive_concurrency}, --expensive-queue {expensive_queue}",
    )
    limiter = anyio.CapacityLimiter(workers + expensive_concurrency)  # threads: every slot of both classes
    authorize = bearer_check(token)
    page = resources.files("npcam").joinpath("static/index.html").read_text(encoding="utf-8")
    about = {
        "npcam": __version__,
        "arch": model.bundle.arch,
        "task": model.bundle.task,
        # a detector's defaults of which detections are kept (a request's conf, iou and max_det)
        "detect": {"conf": CONF, "iou": IOU, "max_det": MAX_DET} if model.bundle.task == "detect" else None,
        "head": model.head.kind,
        "default_method": default_method,
        "methods": {name: METHODS[name].summary for name in offered},
        "input_size": model.bundle.input_size,
        "fixed_size": model.bundle.fixed_size,
        "classes": len(model.labels),
        "labels": list(model.labels),
        "limits": {"max_body_bytes": max_body, "max_pixels": max_pixels, "max_side": max_side},
        "serving": {
            "timeout_seconds": timeout,
            "multi_pass_methods": expensive,
            "cheap": {"limit": workers, "queue": queue},
            "multi_pass": {"limit": expensive_concurrency, "queue": expensive_queue},
        },
        "bundle": {k: v for k, v in model.bundle.meta.items() if k not in ("files",)},
    }

    async def read_body(request: Request) -> bytes:
        """The body, at most ``max_body`` bytes; 413 beyond that.

        A body up to DRAIN bytes is read to its end (and dropped) before the 413
        goes out, so clients that send everything before reading (urllib,
        requests) see the answer instead of a reset connection.
        """
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > max_body
        if too_big and int(declared) > DRAIN:
            raise BadRequest(413, f"the body is {int(declared):,} bytes, over the limit of {max_body:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_body:
                chunks.append(chunk)
            elif size > DRAIN:
                break
        if too_big:
            raise BadRequest(413, f"the body is {int(declared):,} bytes, over the limit of {max_body:,}")
        if size > max_body:
            raise BadRequest(413, f"the body is over the limit of {max_body:,} bytes")
        return b"".join(chunks)

    def work(
        data: bytes, name: str, options: Options, fmt: str, deadline: float | None, abandoned: threading.Event
    ) -> tuple[bytes, str]:
        try:
            options = options.checked(model)
        except NpcamError as e:
            raise BadRequest(422, str(e)) from None

        def should_stop() -> bool:
            return abandoned.is_set() or (deadline is not None and time.monotonic() >= deadline)

        try:
            # A JSON answer needs no overlay: a JPEG then decodes only as large as the network needs.
            explanation = explain(model, data, options, name=name, pixels=fmt != "json", should_stop=should_stop)
        except NpcamError as e:
            raise BadRequest(400, str(e)) from None
        except Cancelled:
            if deadline is not None and time.monotonic() >= deadline:
                raise _timed_out(timeout, f"so its {options.method} passes were stopped") from None
            # Abandoned: the client left, or the server is stopping and could wait no longer.
            raise BadRequest(503, "the server is stopping; send the request again", {"Retry-After": "1"}) from None
        if fmt == "json":
            return json.dumps(describe(explanation, options)).encode(), "application/json"
        out = io.BytesIO()
        encode_image(draw(explanation, 0, options), fmt.upper(), out)
        return out.getvalue(), f"image/{fmt}"

    def offered_method(options: Options) -> str:
        """The request's method, resolved; 403 for one this deployment does not offer (``--methods``)."""
        name = options.method or default_method
        if name not in offered and name in usable:  # one the head cannot take gets its 422 from Options.checked
            raise BadRequest(
                403, f"method {name} is not offered by this server (--methods); choose one of {', '.join(offered)}"
            )
        return name

    async def explain_route(request: Request) -> Response:
        authorize(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        options, fmt = options_from_query(request.query_params, max_pixels, max_side)
        options = replace(options, method=offered_method(options))
        data, name = image_from_body(await read_body(request), request.headers.get("content-type", ""))
        if not data:
            raise BadRequest(400, "the request holds no image (send it as the body, or as a multipart file)")
        slots = expensive_slots if options.method in expensive else cheap_slots
        abandoned = threading.Event()

        async def start():
            if request.scope.get(GONE, lambda: False)():
                raise ClientDisconnect  # it left while waiting its turn: nobody is waiting for this work
            try:
                return await anyio.to_thread.run_sync(
                    work, data, name, options, fmt, deadline, abandoned, limiter=limiter
                )
            except BaseException:  # cancelled (the graceful stop ran out of time): stop the passes too
                abandoned.set()
                raise

        content, media = await slots.run(deadline, timeout, start)
        return Response(content, media_type=media)

    async def model_route(request: Request) -> Response:
        authorize(request)
        return JSONResponse(about)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "cheap": cheap_slots.state(), "multi_pass": expensive_slots.state()})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(
            {"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code
        )

    async def gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away (mid-upload, or while queued): nobody reads this answer; the access log says 499.
        return Response(status_code=CLIENT_CLOSED)

    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    app = Starlette(
        routes=[
            Route("/explain", explain_route, methods=["POST"]),
            Route("/model", model_route, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ],
        exception_handlers={
            BadRequest: bad_request,
            HTTPException: http_error,
            ClientDisconnect: gone,
            Exception: crash,
        },
    )
    return _AccessLog(app)


class _AccessLog:
    """ASGI middleware: one line per request, ``client method path status bytes ms``.

    A client that closed the connection before the whole answer was sent (mid-upload, while its request
    waited its turn, or while its image was being explained) is logged with status 499 (nginx's "client
    closed request") and the bytes sent before it left.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import anyio

        start, seen = time.perf_counter(), {"status": 0, "bytes": 0, "answered": False, "closed": False}

        async def watch():
            # Once the body is in, the server's next message is the disconnect: at once if the client
            # left, else when the answer is complete (the server says so by then too).
            if (await receive())["type"] == "http.disconnect" and not seen["answered"]:
                seen["closed"] = True

        async def receiving():
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["closed"] = True
            elif not message.get("more_body", False):
                watchers.start_soon(watch)
            return message

        async def sending(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and not seen["closed"]:  # else the server drops it
                seen["bytes"] += len(message.get("body", b""))
                seen["answered"] = seen["answered"] or not message.get("more_body", False)
            await send(message)

        error = None
        try:
            async with anyio.create_task_group() as watchers:
                try:
                    await self.app({**scope, GONE: lambda: seen["closed"]}, receiving, sending)
                except BaseException as e:  # raised again below as itself, not wrapped by the task group
                    error = e
                watchers.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            if seen["closed"]:
                seen["status"] = CLIENT_CLOSED
            client = scope.get("client") or ("-", 0)
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            log.info(
                "%s %s %s%s %d %d %.1f ms", client[0], scope["method"], scope["path"], query, seen["status"], seen["bytes"],
                (time.perf_counter() - start) * 1000,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from .arguments import MAX_THREADS, OneLineParser, between
    from .model import Model, default_model_dir

    p = OneLineParser(prog="npcam serve", description="Serve npcam over HTTP, with a web page at /.")
    p.add_argument("--model", "-m", type=Path, help="model bundle directory (default: as for npcam)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=between(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--workers", type=between(1, MAX_THREADS), help="requests explained at once (default: one per core)")
    p.add_argument(
        "--max-body", type=between(1), default=MAX_BODY, help=f"largest request body in bytes (default {MAX_BODY:,})"
    )
    p.add_argument("--max-pixels", type=between(1), default=MAX_PIXELS, help=f"largest image (default {MAX_PIXELS:,})")
    p.add_argument("--max-side", type=between(1), metavar="N", help="overlays (format=jpeg|png) at most N pixels on "
                   "their long side, and the most a request's max_side may ask for (default: the photo's size)")  # fmt: skip
    add_admission_options(p)
    args = p.parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print("npcam serve: error: needs Starlette and uvicorn: pip install 'npcam[serve]'", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        token = read_token(args.token_file)
        model = Model(args.model or default_model_dir(), threads=max(1, cores // workers))
        offered = allowed_methods(model, args.methods)
    except NpcamError as e:
        print(f"npcam serve: error: {e}", file=sys.stderr)
        return 2
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)  # connections queue from now on, so the URL logged below is ready for them
    except (OSError, UnicodeError, ValueError) as e:  # a host name that is not one: UnicodeError from IDNA
        reason = getattr(e, "strerror", None) or e
        print(f"npcam serve: error: cannot listen on {args.host}:{args.port} ({reason})", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}/" if family == socket.AF_INET6 else f"http://{host}:{port}/"
    log.info("npcam serve %s: %s (%s, %d at once, %d onnxruntime thread(s) each)", __version__, url, model.bundle.arch, workers,
             max(1, cores // workers))  # fmt: skip
    if token is None and not _loopback(host):
        log.warning("npcam serve: warning: listening on %s without a token: anyone who reaches this port can use "
                    "it (give one with --token-file PATH or NPCAM_TOKEN)", host)  # fmt: skip
    app = make_app(
        model,
        workers,
        args.max_body,
        args.max_pixels,
        max_side=args.max_side,
        queue=args.queue,
        expensive_concurrency=args.expensive_concurrency,
        expensive_queue=args.expensive_queue,
        timeout=args.timeout or None,
        methods=offered,
        token=token,
    )
    # On SIGTERM the requests in flight are answered: with a time limit, each ends within it (so the stop waits
    # that long and a margin); without one, the stop waits for them all (Ctrl-C twice forces it).
    grace = None if args.timeout == 0 else args.timeout + GRACE_MARGIN
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=grace, lifespan="off")
    server = uvicorn.Server(config)
    # On Ctrl-C or SIGTERM uvicorn stops accepting, answers the requests in flight, then raises the
    # signal again: it arrives here, after the graceful part, as KeyboardInterrupt or _Stopped.
    signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    log.info("npcam serve: stopped")
    return 0


def add_admission_options(p: argparse.ArgumentParser) -> None:
    """What the server offers, to whom, and how much at once."""

    from .arguments import MAX_THREADS, between

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number of seconds (0: no limit), not {text!r}")
        return value

    p.add_argument("--queue", type=between(0, 100_000), default=16, help="cheap requests that may wait for a worker; "
                   "beyond that 503 with Retry-After (default 16)")  # fmt: skip
    p.add_argument("--expensive-concurrency", type=between(1, MAX_THREADS), default=1, metavar="N", help="multi-pass requests "
                   "(Score-CAM; Ablation-CAM, Recipro-CAM on a graph head) explained at once, beside the workers (default 1)")  # fmt: skip
    p.add_argument("--expensive-queue", type=between(0, 100_000), default=2, metavar="N",
                   help="multi-pass requests that may wait; beyond that 503 with Retry-After (default 2)")  # fmt: skip
    p.add_argument("--timeout", type=seconds, default=60.0, help="time limit of a request in seconds; "
                   "multi-pass methods stop between batches, and the answer is 504 (default 60; 0: none)")  # fmt: skip
    p.add_argument("--methods", metavar="A,B,...", help="offer only these methods (default: all the model allows)")
    p.add_argument("--token-file", type=Path, metavar="PATH", help="require 'Authorization: Bearer <token>' with "
                   "the token in this file (or in $NPCAM_TOKEN); /health and the page stay open")  # fmt: skip


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Stopped(Exception):
    pass


def _stopped(signum, frame):
    raise _Stopped


if __name__ == "__main__":
    sys.exit(main())
