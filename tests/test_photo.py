"""Camera-size photos: shared decode, reduced network inputs, the fused overlay and record-only runs.

References: the unfused path (``overlay(image, upsample(cam))``, itself checked
against torch and OpenCV in test_parity.py), ``read_image`` for pixels, and the
exact resize (``reducing_gap=None``, torchvision's) for the network input. The
12 MP photos are the shipped samples upscaled with noise, made per run.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
from conftest import PHOTOS, record, synthetic_image
from PIL import Image

import npcam
from npcam import render
from npcam.explain import Options, describe, draw, explain, explain_files
from npcam.files import Job, encode_image
from npcam.image import preprocess, read_image, read_photo, recycle, rgbx_base
from npcam.upsample import upsample


@pytest.fixture(scope="module")
def photos_12mp(tmp_path_factory) -> list:
    """The shipped photos as 12 MP JPEGs: bicubic upscale, noise of 8 levels, quality 90 (like a phone's)."""
    folder = tmp_path_factory.mktemp("12mp")
    rng = np.random.default_rng(0)
    paths = []
    for photo in PHOTOS:
        img = Image.open(photo).convert("RGB")
        size = (4000, 3000) if img.width >= img.height else (3000, 4000)
        big = np.asarray(img.resize(size, Image.BICUBIC)).astype(np.float32)
        noisy = np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)
        path = folder / f"{photo.stem}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


# The fused overlay


def unfused(image: np.ndarray, cam: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """overlay(image, upsample(cam)) and where its 8-bit level is within 1e-3 of a rounding tie."""
    full = upsample(cam, image.shape[:2])
    scaled = full.astype(np.float64) * 255
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
    return render.overlay(image, full, alpha), near_tie


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape, cam_shape, alpha",
    [((3000, 4000), (7, 7), 0.5), ((375, 500), (7, 10), 0.3), ((1, 1), (1, 1), 1.0), ((3, 1000), (7, 7), 0.0)],
)
def test_overlay_map_is_the_overlay_of_the_upsampled_map(shape, cam_shape, alpha, threads):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    cam = rng.random(cam_shape, dtype=np.float32)
    want, near_tie = unfused(image, cam, alpha)
    got = render.overlay_map(image, cam, alpha, threads=threads)
    # The bands compute upsample()'s float32 products row for row: equal, except that a BLAS could round a
    # product differently by an ulp, which can move a level only where it sits on a tie (none seen so far).
    differ = np.any(got != want, axis=2)
    assert record("fused overlay pixels off the unfused one", differ.sum()) == 0 or not np.any(differ & ~near_tie)
    rgbx = np.concatenate([image, np.full((*shape, 1), 255, np.uint8)], axis=2)  # Pillow's RGBX: X = 255
    got4 = render.overlay_map(rgbx, cam, alpha, threads=threads)
    assert got4.shape == (*shape, 4) and (got4[..., 3] == 255).all()
    np.testing.assert_array_equal(got4[..., :3], got)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_overlay_map_into_a_given_array_or_the_image_itself(alpha):
    """``out``: the same pixels written where asked, the photo itself included (each band reads its rows first)."""
    rng = np.random.default_rng(7)
    rgbx = rng.integers(0, 256, (301, 257, 4), dtype=np.uint8)
    rgbx[..., 3] = 255
    cam = rng.random((5, 6), dtype=np.float32)
    want = render.overlay_map(rgbx, cam, alpha, threads=1)
    out = np.zeros_like(rgbx)
    assert render.overlay_map(rgbx, cam, alpha, out=out) is out
    np.testing.assert_array_equal(out, want)
    photo = rgbx.copy()
    assert render.overlay_map(photo, cam, alpha, out=photo) is photo
    np.testing.assert_array_equal(photo, want)
    with pytest.raises(ValueError, match="out must be"):
        render.overlay_map(rgbx, cam, alpha, out=np.zeros((301, 257, 3), np.uint8))


def test_half_and_half_blend_of_rgbx_in_any_layout_is_the_rounded_mean():
    """Alpha 0.5 blends packed RGBX words; every byte must be (heat + photo + 1) // 2, whatever the buffer's layout.

    The reference is written from the definition: the jet colour of each level, then the rounded mean in
    integers. Layouts: contiguous, a view that starts one byte in (words not aligned: the uint16 path), and
    rows of a wider buffer.
    """
    rng = np.random.default_rng(11)
    cam = rng.random((7, 7), dtype=np.float32)
    wide = rng.integers(0, 256, (40, 70 * 4 + 1), dtype=np.uint8)
    for rgbx in (
        rng.integers(0, 256, (40, 70, 4), dtype=np.uint8),
        wide[:, 1:].reshape(40, 70, 4),  # one byte in: not aligned to 4
        rng.integers(0, 256, (40, 90, 4), dtype=np.uint8)[:, 10:80],  # rows longer than the image
    ):
        levels = render.to_uint8(upsample(cam, rgbx.shape[:2])).astype(np.int32)
        heat = np.concatenate([render.JET, np.full((256, 1), 255, np.uint8)], axis=1)[levels].astype(np.int32)
        want = (heat + rgbx + 1) // 2
        np.testing.assert_array_equal(render.overlay_map(rgbx, cam, 0.5), want)


def test_overlay_map_is_within_one_level_of_opencv():
    """Independently: OpenCV's jet of the levels, blended in float, against the fused overlay."""
    image = synthetic_image(300, 451)
    cam = np.random.default_rng(3).random((7, 7), dtype=np.float32)
    levels = render.to_uint8(upsample(cam, image.shape[:2]))
    heat = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1]
    exact = 0.5 * heat + 0.5 * image
    assert np.abs(render.overlay_map(image, cam, 0.5).astype(float) - exact).max() <= 1


# Decoding into shared memory


def jpeg_bytes(array: np.ndarray, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=95, **kw)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "png", "turned jpeg", "grey jpeg", "cmyk jpeg", "array", "pil"])
def test_read_photo_gives_read_images_pixels(tmp_path, kind):
    rgb = synthetic_image(60, 40)
    if kind == "jpeg":
        source = jpeg_bytes(rgb)
    elif kind == "turned jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6
        source = jpeg_bytes(rgb, exif=exif)
    elif kind == "grey jpeg":
        source = jpeg_bytes(rgb[..., 0])
    elif kind == "cmyk jpeg":
        out = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(out, "JPEG")
        source = out.getvalue()
    elif kind == "png":
        source = tmp_path / "x.png"
        Image.fromarray(rgb).save(source)
    elif kind == "array":
        source = rgb
    else:
        source = Image.fromarray(rgb)
    pil, pixels, size = read_photo(source)
    want = read_image(source)
    np.testing.assert_array_equal(pixels, want)
    np.testing.assert_array_equal(np.asarray(pil), want)
    assert size == want.shape[:2]
    if kind != "array":  # a decoded image's pixels are its PIL storage: no copy between them
        base = rgbx_base(pixels)
        assert base is not None and (base[..., 3] == 255).all()
        base[0, 0, 0] ^= 0xFF
        assert pil.getpixel((0, 0))[0] == base[0, 0, 0]


def test_read_photo_reduces_a_jpeg_and_reports_its_own_size(photos_12mp):
    for path in photos_12mp:
        full = read_image(path)
        pil, pixels, size = read_photo(path, min_size=672)
        assert size == full.shape[:2]
        assert min(pixels.shape[:2]) >= 672 and pixels.shape[0] < full.shape[0]  # 1/4 scale: 1000x750
        assert pil.size == (pixels.shape[1], pixels.shape[0])
    exif = Image.Exif()
    exif[0x0112] = 8  # a quarter turn: the photo's own size is the turned one
    data = jpeg_bytes(synthetic_image(1600, 2400), exif=exif)
    _, pixels, size = read_photo(data, min_size=300)
    assert size == (2400, 1600) and pixels.shape[:2] == (600, 400)


def test_a_recycled_buffer_decodes_the_next_photo_of_this_thread(tmp_path):
    """recycle(): the next read_photo in the same thread decodes into the buffer, whatever its orientation;
    larger photos get a new one, other threads never see it, and arrays npcam did not make are ignored."""
    import threading

    landscape, portrait = jpeg_bytes(synthetic_image(60, 80)), jpeg_bytes(synthetic_image(80, 60, seed=1))
    first = read_photo(landscape)[1]
    recycle(first)
    pil, second, _ = read_photo(portrait)  # the same bytes, turned: the buffer is reused
    assert np.shares_memory(first, second) and second.shape == (80, 60, 3)
    np.testing.assert_array_equal(second, read_image(portrait))
    np.testing.assert_array_equal(np.asarray(pil), read_image(portrait))
    recycle(second)
    larger = read_photo(jpeg_bytes(synthetic_image(90, 80)))[1]  # does not fit: a new buffer
    assert not np.shares_memory(larger, second)
    recycle(larger)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(read_photo(landscape)[1]))
    thread.start()
    thread.join()
    assert not np.shares_memory(seen[0], larger)  # another thread's photo: its own buffer
    smaller = read_photo(landscape)[1]  # fits in the larger buffer
    assert np.shares_memory(smaller, larger) and rgbx_base(smaller).shape == (60, 80, 4)
    np.testing.assert_array_equal(smaller, read_image(landscape))
    mine = np.zeros((60, 80, 4), np.uint8)
    recycle(mine[:, :, :3])  # not one of npcam's buffers: ignored
    assert not np.shares_memory(read_photo(landscape)[1], mine)


def test_rgbx_base_finds_the_buffer_of_any_view_with_four_bytes_a_pixel():
    rgbx = np.arange(5 * 6 * 4, dtype=np.uint8).reshape(5, 6, 4)
    for pixels in (rgbx[:, :, :3], rgbx[1:4, :, :3]):
        base = rgbx_base(pixels)
        assert base.shape == (*pixels.shape[:2], 4) and np.shares_memory(base, rgbx)
        np.testing.assert_array_equal(base[..., :3], pixels)
    assert rgbx_base(rgbx[:, 1:, :3]) is None  # rows of 6 pixels hold 5: not an RGBX image of its own
    assert rgbx_base(np.zeros((5, 6, 3), np.uint8)) is None
    assert rgbx_base(rgbx[:, :, 1:]) is None  # bytes 1-3: the last pixel's fourth byte would lie past the buffer
    assert rgbx_base(np.zeros((5, 6, 4), np.uint8)[:, :, :3].astype(np.uint16)) is None


def test_encoding_the_shared_buffer_gives_the_same_file():
    pixels = read_photo(jpeg_bytes(synthetic_image(120, 90)))[1]
    for fmt in ("JPEG", "PNG"):
        shared, copied = io.BytesIO(), io.BytesIO()
        encode_image(pixels, fmt, shared)
        encode_image(np.ascontiguousarray(pixels), fmt, copied)
        assert shared.getvalue() == copied.getvalue(), fmt


# The reduced network input of large photos


def test_reducing_gap_leaves_normal_photos_exact():
    for photo in PHOTOS:  # <= 640 px: under 2 * REDUCING_GAP * 224, so Pillow does not reduce
        rgb = read_image(photo)
        exact = preprocess(rgb, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), reducing_gap=None)
        np.testing.assert_array_equal(preprocess(rgb, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), exact)


def test_reduced_input_of_12mp_photos_stays_close_to_the_exact_one(model, photos_12mp):
    """The preprocessing change at 12 MP: the input within 3 levels, the same top-5, the map nearly the same.

    Averaging k x k boxes before the bilinear filter changes the filter's shape a
    little (a box under a narrower triangle) and rounds once more: on photos that
    moves a 224 px input pixel by a level or two (2 measured). A bound of 3 levels
    guards against a wrong box, factor or offset, which would move it by tens.
    """
    for path in photos_12mp:
        pil = npcam.open_image(path)
        exact = preprocess(pil, 224, model.bundle.mean, model.bundle.std, reducing_gap=None)
        reduced = preprocess(pil, 224, model.bundle.mean, model.bundle.std)
        levels = np.abs(reduced - exact) * 255 * np.asarray(model.bundle.std, dtype=np.float32)[None, :, None, None]
        assert record("12 MP input, reduced vs exact, levels", levels.max()) <= 3.001  # float32 normalization
        a, b = model.classify([np.asarray(pil)] * 2, [exact, reduced])
        assert [c for c, _, _ in a.top(5)] == [c for c, _, _ in b.top(5)], path.name
        cam_a, cam_b = model.cam(a), model.cam(b)
        assert record("12 MP top-1 map, reduced vs exact input, abs", np.abs(cam_a - cam_b).max()) <= 0.05


# Record-only runs


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - ix
    return ix / area


def test_record_only_runs_give_the_full_decodes_record(model, photos_12mp):
    """Reduced decode (1/4 DCT scale) against full decode: same sizes and top-5, close scores, maps and boxes.

    The network input is made from a JPEG decoded at 1/4 scale instead of from
    the full image: DCT scaling is close to averaging 4x4 boxes, so the input
    moves by a few levels, like the reducing gap's. The tolerances are for that:
    the same classes, probabilities within 0.01, maps within 0.05, boxes with
    IoU >= 0.8 in the photo's own pixels (a map that moves a little moves a
    threshold's edge more where the map is flat; a box in the decoded pixels
    instead of the photo's would have IoU 1/16, a shifted one far less than 0.8).
    """
    options = Options(top=2, bbox=True, lowres=True).checked(model)
    for path in photos_12mp:
        full = describe(explain(model, path, options), options)
        reduced_explanation = explain(model, path, options, pixels=False)
        reduced = describe(reduced_explanation, options)
        assert reduced_explanation.prediction.image.shape[0] < full["height"]  # decoded smaller...
        assert (reduced["width"], reduced["height"]) == (full["width"], full["height"])  # ...reported as is
        assert [t["class"] for t in reduced["top5"]] == [t["class"] for t in full["top5"]]
        assert len(full["maps"]) == len(reduced["maps"]) >= 1
        for m_full, m_reduced in zip(full["maps"], reduced["maps"]):
            assert record("record-only score, abs", abs(m_full["score"] - m_reduced["score"])) <= 0.01
            a, b = np.asarray(m_full["lowres"]["values"]), np.asarray(m_reduced["lowres"]["values"])
            assert record("record-only map, abs", np.abs(a - b).max()) <= 0.05
            assert record("record-only box IoU, 1 -", 1 - iou(m_full["bbox"], m_reduced["bbox"])) <= 0.2
            assert max(m_reduced["bbox"][2:]) < max(full["width"], full["height"])


def test_overlay_from_a_reduced_photo_has_its_size_and_the_box_scaled(model, photos_12mp):
    options = Options(bbox=True).checked(model)
    explanation = explain(model, photos_12mp[0], options, pixels=False)
    picture = draw(explanation, 0, options)
    assert picture.shape == explanation.prediction.image.shape
    plain = draw(explanation, 0, Options().checked(model))
    assert (picture != plain).any()  # the box is drawn, inside the smaller picture


def test_draw_with_a_box_is_the_unfused_overlay_with_draw_box(model):
    options = Options(bbox=True).checked(model)
    explanation = explain(model, PHOTOS[1], options)
    rgb = np.ascontiguousarray(explanation.prediction.image)
    want = render.draw_box(render.overlay(rgb, explanation.full(0), 0.5), explanation.box(0))
    np.testing.assert_array_equal(draw(explanation, 0, options), want)


def test_draw_into_the_photo_gives_the_same_picture_there(model):
    options = Options(bbox=True).checked(model)
    explanation = explain(model, PHOTOS[0], options)
    want = draw(explanation, 0, options)
    photo = explanation.prediction.image
    picture = draw(explanation, 0, options, into_photo=True)
    np.testing.assert_array_equal(picture, want)
    assert np.shares_memory(picture, photo)  # prediction.image now holds the overlay
    np.testing.assert_array_equal(explanation.prediction.image, want)
    pixels = read_image(PHOTOS[1])
    theirs = pixels.copy()
    explanation = explain(model, theirs, options)  # an array passed in: never written
    picture = draw(explanation, 0, options, into_photo=True)
    np.testing.assert_array_equal(theirs, pixels)
    assert not np.shares_memory(picture, theirs)


def test_a_directory_run_writes_what_each_photo_alone_gives(model, tmp_path):
    """explain_files recycles each photo's buffer for its thread's next one: every output must still be the
    overlay of its own photo, byte for byte, with photos of several sizes and both orientations in flight."""
    sizes = [(300, 400), (400, 300), (300, 400), (120, 90), (500, 640), (300, 400), (400, 300), (90, 120)]
    jobs = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / f"p{i}.jpg"
        Image.fromarray(synthetic_image(h, w, seed=i)).save(path, quality=90)
        jobs.append(Job(path, tmp_path / "out" / f"p{i}_cam.jpg", per_class=True))
    options = Options(top=2).checked(model)
    results = list(explain_files(model, jobs, options, workers=2))
    assert all(not isinstance(r, str) for _, r in results), results
    for job in jobs:
        explanation = explain(model, job.image, options)
        for i, c in enumerate(explanation.classes):
            alone = io.BytesIO()
            encode_image(draw(explanation, i, options), "JPEG", alone)
            assert job.output_for(c).read_bytes() == alone.getvalue(), job.output_for(c).name


def test_cli_no_overlay_writes_only_the_record_and_maps(cli, tmp_path, photos_12mp):
    code, out, _ = cli(str(photos_12mp[0]), "--json", "--no-overlay", "--save-cam", "-o", f"{tmp_path}/out/")
    assert code == 0
    rec = json.loads(out)
    assert (rec["width"], rec["height"]) == (4000, 3000) and "output" not in rec
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{photos_12mp[0].stem}_cam.npy"]
    cam = np.load(rec["cam"])
    assert cam.shape == (3000, 4000)
    code, out, _ = cli(str(photos_12mp[1]), "--no-overlay")
    assert code == 0 and "->" not in out and "top-5" in out


@pytest.mark.parametrize("max_side", [1000, 999, 5000])
def test_max_side_caps_the_overlay_and_keeps_the_record_in_the_photos_pixels(cli, tmp_path, photos_12mp, max_side):
    out = tmp_path / "small.jpg"
    code, text, _ = cli(str(photos_12mp[0]), "--json", "--bbox", "--max-side", str(max_side), "-o", str(out))
    assert code == 0
    rec = json.loads(text)
    assert (rec["width"], rec["height"]) == (4000, 3000)
    want = (4000, 3000) if max_side >= 4000 else (max_side, round(3000 * max_side / 4000))
    assert Image.open(out).size == want
    assert rec["bbox"][2] < 4000 and rec["bbox"][3] < 3000


# Overlays at most max_side: the JPEG decoded at the scale the overlay and the network need


@pytest.mark.parametrize(
    "max_side, min_size, decoded",
    [
        (1000, 672, (1000, 750)),  # 1/4 is exactly the overlay's size: no resize after it
        (1024, 672, (2000, 1500)),  # 1/4 would be 1000 < 1024: 1/2
        (500, 672, (1000, 750)),  # the network needs 672 on both sides: 1/4, not 1/8
        (500, None, (500, 375)),  # the overlay alone: 1/8
        (4000, 672, (4000, 3000)),  # the photo's own size: a full decode
        (None, 672, (1000, 750)),  # the network alone (record-only runs)
    ],
)
def test_a_jpeg_decodes_at_the_smallest_scale_the_overlay_and_the_network_allow(
    photos_12mp, max_side, min_size, decoded
):
    pil, pixels, size = read_photo(photos_12mp[0], min_size=min_size, max_side=max_side)
    assert size == (3000, 4000) and pil.size == decoded and pixels.shape[1::-1] == decoded


def test_a_turned_jpeg_decodes_at_the_same_scale_turned():
    """EXIF orientation 6 (a quarter turn clockwise to view it): the same DCT-scaled pixels as the file without the
    tag, turned, exactly; the scale is chosen on the long side, which the turn does not change."""
    rgb = synthetic_image(1600, 2400)
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = read_photo(jpeg_bytes(rgb), min_size=300, max_side=700)[1]
    _, turned, size = read_photo(jpeg_bytes(rgb, exif=exif), min_size=300, max_side=700)
    assert plain.shape[:2] == (800, 1200)  # 1/2: 1/4 would be 600 < 700 on the long side
    assert size == (2400, 1600)
    np.testing.assert_array_equal(turned, np.rot90(plain, k=-1))


def test_max_side_on_a_png_keeps_the_full_decodes_maps(model, tmp_path):
    """No DCT scaling outside JPEG: a PNG decodes at full size, so the network input and maps are exactly the
    full decode's; only the overlay is the photo resized to max_side."""
    path = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(1200, 1600)).save(path)
    pixels = read_photo(path, min_size=672, max_side=400)[1]
    np.testing.assert_array_equal(pixels, read_image(path))
    options = Options(top=2, lowres=True).checked(model)
    full = explain(model, path, options)
    small = explain(model, path, replace(options, max_side=400))
    assert small.prediction.image.shape == (300, 400, 3) and small.prediction.size == (1200, 1600)
    np.testing.assert_array_equal(small.maps, full.maps)
    assert small.classes == full.classes


@pytest.mark.parametrize("max_side", [1000, 1024, 4000])
def test_max_side_overlays_keep_the_full_decodes_answers(model, photos_12mp, max_side):
    """An overlay of at most max_side from a draft-decoded JPEG, against the full decode.

    - 4000 (the photo's size): a full decode, so the maps are exactly the full decode's.
    - 1000: decoded at 1/4, the scale record-only runs use for the network, so the maps are exactly those of a
      record-only run; 1024: decoded at 1/2.
    - Against the full decode, both give what test_record_only_runs_give_the_full_decodes_record allows, for the
      reasons given there (DCT scaling is close to a box average): the same top-5, scores within 0.01, maps within
      0.05, boxes with IoU >= 0.8 in the photo's own pixels.
    - The overlay's photo (alpha 0: the photo itself) against the full decode resized by Pillow to the same size:
      two low-pass filters of the same photo. The photos' noise (8 levels) averaged over the 4x4 (2x2) pixels each
      output pixel covers has a spread of 2 (4) levels, and two different averages of it differ by about
      sqrt(2) times that, so their mean absolute difference is under 6 levels; a photo turned, shifted or scaled
      wrong differs by tens.
    """
    options = Options(top=2, bbox=True, lowres=True).checked(model)
    for path in photos_12mp:
        full = explain(model, path, options)
        small = explain(model, path, replace(options, max_side=max_side))
        fit = (3000 * max_side // 4000, max_side)
        assert small.prediction.image.shape[:2] == fit and small.prediction.size == (3000, 4000)
        if max_side == 4000:
            np.testing.assert_array_equal(small.maps, full.maps)
            continue
        if max_side == 1000:
            np.testing.assert_array_equal(small.maps, explain(model, path, options, pixels=False).maps)
        a, b = describe(full, options), describe(small, options)
        assert (a["width"], a["height"]) == (b["width"], b["height"]) == (4000, 3000)
        assert [t["class"] for t in a["top5"]] == [t["class"] for t in b["top5"]]
        for m_full, m_small in zip(a["maps"], b["maps"]):
            assert record("max_side score, abs", abs(m_full["score"] - m_small["score"])) <= 0.01
            cams = np.asarray(m_full["lowres"]["values"]), np.asarray(m_small["lowres"]["values"])
            assert record("max_side map, abs", np.abs(cams[0] - cams[1]).max()) <= 0.05
            assert record("max_side box IoU, 1 -", 1 - iou(m_full["bbox"], m_small["bbox"])) <= 0.2
        photo = draw(small, 0, replace(options, alpha=0.0, bbox=False)).astype(np.int16)
        resized = np.asarray(Image.fromarray(full.prediction.image).resize(fit[::-1], Image.BILINEAR))
        assert record("max_side photo, mean abs levels", np.abs(photo - resized).mean()) <= 6
