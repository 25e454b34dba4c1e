"""From a file (or PIL image, or array) to an RGB array and a network input.

Reading is where user files meet npcam, so every failure becomes an
:class:`~npcam.errors.NpcamError` that names the file and the problem.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import NpcamError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

# 100 MP: a 12 MP photo needs ~0.5 GB of working memory end to end; this
# bound keeps the worst case near 4 GB. The CLI's --max-pixels raises it.
MAX_PIXELS = 100_000_000


def read_image(source: ImageLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Load an image as it should be seen: upright, RGB.

    Parameters
    ----------
    source : path, PIL image or uint8 array ``[H, W, 3]`` (or ``[H, W]`` grey)
    max_pixels : int
        Refuse images with more pixels than this, before decoding them.

    Returns
    -------
    uint8 ``[H, W, 3]``, C-contiguous.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    return np.asarray(open_image(source, max_pixels))


def open_image(source: ImageLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """:func:`read_image` as a PIL image, decoded but not yet copied into an array.

    Resizing for the network from this image, rather than from the array,
    saves a full-size copy (30 ms at 12 MP).
    """
    if isinstance(source, np.ndarray):
        return Image.fromarray(_array_to_rgb(source))
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))  # a copy: the caller's image stays as it was
    path = Path(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own bomb limit; ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise NpcamError(
                        f"{path}: {width}x{height} is {width * height:,} pixels, over the limit "
                        f"of {max_pixels:,} (raise it with --max-pixels)"
                    )
                img.seek(0)  # first frame of an animation
                img.load()  # before the file closes
                ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy
                return to_rgb(img)
    except NpcamError:
        raise
    except FileNotFoundError:
        raise NpcamError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NpcamError(f"{path}: is a directory") from None
    except PermissionError:
        raise NpcamError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise NpcamError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise NpcamError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Pillow reports truncated and corrupt data as these.
        raise NpcamError(f"{path}: cannot decode image ({e})") from None
    except Exception as e:
        # Decoders meet arbitrary bytes and fail in arbitrary ways (the fuzzer found a
        # TypeError from a TIFF tag of the wrong type): the file cannot be decoded.
        raise NpcamError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


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


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise NpcamError(f"image array must be uint8, not {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise NpcamError(f"image array must be [H, W, 3] or [H, W], not {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise NpcamError("image array is empty")
    return np.ascontiguousarray(array)


def input_size(height: int, width: int, size: int, keep_aspect: bool) -> tuple[int, int]:
    """The network input ``(h, w)`` for an image of ``height x width``.

    Squash to ``size x size`` (the tutorial's and most classifiers' choice), or,
    with ``keep_aspect``, scale the short side to ``size``; the long side is
    capped at 4x ``size`` so that a 1x10000 strip does not make a huge input.
    """
    if not keep_aspect:
        return size, size
    scale = size / min(height, width)
    h = min(max(round(height * scale), size), 4 * size)
    w = min(max(round(width * scale), size), 4 * size)
    return h, w


def preprocess(
    image: np.ndarray | Image.Image,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    keep_aspect: bool = False,
) -> np.ndarray:
    """Resize with Pillow bilinear, scale to [0, 1], normalize per channel.

    Parameters
    ----------
    image : uint8 ``[H, W, 3]``, or the same as an RGB PIL image (saves a copy)
    size : int
        The network's input size (224 for ResNet).
    mean, std : per-channel statistics in [0, 1] units
    keep_aspect : bool
        See :func:`input_size`.

    Returns
    -------
    float32 ``[1, 3, h, w]``: ``(pixel / 255 - mean) / std``.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    h, w = input_size(pil.height, pil.width, size, keep_aspect)
    resized = np.asarray(pil.resize((w, h), Image.BILINEAR))
    # A uint8 channel normalizes to only 256 values: a table, made with the same float32
    # operations in the same order as torchvision's ToTensor + Normalize (bit-identical).
    levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255)
    table = (levels - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    x = np.empty((1, 3, h, w), dtype=np.float32)
    for c in range(3):
        np.take(table[c], resized[:, :, c], out=x[0, c])
    return x
