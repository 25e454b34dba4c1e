"""`npcam serve` over real HTTP on loopback: every endpoint, every error, concurrent requests, a graceful stop."""

from __future__ import annotations

import io
import json
import signal
import threading
import uuid

import numpy as np
import pytest
from conftest import PHOTOS, Server, http, synthetic_image
from PIL import Image

pytest.importorskip("starlette", reason="npcam serve needs the serve extra: pip install '.[serve]'")
pytest.importorskip("uvicorn", reason="npcam serve needs the serve extra: pip install '.[serve]'")

import npcam  # noqa: E402


@pytest.fixture(scope="module")
def server(bundle):
    running = Server(bundle, "--max-body", "2000000", "--max-pixels", "3000000")
    yield running
    assert running.stop() == 0 and "stopped" in running.log[-1]


def post(server, query: str, body: bytes, headers=None):
    return http(f"{server.url}/explain{query}", body, headers, method="POST")


def expected(model, photo, **options) -> dict:
    """What the library gives for the same image and options, named as the server names uploads."""
    opts = npcam.Options(**options).checked(model)
    return npcam.describe(npcam.explain(model, photo.read_bytes(), opts, name="upload"), opts)


def test_health_model_and_page(server, model):
    assert http(f"{server.url}/health") == (200, "application/json", b'{"status":"ok"}')
    status, kind, body = http(f"{server.url}/model")
    about = json.loads(body)
    assert status == 200 and about["labels"] == list(model.labels) and about["default_method"] == "cam"
    assert about["limits"] == {"max_body_bytes": 2_000_000, "max_pixels": 3_000_000} and "scorecam" in about["methods"]
    status, kind, body = http(f"{server.url}/")
    assert (
        status == 200
        and kind.startswith("text/html")
        and b'id="heat"' in body
        and b"http" not in body.split(b"<script>")[0].lower().replace(b"http-equiv", b"")
    )


def test_explain_raw_body_gives_the_record(server, model):
    status, kind, body = post(server, "?top=3&bbox=1", PHOTOS[0].read_bytes())
    assert status == 200 and kind == "application/json"
    assert json.loads(body) == expected(model, PHOTOS[0], top=3, bbox=True)


def test_explain_multipart(server, model):
    boundary = uuid.uuid4().hex
    data = PHOTOS[1].read_bytes()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="coffee.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, _, answer = post(
        server, "?method=layercam", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    record = json.loads(answer)
    assert status == 200 and record["image"] == "coffee.jpg" and record["method"] == "layercam"
    assert {k: v for k, v in record.items() if k != "image"} == {
        k: v for k, v in expected(model, PHOTOS[1], method="layercam").items() if k != "image"
    }


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_explain_as_an_image(server, model, fmt):
    status, kind, body = post(server, f"?format={fmt}&class=281&alpha=0.7&bbox=1", PHOTOS[0].read_bytes())
    picture = Image.open(io.BytesIO(body))
    assert status == 200 and kind == f"image/{fmt}" and picture.size == (451, 300) and picture.format == fmt.upper()
    if fmt == "png":  # lossless: exactly the library's picture
        options = npcam.Options(classes=(281,), alpha=0.7, bbox=True).checked(model)
        want = npcam.draw(npcam.explain(model, PHOTOS[0], options), 0, options)
        np.testing.assert_array_equal(np.asarray(picture), want)


@pytest.mark.parametrize(
    "query, body, status, message",
    [
        ("", b"", 400, "holds no image"),
        ("", b"this is not an image", 400, "upload: not an image Pillow can read"),
        ("", None, 400, "over the limit of 3,000,000"),  # a 4 MP image: over --max-pixels
        ("?class=no+such+class", None, 422, "no class is named 'no such class'"),
        ("?class=5000", None, 422, "out of range"),
        ("?alpha=2", None, 422, "alpha must be between 0.0 and 1.0"),
        ("?top=zero", None, 422, "top must be a int"),
        ("?format=gif", None, 422, "format must be json, jpeg or png"),
        ("?method=magic", None, 422, "method must be one of cam"),
        ("?threshold=3", None, 422, "threshold must be 'mean'"),
        ("?size=8", None, 422, "must be at least 64"),
    ],
)
def test_errors_have_the_right_status_and_one_line(server, query, body, status, message):
    if body is None:
        body = PHOTOS[0].read_bytes() if "limit" not in message else _flat_png(2000, 2000)
    got, kind, answer = post(server, query, body)
    error = json.loads(answer)["error"]
    assert (got, kind) == (status, "application/json") and message in error and "\n" not in error, error


def _flat_png(height, width) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def raw(url: str, request: bytes) -> tuple[int, dict]:
    """Send raw bytes on a socket and read the answer to the end: for answers that come before the body is sent."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_oversized_bodies_get_413(server):
    status, kind, answer = post(server, "", b"x" * 2_000_001)  # urllib sends it all, then reads the answer
    assert (status, json.loads(answer)) == (413, {"error": "the body is 2,000,001 bytes, over the limit of 2,000,000"})
    chunk = b"x" * 1_000_001
    chunked = (b"POST /explain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")  # fmt: skip
    assert raw(server.url, chunked) == (413, {"error": "the body is over the limit of 2,000,000 bytes"})
    huge = b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n"
    assert raw(server.url, huge) == (413, {"error": "the body is 10,000,000,000 bytes, over the limit of 2,000,000"})
    assert http(f"{server.url}/health")[0] == 200


def _png(height, width) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(height, width)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_wrong_paths_and_methods(server):
    assert http(f"{server.url}/nope")[0] == 404
    status, kind, body = http(f"{server.url}/explain")
    assert status == 405 and json.loads(body) == {"error": "GET /explain: Method Not Allowed"}
    assert http(f"{server.url}/health", b"x", method="POST")[0] == 405


def test_concurrent_requests_get_their_own_answers(server, model):
    jobs = [(photo, c) for photo in PHOTOS for c in (None, 3, 281)] * 2
    want = {(p, c): expected(model, p, **({"classes": (c,)} if c else {})) for p, c in set(jobs)}
    answers = [None] * len(jobs)

    def client(i):
        photo, c = jobs[i]
        answers[i] = post(server, f"?class={c}" if c else "", photo.read_bytes())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (photo, c), (status, _, body) in zip(jobs, answers):
        record = json.loads(body)
        assert status == 200 and record["class"] == want[(photo, c)]["class"]
        assert record["score"] == pytest.approx(want[(photo, c)]["score"], abs=1e-6)


def test_nothing_a_request_sends_stops_the_server(server):
    for body in (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"GIF89a" + b"\xff" * 50, _png(1, 1)):
        assert post(server, "", body)[0] in (200, 400)
    assert http(f"{server.url}/health")[0] == 200


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_stopping_answers_the_requests_in_flight(bundle, signal_number):
    running = Server(bundle, "--workers", "1")
    answer = {}
    slow = threading.Thread(target=lambda: answer.update(r=post(running, "?method=scorecam", PHOTOS[0].read_bytes())))
    slow.start()
    import time

    time.sleep(0.5)  # the Score-CAM request (512 trunk passes) is in flight
    assert running.stop(signal_number) == 0
    slow.join()
    assert answer["r"][0] == 200 and json.loads(answer["r"][2])["method"] == "scorecam"
    assert "POST /explain?method=scorecam 200" in running.log[-1] and "stopped" in running.log[-1]
    assert "Traceback" not in running.log[-1]


ABANDONED = 300


def test_clients_that_go_away_are_one_line_each_and_never_an_error(bundle):
    """Uploads that announce 100 kB, send a few bytes and close; requests whose client leaves before the
    answer. Each is one access-log line with status 499; no traceback, no 500; the server keeps answering."""
    import socket
    import subprocess
    import time
    from urllib.parse import urlparse

    running = Server(bundle, "--workers", "1")
    lines: list[str] = []
    answers: list = []
    reader = threading.Thread(target=lambda: lines.extend(running.process.stderr), daemon=True)
    reader.start()  # the log is read as it comes, so that a flood of it could never block the server
    where = urlparse(running.url)
    head = b"POST /explain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    try:
        for _ in range(ABANDONED):
            with socket.create_connection(("127.0.0.1", where.port), timeout=10) as sock:
                sock.sendall(head + b"\x89PNG\r\n\x1a\n" + bytes(40))
        photo = PHOTOS[0].read_bytes()
        # Clients that send a whole upload and leave at once, before any answer could be sent. A Score-CAM
        # request (512 trunk passes) from a client that stays, sent a second earlier, usually holds the one
        # worker meanwhile, so that these leave while they wait their turn; either way each is a 499.
        staying = threading.Thread(target=lambda: answers.append(post(running, "?method=scorecam&size=128", photo)))
        staying.start()
        time.sleep(1.0)
        left = 3
        for _ in range(left):
            with socket.create_connection(("127.0.0.1", where.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /explain?top=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(photo)
                )
                sock.sendall(photo)
        assert http(f"{running.url}/health") == (200, "application/json", b'{"status":"ok"}')
        staying.join()
        assert answers[0][0] == 200 and json.loads(answers[0][2])["method"] == "scorecam"
        status, _, body = post(running, "", photo)
        assert status == 200 and json.loads(body)["method"] == "cam"
    finally:
        running.process.send_signal(signal.SIGTERM)
        try:
            code = running.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            running.process.kill()
            raise
        reader.join(timeout=10)
    assert code == 0
    log = "".join(running.log + lines)
    assert "Traceback" not in log and " 500 " not in log and "rror" not in log, log[-3000:]
    explains = [line for line in log.splitlines() if " POST /explain" in line]
    closed = [line for line in explains if " POST /explain 499 0 " in line]
    late = [line for line in explains if " POST /explain?top=2 499 0 " in line]
    assert len(closed) == ABANDONED and len(late) == left, log[-3000:]
    assert sorted(line.split()[4:6] for line in explains if line not in closed + late) == [
        ["/explain", "200"],
        ["/explain?method=scorecam&size=128", "200"],
    ]
    assert len(log.splitlines()) == len(explains) + 3  # and the start, /health and stop lines


def test_the_access_log_passes_an_apps_own_error_on_as_itself():
    """The disconnect watcher's task group must not wrap a real error (uvicorn logs it, and answers 500)."""
    import asyncio

    from npcam.serve import _AccessLog

    async def app(scope, receive, send):
        await receive()
        raise ValueError("a real bug")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/explain", "query_string": b"", "client": ("127.0.0.1", 1)}
    with pytest.raises(ValueError, match="a real bug"):
        asyncio.run(_AccessLog(app)(scope, receive, send))
