"""The command line: outputs, JSON Lines, exit codes, directory runs, bad input, and no torch at run time."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PHOTOS, REPO, SAMPLE, synthetic_image
from PIL import Image

import npcam
from npcam.cli import Progress, main

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


def leftovers(directory):
    """Temporary files an interrupted or failed write would leave."""
    return [p for p in directory.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def overlay(model, image, class_=None, alpha=0.5, method=None):
    """The overlay made from the library's pieces: predict, the map at the image's size, the jet blend."""
    pred = model.predict(image)
    return npcam.overlay(pred.image, model.cam(pred, class_, size=pred.image.shape[:2], method=method), alpha)


def photo(tmp_path, name="photo.jpg", size=(375, 500), seed=0):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(*size, seed=seed)).save(path)
    return path


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_default_output_in_current_directory(tiny_cli, tmp_path):
    image = photo(tmp_path / "in")
    code, out, err = tiny_cli(image)
    assert code == 0, err
    written = tmp_path / "photo_cam.jpg"
    assert Image.open(written).size == (500, 375) and Image.open(written).format == "JPEG"
    assert "top-5" in out and "photo_cam.jpg" in out and "CAM of" in out


def test_json_record(tiny_cli, tmp_path, tiny_model):
    image = photo(tmp_path)
    code, out, _ = tiny_cli(image, "--json", "--save-cam", "-o", f"{tmp_path}/out/")
    assert code == 0
    record = json.loads(out)
    assert {
        "image",
        "width",
        "height",
        "method",
        "layer",
        "top5",
        "maps",
        "class",
        "label",
        "score",
        "output",
        "cam",
    } <= record.keys()
    pred = tiny_model.predict(image)
    assert record["class"] == pred.top1 and record["label"] == pred.labels[pred.top1] and record["method"] == "cam"
    assert record["layer"] == tiny_model.bundle.layer  # the explained layer (a pre-format-4 bundle: "features")
    assert record["score"] == pytest.approx(float(pred.probs.max()))
    assert [t["class"] for t in record["top5"]] == [c for c, _, _ in pred.top(5)]
    assert record["maps"] == [{k: record[k] for k in ("class", "label", "score", "output", "cam")}]
    cam = np.load(record["cam"], allow_pickle=False)
    assert cam.dtype == np.float32 and cam.shape == (375, 500)
    np.testing.assert_allclose(cam, tiny_model.cam(pred, size=(375, 500)), atol=1e-6)
    assert record["output"] == str(tmp_path / "out" / "photo_cam.jpg")


def test_output_file_picks_format_and_class_by_label(tiny_cli, tmp_path, tiny_model):
    image = photo(tmp_path)
    code, out, err = tiny_cli(image, "-o", tmp_path / "explained.png", "--class", "tabby", "--json", "--alpha", "0.3")
    assert code == 0, err
    record = json.loads(out)
    assert record["class"] == 281 and record["output"] == str(tmp_path / "explained.png")
    written = np.asarray(Image.open(tmp_path / "explained.png"))
    np.testing.assert_array_equal(written, overlay(tiny_model, image, 281, alpha=0.3))  # PNG is lossless


def test_output_file_in_a_folder_that_does_not_exist_yet(tiny_cli, tmp_path):
    code, _, err = tiny_cli(photo(tmp_path), "-o", tmp_path / "new" / "deeper" / "x.png")
    assert code == 0, err
    assert Image.open(tmp_path / "new" / "deeper" / "x.png").size == (500, 375)


def test_top_k_writes_one_overlay_per_class(tiny_cli, tmp_path):
    code, out, _ = tiny_cli(photo(tmp_path), "--top", "3", "--json")
    assert code == 0
    record = json.loads(out)
    assert len(record["maps"]) == 3
    for m in record["maps"]:
        assert (tmp_path / f"photo_cam_{m['class']}.jpg").is_file()


@pytest.mark.parametrize("method", ["gradcam", "layercam", "gradcam++", "eigencam", "softmax"])
def test_method_option(tiny_cli, tmp_path, tiny_model, method):
    image = photo(tmp_path)
    code, out, err = tiny_cli(image, "--method", method, "--json", "-o", tmp_path / "m.png")
    assert code == 0, err
    record = json.loads(out)
    assert record["method"] == method.replace("++", "pp")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "m.png")), overlay(tiny_model, image, method=record["method"])
    )


@pytest.mark.parametrize("size", [(1, 1), (3, 1000), pytest.param((4000, 3000), marks=pytest.mark.slow)])  # 12 MP: slow
def test_output_has_the_input_size(tiny_cli, tmp_path, size):
    # The pixels tiled from a small synthetic photo, stored with light compression: computing and encoding 12 MP
    # of synthetic_image took most of the test, whose point is the size.
    tile = synthetic_image(min(size[0], 400), min(size[1], 300))
    reps = (-(-size[0] // tile.shape[0]), -(-size[1] // tile.shape[1]), 1)
    Image.fromarray(np.tile(tile, reps)[: size[0], : size[1]]).save(tmp_path / "odd.png", compress_level=1)
    code, _, err = tiny_cli(tmp_path / "odd.png", "-o", tmp_path / "o.png")
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (size[1], size[0])


def test_directory_with_bad_files_does_the_good_ones(tiny_cli, tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        photo(data, f"good{i}.jpg", (60, 80))
    photo(data / "sub", "nested.png", (50, 50))
    (data / "text.jpg").write_text("not an image")
    (data / "empty.png").write_bytes(b"")
    (data / "notes.txt").write_text("ignored: not an image suffix")
    code, out, err = tiny_cli(data, "-o", f"{tmp_path}/out/", "--json")
    assert code == 1
    found = records(out)
    done = sorted(r["output"] for r in found if "output" in r)
    assert len(done) == 4 and str(tmp_path / "out" / "sub" / "nested_cam.jpg") in done
    assert sorted(r["image"] for r in found if "error" in r) == [str(data / "empty.png"), str(data / "text.jpg")]
    assert err.count("npcam: error:") == 2 and "text.jpg: not an image" in err
    assert not (tmp_path / "out" / "text_cam.jpg").exists()
    assert leftovers(tmp_path / "out") == []


def test_hidden_files_and_folders_are_skipped(tiny_cli, tmp_path):
    data = tmp_path / "data"
    photo(data, "seen.jpg", (40, 40))
    photo(data / ".thumbnails", "thumb.jpg", (40, 40))
    photo(data, ".hidden.jpg", (40, 40))
    code, out, _ = tiny_cli(data, "-o", f"{tmp_path}/out/", "--json")
    assert code == 0 and [r["image"] for r in records(out)] == [str(data / "seen.jpg")]


def test_missing_file_is_reported_and_others_still_run(tiny_cli, tmp_path):
    code, out, err = tiny_cli(tmp_path / "nope.jpg", photo(tmp_path))
    assert code == 1
    assert err.strip() == f"npcam: error: {tmp_path / 'nope.jpg'}: no such file"
    assert (tmp_path / "photo_cam.jpg").is_file()


def test_json_lines_have_a_record_for_every_input_missing_ones_included(tiny_cli, tmp_path):
    code, out, _ = tiny_cli(tmp_path / "nope.jpg", photo(tmp_path, "a.jpg"), photo(tmp_path, "b.jpg", seed=1), "--json")
    lines = records(out)  # one JSON object per line: JSON Lines
    assert code == 1 and len(lines) == 3
    assert lines[0] == {"image": str(tmp_path / "nope.jpg"), "error": f"{tmp_path / 'nope.jpg'}: no such file"}
    assert [r["image"] for r in lines[1:]] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_inputs_with_the_same_stem_get_distinct_outputs(tiny_cli, tmp_path):
    data = tmp_path / "data"
    photo(data, "a.jpg", seed=1)
    photo(data, "a.png", seed=2)
    photo(data, "b.jpg", seed=3)
    code, out, err = tiny_cli(data, "-o", f"{tmp_path}/out/", "--json")
    assert code == 0, err
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == ["a_jpg_cam.jpg", "a_png_cam.jpg", "b_cam.jpg"]


def test_an_input_named_like_an_output_is_never_overwritten(tiny_cli, tmp_path):
    mine = photo(tmp_path, "photo_cam.jpg", seed=5)  # the user's own photo, named like an output
    before = mine.read_bytes()
    code, out, err = tiny_cli(photo(tmp_path, "photo.jpg"), mine, "--json")
    assert code == 0, err
    assert mine.read_bytes() == before
    assert sorted(r["output"] for r in records(out)) == [
        "photo_cam_cam.jpg",
        "photo_jpg_cam.jpg",
    ]  # in the current folder
    code, _, err = tiny_cli(mine, "-o", mine)
    assert code == 2 and "is the input image" in err and mine.read_bytes() == before


def test_top_k_never_overwrites_an_input_named_like_its_outputs(tiny_cli, tmp_path, tiny_model):
    image = photo(tmp_path, "photo.jpg")
    top1 = tiny_model.predict(image).top1
    lookalike = photo(tmp_path, f"photo_cam_{top1}.jpg", seed=7)  # a user's file, not one npcam wrote
    before = lookalike.read_bytes()
    code, out, err = tiny_cli(image, lookalike, "--top", "3", "--json")
    assert code == 1 and "is one of the input images" in err and lookalike.read_bytes() == before
    failed = [r for r in records(out) if "error" in r]
    assert [r["image"] for r in failed] == [str(image)]
    written = {p.name for p in tmp_path.glob("photo_cam_*.jpg")} - {lookalike.name}
    assert written and all(name.startswith(f"{lookalike.stem}_cam_") for name in written)  # nothing of photo.jpg


def test_a_second_run_in_the_same_folder_skips_its_own_outputs(tiny_cli, tmp_path):
    for i in range(3):
        photo(tmp_path, f"p{i}.jpg", (60, 80), seed=i)
    code, _, err = tiny_cli(".")
    assert code == 0, err
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*_cam.jpg")}
    assert sorted(first) == ["p0_cam.jpg", "p1_cam.jpg", "p2_cam.jpg"]
    code, out, err = tiny_cli(".", "--json")  # the directory now holds npcam's outputs as well
    assert code == 0, err
    assert sorted(r["image"] for r in records(out)) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert sorted(p.name for p in tmp_path.glob("*_cam*.jpg")) == sorted(first)  # no p0_cam_cam.jpg
    code, out, err = tiny_cli(*sorted(p.name for p in tmp_path.glob("*.jpg")))  # as `npcam *.jpg` would
    assert code == 0 and "skipped 3 image(s) npcam wrote" in err


def test_closed_stdout_ends_the_run_quietly(tiny_bundle, tmp_path):
    data = tmp_path / "data"
    for i in range(12):
        photo(data, f"p{i:02d}.jpg", (300, 400), seed=i)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in ([], ["--json"]):
        out = tmp_path / ("out" + "".join(extra))
        command = f"{sys.executable} -m npcam -m {tiny_bundle} {data} -o {out}/ {' '.join(extra)} | head -1; echo ${{PIPESTATUS[0]}}"
        result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
        first, status = result.stdout.splitlines()
        assert status in ("0", "141"), result.stderr  # 0: all done before head closed the pipe
        assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
        assert leftovers(out) == []
        if extra:
            assert json.loads(first)["image"] == str(data / "p00.jpg")


def test_no_bundle_says_how_to_create_one(tmp_path, capsys):
    code = main(["-m", str(tmp_path / "none"), str(photo(tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and "npcam-export" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "crane"], "ambiguous"),
        (["--class", "1000"], "out of range"),
        (["--class", "no such thing"], "no class is named"),
        (["-o", "x.unknown"], "cannot tell an image format"),
        (["--size", "16"], "must be at least 64 (2 feature cells at a stride of 32)"),
    ],
)
def test_usage_errors(tiny_cli, tmp_path, args, message):
    code, _, err = tiny_cli(photo(tmp_path), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "2"], "must be 'mean' or a fraction of the max in (0, 1]"),
        (["--alpha", "1.5"], "between 0 (the photo) and 1 (the heat map alone)"),
        (["--top", "0"], "must be at least 1"),
        (["--method", "nope"], "must be one of cam, gradcam"),
    ],
)
def test_argument_errors_say_what_is_valid(tiny_cli, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        tiny_cli(photo(tmp_path), *args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_names_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in npcam.METHODS:
        assert f"\n  {name} " in text


def test_one_output_file_for_many_inputs_is_refused(tiny_cli, tmp_path):
    code, _, err = tiny_cli(photo(tmp_path, "a.jpg"), photo(tmp_path, "b.jpg"), "-o", tmp_path / "one.jpg")
    assert code == 2 and "give a directory" in err


def test_unwritable_output_leaves_no_file(tiny_cli, tmp_path):
    if os.geteuid() == 0:
        # root ignores directory permissions; a path under a regular file fails for everyone.
        blocker = tmp_path / "file"
        blocker.write_text("")
        target = f"{blocker}/out/"
    else:
        target = f"{tmp_path}/ro/"
        (tmp_path / "ro").mkdir(mode=0o500)
    code, _, err = tiny_cli(photo(tmp_path), "-o", target)
    assert code == 1 and "photo.jpg" in err and "Traceback" not in err


def test_progress_line_shows_count_rate_and_time_left():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = Progress(screen)
    progress.start -= 2.0  # two seconds in
    progress.show(4, 10, "photos/p3.jpg")
    line = screen.getvalue()
    assert "[4/10]" in line and "img/s" in line and "left" in line and "p3.jpg" in line
    assert "2.0 img/s, 0:03 left" in line
    progress.clear()
    assert screen.getvalue().endswith("\r\x1b[K")


def test_progress_in_a_log_is_a_plain_line_at_most_every_so_often():
    """Where stderr is a file (a run in the background), lines instead of a redrawn line, spaced in time."""
    log = io.StringIO()
    progress = Progress(log, every=60.0)
    progress.start -= 120.0
    progress.logged -= 61.0
    progress.show(3, 300, "(3 in this process)", unit="photos")
    progress.show(4, 300, "(4 in this process)", unit="photos")  # within the minute: not written
    assert log.getvalue() == "[3/300] 0.025 photos/s, 3:18:00 left  (3 in this process)\n"
    quiet = io.StringIO()
    Progress(quiet).show(3, 300, "x")  # the CLI's: nothing at all where stderr is not a terminal
    assert quiet.getvalue() == ""


def test_runs_with_torch_unimportable(tiny_bundle, tmp_path):
    """The runtime must work where torch is not installed: make `import torch` fail."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    check = "import torch"
    assert subprocess.run([sys.executable, "-c", check], env=env, capture_output=True).returncode != 0
    result = subprocess.run(
        [sys.executable, "-m", "npcam", str(SAMPLE), "-m", str(tiny_bundle), "--json", "-o", str(tmp_path / "o.jpg")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "o.jpg")
    assert Image.open(tmp_path / "o.jpg").size == (451, 300)
    heavy = "torch onnx ray pyarrow starlette uvicorn selenium".split()
    code = f"import sys, npcam, npcam.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    modules = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert modules.stdout.strip() == "[]"


def test_api_accepts_paths_bytes_files_pil_and_arrays(tiny_model):
    rgb = npcam.read_image(SAMPLE)

    def inputs():
        return [SAMPLE, str(SAMPLE), SAMPLE.read_bytes(), open(SAMPLE, "rb"), Image.open(SAMPLE), rgb]

    preds = [tiny_model.predict(x) for x in inputs()]
    for pred in preds:
        np.testing.assert_array_equal(pred.logits, preds[-1].logits)
        assert isinstance(pred.image, np.ndarray) and pred.image.shape == rgb.shape
    many = tiny_model.predict(inputs())  # the same inputs as predict, in one trunk call
    for pred in many:  # a batch may round differently from single images
        np.testing.assert_allclose(pred.logits, preds[0].logits, rtol=0, atol=1e-5 * np.abs(preds[0].logits).max())
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(tiny_model.predict(rgba).logits, preds[0].logits)
    assert tiny_model.cam(rgb).shape == (7, 7)
    assert overlay(tiny_model, rgb).shape == rgb.shape


def test_a_long_list_runs_the_trunk_a_few_inputs_at_a_time(tiny_model, monkeypatch):
    """Equal input shapes share trunk calls of at most TRUNK_BATCH inputs: a list of many photos takes the memory
    of a few (one call for all of them kept gigabytes in onnxruntime's arena), and each prediction is its own."""
    from npcam.model import TRUNK_BATCH

    photos = [synthetic_image(60 + 7 * i, 80, seed=i) for i in range(2 * TRUNK_BATCH + 3)]
    calls, trunk = [], tiny_model.trunk
    monkeypatch.setattr(tiny_model, "trunk", lambda batch: calls.append(len(batch)) or trunk(batch))
    preds = tiny_model.predict(photos)
    assert calls == [TRUNK_BATCH, TRUNK_BATCH, 3]
    for photo, pred in zip(photos, preds):  # a batch may round differently from single images
        alone = tiny_model.predict(photo).logits
        np.testing.assert_allclose(pred.logits, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_library_pipeline_gives_the_cli_record(tiny_model, tmp_path, tiny_cli):
    options = npcam.Options(top=2, bbox=True).checked(tiny_model)
    explanation = npcam.explain(tiny_model, PHOTOS[1], options)
    record = npcam.describe(explanation, options)
    code, out, _ = tiny_cli(PHOTOS[1], "--top", "2", "--bbox", "--json")
    from_cli = json.loads(out)
    for key in ("image", "width", "height", "top5", "class", "label", "score", "bbox", "method"):
        assert record[key] == from_cli[key], key
    assert [{k: v for k, v in m.items() if k != "output"} for m in from_cli["maps"]] == record["maps"]


def test_predict_takes_its_options_by_keyword_only(tiny_model):
    """predict and its sibling predict_many once took (keep_aspect, max_pixels, size) and (keep_aspect, size,
    max_pixels): a positional call right for one set the wrong limit on the other. Now one predict takes one image
    or a list, and its options by keyword only."""
    with pytest.raises(TypeError):
        tiny_model.predict(SAMPLE, False, 100)
    with pytest.raises(TypeError):
        tiny_model.predict([SAMPLE], False, 224)
    by_name = tiny_model.predict(SAMPLE, keep_aspect=True, size=256, max_pixels=10**6)
    assert by_name.input.shape[2] == 256 and by_name.input.shape[3] > 256
    assert (
        tiny_model.predict([SAMPLE], keep_aspect=True, size=256, max_pixels=10**6)[0].input.shape == by_name.input.shape
    )
