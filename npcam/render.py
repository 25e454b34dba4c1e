"""Colouring a CAM and blending it over the photo, in uint8 NumPy.

The colormap is OpenCV's ``COLORMAP_JET`` (blue = 0, red = 1), stored here
as its 256 RGB entries so that npcam needs neither OpenCV nor matplotlib.
The test suite checks it entry by entry against ``cv2.applyColorMap``.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .upsample import interpolation_matrix

# OpenCV COLORMAP_JET, RGB order: 256 entries x 3 bytes, 16 entries a line.
JET = np.frombuffer(
    bytes.fromhex(
        "00008000008400008800008c00009000009400009800009c0000a00000a40000a80000ac0000b00000b40000b80000bc"  # 0-15
        "0000c00000c40000c80000cc0000d00000d40000d80000dc0000e00000e40000e80000ec0000f00000f40000f80000fc"  # 16-31
        "0000ff0004ff0008ff000cff0010ff0014ff0018ff001cff0020ff0024ff0028ff002cff0030ff0034ff0038ff003cff"  # 32-47
        "0040ff0044ff0048ff004cff0050ff0054ff0058ff005cff0060ff0064ff0068ff006cff0070ff0074ff0078ff007cff"  # 48-63
        "0080ff0084ff0088ff008cff0090ff0094ff0098ff009cff00a0ff00a4ff00a8ff00acff00b0ff00b4ff00b8ff00bcff"  # 64-79
        "00c0ff00c4ff00c8ff00ccff00d0ff00d4ff00d8ff00dcff00e0ff00e4ff00e8ff00ecff00f0ff00f4ff00f8ff00fcff"  # 80-95
        "02fffe06fffa0afff60efff212ffee16ffea1affe61effe222ffde26ffda2affd62effd232ffce36ffca3affc63effc2"  # 96-111
        "42ffbe46ffba4affb64effb252ffae56ffaa5affa65effa262ff9e66ff9a6aff966eff9272ff8e76ff8a7aff867eff82"  # 112-127
        "82ff7e86ff7a8aff768eff7292ff6e96ff6a9aff669eff62a2ff5ea6ff5aaaff56aeff52b2ff4eb6ff4abaff46beff42"  # 128-143
        "c2ff3ec6ff3acaff36ceff32d2ff2ed6ff2adaff26deff22e2ff1ee6ff1aeaff16eeff12f2ff0ef6ff0afaff06feff01"  # 144-159
        "fffc00fff800fff400fff000ffec00ffe800ffe400ffe000ffdc00ffd800ffd400ffd000ffcc00ffc800ffc400ffc000"  # 160-175
        "ffbc00ffb800ffb400ffb000ffac00ffa800ffa400ffa000ff9c00ff9800ff9400ff9000ff8c00ff8800ff8400ff8000"  # 176-191
        "ff7c00ff7800ff7400ff7000ff6c00ff6800ff6400ff6000ff5c00ff5800ff5400ff5000ff4c00ff4800ff4400ff4000"  # 192-207
        "ff3c00ff3800ff3400ff3000ff2c00ff2800ff2400ff2000ff1c00ff1800ff1400ff1000ff0c00ff0800ff0400ff0000"  # 208-223
        "fc0000f80000f40000f00000ec0000e80000e40000e00000dc0000d80000d40000d00000cc0000c80000c40000c00000"  # 224-239
        "bc0000b80000b40000b00000ac0000a80000a40000a000009c00009800009400009000008c0000880000840000800000"  # 240-255
    ),
    dtype=np.uint8,
).reshape(256, 3)


def to_uint8(cam: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to 0..255, rounding to nearest.

    Parameters
    ----------
    cam : float ``[H, W]``

    Returns
    -------
    uint8 ``[H, W]``
    """
    scaled = np.multiply(cam, 255, dtype=np.float32)
    np.clip(scaled, 0, 255, out=scaled)
    scaled += 0.5
    return scaled.astype(np.uint8)


def colorize(cam: np.ndarray) -> np.ndarray:
    """Jet heat map of a CAM: float ``[H, W]`` in [0, 1] to uint8 RGB ``[H, W, 3]``."""
    return np.take(JET, to_uint8(cam), axis=0)  # np.take: ~3x faster than JET[index] here


# Pixels per slice in overlay(): a slice's temporaries (~9 bytes a pixel) then stay in cache.
CHUNK_PIXELS = 1 << 19


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The jet-coloured CAM blended over the image: ``alpha * heat + (1 - alpha) * image``.

    Parameters
    ----------
    image : uint8 ``[H, W, 3]``
    cam : float ``[H, W]`` in [0, 1], at the image's size
    alpha : float in [0, 1]
        Opacity of the heat map: 0 gives the photo, 1 the heat map alone.

    Returns
    -------
    uint8 ``[H, W, 3]``, within one level of the exact float blend.

    Integer arithmetic with alpha in 1/256 steps, so every term fits in uint16.
    The heat map's share takes only 256 values per channel and comes from a
    table; the work goes slice by slice so that the temporaries stay in cache.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    if cam.shape != image.shape[:2]:
        raise ValueError(f"cam shape {cam.shape} does not match image shape {image.shape[:2]}")
    a = round(alpha * 256)
    heat_share = JET.astype(np.uint16) * np.uint16(a) + np.uint16(128)  # [256, 3], +128 rounds
    out = np.empty_like(image)
    rows = max(1, CHUNK_PIXELS // max(1, image.shape[1]))
    for top in range(0, image.shape[0], rows):
        part = slice(top, top + rows)
        mixed = np.take(heat_share, to_uint8(cam[part]), axis=0)
        photo = image[part].astype(np.uint16)
        photo *= np.uint16(256 - a)
        mixed += photo
        mixed >>= 8
        out[part] = mixed
    return out


def overlay_map(
    image: np.ndarray,
    cam: np.ndarray,
    alpha: float = 0.5,
    threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`overlay` of the map upsampled to the image, without the full-size float map.

    The same result as ``overlay(image, upsample(cam, image.shape[:2]), alpha)``:
    each band of rows is upsampled (the same two float32 products as
    :func:`~npcam.upsample.upsample`, on that band's rows of the row matrix),
    coloured and blended while it is in cache, and the bands run on a small
    thread pool (NumPy and BLAS release the GIL), so that at 12 MP the
    48 MB float map is never written and both cores work.

    Parameters
    ----------
    image : uint8 ``[H, W, 3]``, or an RGBX ``[H, W, 4]`` as
        :func:`npcam.image.read_photo` decodes it (X = 255, which the blend keeps)
    cam : float ``[h, w]`` in [0, 1], at feature resolution
    alpha : float in [0, 1], as for :func:`overlay`
    threads : bands in flight at once (default: one per usable core; 1 runs them in this thread)
    out : uint8, the image's shape: where to write the result (default: a new array). It may be
        ``image`` itself: each band reads its rows of the photo before writing them.

    Returns
    -------
    uint8 ``[H, W, 3]`` (``[H, W, 4]`` RGBX for an RGBX image): ``out`` if given
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    if cam.ndim != 2 or image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected cam [h, w] and uint8 image [H, W, 3|4], not {cam.shape} and {image.shape}")
    if out is None:
        out = np.empty_like(image)
    elif out.shape != image.shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {list(image.shape)}, not {out.dtype} {list(out.shape)}")
    height, width, channels = image.shape
    rows_matrix = interpolation_matrix(cam.shape[0], height)
    cols_t = interpolation_matrix(cam.shape[1], width).T
    cam = cam.astype(np.float32, copy=False)
    a = round(alpha * 256)
    table = JET if channels == 3 else np.concatenate([JET, np.full((256, 1), 255, np.uint8)], axis=1)
    packed = channels == 4 and a == 128 and _packs(image) and _packs(out)
    if packed:
        # Half and half (the default alpha): the blend below is (heat + photo + 1) >> 1 in every byte, which is
        # (h | p) - ((h ^ p) >> 1) with the shift kept inside each byte. On RGBX that is a few uint32 operations
        # per pixel instead of widening every channel to uint16 (the same bytes, about 2x faster at 12 MP).
        heat_rgbx = np.ascontiguousarray(table).view(np.uint32)[:, 0]
        photo_words, out_words = image.view(np.uint32)[:, :, 0], out.view(np.uint32)[:, :, 0]
    heat_share = table.astype(np.uint16) * np.uint16(a) + np.uint16(128)
    if channels == 4:
        # Four uint16 lanes are one uint64: the lookup then moves one 8-byte item per pixel (~2x faster).
        heat_share = np.ascontiguousarray(heat_share).view(np.uint64)[:, 0]
    rows = max(1, CHUNK_PIXELS // max(1, width))

    def band(top: int) -> None:
        part = slice(top, top + rows)
        level = to_uint8(rows_matrix[part] @ cam @ cols_t)  # [rows, W]: upsample()'s products for these rows
        if packed:
            heat = np.take(heat_rgbx, level)
            half_difference = np.bitwise_xor(heat, photo_words[part])
            half_difference >>= 1
            half_difference &= np.uint32(0x7F7F7F7F)
            np.bitwise_or(heat, photo_words[part], out=heat)
            np.subtract(heat, half_difference, out=out_words[part])
            return
        if channels == 4:
            mixed = np.take(heat_share, level).view(np.uint16).reshape(*level.shape, 4)
        else:
            mixed = np.take(heat_share, level, axis=0)
        photo = image[part].astype(np.uint16)
        photo *= np.uint16(256 - a)
        mixed += photo
        mixed >>= 8
        out[part] = mixed

    tops = range(0, height, rows)
    workers = min(threads or usable_cores(), len(tops))
    if workers <= 1:
        for top in tops:
            band(top)
    else:
        # list(): wait for every band and re-raise the first error.
        list(_pool().map(band, tops))
    return out


def _packs(rgbx: np.ndarray) -> bool:
    """Whether uint8 ``[H, W, 4]`` can be seen as uint32 ``[H, W, 1]``: each pixel's 4 bytes together and aligned."""
    return rgbx.strides[2] == 1 and rgbx.strides[1] == 4 and rgbx.ctypes.data % 4 == 0 and rgbx.strides[0] % 4 == 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's band pool, one thread per usable core; a forked child makes its own (threads do not survive fork)."""
    with _POOL_LOCK:
        pid = os.getpid()
        if pid not in _POOL:
            _POOL.clear()
            _POOL[pid] = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="npcam-render")
        return _POOL[pid]


def draw_box(image: np.ndarray, box: tuple[int, int, int, int], color=(255, 255, 255)) -> np.ndarray:
    """A copy of uint8 ``[H, W, 3]`` with the outline of inclusive box ``(x0, y0, x1, y1)``.

    The line is white with a black edge, so that it shows on every jet colour,
    and about 1/150 of the image's short side thick (at least 1 pixel).
    """
    return draw_box_into(image.copy(), box, color)


def draw_box_into(
    image: np.ndarray, box: tuple[int, int, int, int], color=(255, 255, 255), thickness: int | None = None
) -> np.ndarray:
    """:func:`draw_box` on ``image`` itself (uint8 ``[H, W, 3]`` or RGBX ``[H, W, 4]``, whose 4th channel is kept);
    ``thickness`` in pixels (default: about 1/150 of the short side), the black edge one more."""
    out = image[:, :, :3]
    x0, y0, x1, y1 = box
    thick = thickness or max(1, min(image.shape[:2]) // 150)
    for width, c in ((thick + 1, (0, 0, 0)), (thick, color)):
        for ys, xs in (
            (slice(y0, y0 + width), slice(x0, x1 + 1)),
            (slice(max(y1 - width + 1, y0), y1 + 1), slice(x0, x1 + 1)),
            (slice(y0, y1 + 1), slice(x0, x0 + width)),
            (slice(y0, y1 + 1), slice(max(x1 - width + 1, x0), x1 + 1)),
        ):
            out[ys, xs] = c
    return image


# A detector's overlay: every detection's box in its class's colour, with its label; the explained one emphasized.

GOLDEN = 0.6180339887498949  # hues a golden-ratio turn apart: any run of classes gets well-separated colours


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` on a detector's overlay: RGB levels, bright and saturated."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((0.83 + index * GOLDEN) % 1.0, 0.8, 1.0)
    return round(255 * r), round(255 * g), round(255 * b)


def draw_detections_into(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: list[int],
    texts: list[str],
    emphasized: int | None = None,
) -> np.ndarray:
    """Boxes and their labels on ``image`` itself, as the YOLO tools draw detections.

    Parameters
    ----------
    image : uint8 ``[H, W, 3]``, or RGBX ``[H, W, 4]`` (the 4th channel is kept)
    boxes : float ``[n, 4]``, ``x0, y0, x1, y1`` in the image's pixels (edges: a box from 0 to W covers the image)
    classes : n class indices, which pick each box's colour (:func:`class_colour`)
    texts : n labels, written above each box (inside it at the image's top edge)
    emphasized : the index of the box drawn thicker and last (the explained detection); None: all alike

    Returns
    -------
    ``image``. Lines are in the class's colour with a black edge, so that they show on every jet colour; the
    emphasized one is over twice as thick as the others. The font is Pillow's default, scaled to the image.
    """
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return image
    thin = max(2, round(min(height, width) / 300))
    # Inclusive pixels: a box's last column is the one its right edge ends in.
    x0 = np.clip(np.floor(boxes[:, 0]), 0, width - 1).astype(int)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, height - 1).astype(int)
    x1 = np.maximum(np.clip(np.ceil(boxes[:, 2]) - 1, 0, width - 1).astype(int), x0)
    y1 = np.maximum(np.clip(np.ceil(boxes[:, 3]) - 1, 0, height - 1).astype(int), y0)
    order = [j for j in range(len(boxes)) if j != emphasized] + ([emphasized] if emphasized is not None else [])
    size = max(12, round(min(height, width) / 30))
    for j in order:
        colour = class_colour(classes[j])
        thick = 2 * thin + 1 if j == emphasized else thin
        draw_box_into(image, (x0[j], y0[j], x1[j], y1[j]), colour, thick)
        _label_into(image, texts[j], x0[j], y0[j], colour, size)
    return image


def _label_into(image: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], size: int) -> None:
    """``text`` on a patch of ``colour`` whose bottom-left is the box corner ``(x, y)``, moved to stay in the image."""
    mask = _text_mask(text, size)  # uint8 [h, w], the text's coverage
    pad = max(1, size // 6)
    h, w = mask.shape[0] + 2 * pad, mask.shape[1] + 2 * pad
    height, width = image.shape[:2]
    top = y - h if y - h >= 0 else y  # above the box, or inside it at the image's top
    left = min(x, max(0, width - w))
    patch = image[top : top + h, left : left + w, :3]
    patch[...] = np.array(colour, np.uint8)  # an array: numpy casts a tuple element by element
    text_part = patch[pad : pad + mask.shape[0], pad : pad + mask.shape[1]]
    coverage = mask[: text_part.shape[0], : text_part.shape[1], None].astype(np.uint16)
    ink = 0 if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else 255
    # colour * (1 - m) + ink * m, m = coverage / 255, in integers (rounded)
    blend = np.array(colour, np.uint16) * (255 - coverage) + np.uint16(ink) * coverage + np.uint16(127)
    text_part[...] = blend // np.uint16(255)


@functools.lru_cache(maxsize=512)  # labels repeat (a class and a score to two places); each at most size x 40 size
def _text_mask(text: str, size: int) -> np.ndarray:
    """``text`` in Pillow's default font of about ``size`` pixels, as its coverage: uint8 ``[h, w]``."""
    from PIL import Image, ImageDraw

    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, right - left), max(1, bottom - top)))
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    return np.asarray(canvas)


@functools.lru_cache(maxsize=64)
def _font(size: int):
    """Pillow's default font at ``size`` pixels (its scalable one from Pillow 10.1; the bitmap one before)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one size only
        return ImageFont.load_default()
