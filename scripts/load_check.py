"""Load check for `npcam serve`: N clients on loopback, bounded in count and time; requests/s, latency, RSS.

    python scripts/load_check.py --model DIR [--clients 4] [--requests 10000] [--seconds 900] [--workers N]
    python scripts/load_check.py --model DIR --expensive 2 [--requests 200] [--server-arg=--timeout=120 ...]

Starts ``npcam serve`` on a free loopback port, warms it up (100 requests),
then N client threads each keep one HTTP/1.1 connection and post a 0.2 MP
JPEG (a sample photo resized to 548x365) to ``/explain`` until the requests
or the seconds run out. Prints requests/s, p50/p99 latency, and the server's
RSS after the warm-up and every 1,000 requests: flat RSS means no leak.

With ``--expensive N`` it measures instead how cheap requests fare beside
expensive ones, in one run: one client posts ``--requests`` CAM requests with
the server idle, then again while N other clients keep Score-CAM requests in
flight (a refused one waits its Retry-After), then once more idle; it prints
p50/p99 of each phase and the loaded phase's ratio to the idle ones.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS: this check needs Linux")


def photo_jpeg() -> bytes:
    image = Image.open(REPO / "samples" / "coffee.jpg").convert("RGB").resize((548, 365), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=900)
    p.add_argument("--workers", type=int, help="the server's --workers (default: its own)")
    p.add_argument("--query", default="", help="query string for /explain, e.g. 'bbox=1'")
    p.add_argument("--expensive", type=int, default=0, metavar="N",
                   help="measure cheap-request latency idle and beside N Score-CAM clients (see above)")  # fmt: skip
    p.add_argument("--expensive-query", default="method=scorecam", help="the expensive clients' query string")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to npcam serve, e.g. --server-arg=--expensive-concurrency=2 (repeatable)")  # fmt: skip
    args = p.parse_args()
    command = [sys.executable, "-m", "npcam", "serve", "--model", str(args.model), "--port", "0", *args.server_arg]
    if args.workers:
        command += ["--workers", str(args.workers)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    first = server.stderr.readline()
    if "http://" not in first:
        print(f"load_check: error: the server did not start: {first}", file=sys.stderr)
        return 2
    threading.Thread(target=server.stderr.read, daemon=True).start()  # drain its access log
    host, port = first[first.index("http://") + 7 :].split("/")[0].rsplit(":", 1)
    body = photo_jpeg()
    path = f"/explain?{args.query}" if args.query else "/explain"

    def post(connection: http.client.HTTPConnection) -> float:
        start = time.perf_counter()
        connection.request("POST", path, body, {"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        return time.perf_counter() - start

    if args.expensive:
        try:
            return latency_beside_expensive(host, int(port), path, body, args)
        finally:
            server.kill()  # Score-CAMs may still be in flight: no need to wait for their answers
            server.wait(timeout=60)
    try:
        warm = http.client.HTTPConnection(host, int(port), timeout=60)
        for _ in range(100):
            post(warm)
        warm.close()
        readings = [(0, rss_mib(server.pid))]
        latencies: list[float] = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        failures: list[str] = []

        def client():
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            while time.monotonic() < deadline:
                with lock:
                    if len(latencies) >= args.requests:
                        break
                try:
                    seconds = post(connection)
                except Exception as e:  # report, do not hide: a failed request fails the check
                    failures.append(f"{type(e).__name__}: {e}")
                    break
                with lock:
                    latencies.append(seconds)
                    if len(latencies) % 1000 == 0:
                        readings.append((len(latencies), rss_mib(server.pid)))
            connection.close()

        start = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    if failures:
        print(f"load_check: {len(failures)} failed request(s), e.g. {failures[0]}", file=sys.stderr)
        return 1
    ms = np.asarray(latencies) * 1000
    print(f"{len(ms)} requests from {args.clients} clients in {elapsed:.1f} s: {len(ms) / elapsed:.1f} requests/s, "
          f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms (0.2 MP JPEG, {len(body):,} bytes)")  # fmt: skip
    print("requests  server RSS MiB")
    for n, rss in readings:
        print(f"{n:>8}  {rss:8.1f}")
    print(f"RSS change from after the warm-up to the end: {readings[-1][1] - readings[0][1]:+.1f} MiB")
    return 0


def latency_beside_expensive(host: str, port: int, path: str, body: bytes, args) -> int:
    """Cheap-request p50/p99 idle, beside ``args.expensive`` Score-CAM clients, and idle again; prints a table."""
    expensive_path = f"/explain?{args.expensive_query}"

    def timed(connection, where) -> tuple[int, float, str | None]:
        start = time.perf_counter()
        connection.request("POST", where, body, {"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - start, response.getheader("Retry-After")

    def health() -> dict:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.request("GET", "/health")
        state = json.loads(connection.getresponse().read())
        connection.close()
        return state

    def cheap_phase() -> np.ndarray:
        connection = http.client.HTTPConnection(host, port, timeout=600)
        seconds = []
        for _ in range(args.requests):
            status, elapsed, _ = timed(connection, path)
            if status != 200:
                raise RuntimeError(f"a cheap request got HTTP {status}")
            seconds.append(elapsed)
        connection.close()
        return np.asarray(seconds) * 1000

    warm = http.client.HTTPConnection(host, port, timeout=600)
    for _ in range(20):
        timed(warm, path)
    warm.close()
    idle = cheap_phase()

    stop = threading.Event()
    answers: dict[int, int] = {}
    lock = threading.Lock()

    def expensive_client():
        connection = http.client.HTTPConnection(host, port, timeout=600)
        while not stop.is_set():
            status, _, retry_after = timed(connection, expensive_path)
            with lock:
                answers[status] = answers.get(status, 0) + 1
            if status == 503:
                stop.wait(float(retry_after or 1))
        connection.close()

    threads = [threading.Thread(target=expensive_client, daemon=True) for _ in range(args.expensive)]
    for t in threads:
        t.start()
    # Measure only once the expensive requests are in: running (or waiting, if the server queues them).
    began = time.monotonic()
    while time.monotonic() < began + 60:
        state = health().get("multi_pass")
        if state is None and time.monotonic() > began + 2:  # a server without admission control: give them 2 s
            break
        if state and (state["running"] + state["waiting"] >= args.expensive or answers.get(503)):
            break
        time.sleep(0.05)
    in_flight = health().get("multi_pass", {})
    loaded = cheap_phase()
    stop.set()
    for t in threads:
        t.join()
    idle_after = cheap_phase()

    def row(name, ms):
        return f"{name:<34} {np.percentile(ms, 50):>9.1f} {np.percentile(ms, 99):>9.1f} {len(ms):>6}"

    idle_p50, idle_p99 = np.percentile(idle, 50), np.percentile(idle, 99)
    print(f"cheap requests: POST {path} ({len(body):,} byte JPEG), one client; expensive: {args.expensive} "
          f"client(s) posting {expensive_path}")  # fmt: skip
    print(f"{'phase':<34} {'p50 ms':>9} {'p99 ms':>9} {'n':>6}")
    print(row("idle", idle))
    print(row(f"beside {args.expensive} expensive client(s)", loaded))
    print(row("idle again", idle_after))
    ratios = np.percentile(loaded, 50) / idle_p50, np.percentile(loaded, 99) / idle_p99
    print(f"{'loaded / first idle':<34} {ratios[0]:>8.2f}x {ratios[1]:>8.2f}x")
    print(f"multi-pass slots when the loaded phase began: {in_flight}")
    print("expensive answers: " + ", ".join(f"HTTP {k}: {v}" for k, v in sorted(answers.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
