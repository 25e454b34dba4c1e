"""Fuzz npcam's image-loading path with atheris (coverage-guided, libFuzzer).

    pip install atheris
    python scripts/fuzz_decode.py --seconds 600 [--corpus DIR]

Each input is written to a file and read with ``npcam.read_image``, then
preprocessed. The contract: a uint8 ``[H, W, 3]`` array, or an ``NpcamError``.
Anything else (another exception, a wrong shape) is a finding: libFuzzer stops
and saves the input as ``crash-*``. The seed corpus is small valid images in
every format Pillow writes, with EXIF orientations, modes and animation.
When time is up it prints how the inputs ended, by outcome.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from PIL import Image

    import npcam.image

OUTCOMES: collections.Counter = collections.Counter()
SCRATCH = Path(tempfile.mkdtemp(prefix="npcam-fuzz-")) / "input"
MAX_PIXELS = 4_000_000  # keeps each run fast; the limit itself is tested in the suite
DEADLINE = [float("inf")]


def one_input(data: bytes) -> None:
    if time.monotonic() > DEADLINE[0]:
        report()  # libFuzzer's own time limit exits without running Python's atexit
        os._exit(0)
    SCRATCH.write_bytes(data)
    try:
        rgb = npcam.image.read_image(SCRATCH, max_pixels=MAX_PIXELS)
    except npcam.NpcamError as e:
        # Group by the kind of problem, not the details.
        kind = str(e).split(": ", 1)[1].split(" (")[0]
        OUTCOMES["error: " + ("over the pixel limit" if "over the limit" in kind else kind)] += 1
        return
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise AssertionError(f"read_image returned {rgb.dtype} {rgb.shape}")
    x = npcam.image.preprocess(rgb, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), keep_aspect=True)
    if not np.isfinite(x).all():
        raise AssertionError("preprocess produced non-finite values")
    OUTCOMES["ok"] += 1


def seed_corpus(directory: Path) -> None:
    """Small valid images to start from: each format, odd modes, EXIF, animation."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 17, 3), dtype=np.uint8))
    variants = {
        "rgb.png": (rgb, "PNG", {}),
        "rgba.png": (rgb.convert("RGBA"), "PNG", {}),
        "la.png": (rgb.convert("LA"), "PNG", {}),
        "p.png": (rgb.convert("P"), "PNG", {"transparency": 0}),
        "i16.png": (Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)), "PNG", {}),
        "rgb.jpg": (rgb, "JPEG", {"quality": 80}),
        "cmyk.jpg": (rgb.convert("CMYK"), "JPEG", {}),
        "l.jpg": (rgb.convert("L"), "JPEG", {}),
        "rgb.gif": (rgb.convert("P"), "GIF", {"save_all": True, "append_images": [rgb.convert("P")]}),
        "rgb.bmp": (rgb, "BMP", {}),
        "rgb.tif": (rgb, "TIFF", {}),
        "f.tif": (rgb.convert("F"), "TIFF", {}),
        "rgb.webp": (rgb, "WEBP", {}),
        "rgb.ppm": (rgb, "PPM", {}),
    }
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        variants[f"exif{orientation}.jpg"] = (rgb, "JPEG", {"exif": exif})
    for name, (image, fmt, options) in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        (directory / name).write_bytes(buffer.getvalue())


def report() -> None:
    total = sum(OUTCOMES.values())
    print(f"\n{total} inputs in this process:", file=sys.stderr)
    for outcome, count in OUTCOMES.most_common():
        print(f"  {count:9d}  {outcome}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--corpus", type=Path, help="corpus directory (default: a new temporary one)")
    args, libfuzzer_args = parser.parse_known_args()
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="npcam-corpus-"))
    seed_corpus(corpus)
    warnings.simplefilter("ignore")  # Pillow warns about every corrupt EXIF block it meets
    print(f"fuzzing npcam.image.read_image for {args.seconds} s, corpus {corpus}", file=sys.stderr)
    DEADLINE[0] = time.monotonic() + args.seconds
    argv = [sys.argv[0], "-max_len=65536", "-rss_limit_mb=4096", *libfuzzer_args]
    atheris.Setup(argv + [str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
