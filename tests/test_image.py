"""Reading images of every mode and orientation, and preprocessing them."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import synthetic_image
from PIL import Image

import npcam
from npcam import NpcamError
from npcam.image import input_size

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


def save(tmp_path, image: Image.Image, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(synthetic_image(40, 60))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    else:
        img = rgb.convert(mode)
    suffix = {"CMYK": ".jpg", "F": ".tif", "I": ".tif"}.get(mode, ".png")
    out = npcam.read_image(save(tmp_path, img, "x" + suffix))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16"):
        np.testing.assert_allclose(out[..., 0], np.asarray(rgb.convert("L")), atol=1)


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = npcam.read_image(save(tmp_path, Image.fromarray(rgba), "a.png"))
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    # A mark in the top-left corner of the upright image must end up there after reading.
    upright = np.zeros((40, 60, 3), dtype=np.uint8)
    upright[:10, :10] = 255
    stored = (
        Image.fromarray(upright).transpose(
            {
                1: None,
                2: Image.FLIP_LEFT_RIGHT,
                3: Image.ROTATE_180,
                4: Image.FLIP_TOP_BOTTOM,
                5: Image.TRANSPOSE,
                6: Image.ROTATE_90,
                7: Image.TRANSVERSE,
                8: Image.ROTATE_270,
            }[orientation]
        )
        if orientation != 1
        else Image.fromarray(upright)
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = npcam.read_image(save(tmp_path, stored, "o.jpg", exif=exif, quality=95))
    assert out.shape == (40, 60, 3)
    assert out[:10, :10].mean() > 200 and out[-10:, -10:].mean() < 50


def test_array_and_pil_inputs(tmp_path):
    rgb = synthetic_image(30, 20)
    np.testing.assert_array_equal(npcam.read_image(rgb), rgb)
    np.testing.assert_array_equal(npcam.read_image(Image.fromarray(rgb)), rgb)
    assert npcam.read_image(rgb[..., 0]).shape == (30, 20, 3)
    with pytest.raises(NpcamError, match="uint8"):
        npcam.read_image(rgb.astype(np.float32))


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not an image"), (b"hello, I am text", "not an image"), (None, "no such file")],
)
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NpcamError, match=f"bad.jpg: {message}"):
        npcam.read_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(tmp_path, fmt):
    path = save(tmp_path, Image.fromarray(synthetic_image(200, 200)), "t." + fmt.lower(), format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NpcamError, match="cannot decode"):
        npcam.read_image(path)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = save(tmp_path, Image.new("RGB", (300, 200)), "big.png")
    with pytest.raises(NpcamError, match="60,000 pixels, over the limit of 50,000"):
        npcam.read_image(path, max_pixels=50_000)
    assert npcam.read_image(path, max_pixels=60_000).shape == (200, 300, 3)


def test_input_size():
    assert input_size(300, 451, 224, keep_aspect=False) == (224, 224)
    assert input_size(300, 451, 224, keep_aspect=True) == (224, 337)
    assert input_size(1, 10000, 224, keep_aspect=True) == (224, 896)  # long side capped at 4x


def test_keep_aspect_gives_a_non_square_map(tiny_model):
    pred = tiny_model.predict(synthetic_image(300, 600), keep_aspect=True)
    assert pred.features.shape == (512, 7, 14)
    assert tiny_model.cam(pred, size=(300, 600)).shape == (300, 600)


def test_fuzzer_finding_tiff_with_double_strip_offsets(tmp_path):
    """Found by scripts/fuzz_decode.py: Pillow raises TypeError loading this TIFF."""
    data = base64.b64decode(
        "SUkqAAgAAAAKAAABBAABAAAAEQAAAAEBBAABAAAADAAAAAIBAwADAAAAhgAAAAMBAwABAAAAAQAAAAYBAwABAAAAAgAAABEBDAAB"
        "AAAAjAAAABUBAwABAAAAAwAAABYBBAABAAAADAAAABcBBAABAAAAZAIAABwBAwABAAAAAQAAAAAAAAAIAAgACABegcFv1cALfMfa"
        "a7ANBwtOxZ1n"
    )
    path = tmp_path / "fuzz.tif"
    path.write_bytes(data)
    with pytest.raises(NpcamError, match="fuzz.tif: cannot decode image"):
        npcam.read_image(path)


def test_the_library_owns_its_pixel_limit(tmp_path):
    """Pillow's own bomb limit (~179 MP) neither overrides nor preempts npcam's max_pixels."""
    from test_robustness import png_claiming

    path = tmp_path / "claims_200mp.png"
    path.write_bytes(png_claiming(20_000, 10_000))
    with pytest.raises(NpcamError, match="cannot decode"):  # past the header check: the data is just missing
        npcam.read_image(path, max_pixels=300_000_000)
    with pytest.raises(NpcamError, match="200,000,000 pixels, over the limit of 5,000,000"):
        npcam.read_image(path, max_pixels=5_000_000)
    big = save(tmp_path, Image.fromarray(synthetic_image(1000, 1200)), "big.jpg")
    with pytest.raises(NpcamError, match="1,200,000 pixels, over the limit of 1,000,000"):
        npcam.read_image(big, max_pixels=1_000_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global is left as it was


def test_bytes_and_file_objects(tmp_path):
    import io

    path = save(tmp_path, Image.fromarray(synthetic_image(30, 40)), "p.png")
    want = npcam.read_image(path)
    np.testing.assert_array_equal(npcam.read_image(path.read_bytes()), want)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(npcam.read_image(f), want)

    class Stream(io.RawIOBase):  # a pipe-like, unseekable stream
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.data.readinto(b)

    np.testing.assert_array_equal(npcam.read_image(Stream(path.read_bytes())), want)
    with pytest.raises(NpcamError, match="upload.jpg: not an image Pillow can read"):
        npcam.read_image(b"garbage", name="upload.jpg")
    with pytest.raises(NpcamError, match="^image: not an image"):
        npcam.read_image(b"garbage")


def test_rgba_and_single_channel_arrays():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255
    out = npcam.read_image(rgba)
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()  # as for an RGBA file
    assert npcam.read_image(np.zeros((5, 6, 1), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(NpcamError, match=r"must be \[H, W\], \[H, W, 3\] or \[H, W, 4\]"):
        npcam.read_image(np.zeros((5, 6, 2), np.uint8))
