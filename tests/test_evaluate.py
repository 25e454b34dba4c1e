"""``npcam evaluate`` end to end on the tiny bundle: generated photos, annotations in the three formats,
bad input, Ctrl-C and resume. The metrics themselves: test_metrics.py; the report in Chromium: test_report.py.

Runs at a 64 px input (``--size 64``: the tiny trunk's two feature cells a side) so that ROAD's
imputations and the perturbation passes stay quick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, default_sigint, imagenet_labels, synthetic_image
from PIL import Image

from npcam import annotations
from npcam.errors import NpcamError

pytestmark = pytest.mark.slow  # Ray and pyarrow

pq = pytest.importorskip("pyarrow.parquet", reason="npcam evaluate needs the dataset extra (pyarrow)")
import pyarrow.dataset as pds  # noqa: E402

from npcam.evaluate import main as evaluate_main  # noqa: E402

METHODS = "cam,gradcampp,eigencam"
FAST = ["--size", "64", "--methods", METHODS, "--bootstrap", "50", "--samples", "2"]
# Each photo: (name, class index, boxes in 0-based inclusive pixels); None boxes: no annotation at all.
PHOTOS = [
    ("a/one.jpg", 0, [(10, 12, 70, 60)]),
    ("a/two.png", 1, [(0, 0, 40, 40), (50, 30, 90, 79)]),
    ("b/three.jpg", 2, [(20, 5, 99, 70)]),
    ("four.jpg", 3, []),  # a class, no boxes
    ("five.png", None, None),  # not annotated
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, (name, _, _) in enumerate(PHOTOS):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_image(80, 100, seed=i)).save(folder / name)
    return folder


def write_csv(path: Path, rows=PHOTOS) -> Path:
    lines = ["file,imagenet_index,bboxes_xyxy"]
    for name, label, boxes in rows:
        if boxes is not None:
            lines.append(f'{name},{label}|999,"{";".join(",".join(map(str, b)) for b in boxes)}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def write_coco(path: Path) -> Path:
    labels = imagenet_labels()
    images, found = [], []
    for i, (name, label, boxes) in enumerate(PHOTOS):
        if boxes is None:
            continue
        images.append({"id": 100 + i, "file_name": name, "width": 100, "height": 80})
        for x0, y0, x1, y1 in boxes:  # [x, y, w, h] covering the inclusive pixels exactly
            found.append({"image_id": 100 + i, "category_id": 7 + label, "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
    found.append({"image_id": 100, "category_id": 99, "bbox": [0, 0, 5, 5]})  # a category of no class
    categories = [{"id": 7 + c, "name": labels[c].split(",")[0]} for c in range(4)] + [{"id": 99, "name": "unicorn"}]
    path.write_text(json.dumps({"images": images, "annotations": found, "categories": categories}))
    return path


def write_voc(folder: Path) -> tuple[Path, Path]:
    """VOC-style XML named by WordNet ids (1-based pixels), and ILSVRC's mapping file (line i: wnid of class i)."""
    folder.mkdir()
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    for name, label, boxes in PHOTOS:
        if not boxes:
            continue
        objects = "".join(
            f"<object><name>{wnids[label]}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox></object>"
            for x0, y0, x1, y1 in boxes
        )
        (folder / f"{Path(name).stem}.xml").write_text(f"<annotation><filename>{name}</filename>{objects}</annotation>")
    mapping = folder.parent / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{w} {imagenet_labels()[i]}\n" for i, w in enumerate(wnids)))
    return folder, mapping


def expected(photos_root: Path) -> dict[str, annotations.Annotation | None]:
    return {str(photos_root / name): (annotations.Annotation(label, tuple(boxes), objects=tuple((label, b) for b in
                                      boxes)) if boxes else None) for name, label, boxes in PHOTOS}  # fmt: skip


def matched(source: annotations.Annotations, photos: Path) -> dict:
    names = [str(photos / name) for name, _, _ in PHOTOS]
    found, unmatched = source.match(names, str(photos))
    return dict(zip(names, found)), unmatched


def test_the_three_formats_give_the_same_records(photos, tmp_path):
    labels = imagenet_labels()
    want = expected(photos)
    csv_found, _ = matched(annotations.read(write_csv(tmp_path / "a.csv"), labels), photos)
    coco = annotations.read(write_coco(tmp_path / "coco.json"), labels)
    coco_found, _ = matched(coco, photos)
    folder, mapping = write_voc(tmp_path / "Annotations")
    voc_found, _ = matched(annotations.read(folder, labels, mapping), photos)
    for name, _, boxes in PHOTOS:
        key = str(photos / name)
        if boxes:
            assert csv_found[key] == coco_found[key] == voc_found[key] == want[key], name
    # a class without boxes: the CSV knows its class; COCO and XML have nothing to say about it
    assert csv_found[str(photos / "four.jpg")] == annotations.Annotation(3, ())
    assert csv_found[str(photos / "five.png")] is None and voc_found[str(photos / "five.png")] is None
    assert coco.warnings == ["annotated class 'unicorn' maps to no class of the model: its 1 box(es) are left out"]


def test_a_photo_with_several_classes_is_evaluated_for_the_largest(tmp_path):
    xml = tmp_path / "x.xml"
    xml.write_text("<annotation><object><name>tench</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
                   "<ymax>10</ymax></bndbox></object><object><name>goldfish</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   "<xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")  # fmt: skip
    read = annotations.read(xml, imagenet_labels())
    both = ((0, (0, 0, 9, 9)), (1, (0, 0, 19, 19)))  # a detector is evaluated against every object
    assert read.by_stem["x"] == annotations.Annotation(1, ((0, 0, 19, 19),), objects=both)


def test_bad_annotations_are_one_line_errors(photos, tmp_path):
    labels = imagenet_labels()
    with pytest.raises(NpcamError, match=r"nothing\.csv: no such annotation file or folder$"):
        annotations.read(tmp_path / "nothing.csv", labels)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NpcamError, match=r"bad\.json: not COCO JSON"):
        annotations.read(tmp_path / "bad.json", labels)
    (tmp_path / "none.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a/one.jpg"}], "annotations": [
        {"image_id": 1, "category_id": 5, "bbox": [0, 0, 3, 3]}], "categories": [{"id": 5, "name": "unicorn"}]}))  # fmt: skip
    with pytest.raises(NpcamError, match="no annotated class is a class of the model .e.g. 'unicorn'.; give a mapping"):
        annotations.read(tmp_path / "none.json", labels)
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "one.xml").write_text("<annotation><object>")  # cut short
    (folder / "two.xml").write_text("<annotation><object><name>tench</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                                    "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")  # fmt: skip
    found, _ = matched(annotations.read(folder, labels), photos)
    assert found[str(photos / "a/one.jpg")].error.startswith(f"{folder / 'one.xml'}: not XML")
    assert found[str(photos / "a/two.png")] == annotations.Annotation(0, ((0, 0, 4, 4),), objects=((0, (0, 0, 4, 4)),))
    csv = tmp_path / "bad.csv"
    csv.write_text('file,class,bboxes_xyxy\na/one.jpg,tench,"1,2,3"\n')
    found, _ = matched(annotations.read(csv, labels), photos)
    assert "line 2" in found[str(photos / "a/one.jpg")].error


def rows(dest: Path) -> list[dict]:
    return pds.dataset(str(dest), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def csv_run(photos, tiny_bundle, tmp_path_factory):
    """One run with the CSV and a corrupt photo, shared by the tests below (in-process)."""
    out = tmp_path_factory.mktemp("runs")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    try:
        import contextlib
        import io

        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = evaluate_main([str(photos), "-m", str(tiny_bundle), "--out", str(out / "rows"),
                                  "--annotations", str(write_csv(out / "a.csv")), *FAST])  # fmt: skip
    finally:
        (photos / "broken.jpg").unlink()
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_a_run_gives_a_row_per_photo_and_method_a_table_and_a_report(csv_run, photos):
    code, stdout, stderr, out = csv_run
    assert code == 0, stderr
    found = rows(out / "rows")
    by_key = {(r["image"], r["method"]): r for r in found}
    for name, label, boxes in PHOTOS:
        for method in METHODS.split(","):
            row = by_key[(str(photos / name), method)]
            assert row["error"] is None and row["width"] == 100 and row["height"] == 80
            assert 0 <= row["drop"] <= 1 and 0 <= row["deletion"] <= 1 and len(row["road_morf"]) == 9
            assert row["label"] == label and (row["correct"] is None) == (label is None)
            if boxes:
                assert row["boxes"] == [list(b) for b in boxes] and len(row["box_ious"]) == 100
                assert isinstance(row["gt_known"], bool) and 0 <= row["energy"] <= 1
            else:
                assert row["box_ious"] is None and row["gt_known"] is None
    broken = [r for r in found if r["image"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["method"] is None and "not an image Pillow can read" in broken[0]["error"]
    assert f"npcam evaluate: error: {broken[0]['error']}" in stderr
    table = [line for line in stdout.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in table] == [f"`{m}`" for m in METHODS.split(",")]
    header = next(line for line in stdout.splitlines() if line.startswith("| method"))
    assert "MaxBoxAccV2 ↑" in header and "ROAD ↑" in header and "Average Drop ↓" in header
    assert stdout.startswith("tiny: 5 photos (3 with boxes, top-1 classification ")
    page = (out / "rows.html").read_text()
    assert page.count("<tr data-method=") == 3 and page.count("class='cell'") == 2 * 3
    assert "http://" not in page and "https://" not in page  # self-contained


def test_the_three_formats_give_the_same_localization(csv_run, photos, tiny_bundle, tmp_path, capsys):
    _, _, _, out = csv_run
    reference = {(r["image"], r["method"]): r for r in rows(out / "rows") if r["boxes"]}
    folder, mapping = write_voc(tmp_path / "Annotations")
    for name, extra in (("coco", ["--annotations", str(write_coco(tmp_path / "coco.json"))]),
                        ("voc", ["--annotations", str(folder), "--classes", str(mapping)])):  # fmt: skip
        assert evaluate_main([str(photos), "-m", str(tiny_bundle), "--out", str(tmp_path / name), *extra, *FAST]) == 0
        err = capsys.readouterr().err
        if name == "coco":
            assert "warning: annotated class 'unicorn' maps to no class of the model" in err
        located = {(r["image"], r["method"]): r for r in rows(tmp_path / name) if r["boxes"]}
        assert located.keys() == reference.keys()
        for key, row in located.items():  # the same photos, boxes and classes: the same numbers
            for column in ("boxes", "box", "gt_known", "box_ious", "pointing", "energy", "drop", "road_morf"):
                assert row[column] == reference[key][column], (name, key, column)


def test_bad_input_is_one_line_and_exit_2(photos, tiny_bundle, tmp_path, capsys):
    for args, message in (
        (["--annotations", str(tmp_path / "none.csv")], f"{tmp_path / 'none.csv'}: no such annotation file"),
        (["--methods", "cam,nope"], "unknown method 'nope'"),
    ):
        assert evaluate_main([str(photos), "-m", str(tiny_bundle), "--out", str(tmp_path / "o"), *FAST, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("npcam evaluate: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_then_the_same_command_loses_nothing(csv_run, photos, tiny_bundle, tmp_path):
    """SIGINT mid-run: exit 130, only complete files; the rerun does the rest and the rows equal a straight run's."""
    _, _, _, out = csv_run
    many = tmp_path / "many"
    many.mkdir()
    for i in range(10):
        Image.fromarray(synthetic_image(80, 100, seed=i % 5)).save(many / f"p{i}.png")
    command = [sys.executable, "-m", "npcam", "evaluate", str(many), "-m", str(tiny_bundle), "--out", str(tmp_path / "rows"),
               "--rows-per-file", "3", *FAST]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((tmp_path / "rows").glob("*.parquet"))) < 2:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "interrupted; the photos finished are saved: run the same command again to finish" in err
    first = rows(tmp_path / "rows")
    done = {r["image"] for r in first}
    assert 2 <= len(done) < 10 and len(first) == 3 * len(done)  # whole photos only
    assert not [p for p in (tmp_path / "rows").iterdir() if p.name.startswith(".")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"10 photos: {len(done)} already in" in result.stderr
    final = rows(tmp_path / "rows")
    assert sorted((r["image"], r["method"]) for r in final) == sorted(
        (str(many / f"p{i}.png"), m) for i in range(10) for m in METHODS.split(",")
    )  # each photo and method once
    # p4 and p9 have the pixels of five.png of the annotated run (PNG, lossless), which had no annotation either:
    # the same computation, so the same numbers (ROAD's noise is drawn from the input and the map) up to
    # onnxruntime's float32 rounding, which differs from run to run at 1e-7 of a score (measured 5e-9).
    straight = {r["method"]: r for r in rows(out / "rows") if r["image"] == str(photos / "five.png")}
    twins = [row for row in final if row["image"].endswith(("p4.png", "p9.png"))]
    assert len(twins) == 2 * 3
    for row in twins:
        twin = straight[row["method"]]
        assert row["increase"] == twin["increase"] and row["lowres"] == twin["lowres"], row["image"]
        for column in ("drop", "deletion", "insertion", "road_morf", "road_lerf"):
            np.testing.assert_allclose(row[column], twin[column], atol=1e-6, err_msg=f"{row['image']} {column}")


def test_a_resumed_run_with_other_settings_is_refused(csv_run, photos, tiny_bundle, capsys):
    _, _, _, out = csv_run
    args = [str(photos), "-m", str(tiny_bundle), "--out", str(out / "rows"), "--annotations", str(out / "a.csv"), *FAST]
    assert evaluate_main([*args, "--threshold", "0.2"]) == 2
    assert "holds results made with other options" in capsys.readouterr().err
    assert evaluate_main(args) == 0  # the same command: nothing to do, the table again
    captured = capsys.readouterr()
    assert "5 photos: 5 already in" in captured.err and "| `cam` |" in captured.out


def test_limit_spreads_and_nests():
    from npcam.summary import spread

    items = list(range(353))
    assert spread(items, None) == items and spread(items, 400) == items
    small, large = spread(items, 40), spread(items, 80)
    assert len(small) == 40 and set(small) <= set(large) and small == sorted(small)
    assert max(np.diff(small)) <= 16  # spread over the whole list, not its start


def test_ray_actors_make_the_same_rows(csv_run, photos, tiny_bundle, tmp_path, monkeypatch):
    """With --driver-threads 0, Ray's actors alone evaluate (the engine of npcam dataset): the same rows."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install '.[dataset]'")
    monkeypatch.setenv("RAY_ADDRESS", "")
    _, _, _, out = csv_run
    args = [str(photos / "*.png"), "-m", str(tiny_bundle), "--out", str(tmp_path / "ray"), *FAST, "--driver-threads", "0",
            "--actors", "1"]  # fmt: skip
    assert evaluate_main(args) == 0
    straight = {r["method"]: r for r in rows(out / "rows") if r["image"] == str(photos / "five.png")}
    found = rows(tmp_path / "ray")
    assert sorted((r["image"], r["method"]) for r in found) == [(str(photos / "five.png"), m) for m in sorted(straight)]
    for row in found:
        for column in ("drop", "deletion", "insertion", "road_morf", "road_lerf"):
            np.testing.assert_allclose(row[column], straight[row["method"]][column], atol=1e-6)
