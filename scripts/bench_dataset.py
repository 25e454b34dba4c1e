"""Images/s for a whole folder: the CLI's directory mode against `npcam dataset` (embedded Ray), in one run.

    python scripts/bench_dataset.py --model DIR [--images DIR | --generate 2000] [--rounds 3] [--overlays] [--ray]

The folder is ``--images``, or ``--generate N`` photos made with Pillow from
the dev set in ../shared/eval (or from samples/ without it): each a random
crop of one of them, scaled to a long side between 224 and 1024 px, sometimes
mirrored, saved as JPEG at quality 75-95, into a RAM disk that is removed at
the end (never into the repository). Every run is a fresh process, as a user
would start it, timed from start to exit, start-up included; outputs go to the
RAM disk. The CLI writes records only (``--json --no-overlay``) as the dataset
job does without ``--overlays``; ``--overlays`` adds both with overlays. The
rounds alternate the methods; the table has medians, and the ratio is the
dataset job's images/s over the CLI's. Peak memory is the largest sum of the
PSS (shared pages split between the processes that share them) of the
process and all its descendants (Ray's services and workers are children of
the driver), sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEV_SET = REPO.parent / "shared" / "eval" / "images"


def cpu_name() -> str:
    """The CPU's model name with its family/model numbers (KVM guests often say only "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or fields.get("Hardware") or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return f"{name}, {os.cpu_count()} cores"


def generate(n: int, into: Path, source: Path = DEV_SET, seed: int = 0) -> Path:
    """``n`` varied JPEGs made from ``source``'s photos (samples/ if it is missing): crops, scales, mirrors, qualities."""
    from PIL import Image, ImageOps

    from npcam.files import find_images

    sources = [i.path for i in find_images([source if source.is_dir() else REPO / "samples"]).images]
    sources = [s for s in sources if "overlay" not in s.name and "serve_page" not in s.name]
    rng = random.Random(seed)
    into.mkdir(parents=True)
    originals = [Image.open(s).convert("RGB") for s in sources]
    for k in range(n):
        image = originals[k % len(originals)]
        w, h = image.size
        f = rng.uniform(0.7, 1.0)
        cw, ch = max(16, int(w * f)), max(16, int(h * f))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((x, y, x + cw, y + ch))
        side = rng.randint(224, 1024)
        scale = side / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop.save(into / f"photo_{k:05d}.jpg", quality=rng.randint(75, 95))
    return into


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


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux), so that their CPU time reaches RUSAGE_CHILDREN.

    Ray's workers are children of its raylet, which dies before them: without this their CPU time would be lost.
    """
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap(timeout: float = 30.0) -> None:
    """Wait for every descendant left (adopted orphans), at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds of the process tree, peak memory (PSS of the tree, MiB) and the last stderr line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    with tempfile.TemporaryFile("w+") as err:
        cpu = cpu_seconds()
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, tree_pss_mib(process.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - start
        reap()
        cpu = cpu_seconds() - cpu
        err.seek(0)
        said = err.read().strip().splitlines()
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{command[:5]} failed ({process.returncode}): {said[-5:]}")
    return wall, cpu, peak, said[-1] if said else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--images", type=Path, help="a folder of photos (default: --generate)")
    p.add_argument("--generate", type=int, default=2000, metavar="N", help="photos to make (default 2000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overlays", action="store_true", help="also time both writing overlays")
    p.add_argument("--ray", action="store_true", help="also time the dataset job with Ray's actors "
                   "(--driver-threads 1: beside one driver thread; 0: alone)")  # fmt: skip
    p.add_argument("--from", dest="source", type=Path, default=DEV_SET, help="photos to generate from "
                   "(default ../shared/eval/images, else samples/)")  # fmt: skip
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    whole_tree = become_subreaper()
    ram = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="npcam-bench-", dir=ram))
    python = sys.executable
    try:
        folder = args.images or generate(args.generate, work / "photos", args.source)
        from npcam.files import find_images

        n = len(find_images([folder]).images)
        if not n:
            print(f"bench_dataset: error: {folder}: no images", file=sys.stderr)
            return 2

        def cli(overlays: bool):
            extra = [] if overlays else ["--no-overlay"]
            return lambda out: [python, "-m", "npcam", str(folder), "-m", str(args.model), "-o", f"{out}/", "--json",
                                *extra]  # fmt: skip

        def dataset(overlays: bool):
            extra = lambda out: ["--overlays", f"{out}-overlays"] if overlays else []  # noqa: E731
            return lambda out: [python, "-m", "npcam.dataset", str(folder), "--model", str(args.model), "--out",
                                str(out), *extra(out)]  # fmt: skip

        methods = {"CLI --json --no-overlay": cli(False), "npcam dataset": dataset(False)}
        if args.ray:  # the driver with one thread beside Ray's actors, and Ray's actors alone
            for threads in ("1", "0"):
                run = dataset(False)
                methods[f"npcam dataset --driver-threads {threads}"] = (
                    lambda out, run=run, threads=threads: [*run(out), "--driver-threads", threads]
                )
        if args.overlays:
            methods |= {"CLI --json (overlays)": cli(True), "npcam dataset --overlays": dataset(True)}
        results: dict[str, dict[str, list]] = {m: {"wall": [], "cpu": [], "pss": []} for m in methods}
        for r in range(args.rounds):
            for name, command in methods.items():
                out = work / f"out-{r}-{name.replace(' ', '_').replace('-', '')}"
                wall, cpu, pss, said = timed(command(out))
                for key, value in (("wall", wall), ("cpu", cpu), ("pss", pss)):
                    results[name][key].append(value)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(f"{out}-overlays", ignore_errors=True)
                print(f"round {r + 1}, {name}: {wall:.1f} s, {cpu:.1f} CPU s, peak PSS {pss:.0f} MiB, load "
                      f"{os.getloadavg()[0]:.1f}  {said[:160]}", file=sys.stderr)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    source = args.images or f"{args.generate} generated from {args.source if args.source.is_dir() else 'samples/'}"
    print(f"{n} images ({source}), {cpu_name()}, {args.rounds} rounds, medians; outputs on {ram or 'disk'}")
    print(f"CPU s: user + system of the whole process tree{'' if whole_tree else ' (Ray workers not included)'}\n")
    print("| method | wall s | images/s | ratio to the CLI | CPU s | images per CPU s | ratio to the CLI | "
          "walls s | peak memory (PSS) MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rates: dict[str, tuple[float, float]] = {}
    for name, r in results.items():
        wall, cpu = float(np.median(r["wall"])), float(np.median(r["cpu"]))
        rates[name] = (n / wall, n / cpu)
        base = rates[next(k for k in rates if k.startswith("CLI") and ("overlays" in k) == ("overlays" in name))]
        walls = ", ".join(f"{w:.1f}" for w in r["wall"])
        print(f"| {name} | {wall:.1f} | {n / wall:.1f} | {n / wall / base[0]:.2f} | {cpu:.1f} | {n / cpu:.1f} | "
              f"{n / cpu / base[1]:.2f} | {walls} | {np.median(r['pss']):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
