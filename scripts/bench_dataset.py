"""Images/s for whole folders: the CLI's directory mode against `npcam dataset` on embedded Ray (1 and 2 actors).

    python scripts/bench_dataset.py --model DIR [--images DIR] [--rounds 3]

Every run is a fresh process, as a user would start it, timed from start to
exit; outputs go to a RAM disk. Peak memory is the largest sum of the PSS
(resident memory, shared pages split between the processes that share them) of
the process and all its descendants (Ray's GCS, raylet and workers are
children of the driver), sampled every 0.1 s. Start-up is a run on a single image. The
rounds alternate the methods; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "eval" / "images"


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of ``pid`` and its descendants, in MiB: shared pages split between their users."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak memory (PSS of the process tree, MiB) of one command."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_pss_mib(process.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{command[:5]} failed: {process.stderr.read()[-1000:]}")
    return wall, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from npcam.files import find_images

    images = find_images([args.images]).images
    if not images:
        print(f"bench_dataset: error: {args.images}: no images", file=sys.stderr)
        return 2
    ram = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="npcam-bench-", dir=ram))
    one = work / "one"
    one.mkdir()
    shutil.copy(images[0].path, one)
    python = sys.executable

    def dataset(actors: int, overlays: bool = False):
        def command(src, out):
            extra = ["--overlays", f"{out}-overlays"] if overlays else []
            return [
                python,
                "-m",
                "npcam.dataset",
                str(src),
                "--model",
                str(args.model),
                "--out",
                str(out),
                "--actors",
                str(actors),
                *extra,
            ]

        return command

    methods = {
        "CLI directory mode": lambda src, out: [
            python,
            "-m",
            "npcam",
            str(src),
            "-m",
            str(args.model),
            "-o",
            f"{out}/",
            "--json",
        ],
        "embedded Ray, 1 actor": dataset(1),
        "embedded Ray, 2 actors": dataset(2),
        # The CLI always writes overlays; the dataset job writes them only when asked.
        "embedded Ray, 2 actors, --overlays": dataset(2, overlays=True),
    }
    results: dict[str, dict[str, list[float]]] = {m: {"wall": [], "rss": [], "startup": []} for m in methods}
    try:
        for r in range(args.rounds):
            for i, (name, command) in enumerate(methods.items()):
                out = work / f"out-{r}-{name.replace(' ', '_').replace(',', '')}"
                wall, rss = timed(command(args.images, out))
                results[name]["wall"].append(wall)
                results[name]["rss"].append(rss)
                results[name]["startup"].append(timed(command(one, work / f"one-{r}-{i}"))[0])
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(f"{out}-overlays", ignore_errors=True)
                print(f"round {r + 1}, {name}: {wall:.1f} s, peak PSS {rss:.0f} MiB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(images)
    print(
        f"{n} images from {args.images}, {os.cpu_count()} cores, {args.rounds} rounds, medians; outputs on {ram or 'disk'}\n"
    )
    print("| method | wall s | images/s | images/s after start-up | one-image run s | peak memory (PSS) MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        wall, startup = float(np.median(r["wall"])), float(np.median(r["startup"]))
        print(
            f"| {name} | {wall:.1f} | {n / wall:.1f} | {n / max(wall - startup, 1e-9):.1f} | {startup:.1f} | {np.median(r['rss']):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
