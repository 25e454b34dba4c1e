"""The command line: outputs, JSON, exit codes, bad input, and no torch at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SAMPLE, synthetic_image
from PIL import Image

import npcam
from npcam.cli import main


def leftovers(directory):
    """Temporary files an interrupted or failed write would leave."""
    return [p for p in directory.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def photo(tmp_path, name="photo.jpg", size=(375, 500)):
    path = tmp_path / name
    Image.fromarray(synthetic_image(*size)).save(path)
    return path


def test_default_output_in_current_directory(cli, tmp_path):
    (tmp_path / "in").mkdir()
    image = photo(tmp_path / "in")
    code, out, err = cli(image)
    assert code == 0, err
    written = tmp_path / "photo_cam.jpg"
    assert Image.open(written).size == (500, 375) and Image.open(written).format == "JPEG"
    assert "top-5" in out and "photo_cam.jpg" in out


def test_json_record(cli, tmp_path, model):
    image = photo(tmp_path)
    code, out, _ = cli(image, "--json", "--save-cam", "-o", f"{tmp_path}/out/")
    assert code == 0
    record = json.loads(out)
    assert {"image", "class", "label", "score", "top5", "output", "cam"} <= record.keys()
    pred = model.predict(image)
    assert record["class"] == pred.top1 and record["label"] == pred.labels[pred.top1]
    assert record["score"] == pytest.approx(float(pred.probs.max()))
    assert [t["class"] for t in record["top5"]] == [c for c, _, _ in pred.top(5)]
    cam = np.load(record["cam"], allow_pickle=False)
    assert cam.dtype == np.float32 and cam.shape == (375, 500)
    np.testing.assert_allclose(cam, model.cam(pred, size=(375, 500)), atol=1e-6)
    assert record["output"] == str(tmp_path / "out" / "photo_cam.jpg")


def test_output_file_picks_format_and_class_by_label(cli, tmp_path, model):
    image = photo(tmp_path)
    code, out, err = cli(image, "-o", tmp_path / "explained.png", "--class", "tabby", "--json", "--alpha", "0.3")
    assert code == 0, err
    record = json.loads(out)
    assert record["class"] == 281 and record["output"] == str(tmp_path / "explained.png")
    written = np.asarray(Image.open(tmp_path / "explained.png"))
    np.testing.assert_array_equal(written, model.overlay(image, 281, alpha=0.3))  # PNG is lossless


def test_top_k_writes_one_overlay_per_class(cli, tmp_path):
    code, out, _ = cli(photo(tmp_path), "--top", "3", "--json")
    assert code == 0
    record = json.loads(out)
    assert len(record["maps"]) == 3
    for m in record["maps"]:
        assert (tmp_path / f"photo_cam_{m['class']}.jpg").is_file()


@pytest.mark.parametrize("size", [(1, 1), (3, 1000), (4000, 3000)])
def test_output_has_the_input_size(cli, tmp_path, size):
    code, _, err = cli(photo(tmp_path, "odd.png", size), "-o", tmp_path / "o.png")
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (size[1], size[0])


def test_directory_with_bad_files_does_the_good_ones(cli, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(3):
        photo(data, f"good{i}.jpg", (60, 80))
    photo(data / "sub", "nested.png", (50, 50))
    (data / "text.jpg").write_text("not an image")
    (data / "empty.png").write_bytes(b"")
    (data / "notes.txt").write_text("ignored: not an image suffix")
    code, out, err = cli(data, "-o", f"{tmp_path}/out/", "--json")
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    done = sorted(r["output"] for r in records if "output" in r)
    assert len(done) == 4 and str(tmp_path / "out" / "sub" / "nested_cam.jpg") in done
    assert sorted(r["image"] for r in records if "error" in r) == [str(data / "empty.png"), str(data / "text.jpg")]
    assert err.count("npcam: error:") == 2 and "text.jpg: not an image" in err
    assert not (tmp_path / "out" / "text_cam.jpg").exists()
    assert leftovers(tmp_path / "out") == []


def test_missing_file_is_reported_and_others_still_run(cli, tmp_path):
    code, out, err = cli(tmp_path / "nope.jpg", photo(tmp_path))
    assert code == 1
    assert err.strip() == f"npcam: error: {tmp_path / 'nope.jpg'}: no such file"
    assert (tmp_path / "photo_cam.jpg").is_file()


def test_no_bundle_says_how_to_create_one(tmp_path, capsys):
    code = main(["-m", str(tmp_path / "none"), str(photo(tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and "python -m export" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "crane"], "ambiguous"),
        (["--class", "1000"], "out of range"),
        (["--class", "no such thing"], "no class is named"),
        (["-o", "x.unknown"], "cannot tell an image format"),
    ],
)
def test_usage_errors(cli, tmp_path, args, message):
    code, _, err = cli(photo(tmp_path), *args)
    assert code == 2 and message in err


def test_one_output_file_for_many_inputs_is_refused(cli, tmp_path):
    code, _, err = cli(photo(tmp_path, "a.jpg"), photo(tmp_path, "b.jpg"), "-o", tmp_path / "one.jpg")
    assert code == 2 and "give a directory" in err


def test_never_overwrites_an_input(cli, tmp_path):
    image = photo(tmp_path, "photo_cam.jpg")
    before = image.read_bytes()
    code, _, err = cli(photo(tmp_path, "photo.jpg"), image)  # photo.jpg's default output is photo_cam.jpg
    assert code == 2 and "is an input" in err
    code, _, err = cli(image, "-o", image)
    assert code == 2 and image.read_bytes() == before


def test_top_k_never_overwrites_an_input_named_like_its_outputs(cli, tmp_path):
    image = photo(tmp_path, "photo.jpg")
    lookalike = photo(tmp_path, "photo_cam_281.jpg")
    before = lookalike.read_bytes()
    code, _, err = cli(image, lookalike, "--top", "3")
    assert code == 2 and "named like a --top output" in err and lookalike.read_bytes() == before
    renamed = lookalike.rename(tmp_path / "out_281.jpg")  # what -o out.jpg --top 3 could write
    code, _, err = cli(renamed, "--top", "3", "-o", tmp_path / "out.jpg")
    assert code == 2 and "named like a --top output" in err and renamed.read_bytes() == before


def test_bad_alpha_is_a_usage_error(cli, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(photo(tmp_path), "--alpha", "1.5")
    assert e.value.code == 2


def test_unwritable_output_leaves_no_file(cli, tmp_path):
    if os.geteuid() == 0:
        # root ignores directory permissions; a path under a regular file fails for everyone.
        blocker = tmp_path / "file"
        blocker.write_text("")
        target = f"{blocker}/out/"
    else:
        target = f"{tmp_path}/ro/"
        (tmp_path / "ro").mkdir(mode=0o500)
    code, _, err = cli(photo(tmp_path), "-o", target)
    assert code == 1 and "photo.jpg" in err and "Traceback" not in err


def test_runs_with_torch_unimportable(bundle, tmp_path):
    """The runtime must work where torch is not installed: make `import torch` fail."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    check = "import torch"
    assert subprocess.run([sys.executable, "-c", check], env=env, capture_output=True).returncode != 0
    result = subprocess.run(
        [sys.executable, "-m", "npcam", str(SAMPLE), "-m", str(bundle), "--json", "-o", str(tmp_path / "o.jpg")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "o.jpg")
    assert Image.open(tmp_path / "o.jpg").size == (451, 300)
    modules = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, npcam, npcam.cli; print(sorted(m for m in sys.modules if m.startswith('torch')))",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert modules.stdout.strip() == "[]"


def test_api_accepts_path_pil_and_array(model):
    rgb = npcam.read_image(SAMPLE)
    by_path, by_pil, by_array = (model.predict(x) for x in (SAMPLE, Image.open(SAMPLE), rgb))
    np.testing.assert_array_equal(by_path.logits, by_array.logits)
    np.testing.assert_array_equal(by_pil.logits, by_array.logits)
    assert model.cam(rgb).shape == (7, 7)
    assert model.overlay(rgb).shape == rgb.shape
