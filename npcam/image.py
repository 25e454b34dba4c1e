"""From a file (or PIL image, or array) to an RGB array and a network input.

Reading is where user files meet npcam, so every failure becomes an
:class:`~npcam.errors.NpcamError` that names the file and the problem.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import NpcamError

ImageLike = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]

# 100 MP: a 12 MP photo needs ~0.5 GB of working memory end to end; this
# bound keeps the worst case near 4 GB. Options.max_pixels (the CLI's --max-pixels) raises it.
MAX_PIXELS = 100_000_000

# Network inputs from large images: Pillow's resize first averages boxes of
# k x k pixels, k = floor(scale / REDUCING_GAP), then filters the rest exactly
# (reducing_gap). Only images at least 2 * REDUCING_GAP times the input size
# (1344 px for 224) are affected; their input moved by at most 2 levels of 255 on photos
# (docs/performance.md). 3.0 is Pillow's "close to fair resampling" setting.
REDUCING_GAP = 3.0

# Pillow refuses images over its own process-wide limit while opening them. npcam
# applies its own limit (max_pixels) from the header instead, so Pillow's check is
# switched off for the moment of opening; the lock keeps npcam's threads from
# restoring it under each other.
_PILLOW_LIMIT = threading.Lock()


def read_image(source: ImageLike, max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Load an image as it should be seen: upright, RGB.

    Parameters
    ----------
    source : see :func:`open_image`
    max_pixels : int
        Refuse images with more pixels than this, before decoding them.
    name : how error messages call the image (default: its path, or "image")

    Returns
    -------
    uint8 ``[H, W, 3]``, C-contiguous.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name)
    return np.asarray(open_image(source, max_pixels, name))


def open_image(source: ImageLike, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """:func:`read_image` as an RGB PIL image, decoded but not yet copied into an array.

    ``source`` is a path, the encoded bytes of a file, a binary file object, a
    PIL image (EXIF orientation is applied to a copy) or a uint8 array
    ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` (alpha composited over white).
    Every problem is an :class:`NpcamError` naming the image.

    Resizing for the network from this image, rather than from the array,
    saves a full-size copy (30 ms at 12 MP).
    """
    if isinstance(source, np.ndarray):
        return Image.fromarray(_array_to_rgb(source, name))
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))  # a copy: the caller's image stays as it was
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), name or "image", max_pixels)
    if hasattr(source, "read"):
        label = name or str(getattr(source, "name", "image"))
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(source.read())
        return _decode(source, label, max_pixels)
    return _decode(Path(source), name or str(source), max_pixels)


def _decode(source: Path | BinaryIO, name: str, max_pixels: int) -> Image.Image:
    return _decode_sized(source, name, max_pixels)[0]


def _decode_sized(
    source: Path | BinaryIO,
    name: str,
    max_pixels: int,
    min_size: int | None = None,
    shared: bool = False,
    max_side: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`_decode`, and the photo's own upright ``(H, W)``; see :func:`read_photo` for ``min_size``,
    ``max_side``, ``shared``."""
    try:
        with _PILLOW_LIMIT:
            pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise NpcamError(
                    f"{name}: {width}x{height} is {width * height:,} pixels, over the limit "
                    f"of {max_pixels:,} (raise it with max_pixels)"
                )
            img.seek(0)  # first frame of an animation
            if (min_size or max_side) and img.format == "JPEG":
                img.draft(img.mode, draft_request(width, height, min_size, max_side))  # DCT scaling
            stored = img.size
            if shared and img.mode == "RGB":
                _decode_into_numpy(img)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is checked above
                img.load()  # before the file closes
            ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy
            turned = img.size != stored  # a quarter turn (orientations 5-8) swaps the photo's sides too
            return to_rgb(img), ((width, height) if turned else (height, width))
    except NpcamError:
        raise
    except FileNotFoundError:
        raise NpcamError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise NpcamError(f"{name}: is a directory") from None
    except PermissionError:
        raise NpcamError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise NpcamError(f"{name}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise NpcamError(f"{name}: refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Pillow reports truncated and corrupt data as these.
        raise NpcamError(f"{name}: cannot decode image ({e})") from None
    except Exception as e:
        # Decoders meet arbitrary bytes and fail in arbitrary ways (the fuzzer found a
        # TypeError from a TIFF tag of the wrong type): the file cannot be decoded.
        raise NpcamError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def draft_request(width: int, height: int, min_size: int | None, max_side: int | None) -> tuple[int, int]:
    """The ``(w, h)`` to ask Pillow's ``draft`` for, for a JPEG of ``width x height``: DCT scaling then picks the
    smallest scale (1/2, 1/4, 1/8) whose decode is at least this on both sides.

    That keeps both sides at least ``min_size`` (the network's need) and the long side at least ``max_side`` (the
    overlay's size: at least the photo fitted into ``max_side``, rounded up, on each side). Either may be None.
    """
    want_w = want_h = min_size or 1
    if max_side is None:
        return want_w, want_h
    scale = min(1.0, max_side / max(width, height))
    return max(want_w, math.ceil(width * scale)), max(want_h, math.ceil(height * scale))


def fitted(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(h, w)``: a photo of ``height x width`` scaled to at most ``max_side`` on its long side (as is if it fits)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_photo(
    source: ImageLike,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
    min_size: int | None = None,
    max_side: int | None = None,
) -> tuple[Image.Image, np.ndarray, tuple[int, int]]:
    """Decode an image for explaining it: as an RGB PIL image and as pixels, sharing one buffer.

    Parameters
    ----------
    source, max_pixels, name : as for :func:`open_image`
    min_size : int, optional
        Decode a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8, Pillow's
        ``draft``) that keeps both sides at least ``min_size``: for runs that
        need only the network input. Other formats decode at full size.
    max_side : int, optional
        Also let a JPEG decode at a smaller DCT scale as long as its long side
        stays at least ``max_side`` (with ``min_size``: both hold), for overlays
        of at most ``max_side`` (:func:`fitted`). The pixels are not resized here.

    Returns
    -------
    image : the upright RGB PIL image, ``h x w``
    pixels : uint8 ``[h, w, 3]``, the same pixels. For a decoded file it is a
        view of a uint8 ``[h, w, 4]`` RGBX buffer (:func:`rgbx_base`) that is
        also the PIL image's storage, so neither side copies the other
        (Pillow keeps RGB as 4 bytes a pixel).
    size : ``(H, W)``, the photo's own upright size; ``(h, w)`` unless ``min_size`` reduced it
    """
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, name)
        return Image.fromarray(rgb), rgb, rgb.shape[:2]
    if isinstance(source, (bytes, bytearray, memoryview)):
        img, size = _decode_sized(io.BytesIO(source), name or "image", max_pixels, min_size, True, max_side)
    elif isinstance(source, Image.Image):
        img = open_image(source)
        size = (img.height, img.width)
    elif hasattr(source, "read"):
        label = name or str(getattr(source, "name", "image"))
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(source.read())
        img, size = _decode_sized(source, label, max_pixels, min_size, True, max_side)
    else:
        img, size = _decode_sized(Path(source), name or str(source), max_pixels, min_size, True, max_side)
    img, buffer = _shared(img)
    return img, buffer[:, :, :3], size


def rgbx_base(pixels: np.ndarray) -> np.ndarray | None:
    """The uint8 ``[H, W, 4]`` buffer that ``pixels`` (uint8 ``[H, W, 3]``) is the first three channels of, or None.

    That is: each pixel's three bytes are followed by a fourth, rows are ``4 W`` bytes, and the array
    that owns the memory holds all of it. The result is a view of the same memory.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return None
    height, width = pixels.shape[:2]
    owner = pixels.base
    if pixels.strides != (4 * width, 4, 1) or not (
        isinstance(owner, np.ndarray) and owner.dtype == np.uint8 and owner.flags.c_contiguous
    ):
        return None
    start = pixels.ctypes.data - owner.ctypes.data
    end = start + 4 * height * width
    if start < 0 or end > owner.nbytes:
        return None
    return owner.reshape(-1)[start:end].reshape(height, width, 4)  # a view whose base is the owner


# One spare RGBX buffer per thread. A run over files gives each photo's buffer back once its overlay is written
# (recycle), and the thread's next photo decodes into it: a directory of camera photos then makes the kernel map
# and zero no new 48 MB buffer per photo (measured: most of a 12 MP directory run's system time).
_SPARE = threading.local()


def recycle(pixels: np.ndarray) -> None:
    """Give the RGBX buffer behind ``pixels`` (from :func:`read_photo`) to this thread's next :func:`read_photo`.

    Only for a caller that keeps no other reference to these pixels or to their PIL image: the next photo
    decoded in this thread writes over them. Pixels that are not such a buffer are ignored.
    """
    rgbx = rgbx_base(pixels)
    if rgbx is not None and rgbx.base.ndim == 1:  # one of _rgbx_buffer's
        _SPARE.buffer = rgbx.base


def _rgbx_buffer(height: int, width: int) -> np.ndarray:
    """A uint8 ``[height, width, 4]`` buffer: this thread's spare if it is large enough, else a new one."""
    spare, _SPARE.buffer = getattr(_SPARE, "buffer", None), None
    size = 4 * height * width
    if spare is not None and spare.ndim == 1 and size <= spare.size:
        return spare[:size].reshape(height, width, 4)
    return np.empty(size, dtype=np.uint8).reshape(height, width, 4)


def _decode_into_numpy(img: Image.Image) -> None:
    """Make ``img`` (RGB, not yet loaded) decode into a NumPy RGBX buffer instead of Pillow's own memory.

    Pillow's ``map_buffer`` (what ``Image.frombuffer`` uses) gives an image
    core whose rows are the buffer's, and ``load()`` decodes into a core that
    is already there. Where a Pillow lacks these, the image decodes as usual
    and :func:`_shared` copies it once.
    """
    buffer = _rgbx_buffer(img.height, img.width)
    try:
        core = Image.core.map_buffer(buffer, img.size, "raw", 0, ("RGB", 0, 1))
        img.im = core
    except (AttributeError, TypeError, ValueError):
        return
    img.info[_BUFFER] = (buffer, core)


_BUFFER = "npcam_buffer"  # a key of the image's info while it is being decoded


def _shared(img: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """``img`` (RGB) backed by a uint8 ``[h, w, 4]`` NumPy buffer, and that buffer (copying only if it is not yet)."""
    buffer, core = img.info.pop(_BUFFER, (None, None))
    if buffer is not None and img.im is core:  # still the core decoded into (an EXIF turn makes a new one)
        return img, buffer
    buffer = _rgbx_buffer(img.height, img.width)
    try:
        core = Image.core.map_buffer(buffer, img.size, "raw", 0, ("RGB", 0, 1))
        core.paste(img.im, (0, 0, img.width, img.height))  # same mode and layout: a copy of rows
        shared = img._new(core)
    except (AttributeError, TypeError, ValueError):
        buffer[:, :, :3] = np.asarray(img)
        buffer[:, :, 3] = 255
        return img, buffer
    return shared, buffer


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB.

    Transparent pixels are composited over white (what a viewer shows),
    16-bit and float greys are scaled to 8 bits by their full range, palettes
    are expanded, CMYK is converted by Pillow.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        img = Image.fromarray(np.clip(grey / top * 255 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(array: np.ndarray, name: str | None = None) -> np.ndarray:
    """A uint8 grey, RGB or RGBA array as C-contiguous RGB ``[H, W, 3]`` (alpha over white, as for files)."""
    label = name or "image array"
    if array.dtype != np.uint8:
        raise NpcamError(f"{label}: must be uint8, not {array.dtype} (scale it to 0..255 first)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise NpcamError(f"{label}: must be [H, W], [H, W, 3] or [H, W, 4], not {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise NpcamError(f"{label}: is empty")
    if array.shape[2] == 4:
        return np.asarray(to_rgb(Image.fromarray(array, "RGBA")))
    return np.ascontiguousarray(array)


Size = tuple[int, int]  # (height, width) of a network input, in pixels
_SIZE = re.compile(r"\s*([0-9]+)\s*(?:[xX×]\s*([0-9]+)\s*)?")


# A network input beyond this is a typo, not a model: at 100000 px a side the trunk would never return.
MAX_SIDE = 4096


# ``size="fine"`` (``--size fine``): the network input that localized best on photos, FINE_SCALE times the
# model's own size. The gain, the cost and why this scale are in docs/methods.md ("A finer input").
FINE = "fine"
FINE_SCALE = 9 / 7  # 224 -> 288


def fine_size(native: Size, stride: int) -> Size:
    """``native`` ``(H, W)`` times :data:`FINE_SCALE`, each side rounded to a whole number of feature cells.

    Rounding to a multiple of ``stride`` keeps the last cell of the map on the photo rather than on padding:
    224 -> 288 and 240 or 260 -> 320 at a stride of 32. Each side is at least one stride.
    """
    return tuple(max(stride, round(side * FINE_SCALE / stride) * stride) for side in native)


def parse_size(text: str) -> Size:
    """``"S"`` (a square, ``S x S``) or ``"HxW"`` (height by width) as ``(H, W)``; ValueError says why not.

    Both sides must be whole numbers from 1 to :data:`MAX_SIDE`; ``x`` may also be ``X`` or ``×``.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"must be S or HxW (height x width) in whole pixels, e.g. 224 or 48x192; not {text!r}")
    height = int(match[1])
    width = int(match[2] or match[1])
    if height < 1 or width < 1:
        raise ValueError(f"must have positive sides, not {text!r}")
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"must be at most {MAX_SIDE} on each side, not {text!r}")
    return height, width


def as_size(size: int | Sequence[int] | None) -> Size | None:
    """An input size given as ``S`` (square), ``(H, W)`` or ``"HxW"``, as ``(H, W)``; None stays None.

    Raises :class:`NpcamError` for anything else (a negative, zero or non-integer side).
    """
    if size is None:
        return None
    if isinstance(size, str):
        try:
            return parse_size(size)
        except ValueError as e:
            raise NpcamError(f"input size {e}") from None
    sides = [size, size] if isinstance(size, (int, np.integer)) else list(size) if isinstance(size, Sequence) else []
    if not (
        len(sides) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in sides)
    ):
        raise NpcamError(f"input size must be S or (H, W) with positive whole sides, not {size!r}")
    if max(sides) > MAX_SIDE:
        raise NpcamError(f"input size must be at most {MAX_SIDE} on each side, not {size!r}")
    return int(sides[0]), int(sides[1])


def format_size(size: Size) -> str:
    """``(H, W)`` as ``"HxW"``, how the options take it."""
    return f"{size[0]}x{size[1]}"


def input_size(height: int, width: int, size: int | Size, keep_aspect: bool) -> Size:
    """The network input ``(h, w)`` for an image of ``height x width``, given the model's ``size`` ``(H, W)``.

    Squash to ``H x W`` (the tutorial's and most classifiers' choice), or,
    with ``keep_aspect``, scale the image, keeping its aspect, to the smallest
    size that covers ``H x W``: one side equals the model's, the other is at
    least the model's. For a square model that is "the short side to S"; for a
    wide 48x192 text-line model and a photo wider than 4:1, "the height to 48,
    the width as the photo's". Each side is capped at 4x the model's, so that
    a 1x10000 strip does not make a huge input.
    """
    rows, cols = (size, size) if isinstance(size, (int, np.integer)) else size
    if not keep_aspect:
        return rows, cols
    scale = max(rows / height, cols / width)
    h = min(max(round(height * scale), rows), 4 * rows)
    w = min(max(round(width * scale), cols), 4 * cols)
    return h, w


@dataclass(frozen=True)
class Placement:
    """Where a photo of ``(H, W)`` lies in the network input: input pixel ``x_in = x * scale_x + left`` (and
    ``y_in = y * scale_y + top``), the photo covering ``size`` ``(h, w)`` pixels of the input. A stretch fills
    the input; a letterbox keeps the aspect and pads (:func:`letterbox_placement`)."""

    scale_y: float
    scale_x: float
    top: int
    left: int
    size: tuple[int, int]

    def to_photo(self, boxes: np.ndarray, photo: tuple[int, int]) -> np.ndarray:
        """Boxes ``[n, 4]`` ``x0, y0, x1, y1`` in input pixels to the photo's ``(H, W)`` pixels, clipped to it."""
        out = np.asarray(boxes, dtype=np.float64).copy()
        out[:, 0::2] = (out[:, 0::2] - self.left) / self.scale_x
        out[:, 1::2] = (out[:, 1::2] - self.top) / self.scale_y
        out[:, 0::2] = out[:, 0::2].clip(0, photo[1])
        out[:, 1::2] = out[:, 1::2].clip(0, photo[0])
        return out


def letterbox_placement(height: int, width: int, size: Size) -> Placement:
    """A letterbox as the YOLO tools make it: the photo scaled to fit ``size`` ``(h, w)``, aspect kept, and
    centred, the pads split with the odd pixel at the bottom and right (ultralytics' ``round(d - 0.1)``)."""
    rows, cols = size
    scale = min(rows / height, cols / width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = round((rows - h) / 2 - 0.1), round((cols - w) / 2 - 0.1)
    return Placement(h / height, w / width, top, left, (h, w))


def stretch_placement(height: int, width: int, size: Size) -> Placement:
    """The photo squashed to fill ``size`` ``(h, w)``."""
    return Placement(size[0] / height, size[1] / width, 0, 0, tuple(size))


def preprocess(
    image: np.ndarray | Image.Image,
    size: int | Size,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    keep_aspect: bool = False,
    reducing_gap: float | None = REDUCING_GAP,
    pad: Sequence[int] | None = None,
) -> np.ndarray:
    """Resize with Pillow bilinear, scale to [0, 1], normalize per channel.

    Parameters
    ----------
    image : uint8 ``[H, W, 3]``, or the same as an RGB PIL image (saves a copy)
    size : int or (int, int)
        The network's input size ``(H, W)``, or ``S`` for ``S x S`` (224 for ResNet).
    mean, std : per-channel statistics in [0, 1] units
    keep_aspect : bool
        See :func:`input_size`.
    reducing_gap : float or None
        Pillow's ``reducing_gap`` (see :data:`REDUCING_GAP`); None resizes
        exactly as torchvision's ``Resize`` does, at any size.
    pad : the R, G, B levels (0..255) of a letterbox: the image keeps its aspect inside ``size``, centred,
        and the rest is this colour (:func:`letterbox_placement`; the YOLO tools pad with 114). None: no
        letterbox.

    Returns
    -------
    float32 ``[1, 3, h, w]``: ``(pixel / 255 - mean) / std``.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if pad is not None:
        placed = letterbox_placement(pil.height, pil.width, as_size(size))
        (h, w), (rows, cols) = placed.size, as_size(size)
        resized = np.empty((rows, cols, 3), dtype=np.uint8)
        resized[:] = np.asarray(pad, dtype=np.uint8)
        photo = pil.resize((w, h), Image.BILINEAR, reducing_gap=reducing_gap)
        resized[placed.top : placed.top + h, placed.left : placed.left + w] = np.asarray(photo)
        h, w = rows, cols
    else:
        h, w = input_size(pil.height, pil.width, size, keep_aspect)
        resized = np.asarray(pil.resize((w, h), Image.BILINEAR, reducing_gap=reducing_gap))
    # A uint8 channel normalizes to only 256 values: a table, made with the same float32
    # operations in the same order as torchvision's ToTensor + Normalize (bit-identical).
    levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255)
    table = (levels - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    x = np.empty((1, 3, h, w), dtype=np.float32)
    for c in range(3):
        np.take(table[c], resized[:, :, c], out=x[0, c])
    return x
