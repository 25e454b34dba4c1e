"""Files on disk: finding input images, naming outputs, and writing them so that no reader sees half of one.

Output names: ``<stem>_cam.jpg`` for each input, in the output directory
(mirroring subdirectories of a directory input); ``<stem>_cam_<class>.jpg``
per class with ``--top`` (a detector's: ``<stem>_cam_det<i>.jpg`` per detection).
When two inputs would get the same output (``a.jpg`` and ``a.png``), or an
output would be an input, each such input's extension joins its name:
``a_jpg_cam.jpg``, ``a_png_cam.jpg``.

npcam marks every image it writes (EXIF ``Software`` = ``npcam``), so a later
run over the same folder recognizes its own outputs and skips them, instead
of explaining them or refusing to overwrite them. The user-facing rules are in
docs/cli.md ("Outputs").
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .errors import NpcamError
from .image import rgbx_base
from .version import __version__

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SAVE_OPTIONS = {"JPEG": {"quality": 90}, "PNG": {"compress_level": 1}, "WEBP": {"quality": 90}}
MARK = "npcam"
_SOFTWARE = 0x0131  # EXIF tag
_OUTPUT_NAME = re.compile(r".+_cam(_\d+|_det\d+)?\.[^.]+")

_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class Input:
    """An image to explain, and the directory it was found under (None when named directly)."""

    path: Path
    root: Path | None = None


@dataclass
class Found:
    """What :func:`find_images` found.

    ``missing`` holds ``(input, message)`` for inputs that do not exist or hold
    no images; ``skipped`` counts npcam's own earlier outputs.
    """

    images: list[Input] = field(default_factory=list)
    missing: list[tuple[Path, str]] = field(default_factory=list)
    skipped: int = 0


def find_images(inputs: Iterable[str | os.PathLike]) -> Found:
    """Expand directories (recursively, in sorted order) into their image files.

    Hidden files and directories (a name starting with ``.``) inside a
    directory are skipped; so are images that npcam wrote itself.
    """
    found = Found()
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            images = [p for p in _walk(path) if p.suffix.lower() in IMAGE_SUFFIXES]
            own = {p for p in images if is_npcam_output(p)}
            found.skipped += len(own)
            images = [p for p in images if p not in own]
            if not images:
                found.missing.append((path, f"{path}: no image files in this directory"))
            found.images += [Input(p, path) for p in images]
        elif path.exists() or path.is_symlink():
            if is_npcam_output(path):
                found.skipped += 1
            else:
                found.images.append(Input(path))
        else:
            found.missing.append((path, f"{path}: no such file"))
    return found


def _walk(directory: Path) -> list[Path]:
    files = []
    for top, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(top, n) for n in names if not n.startswith(".")]
    return sorted(files)


def is_npcam_output(path: Path) -> bool:
    """True for an image npcam wrote: its name ends in ``_cam`` (or ``_cam_<class>``, ``_cam_det<i>``) and it carries
    npcam's mark."""
    if not _OUTPUT_NAME.fullmatch(path.name) or not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return str(image.getexif().get(_SOFTWARE, "")).startswith(MARK)
    except Exception:  # not an image Pillow reads: not one of ours
        return False


@dataclass(frozen=True)
class Job:
    """One input image and where its overlay goes.

    With ``per_class`` (``--top K`` > 1) each class gets ``<output stem>_<class><suffix>``, and each of a
    detector's detections ``<output stem>_det<i><suffix>``.
    """

    image: Path
    output: Path
    per_class: bool = False

    def output_for(self, class_index: int) -> Path:
        if not self.per_class:
            return self.output
        return self.output.with_name(f"{self.output.stem}_{class_index}{self.output.suffix}")

    def output_for_detection(self, index: int) -> Path:
        if not self.per_class:
            return self.output
        return self.output.with_name(f"{self.output.stem}_det{index}{self.output.suffix}")


def plan_outputs(images: list[Input], output: str | None, per_class: bool = False) -> list[Job]:
    """Decide every output path up front (see the module's docstring for the rule).

    ``output``: None (the current directory), a directory (existing, or a path
    ending in ``/``), or one file for a single image (its folder is created).
    """
    to_dir = output is None or output.endswith(("/", os.sep)) or Path(output).is_dir()
    if not to_dir:
        if len(images) > 1:
            raise NpcamError(f"-o {output}: names one file, but there are {len(images)} images; give a directory")
        target = Path(output)
        image_format(target)
        if images and target.resolve() == images[0].path.resolve():
            raise NpcamError(f"{target}: is the input image; choose another -o")
        return [Job(i.path, target, per_class) for i in images]
    out_dir = Path(output or ".")

    def target(i: Input, stem: str) -> Path:
        folder = out_dir / (i.path.parent.relative_to(i.root) if i.root else Path())
        return folder / f"{stem}_cam.jpg"

    outputs = [target(i, i.path.stem) for i in images]
    inputs = {i.path.resolve() for i in images}
    counts: dict[Path, int] = {}
    for path in outputs:
        counts[path.resolve()] = counts.get(path.resolve(), 0) + 1
    for n, (i, path) in enumerate(zip(images, outputs)):
        if counts[path.resolve()] > 1 or path.resolve() in inputs:
            outputs[n] = target(i, f"{i.path.stem}_{i.path.suffix.lstrip('.').lower() or 'noext'}")
    return [Job(i.path, path, per_class) for i, path in zip(images, outputs)]


def image_format(path: Path) -> str:
    """The Pillow format an output path's extension names; a one-line error if none."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise NpcamError(f"{path}: cannot tell an image format from the extension {path.suffix!r}")
    return fmt


def encode_image(picture: np.ndarray, fmt: str, file: BinaryIO) -> None:
    """Encode uint8 ``[H, W, 3]`` (JPEG quality 90, fast PNG), marked as npcam's where the format has EXIF."""
    rgbx = rgbx_base(picture)
    if rgbx is None:
        image = Image.fromarray(picture)
    else:  # Pillow's own layout: shared, not copied (JPEG and WebP take RGBX as it is)
        image = Image.frombuffer("RGBX", (rgbx.shape[1], rgbx.shape[0]), rgbx, "raw", "RGBX", 0, 1)
        if fmt not in ("JPEG", "WEBP"):
            image = image.convert("RGB")
    options = dict(SAVE_OPTIONS.get(fmt, {}))
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[_SOFTWARE] = f"{MARK} {__version__}"
        options["exif"] = exif
    image.save(file, format=fmt, **options)


def save_image(path: Path, picture: np.ndarray) -> None:
    """Write uint8 ``[H, W, 3]`` atomically in the format the extension names."""
    fmt = image_format(path)
    atomic_write(path, lambda f: encode_image(picture, fmt, f))


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a float32 ``.npy`` atomically."""
    atomic_write(path, lambda f: np.save(f, array.astype(np.float32), allow_pickle=False))


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, then rename it over ``target``.

    The folder is created if needed. On any failure (including Ctrl-C) the
    temporary file is removed and ``target`` is left as it was: absent, or
    the previous complete version.
    """
    if target.exists() and not target.is_file():
        # Renaming over a device, FIFO or directory would destroy it (think -o /dev/null as root).
        raise NpcamError(f"{target}: exists and is not a regular file; not replacing it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
