"""``npcam IMAGE [IMAGE|DIR ...]``: write a CAM overlay for each image.

Exit codes: 0 every image done; 1 some images failed (the others were
done); 2 bad arguments or an unusable model bundle (nothing done);
130 interrupted (only complete files are left).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__, render
from .boxes import DEFAULT_THRESHOLD, PAPER_THRESHOLD, cam_box, parse_threshold
from .cam import WEIGHTINGS
from .errors import NpcamError
from .files import atomic_write
from .image import MAX_PIXELS
from .model import Model, Prediction, default_model_dir

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SAVE_OPTIONS = {"JPEG": {"quality": 90}, "PNG": {"compress_level": 1}, "WEBP": {"quality": 90}}


@dataclass(frozen=True)
class Job:
    """One input image and where its overlay goes.

    With ``per_class`` (``--top K`` > 1) each class gets ``<output stem>_<class><suffix>``.
    """

    image: Path
    output: Path
    per_class: bool = False

    def output_for(self, class_index: int) -> Path:
        if not self.per_class:
            return self.output
        return self.output.with_name(f"{self.output.stem}_{class_index}{self.output.suffix}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="npcam",
        description="Class Activation Maps for ImageNet CNNs, without PyTorch. "
        "Writes the jet-coloured CAM of the top class blended over each image.",
        epilog="Exit codes: 0 all done, 1 some images failed, 2 bad arguments or model, 130 interrupted.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files, or directories searched recursively")
    p.add_argument(
        "-m",
        "--model",
        type=Path,
        help="model bundle directory (default: $NPCAM_MODEL, else ~/.cache/npcam/resnet18, "
        "else ~/.cache/npcam/efficientnet_lite0)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="a directory (existing, or ending in /) for <stem>_cam.jpg files, or the output file of a single "
        "image, its extension picking the format (default: <stem>_cam.jpg in the current directory)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_", metavar="IDX|LABEL", help="explain this class (default: the top-1)")
    which.add_argument("--top", type=int, default=1, metavar="K", help="one overlay for each of the top K classes")
    p.add_argument(
        "--alpha", type=float, default=0.5, help="heat-map opacity from 0 (photo) to 1 (heat map) (default 0.5)"
    )
    p.add_argument(
        "--keep-aspect", action="store_true", help="scale the short side to the input size instead of squashing"
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTINGS,
        default="fc",
        help="CAM weights: fc = the paper (default), softmax = the seed tutorial's",
    )
    p.add_argument("--bbox", action="store_true", help="draw the CAM's bounding box and report it in --json")
    p.add_argument(
        "--threshold",
        type=parse_threshold,
        default=DEFAULT_THRESHOLD,
        help="box threshold: 'mean' (the CAM's mean, default) or a fraction of its max "
        f"(the paper's rule is {PAPER_THRESHOLD})",
    )
    p.add_argument("--size", type=int, help="network input size (default: the bundle's, e.g. 224)")
    p.add_argument("--save-cam", action="store_true", help="also write the full-resolution CAM as float32 .npy")
    p.add_argument("--json", action="store_true", help="print one JSON object per image on stdout")
    p.add_argument(
        "--threads",
        type=int,
        help="onnxruntime threads per image (default: every core for one image; one for several, "
        "which then run side by side, one per core)",
    )
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"refuse larger images (default {MAX_PIXELS:,})")
    p.add_argument("--version", action="version", version=f"npcam {__version__}")
    args = p.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        p.error("--alpha must be between 0 and 1")
    for name in ("top", "threads", "max_pixels", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a file name that is not valid UTF-8 must not crash a print
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        _clear_progress()
        _error("interrupted; files already written are complete")
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    Image.MAX_IMAGE_PIXELS = args.max_pixels  # Pillow's bomb error then only fires above twice our limit
    try:
        images, missing = collect(args.inputs)
        jobs = plan(images, args.output, multiple=args.top > 1)
        # Several images run side by side, one onnxruntime thread each: on few cores that beats
        # splitting each image's trunk across threads (measured: Lite0 7.2 vs 11.8 ms an image).
        threads = args.threads or (1 if len(jobs) > 1 else None)
        model = Model(args.model or default_model_dir(), threads=threads)
        class_index = model.class_index(args.class_) if args.class_ is not None else None
    except NpcamError as e:
        _error(str(e))
        return EXIT_USAGE
    failed = len(missing)
    for message in missing:
        _error(message, args.json)
    with closing(run(model, jobs, args, class_index)) as results:
        for n, (job, result) in enumerate(results, 1):
            _progress(n, len(jobs), job.image)
            if isinstance(result, str):
                failed += 1
                _error(result, args.json, job.image)
                continue
            _clear_progress()
            print(json.dumps(result) if args.json else _describe(result, verbose=len(jobs) == 1), flush=True)
    _clear_progress()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run(
    model: Model, jobs: list[Job], args: argparse.Namespace, class_index: int | None
) -> Iterator[tuple[Job, dict | str]]:
    """Process the jobs, yielding each with its JSON record or its one-line error, in input order.

    Several images are in flight at once, one per worker thread, each going
    through the whole pipeline: onnxruntime, Pillow's codecs and NumPy's large
    operations release the GIL, so the workers overlap decoding, the trunk and
    encoding. On an interrupt, work not started is dropped and files being
    written are finished, so that only complete files remain.
    """
    workers = 1 if len(jobs) == 1 else max(1, (os.cpu_count() or 1) // (args.threads or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for job, future in _ahead(pool, jobs, partial(_process, model, args, class_index), depth=2 * workers):
            yield job, _result(job, future)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _ahead(pool: ThreadPoolExecutor, jobs: list[Job], fn, depth: int) -> Iterator[tuple[Job, Future]]:
    """``(job, pool.submit(fn, job))`` in order, keeping ``depth`` jobs submitted ahead."""
    queue: deque[tuple[Job, Future]] = deque()
    for job in jobs:
        queue.append((job, pool.submit(fn, job)))
        if len(queue) > depth:
            yield queue.popleft()
    yield from queue


def _result(job: Job, task: Future):
    """A task's value, or its failure as a one-line message naming the file."""
    try:
        return task.result()
    except NpcamError as e:
        return str(e)
    except (MemoryError, OSError) as e:
        return f"{job.image}: {type(e).__name__}: {e}"


def collect(inputs: list[str]) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """Expand directories into their image files.

    Returns ``(images, problems)``: each image with the directory it was found
    under (None for files named directly), and one message per missing input.
    """
    images: list[tuple[Path, Path | None]] = []
    problems = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            if not found:
                problems.append(f"{path}: no image files in this directory")
            images += [(p, path) for p in found]
        elif path.exists() or path.is_symlink():
            images.append((path, None))
        else:
            problems.append(f"{path}: no such file")
    return images, problems


def plan(images: list[tuple[Path, Path | None]], output: str | None, multiple: bool) -> list[Job]:
    """Decide every output path up front, so that no output overwrites an input or another output."""
    to_dir = output is None or output.endswith(("/", os.sep)) or Path(output).is_dir()
    if to_dir:
        out_dir = Path(output or ".")
        jobs = [
            Job(path, out_dir / (path.parent.relative_to(root) if root else Path()) / f"{path.stem}_cam.jpg", multiple)
            for path, root in images
        ]
    else:
        if len(images) > 1:
            raise NpcamError(f"-o {output}: names one file, but there are {len(images)} images; give a directory")
        target = Path(output)
        _format_for(target)
        if not target.parent.is_dir():
            raise NpcamError(f"{target.parent}: output directory does not exist")
        jobs = [Job(path, target, multiple) for path, _ in images]
    _refuse_clashes(jobs)
    return jobs


def _refuse_clashes(jobs: list[Job]) -> None:
    """No output may be an input or another job's output.

    Per-class outputs (``--top``) are named only after prediction, so an input
    named like one (``<stem>_<digits><suffix>`` beside a job's output) is refused too.
    """
    inputs = {job.image.resolve() for job in jobs}
    owners: dict[Path, Job] = {}
    for job in jobs:
        key = job.output.resolve()
        if key in inputs or key in owners:
            clash = "is an input" if key in inputs else f"is also the output of {owners[key].image}"
            raise NpcamError(f"{job.output}: output for {job.image} {clash}; choose another -o")
        owners[key] = job
    for path in inputs:
        match = re.fullmatch(r"(.+)_\d+(\.[^.]*)", path.name)
        owner = owners.get(path.with_name(match[1] + match[2])) if match else None
        if owner is not None and owner.per_class:
            raise NpcamError(f"{path}: an input named like a --top output; choose another -o")


def _process(model: Model, args: argparse.Namespace, class_index: int | None, job: Job) -> dict:
    """One image from file to written overlay and CAM files (runs in a worker thread); returns its JSON record."""
    pred = model.predict(job.image, keep_aspect=args.keep_aspect, max_pixels=args.max_pixels, size=args.size)
    classes = [class_index] if class_index is not None else [c for c, _, _ in pred.top(args.top)]
    size = pred.image.shape[:2]
    maps = []
    for c in classes:
        cam = model.cam(pred, c, size=size, weighting=args.weights)
        output = job.output_for(c)
        output.parent.mkdir(parents=True, exist_ok=True)
        picture = render.overlay(pred.image, cam, args.alpha)
        entry = {"class": c, "label": pred.labels[c], "score": float(pred.probs[c]), "output": str(output)}
        if args.bbox:
            box = cam_box(cam, args.threshold)
            entry["bbox"] = list(box) if box else None
            if box:
                picture = render.draw_box(picture, box)
        save_image(output, picture)
        if args.save_cam:
            cam_file = output.with_suffix(".npy")
            atomic_write(cam_file, lambda f, cam=cam: np.save(f, cam.astype(np.float32), allow_pickle=False))
            entry["cam"] = str(cam_file)
        maps.append(entry)
    record = {"image": str(job.image), **maps[0], "top5": _top5(pred), "width": size[1], "height": size[0]}
    if len(maps) > 1:
        record["maps"] = maps
    return record


def _top5(pred: Prediction) -> list[dict]:
    return [{"class": c, "label": label, "score": score} for c, label, score in pred.top(5)]


def _format_for(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise NpcamError(f"{path}: cannot tell an image format from the extension {path.suffix!r}")
    return fmt


def save_image(path: Path, picture: np.ndarray) -> None:
    """Write uint8 ``[H, W, 3]`` atomically, in the format the extension names (JPEG quality 90, fast PNG)."""
    fmt = _format_for(path)
    image = Image.fromarray(picture)
    atomic_write(path, lambda f: image.save(f, format=fmt, **SAVE_OPTIONS.get(fmt, {})))


def _describe(record: dict, verbose: bool) -> str:
    if not verbose:
        outputs = ", ".join(m["output"] for m in record.get("maps", [record]))
        return f"{record['image']}: {record['label']} ({record['score']:.1%}) -> {outputs}"
    lines = [f"{record['image']} ({record['width']}x{record['height']}), top-5:"]
    lines += [f"  {t['score']:6.1%}  {t['class']:>4}  {t['label']}" for t in record["top5"]]
    lines += [f"CAM of {m['class']} ({m['label']}) -> {m['output']}" for m in record.get("maps", [record])]
    return "\n".join(lines)


def _error(message: str, as_json: bool = False, image: Path | None = None) -> None:
    _clear_progress()
    print(f"npcam: error: {message}", file=sys.stderr, flush=True)
    if as_json and image is not None:
        print(json.dumps({"image": str(image), "error": message}), flush=True)


_progress_shown = False


def _progress(n: int, total: int, path: Path) -> None:
    global _progress_shown
    if total > 1 and sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[K[{n}/{total}] {path}")
        sys.stderr.flush()
        _progress_shown = True


def _clear_progress() -> None:
    global _progress_shown
    if _progress_shown:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()
        _progress_shown = False
