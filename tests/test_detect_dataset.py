"""`npcam dataset` on a detector: a row per detection (the CLI's records, flattened), resuming by image.

On the tiny detector of tests/tiny_detector.py (no torch). The rows are compared with ``npcam.record.rows`` of
the records ``npcam --json`` prints for the same images and options.
"""

from __future__ import annotations

import json

import pytest
from conftest import synthetic_image
from PIL import Image

pytestmark = pytest.mark.slow  # Ray

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install '.[dataset]' (CI installs it)")
pq = pytest.importorskip("pyarrow.parquet")
import pyarrow.dataset as pds  # noqa: E402

import npcam  # noqa: E402
from npcam import dataset, record  # noqa: E402
from npcam.cli import main as cli_main  # noqa: E402
from npcam.explain import Options  # noqa: E402

FEW = Options(top=2, conf=0.5, iou=0.3, max_det=4, lowres=True)


def rows(dest) -> list[dict]:
    return pds.dataset(str(dest), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for seed in range(4):
        Image.fromarray(synthetic_image(90 + 10 * seed, 120, seed=seed)).save(folder / f"p{seed}.png")
    (folder / "text.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def parquet(detector_bundle, images, tmp_path_factory):
    """One run with Ray's actors beside the driver's thread (both write rows), shared by the tests below."""
    dest = tmp_path_factory.mktemp("out") / "rows"
    summary = dataset.run(str(images), str(detector_bundle), str(dest), FEW, batch_size=2, driver_threads=1)
    return dest, summary


def test_a_row_per_detection_the_clis_records_flattened(parquet, images, detector_bundle, capsys, tmp_path):
    dest, summary = parquet
    assert summary["images"] == 5 and summary["explained"] == 5 and summary["errors"] == 1  # images, not rows
    assert summary["actors"] >= 1 and summary["driver"] >= 1
    got = sorted(rows(dest), key=lambda r: (r["image"], r["detection"] if r["detection"] is not None else -1))
    paths = sorted(str(p) for p in images.iterdir())
    args = ["--top", "2", "--conf", "0.5", "--iou", "0.3", "--max-det", "4", "--json", "--no-overlay"]
    assert cli_main(["-m", str(detector_bundle), *paths, *args]) == 1
    want = []
    for line in capsys.readouterr().out.splitlines():
        want += record.rows(json.loads(line))
    schema = record.detection_row_schema()
    # The CLI's rows as Parquet holds them: every column, null where a key is absent; lowres (the dataset's
    # --save-cam) is the library's, in float16
    want = [{k: r.get(k) for k in schema.names} for r in want]
    model = npcam.load(detector_bundle)
    options = FEW.checked(model)
    for w in want:
        if w["explained"]:
            maps = npcam.describe(npcam.explain(model, w["image"], options), options)["maps"]
            w["lowres"] = next(m["lowres"] for m in maps if m["detection"] == w["detection"])
    assert len(got) == 4 * 4 + 1 and got == want
    assert [(r["detection"], r["explained"]) for r in got if r["image"].endswith("p0.png")] == [
        (0, True), (1, True), (2, False), (3, False),
    ]  # fmt: skip
    assert all(len(r["box"]) == 4 and r["class"] is not None for r in got if not r["error"])
    (bad,) = [r for r in got if r["error"]]
    assert bad["image"].endswith("text.png") and bad["detection"] is None and "not an image" in bad["error"]


def test_a_detectors_files_have_their_schema_and_options(parquet, detector_bundle):
    dest, _ = parquet
    for path in dest.glob("*.parquet"):
        file = pq.read_schema(path)
        assert file.remove_metadata().equals(record.detection_row_schema())
        options = json.loads(file.metadata[b"npcam"])["options"]
        assert (options["conf"], options["iou"], options["max_det"], options["detection"]) == (0.5, 0.3, 4, None)


def test_a_rerun_resumes_by_image_and_other_thresholds_are_refused(parquet, images, detector_bundle):
    dest, _ = parquet
    before = sorted(p.name for p in dest.iterdir())
    again = dataset.run(str(images), str(detector_bundle), str(dest), FEW)
    assert again["already_done"] == 5 and again["explained"] == 0 and sorted(p.name for p in dest.iterdir()) == before
    import npcam

    with pytest.raises(npcam.NpcamError, match="holds results made with other options"):
        dataset.run(str(images), str(detector_bundle), str(dest), Options(top=2, conf=0.6, iou=0.3, max_det=4))


def test_an_image_with_no_detection_is_one_row_and_its_overlay_the_photo(detector_bundle, images, tmp_path):
    dest, overlays = tmp_path / "rows", tmp_path / "overlays"
    summary = dataset.run(str(images / "p1.png"), str(detector_bundle), str(dest), Options(conf=1.0),
                          overlays=str(overlays))  # fmt: skip
    assert summary["explained"] == 1 and summary["actors"] == 0
    (row,) = rows(dest)
    assert row["detection"] is None and row["explained"] is False and row["box"] is None and row["error"] is None
    assert row["output"] == str(overlays / "p1_cam.jpg") and (overlays / "p1_cam.jpg").is_file()


def test_a_classifiers_run_keeps_its_stamp_without_the_detectors_fields(tiny_bundle, images, tmp_path):
    dest = tmp_path / "rows"
    dataset.run(str(images / "p0.png"), str(tiny_bundle), str(dest), Options())
    options = json.loads(pq.read_schema(next(dest.glob("*.parquet"))).metadata[b"npcam"])["options"]
    assert not {"detection", "conf", "iou", "max_det", "boxes"} & set(options)
    assert pq.read_schema(next(dest.glob("*.parquet"))).remove_metadata().equals(record.arrow_schema())
