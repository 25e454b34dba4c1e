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
    status, kind, body = http(f"{server.url}/health")
    assert (status, kind, json.loads(body)["status"]) == (200, "application/json", "ok")
    status, kind, body = http(f"{server.url}/model")
    about = json.loads(body)
    assert status == 200 and about["labels"] == list(model.labels) and about["default_method"] == "cam"
    assert about["limits"] == {"max_body_bytes": 2_000_000, "max_pixels": 3_000_000, "max_side": None} and "scorecam" in about["methods"]
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
        ("?top=1001", None, 422, "top must be between 1 and 1000"),  # the limit of Options, as in the CLI
        ("?format=gif", None, 422, "format must be json, jpeg or png"),
        ("?method=magic", None, 422, "method must be one of cam"),
        ("?threshold=3", None, 422, "threshold must be 'mean'"),
        ("?size=8", None, 422, "must be at least 64"),
        ("?max_side=0&format=png", None, 422, "max_side must be at least 1, not 0"),  # Options' limit, as the CLI's
        ("?max_side=big", None, 422, "max_side must be a int"),
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
    running = Server(bundle, "--workers", "1", "--timeout", "0")  # no time limit: this one must be answered
    answer = {}
    slow = threading.Thread(
        target=lambda: answer.update(r=post(running, "?method=scorecam&size=96", PHOTOS[0].read_bytes()))
    )
    slow.start()
    _poll(running, lambda state: state["multi_pass"]["running"] == 1)  # the Score-CAM (~500 passes) in flight
    assert running.stop(signal_number) == 0
    slow.join()
    assert "r" in answer, running.log
    assert answer["r"][0] == 200 and json.loads(answer["r"][2])["method"] == "scorecam"
    assert "POST /explain?method=scorecam&size=96 200" in running.log[-1] and "stopped" in running.log[-1]
    assert "Traceback" not in running.log[-1]


def _poll(server, until, guard=300):
    """GET /health until ``until(state)`` holds; the guard only stops a hung test."""
    import time

    stop = time.monotonic() + guard
    while time.monotonic() < stop:
        state = json.loads(http(f"{server.url}/health")[2])
        if until(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"/health never showed the expected state: {state}")


def test_a_full_multi_pass_queue_answers_503_and_the_time_limit_stops_the_passes(bundle):
    # One Score-CAM at a time and none waiting; Score-CAM at 320 px (over 500 trunk passes) takes far longer
    # than the 5 s limit on any CPU, so the first request is still in flight when the second comes.
    running = Server(bundle, "--expensive-concurrency", "1", "--expensive-queue", "0", "--timeout", "5")
    photo = PHOTOS[0].read_bytes()
    answer = {}
    held = threading.Thread(target=lambda: answer.update(r=post(running, "?method=scorecam&size=320", photo)))
    held.start()
    _poll(running, lambda state: state["multi_pass"]["running"] == 1)
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(f"{running.url}/explain?method=scorecam", photo), timeout=120)
        raise AssertionError("a second Score-CAM was taken while the queue was full")
    except urllib.error.HTTPError as e:
        refused, retry_after, error = e.code, e.headers.get("Retry-After"), json.loads(e.read())["error"]
    assert refused == 503 and retry_after.isdigit() and int(retry_after) >= 1
    assert "busy: 1 multi-pass request(s) running" in error and "--expensive-queue 0" in error and "\n" not in error
    # Cheap requests have their own workers: answered while the Score-CAM runs.
    status, _, body = post(running, "?method=gradcam", photo)
    assert status == 200 and json.loads(body)["method"] == "gradcam"
    assert json.loads(http(f"{running.url}/health")[2])["multi_pass"]["running"] == 1  # it was still held
    held.join()
    status, kind, body = answer["r"]
    error = json.loads(body)["error"]
    assert (status, kind) == (504, "application/json") and "time limit of 5 s (--timeout)" in error, error
    assert "scorecam passes were stopped" in error and "\n" not in error
    # The passes stopped (the slot is free again, not taken by work running on) and the server answers.
    assert json.loads(http(f"{running.url}/health")[2])["multi_pass"]["running"] == 0
    assert post(running, "", photo)[0] == 200
    assert running.stop() == 0
    assert "POST /explain?method=scorecam&size=320 504" in running.log[-1] and "Traceback" not in running.log[-1]


def test_max_side_asked_for_and_capped_by_the_server(server, bundle, model):
    """A request's max_side scales the overlay (the record keeps the photo's pixels); --max-side is the default
    and the cap. The photo is 451x300."""
    photo = PHOTOS[0].read_bytes()
    status, _, body = post(server, "?format=png&max_side=100", photo)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (100, 67)
    options = npcam.Options(max_side=100).checked(model)
    want = npcam.draw(npcam.explain(model, PHOTOS[0], options), 0, options)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), want)  # PNG: the library's picture
    status, _, body = post(server, "?max_side=100&bbox=1", photo)
    assert status == 200 and json.loads(body) == expected(model, PHOTOS[0], bbox=True)  # JSON: no overlay to scale
    capped = Server(bundle, "--max-side", "200")
    try:
        assert json.loads(http(f"{capped.url}/model")[2])["limits"]["max_side"] == 200
        for query, size in (("", (200, 133)), ("&max_side=100", (100, 67)), ("&max_side=300", (200, 133))):
            status, _, body = post(capped, f"?format=jpeg{query}", photo)
            assert status == 200 and Image.open(io.BytesIO(body)).size == size, query
    finally:
        assert capped.stop() == 0


def test_methods_restricts_what_the_server_offers(bundle):
    running = Server(bundle, "--methods", "gradcam,scorecam")
    try:
        about = json.loads(http(f"{running.url}/model")[2])
        assert list(about["methods"]) == ["gradcam", "scorecam"] and about["default_method"] == "gradcam"
        assert about["serving"]["multi_pass_methods"] == ["scorecam"]
        photo = PHOTOS[0].read_bytes()
        for method in ("cam", "gradcam%2B%2B", "LAYERCAM"):
            status, _, body = post(running, f"?method={method}", photo)
            error = json.loads(body)["error"]
            assert status == 403 and "is not offered by this server" in error, error
            assert error.endswith("choose one of gradcam, scorecam") and "\n" not in error
        status, _, body = post(running, "", photo)  # no method: the first offered, as /model says
        assert status == 200 and json.loads(body)["method"] == "gradcam"
    finally:
        assert running.stop() == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "gradcam,magic"], "--methods: unknown method 'magic'; choose one of cam,"),
        (["--methods", ","], "--methods names no method"),
        (["--token-file", "/nonexistent/token"], "/nonexistent/token: cannot read the token file"),
        (["--expensive-concurrency", "0"], "--expensive-concurrency: must be between 1 and 1024, not 0"),
        (["--timeout", "soon"], "--timeout: must be a number of seconds"),
        (["--max-side", "0"], "--max-side: must be at least 1, not 0"),
    ],
)
def test_bad_serving_options_exit_2_in_one_line(bundle, args, message, capsys, monkeypatch):
    # In-process: the checks of the options are what is tested (test_robustness.py checks the exit code of a real
    # process). A check that let a bad option through would start the server: that fails the test instead.
    import uvicorn

    from npcam import serve

    monkeypatch.delenv("NPCAM_TOKEN", raising=False)
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail(f"the server started with {args}"))
    try:
        code = serve.main(["--model", str(bundle), "--port", "0", *args])
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and message in lines[-1] and "Traceback" not in err, err


def test_a_token_protects_the_api_but_not_health_nor_the_page(bundle, tmp_path):
    secret = "s3cret-" + uuid.uuid4().hex
    (tmp_path / "token").write_text(secret + "\n")
    running = Server(bundle, "--token-file", str(tmp_path / "token"), "--host", "0.0.0.0")
    photo = PHOTOS[0].read_bytes()
    try:
        assert http(f"{running.url}/health")[0] == 200 and http(f"{running.url}/")[0] == 200
        for headers, says in [({}, "this server needs its token"), ({"Authorization": "Bearer nope"}, "wrong"),
                              ({"Authorization": secret}, "wrong")]:  # fmt: skip
            for status, _, body in (http(f"{running.url}/model", headers=headers), post(running, "", photo, headers)):
                assert status == 401 and says in json.loads(body)["error"], body
        good = {"Authorization": f"Bearer {secret}"}
        assert http(f"{running.url}/model", headers=good)[0] == 200
        status, _, body = post(running, "", photo, good)
        assert status == 200 and json.loads(body)["method"] == "cam"
    finally:
        assert running.stop() == 0
    log = "".join(running.log)
    assert secret not in log and "without a token" not in log


def test_the_token_can_come_from_the_environment_and_0000_without_one_warns(bundle, monkeypatch):
    open_server = Server(bundle, "--host", "0.0.0.0")
    assert http(f"{open_server.url}/model")[0] == 200  # and it serves: the signal handlers are set
    assert open_server.stop() == 0
    warnings = [line for line in "".join(open_server.log).splitlines() if "warning" in line]
    assert len(warnings) == 1 and "listening on 0.0.0.0 without a token" in warnings[0], open_server.log
    monkeypatch.setenv("NPCAM_TOKEN", "from-the-environment")
    running = Server(bundle, "--host", "0.0.0.0")
    try:
        assert http(f"{running.url}/model")[0] == 401
        assert http(f"{running.url}/model", headers={"Authorization": "Bearer from-the-environment"})[0] == 200
    finally:
        assert running.stop() == 0
    assert "warning" not in "".join(running.log)


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
        # Clients that send a whole upload and leave at once, before any answer could be sent, while a
        # Score-CAM request (512 trunk passes) from a client that stays runs in its multi-pass slot; whether
        # they leave while waiting for the worker or while being explained, each is a 499.
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
        status, kind, body = http(f"{running.url}/health")
        assert (status, kind, json.loads(body)["status"]) == (200, "application/json", "ok")
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
