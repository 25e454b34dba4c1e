"""Does memory stay flat over a long run? Process N images in one process, watch RSS.

    python scripts/rss_check.py --model DIR [--images DIR] [-n 500]

Runs the library pipeline the CLI runs (read, predict, CAM, overlay, box,
atomic JPEG + .npy write) over the images in ``--images`` (default ../shared/eval/images),
cycling through them until N are done, and prints RSS (Linux ``VmRSS``) at
intervals. Growth after the warm-up is what a leak would show.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from npcam import Options
from npcam.explain import explain_files
from npcam.files import Job, find_images
from npcam.model import Model

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS: this check needs Linux")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "eval" / "images")
    p.add_argument("-n", type=int, default=500)
    args = p.parse_args()
    model = Model(args.model, threads=1)  # as the CLI loads it for several images
    images = [image.path for image in find_images([args.images]).images]
    if not images:
        print(f"rss_check: error: {args.images}: no images", file=sys.stderr)
        return 2
    print(f"{args.n} images from {args.images} ({len(images)} files, cycled), model {model.bundle.arch}")
    print(f"{'images':>7} {'RSS MiB':>8}")
    print(f"{0:>7} {rss_mib():8.1f}")
    with tempfile.TemporaryDirectory() as out:
        options = Options(bbox=True, save_cam=True).checked(model)  # as `npcam --bbox --save-cam`
        jobs = [Job(images[i % len(images)], Path(out) / f"{i}_cam.jpg") for i in range(args.n)]
        readings = {}
        for i, (_, result) in enumerate(explain_files(model, jobs, options), 1):
            if isinstance(result, str):
                print(f"rss_check: {result}", file=sys.stderr)
            if i in (1, 10, 50) or i % 100 == 0:
                readings[i] = rss_mib()
                print(f"{i:>7} {readings[i]:8.1f}", flush=True)
    warm = readings.get(50, readings[min(readings)])
    print(f"growth from image 50 to {args.n}: {readings[max(readings)] - warm:+.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
