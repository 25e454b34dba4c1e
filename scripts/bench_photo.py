"""Camera-size photos: ``python -m npcam DIR`` against a practitioner's torch + OpenCV script, as whole processes.

    python scripts/bench_photo.py [--rounds 5] [--count 12] [--arch efficientnet_lite0|resnet18] [--photos DIR]
                                  [--bundle DIR --weights FILE] [--also NAME=DIR] [--json FILE]

The photos are made here in a temporary folder (never shipped): ``--count`` dev-set photos
(``../shared/eval/images/crop8``, ILSVRC val photos at their own resolution), one in four
turned to portrait, upscaled to 4000x3000 or 3000x4000 with a little noise and saved as
JPEG quality 90, about 3 MB each, like a phone's. ``--photos DIR`` uses yours. Photos and outputs are on the RAM disk (/dev/shm).

The model is the demo's, EfficientNet-Lite0 with its ImageNet weights (``--arch
resnet18``: a seeded random-init ResNet-18), the same weights on both sides.
``--bundle`` and ``--weights`` reuse an export of them. ``--also NAME=DIR`` adds
the npcam in another checkout DIR (its ``npcam/``, e.g. the code before a change) as
one more command. Measures, every round
taking the commands in turn (the order rotating), medians over the rounds:

1. the whole directory, process start to exit: ``python -m npcam DIR -m BUNDLE -o
   OUT/`` against ``python scripts/bench_pipelines.py directory …``, the script a
   practitioner writes (cv2.imread, cv2.resize, a forward hook and the CAM in
   torch, cv2.resize, applyColorMap, addWeighted, cv2.imwrite), writing JPEG
   quality 95 (cv2.imwrite's default) and 90 (npcam's); wall and CPU seconds
   (user + system) and peak RSS, with the load average;
2. the same commands on an empty directory: interpreter, imports and model load;
3. where the time goes: each photo's stages in both pipelines, one thread each
   (``bench_pipelines.py npcam-stages`` and ``directory --stages --threads 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PIPELINES = REPO / "scripts" / "bench_pipelines.py"
STAGES = ["decode", "network input", "trunk+head", "map", "overlay", "encode+write"]  # bench_pipelines.PHOTO_STAGES


EVAL = REPO.parent / "shared" / "eval"  # the dev photo set (ILSVRC val photos), beside the checkout


def make_photos(folder: Path, count: int = 12) -> list[Path]:
    """``count`` camera-size JPEGs: dev-set photos at their own resolution (``images/crop8/``, the first ``count``
    by name), every fourth turned to portrait, upscaled bicubic to 4000x3000 (3000x4000), noise 8, quality 90."""
    sources = sorted((EVAL / "images" / "crop8").glob("*.JPEG"))[:count]
    if not sources:
        raise SystemExit(f"{EVAL}/images/crop8 has no photos: give --photos DIR (camera-size JPEGs)")
    rng = np.random.default_rng(0)
    paths = []
    for i, source in enumerate(sources):
        img = Image.open(source).convert("RGB")
        if i % 4 == 3:
            img = img.transpose(Image.ROTATE_90)
        size = (4000, 3000) if img.width >= img.height else (3000, 4000)
        big = np.asarray(img.resize(size, Image.BICUBIC)).astype(np.float32)
        noisy = np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)
        path = folder / f"{source.stem}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


# Runs a command and reports its wall time, CPU time (user + system, its threads and children) and peak RSS.
# A child forked from a big process would start with that process's RSS as its high-water mark, so a small
# launcher process forks the command instead.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the command's own output is not the report
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def timed(command: list[str], ok: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one process running ``command``."""
    launch = [sys.executable, "-S", "-c", LAUNCHER, *command]
    result = subprocess.run(launch, capture_output=True, text=True, env=env)
    wall, cpu, rss_kib, code = result.stdout.split()
    if int(code) not in ok:
        raise RuntimeError(f"{' '.join(command[:4])} … exited {code}: {result.stderr[-500:]}")
    return {"wall": float(wall), "cpu": float(cpu), "rss": int(rss_kib) / 1024}


def stage_run(command: list[str], env: dict[str, str] | None = None) -> list[dict]:
    """The stage times a ``bench_pipelines.py`` process prints, one JSON line per photo."""
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … failed: {result.stderr[-500:]}")
    return [json.loads(line) for line in result.stdout.splitlines()]


REFERENCE_AS_WRITTEN = "torch + OpenCV (as written: q95, default threads)"
REFERENCE = "torch + OpenCV, q90 (npcam's quality)"
REFERENCE_ONE_THREAD = "torch + OpenCV, q90, 1 thread"


class Command:
    """A command timed as a whole process: ``argv`` with ``{images}`` and ``{out}`` filled in per run."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name, self.argv, self.env = name, argv, env
        self.out = Path()

    def run(self, images: Path, empty: bool = False) -> dict[str, float]:
        argv = [a.format(images=images, out=self.out) for a in self.argv]
        ok = (0, 1) if empty and self.argv[1:3] == ["-m", "npcam"] else (0,)  # npcam: no image found is exit 1
        return timed(argv, ok, self.env)


def load() -> float:
    return os.getloadavg()[0]


def prepare_model(arch: str, tmp: Path, bundle: Path | None, weights: Path | None) -> tuple[Path, Path]:
    """The bundle and the torch weights behind it: exported here unless given."""
    if bundle is not None:
        if weights is None:
            raise SystemExit("--bundle needs --weights: the torch weights it was exported from")
        return bundle, weights
    import torch

    from export.api import run as export
    from export.archs import ARCHS
    from export.weights import find_weights

    if arch == "resnet18":
        from export import resnet

        torch.manual_seed(0)
        weights = tmp / "resnet18-random.pth"
        torch.save(resnet.resnet18().state_dict(), weights)
    else:
        weights = find_weights(ARCHS[arch])
    print(f"exporting {arch}…", file=sys.stderr)
    return export(arch, tmp / arch, weights), weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--count", type=int, default=12, help="how many dev-set photos to make 12 MP photos of")
    p.add_argument("--arch", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet18"])
    p.add_argument("--photos", type=Path, help="a folder of JPEGs to use instead of the generated ones")
    p.add_argument("--bundle", type=Path, help="an export of --arch with --weights (default: exported here)")
    p.add_argument("--weights", type=Path, help="the torch state dict --bundle was exported from")
    p.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                   help="also time the npcam of another checkout DIR, called NAME")  # fmt: skip
    p.add_argument("--max-side", type=int, default=1920,
                   help="the overlays' long side in the capped npcam run (1920: a full-HD screen's width)")  # fmt: skip
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage profile")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args()
    ram = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=ram if ram.is_dir() else None) as tmp_name:
        tmp = Path(tmp_name)
        if args.photos:
            photos_dir = args.photos
            photos = sorted(photos_dir.glob("*.jpg"))
        else:
            photos_dir = tmp / "photos"
            photos_dir.mkdir()
            photos = make_photos(photos_dir, args.count)
        bundle, weights = prepare_model(args.arch, tmp, args.bundle, args.weights)
        empty = tmp / "empty"
        empty.mkdir()
        # Python writes bytecode caches, as it does for an installed package (pip compiles them); the
        # warm-up round makes them, so that no process compiles npcam or the models' modules from source.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        reference = [sys.executable, str(PIPELINES), "directory", args.arch, str(weights)]
        npcam = [sys.executable, "-m", "npcam", "{images}", "-m", str(bundle), "-o", "{out}/"]
        commands = [
            Command("npcam", npcam, env),
            Command(f"npcam --max-side {args.max_side}", [*npcam, "--max-side", str(args.max_side)], env),
            Command(REFERENCE_AS_WRITTEN, [*reference, "{images}", "{out}"], env),
            Command(REFERENCE, [*reference, "{images}", "{out}", "--quality", "90"], env),
            Command(REFERENCE_ONE_THREAD, [*reference, "{images}", "{out}", "--quality", "90", "--threads", "1"], env),
        ]
        for name, checkout in (a.split("=", 1) for a in args.also):
            pythonpath = {**env, "PYTHONPATH": str(Path(checkout).resolve())}
            commands.append(Command(name, commands[0].argv, pythonpath))
        for i, command in enumerate(commands):
            command.out = tmp / f"out{i}"
            command.out.mkdir()
        starts = [c for c in commands if not c.name.startswith("npcam --max-side")]  # the same start as npcam's
        runs: dict[str, dict[str, list]] = {
            "directory": {c.name: [] for c in commands},
            "start": {c.name: [] for c in starts},
        }
        loads = []
        print(f"{len(photos)} photos, {args.rounds} rounds (after a warm-up on no photo)…", file=sys.stderr)
        for r in range(args.rounds + 1):
            loads.append(load())
            for what, folder, which in (("directory", photos_dir, commands), ("start", empty, starts)):
                if not r:  # the warm-up: every command once on the empty folder (imports, bytecode, model)
                    if what == "start":
                        continue
                    folder = empty
                for command in which[r % len(which) :] + which[: r % len(which)]:  # a different order each round
                    measured = command.run(folder, empty=folder == empty)
                    if r:
                        runs[what][command.name].append(measured)
            print(f"round {r}: load {loads[-1]:.1f}", file=sys.stderr)
        loads.append(load())
        stages: dict[str, list[dict]] = {"npcam": [], "torch + OpenCV": []}
        if not args.no_stages:
            for r in range(args.rounds):
                # npcam sets NumPy's BLAS threads when it is imported first; bench_pipelines imports NumPy first.
                stages["npcam"] += stage_run(
                    [sys.executable, str(PIPELINES), "npcam-stages", str(bundle), str(photos_dir), str(tmp / "out0")],
                    {**env, "OPENBLAS_NUM_THREADS": "1"},
                )
                stages["torch + OpenCV"] += stage_run(
                    [*reference, str(photos_dir), str(tmp / "out2"), "--quality", "90", "--threads", "1", "--stages"],
                    env,
                )
                print(f"stages, round {r + 1}: load {load():.1f}", file=sys.stderr)
        sizes = sorted({"x".join(map(str, Image.open(q).size)) for q in photos})
        megabytes = float(np.mean([q.stat().st_size for q in photos]) / 1e6)
        outputs = {c.name: float(np.mean([q.stat().st_size for q in c.out.glob("*.jpg")]) / 1e6) for c in commands}
    from export.quantize import cpu_name

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "arch": args.arch,
        "photos": len(photos),
        "sizes": sizes,
        "photo_mb": megabytes,
        "output_mb": outputs,
        "rounds": args.rounds,
        "load": [min(loads), max(loads)],
        "runs": runs,
        "stages": stages,
    }
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def report(results: dict) -> str:
    n = results["photos"]
    low, high = results["load"]
    directory, start = results["runs"]["directory"], results["runs"]["start"]
    wall = {name: _median(r, "wall") for name, r in directory.items()}
    cpu = {name: _median(r, "cpu") for name, r in directory.items()}
    written = REFERENCE_AS_WRITTEN
    lines = [
        f"{n} photos ({', '.join(results['sizes'])}, {results['photo_mb']:.1f} MB each), {results['arch']}, "
        f"{results['date']}, {results['cpu']}, {results['cores']} cores, load average {low:.1f}–{high:.1f}, "
        f"medians of {results['rounds']} rounds",
        "",
        "Whole processes over the directory, start to exit; the ratios are to the torch + OpenCV script as "
        "written (OpenCV decodes, cv2.imwrite's default quality, default threads):",
        "",
    ]
    header = ["command", "wall s", "CPU s", "peak RSS MiB", "output MB", "wall ratio", "CPU ratio"]
    rows = [
        [
            name,
            f"{wall[name]:.2f}",
            f"{cpu[name]:.2f}",
            f"{_median(r, 'rss'):.0f}",
            f"{results['output_mb'][name]:.2f}",
            f"{wall[name] / wall[written]:.2f}",
            f"{cpu[name] / cpu[written]:.2f}",
        ]
        for name, r in directory.items()
    ]
    lines += _table(header, rows)
    for name in directory:
        if not name.startswith("torch"):
            for key in ("wall", "cpu"):
                ratios = [x[key] / directory[written][i][key] for i, x in enumerate(directory[name])]
                lines.append(f"\n{name} / torch + OpenCV as written, {key}, each round: "
                             + ", ".join(f"{x:.2f}" for x in ratios))  # fmt: skip
    lines += [
        "",
        "Start-up, the same commands on an empty directory (interpreter, imports, model), and per photo: the "
        "directory's time less the start-up's, over the photos (ratios to the reference as written, and to "
        "the one-thread reference):",
        "",
    ]
    rows = []
    per_photo = {}
    for name in directory:
        first = start.get(name, start["npcam"])  # a capped npcam run starts as npcam does
        per_photo[name] = {key: (_median(directory[name], key) - _median(first, key)) / n for key in ("wall", "cpu")}
    for name in directory:
        cells = [f"{_median(start.get(name, start['npcam']), key):.2f}" for key in ("wall", "cpu")]
        cells += [f"{per_photo[name][key] * 1000:.0f}" for key in ("wall", "cpu")]
        for reference in (written, REFERENCE_ONE_THREAD):
            cells += [f"{per_photo[name][key] / per_photo[reference][key]:.2f}" for key in ("wall", "cpu")]
        rows.append([name, *cells])
    header = ["command", "start wall s", "start CPU s", "per photo wall ms", "per photo CPU ms"]
    header += ["wall ratio", "CPU ratio", "wall ratio, 1 thread", "CPU ratio, 1 thread"]
    lines += _table(header, rows)
    if results["stages"]["npcam"]:
        lines += ["", "Per photo, ms, one thread on each side (medians over photos and rounds):", ""]
        sides = ("npcam", "torch + OpenCV")
        rows = []
        for stage in [*STAGES, "total"]:
            row = [stage]
            for side in sides:
                for key in ("wall", "cpu"):
                    per_photo = [
                        sum(s[key].values()) if stage == "total" else s[key][stage] for s in results["stages"][side]
                    ]
                    row.append(f"{np.median(per_photo) * 1000:.1f}")
            rows.append(row)
        lines += _table(["stage", "npcam wall", "npcam CPU", "torch+OpenCV wall", "torch+OpenCV CPU"], rows)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


if __name__ == "__main__":
    sys.exit(main())
