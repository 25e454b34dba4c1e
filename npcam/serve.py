"""``npcam serve``: the library pipeline over HTTP, and a web page to look at the maps.

    npcam serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--workers N]

``POST /explain`` takes an image (the raw body, or a multipart file) and
answers with the JSON record (:mod:`npcam.record`) or, with ``format=jpeg|png``,
the overlay; ``GET /model``, ``GET /health`` and the page at ``/``. The README
("npcam serve") has the API table, the status codes and the limits.

The bundle is loaded once. ``--workers`` requests are explained at once, each
with ``cores / workers`` onnxruntime threads, so the cores are used and never
oversubscribed; more requests wait their turn. Ctrl-C or SIGTERM stop the
server after the requests in flight are answered. Needs the ``serve`` extra
(Starlette on uvicorn).
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import os
import signal
import socket
import sys
import time
from importlib import resources
from pathlib import Path

from . import __version__
from .boxes import parse_threshold
from .errors import NpcamError
from .explain import Options, describe, draw, explain
from .files import encode_image
from .image import MAX_PIXELS
from .methods import METHODS

MAX_BODY = 25 * 2**20  # bytes; a 12 MP JPEG is 3-8 MB
DRAIN = 64 * 2**20  # an oversized body up to this size is read to its end before the 413 goes out
log = logging.getLogger("npcam.serve")
GONE = "npcam.client_gone"  # scope key: a function telling whether the client has closed the connection
CLIENT_CLOSED = 499  # the access log's status for a client that went away before its answer (as nginx logs it)


class BadRequest(Exception):
    """An HTTP error with a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def options_from_query(query, max_pixels: int) -> tuple[Options, str]:
    """The explanation options and the response format from the query string; 422 for a bad value."""

    def number(name, kind, default, low=None, high=None):
        text = query.get(name)
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            raise BadRequest(422, f"{name} must be a {kind.__name__}, not {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadRequest(422, f"{name} must be between {low} and {high}, not {value}")
        return value

    def flag(name):
        value = query.get(name)
        return value is not None and value.lower() in ("", "1", "true", "yes", "on")

    fmt = query.get("format", "json").lower()
    if fmt not in ("json", "jpeg", "jpg", "png"):
        raise BadRequest(422, f"format must be json, jpeg or png, not {fmt!r}")
    method = query.get("method")
    if method is not None and method.lower().replace("++", "pp") not in METHODS:
        raise BadRequest(422, f"method must be one of {', '.join(METHODS)}, not {method!r}")
    try:
        threshold = parse_threshold(query.get("threshold", "mean"))
    except ValueError:
        raise BadRequest(
            422, f"threshold must be 'mean' or a fraction in (0, 1], not {query.get('threshold')!r}"
        ) from None
    options = Options(
        classes=(query["class"],) if query.get("class") else (),
        top=number("top", int, 1, 1, 1000),
        method=method,
        alpha=number("alpha", float, 0.5, 0.0, 1.0),
        bbox=flag("bbox"),
        threshold=threshold,
        keep_aspect=flag("keep_aspect"),
        size=number("size", int, None, 1, 4096),
        max_pixels=max_pixels,
    )
    return options, {"jpg": "jpeg"}.get(fmt, fmt)


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


def make_app(model, workers: int = 1, max_body: int = MAX_BODY, max_pixels: int = MAX_PIXELS):
    """The ASGI application (Starlette) serving ``model``."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    limiter, threads = anyio.CapacityLimiter(workers), anyio.CapacityLimiter(workers)
    page = resources.files("npcam").joinpath("static/index.html").read_text(encoding="utf-8")
    about = {
        "npcam": __version__,
        "arch": model.arch,
        "head": model.head.kind,
        "default_method": model.default_method,
        "methods": {
            name: m.summary for name, m in METHODS.items() if not (m.affine_only and model.head.kind != "affine")
        },
        "input_size": model.input_size,
        "fixed_size": model.bundle.fixed_size,
        "classes": len(model.labels),
        "labels": list(model.labels),
        "limits": {"max_body_bytes": max_body, "max_pixels": max_pixels},
        "bundle": {k: v for k, v in model.meta.items() if k not in ("files",)},
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

    def work(data: bytes, name: str, options: Options, fmt: str) -> tuple[bytes, str]:
        try:
            options = options.checked(model)
        except NpcamError as e:
            raise BadRequest(422, str(e)) from None
        try:
            explanation = explain(model, data, options, name=name)
        except NpcamError as e:
            raise BadRequest(400, str(e)) from None
        if fmt == "json":
            return json.dumps(describe(explanation, options)).encode(), "application/json"
        out = io.BytesIO()
        encode_image(draw(explanation, 0, options), fmt.upper(), out)
        return out.getvalue(), f"image/{fmt}"

    async def explain_route(request: Request) -> Response:
        options, fmt = options_from_query(request.query_params, max_pixels)
        data, name = image_from_body(await read_body(request), request.headers.get("content-type", ""))
        if not data:
            raise BadRequest(400, "the request holds no image (send it as the body, or as a multipart file)")
        async with limiter:
            if request.scope.get(GONE, lambda: False)():
                raise ClientDisconnect  # it left while waiting its turn: nobody is waiting for this work
            content, media = await anyio.to_thread.run_sync(work, data, name, options, fmt, limiter=threads)
        return Response(content, media_type=media)

    async def model_route(request: Request) -> Response:
        return JSONResponse(about)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

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
    from .cli import MAX_THREADS, OneLineParser, between
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
        model = Model(args.model or default_model_dir(), threads=max(1, cores // workers))
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
    log.info("npcam serve %s: %s (%s, %d at once, %d onnxruntime thread(s) each)", __version__, url, model.arch, workers,
             max(1, cores // workers))  # fmt: skip
    app = make_app(model, workers, args.max_body, args.max_pixels)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30, lifespan="off")
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


class _Stopped(Exception):
    pass


def _stopped(signum, frame):
    raise _Stopped


if __name__ == "__main__":
    sys.exit(main())
