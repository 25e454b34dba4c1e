"""Load check for `npcam serve`: N clients on loopback, bounded in count and time; requests/s, latency, RSS.

    python scripts/load_check.py --model DIR [--clients 4] [--requests 10000] [--seconds 900] [--workers N]

Starts ``npcam serve`` on a free loopback port, warms it up (100 requests),
then N client threads each keep one HTTP/1.1 connection and post a 0.2 MP
JPEG (a sample photo resized to 548x365) to ``/explain`` until the requests
or the seconds run out. Prints requests/s, p50/p99 latency, and the server's
RSS after the warm-up and every 1,000 requests: flat RSS means no leak.
"""

from __future__ import annotations

import argparse
import http.client
import io
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
    args = p.parse_args()
    command = [sys.executable, "-m", "npcam", "serve", "--model", str(args.model), "--port", "0"]
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


if __name__ == "__main__":
    sys.exit(main())
