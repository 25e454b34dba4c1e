"""Whole datasets on embedded Ray Data: the CLI's records as Parquet rows, bad images as rows, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
from conftest import PHOTOS, REPO, synthetic_image
from PIL import Image

pytestmark = pytest.mark.slow  # Ray

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install '.[dataset]' (CI installs it)")
pq = pytest.importorskip("pyarrow.parquet")
import pyarrow.dataset as pds  # noqa: E402

from npcam import dataset, engine  # noqa: E402
from npcam.cli import main as cli_main  # noqa: E402
from npcam.explain import Options  # noqa: E402


def rows(dest) -> list[dict]:
    return pds.dataset(str(dest), format="parquet").to_table().to_pylist()


def plain(record: dict) -> dict:
    """A row without the keys Parquet fills with null where the JSON record leaves them out."""
    out = {k: v for k, v in record.items() if v is not None}
    if "maps" in out:
        out["maps"] = [{k: v for k, v in m.items() if v is not None} for m in out["maps"]]
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for photo in PHOTOS:
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes(PHOTOS[1].read_bytes()[:3000])
    (folder / "text.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def parquet(bundle, images, tmp_path_factory):
    """One embedded run with Ray (the driver's thread and Ray's actors), shared by the tests below."""
    dest = tmp_path_factory.mktemp("out") / "rows"
    # One driver thread: on two cores one Ray actor beside it (on more cores, more), so both share the list.
    summary = dataset.run(str(images), str(bundle), str(dest), Options(top=2, bbox=True), batch_size=2,
                          driver_threads=1)  # fmt: skip
    return dest, summary


def test_every_image_gets_one_row_and_bad_ones_an_error(parquet, images):
    dest, summary = parquet
    found = rows(dest)
    assert sorted(r["image"] for r in found) == sorted(str(p) for p in images.iterdir())
    errors = {r["image"]: r["error"] for r in found if r["error"]}
    assert set(errors) == {str(images / "broken.jpg"), str(images / "text.png")}
    assert "cannot decode" in errors[str(images / "broken.jpg")] and "not an image" in errors[str(images / "text.png")]
    assert summary["explained"] == 5 and summary["errors"] == 2 and summary["already_done"] == 0
    assert summary["actors"] >= 1 and 1 <= summary["driver"] <= 5  # Ray ran; the driver took at least the last
    assert any(p.name.startswith("driver-") for p in dest.glob("*.parquet"))


def test_rows_are_the_clis_records(parquet, images, bundle, capsys, tmp_path):
    dest, _ = parquet
    by_image = {r["image"]: plain(r) for r in rows(dest)}
    paths = sorted(str(p) for p in images.iterdir())
    assert cli_main(["-m", str(bundle), *paths, "--top", "2", "--bbox", "--json", "-o", f"{tmp_path}/"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths) == len(by_image)  # one record per image, the bad ones included
    for line in lines:
        record = json.loads(line)
        record.pop("output", None)
        for m in record.get("maps", []):
            m.pop("output")
        assert by_image[record["image"]] == record, record["image"]


def test_the_bundle_digest_and_options_are_in_every_files_metadata(parquet, bundle):
    dest, _ = parquet
    import npcam

    files = sorted(dest.glob("*.parquet"))
    assert files, f"no Parquet file in {dest}"
    for path in files:
        stamp = json.loads(pq.read_schema(path).metadata[b"npcam"])
        assert stamp["bundle"] == npcam.bundle.digest(npcam.load(bundle).bundle.meta)
        assert stamp["options"]["top"] == 2 and stamp["options"]["bbox"] is True


def test_a_rerun_does_nothing_and_another_model_is_refused(parquet, images, bundle, tmp_path):
    dest, _ = parquet
    before = sorted(p.name for p in dest.iterdir())
    again = dataset.run(str(images), str(bundle), str(dest), Options(top=2, bbox=True))
    assert again["already_done"] == 5 and again["explained"] == 0 and sorted(p.name for p in dest.iterdir()) == before
    import shutil

    import npcam

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["arch"] = "renamed"  # the same files: the digest is of the files
    (other / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(npcam.NpcamError, match="holds results made with other options|another model"):
        dataset.run(str(images), str(other), str(dest), Options(top=2, bbox=True))
    with pytest.raises(npcam.NpcamError, match="holds results made with other options"):
        dataset.run(str(images), str(bundle), str(dest), Options(top=3))


def test_low_resolution_maps_as_float16(bundle, tmp_path):
    dest = tmp_path / "lowres"
    dataset.run(str(PHOTOS[0]), str(bundle), str(dest), Options(lowres=True))
    (row,) = rows(dest)
    assert row["lowres"]["shape"] == [7, 7] and len(row["lowres"]["values"]) == 49
    assert max(row["lowres"]["values"]) == 1.0 and row["maps"][0]["lowres"] == row["lowres"]
    schema = pq.read_schema(next(dest.glob("*.parquet")))
    assert str(schema.field("lowres").type) == "struct<shape: list<element: int64>, values: list<element: halffloat>>"


def test_sources_globs_and_list_files(images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n{images / 'coffee.jpg'}\n\n{images / 'rocket.jpg'}\n")
    assert dataset.list_images(str(listing)) == [str(images / "coffee.jpg"), str(images / "rocket.jpg")]
    assert dataset.list_images(str(images / "*.jpg")) == sorted(str(p) for p in images.glob("*.jpg"))
    assert dataset.list_images(f"file://{images}") == sorted(f"file://{p}" for p in images.iterdir())


def test_overlays_on_request(bundle, images, tmp_path):
    dest, overlays = tmp_path / "rows", tmp_path / "overlays"
    summary = dataset.run(str(images), str(bundle), str(dest), Options(), overlays=str(overlays))
    # By default every core runs a driver thread: Ray's actors would add no core, so Ray is not started.
    assert summary["actors"] == 0 and summary["driver"] == 5
    written = sorted(p.name for p in overlays.iterdir())
    assert written == ["chelsea_cam.jpg", "coffee_cam.jpg", "rocket_cam.jpg"]
    assert {r["output"] for r in rows(dest) if not r["error"]} == {str(overlays / n) for n in written}


def processes_marked(mark: str) -> list[int]:
    """The ids of this machine's processes whose environment holds ``NPCAM_TEST_RUN=mark`` (Linux's /proc)."""
    needle = f"NPCAM_TEST_RUN={mark}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # dead, waiting for its parent
        except OSError:  # gone meanwhile, or another user's
            continue
        if needle in environ and not zombie:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("driver", ["1", "0"], ids=["driver-and-ray", "ray-alone"])
def test_a_killed_run_finishes_on_the_second_with_nothing_lost_or_duplicated(tiny_bundle, tmp_path, driver):
    """SIGKILL mid-run, then the same command: every image once. With the driver's head start the kill lands
    while its files are being written (one row each); with --driver-threads 0, while Ray's are.

    The tiny bundle: the point is the claims and the files of a killed run, not ResNet-18's numbers."""
    folder = tmp_path / "many"
    folder.mkdir()
    # Enough images that the kill, as soon as five files are written, lands well before the end (it landed at
    # 5 to 8 in our runs), few enough that the second run, through Ray Data a file per image, is short.
    for i in range(40):
        Image.fromarray(synthetic_image(120, 160, seed=i)).save(folder / f"img{i:03d}.jpg")
    dest = tmp_path / "rows"
    command = [sys.executable, "-m", "npcam.dataset", str(folder), "--model", str(tiny_bundle), "--out", str(dest),
               "--batch-size", "1", "--rows-per-file", "1", "--actors", "1", "--driver-threads", driver]  # fmt: skip
    # A mark in the environment, which every process of the run inherits (Ray's too): the killed run is over
    # when no process carries it any more.
    mark = f"{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "NPCAM_TEST_RUN": mark}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(dest.glob("*.parquet"))) < 5 and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-run
    process.wait()
    # Ray's worker processes notice their driver's death a moment later and may finish a file meanwhile: the
    # killed run is over once none of its processes is left (a second run started earlier would race with them).
    settled = time.monotonic() + 60
    if os.path.isdir("/proc"):
        while time.monotonic() < settled and processes_marked(mark):
            time.sleep(0.1)
    else:  # no /proc to look in: over once its files stop changing
        seen = None
        while time.monotonic() < settled:
            now = sorted((p.name, p.stat().st_size if p.exists() else -1) for p in dest.glob("*.parquet"))
            if now == seen:
                break
            seen = now
            time.sleep(3)
    partial = len(list(dest.glob("*.parquet")))
    assert 5 <= partial < 40, process.stderr.read()[-2000:]
    if driver == "1":
        assert any(p.name.startswith("driver-") for p in dest.glob("*.parquet"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    found = [r["image"] for r in rows(dest)]
    assert sorted(found) == sorted(str(p) for p in folder.iterdir())  # each once: nothing lost, nothing twice
    assert "already in" in result.stderr
    assert not [p.name for p in dest.iterdir() if p.name.startswith(".")]  # no hidden file of a killed driver left


def test_the_driver_and_the_actors_share_the_list_without_overlap(bundle, tmp_path):
    """The claim scheme without Ray's timing: the driver's HeadStart (from the end) and an actor's batches (from
    the start) race over the same list in threads of this process; each image gets exactly one row."""
    from npcam import record
    from npcam.model import Model

    folder = tmp_path / "split"
    folder.mkdir()
    paths = []
    for i in range(40):
        paths.append(folder / f"s{i:02d}.png")
        Image.fromarray(synthetic_image(64 + i, 80, seed=100 + i)).save(paths[-1])
    items = [{"image": str(p), "overlay": "", "index": n} for n, p in enumerate(paths)]
    claims = tmp_path / "claims"
    claims.mkdir()
    model = Model(str(bundle), threads=1)
    options = Options(bbox=True).checked(model)
    dest = tmp_path / "rows"
    schema = record.arrow_schema().with_metadata({b"npcam": b"{}"})
    head = engine.HeadStart(model, items, partial(dataset.explain_rows, options), str(claims), str(dest), schema,
                             rows_per_file=7, threads=2)
    actor = dataset.explainer_class(str(bundle), options, str(claims))()
    head.start()
    actor_rows = []
    for start in range(0, len(items), 4):  # Ray's way: batches of the list in order
        batch = {k: [item[k] for item in items[start : start + 4]] for k in ("image", "overlay", "index")}
        actor_rows += actor(batch).to_pylist()
    head.finish()
    driver_rows = rows(dest)
    assert sorted(p.name for p in dest.iterdir())[0].startswith("driver-")
    mine = [r["image"] for r in actor_rows] + [r["image"] for r in driver_rows]
    assert sorted(mine) == sorted(str(p) for p in paths)  # every image once
    assert head.explained == len(driver_rows) and len(actor_rows) == len(paths) - len(driver_rows)
    assert sorted(os.listdir(claims), key=int) == [str(i) for i in range(len(paths))]
    reference = {str(p): plain(npcam_describe(model, p, options)) for p in paths}
    for row in actor_rows + driver_rows:  # the same record whoever explained it
        assert plain(row) == reference[row["image"]], row["image"]


def npcam_describe(model, path, options) -> dict:
    from npcam.explain import describe, explain

    return describe(explain(model, path.read_bytes(), options, name=str(path), pixels=False), options)


def test_max_side_scales_the_overlays_and_keeps_the_rows_in_the_photos_pixels(bundle, images, tmp_path):
    dest, overlays = tmp_path / "rows", tmp_path / "overlays"
    summary = dataset.run(str(images), str(bundle), str(dest), Options(max_side=100, bbox=True), overlays=str(overlays))
    assert summary["explained"] == 5 and summary["errors"] == 2
    found = {r["image"]: r for r in rows(dest) if not r["error"]}
    for photo in PHOTOS:
        row = found[str(images / photo.name)]
        with Image.open(photo) as original, Image.open(row["output"]) as overlay:
            assert (row["width"], row["height"]) == original.size  # the record: the photo's pixels
            assert max(overlay.size) == 100 and overlay.size[0] / overlay.size[1] == pytest.approx(
                original.size[0] / original.size[1], abs=0.02  # rounding one side of a 100 px overlay
            )
        x0, y0, x1, y1 = row["maps"][0]["bbox"]
        assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
    # max_side changes only the overlays: a run into the same DEST without it is a resume, not other options
    again = dataset.run(str(images), str(bundle), str(dest), Options(bbox=True))
    assert again["already_done"] == 5 and again["explained"] == 0


def test_without_the_extra_the_error_is_one_line(bundle, tmp_path):
    """Where Ray is not installed, `npcam dataset` says which extra to install."""
    blocker = tmp_path / "block"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('ray is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "npcam", "dataset", str(PHOTOS[0]), "--model", str(bundle), "--out",
                             str(tmp_path / "o"), "--actors", "1"], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip() == (
        "npcam dataset: error: npcam dataset needs Ray Data and pyarrow: pip install 'npcam[dataset]'"
    )
    assert not (tmp_path / "o").exists()  # the driver's head start leaves no rows when Ray cannot start


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """Ray's services have no authentication by default: the embedded instance must not be reachable from outside."""
    code = (
        "import ray, npcam.engine as d; d._start_ray(None); "
        "print(ray.util.get_node_ip_address(), ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    node_ip, gcs = result.stdout.split()[-2:]
    assert node_ip == "127.0.0.1" and gcs.startswith("127.0.0.1:"), result.stdout


def _dataset_cli(bundle, tmp_path, *args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "npcam", "dataset", str(PHOTOS[0]), "--model", str(bundle),
               "--out", str(tmp_path / "o"), *args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_cluster_where_nothing_listens_is_one_line_at_once(bundle, tmp_path):
    result = _dataset_cli(bundle, tmp_path, "--address", "127.0.0.1:1", "--connect-timeout", "20")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("npcam dataset: error: cannot reach a Ray cluster at 127.0.0.1:1 (")
    assert not (tmp_path / "o").exists()


def test_a_cluster_that_never_answers_ends_at_the_connect_timeout_in_one_line(bundle, tmp_path):
    """Something accepts the connection but never speaks Ray: the watchdog ends the run, Ray's warnings unseen."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts the connections; nobody ever answers them
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        result = _dataset_cli(bundle, tmp_path, "--address", address, "--connect-timeout", "3")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == f"npcam dataset: error: no Ray cluster answered at {address} within 3 s (--connect-timeout)\n"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--connect-timeout", "0"], "argument --connect-timeout: must be more than 0"),
        (["--connect-timeout", "soon"], "argument --connect-timeout: must be a number of seconds"),
        (["--actors", "0"], "argument --actors: must be at least 1, not 0"),
        (["--batch-size", "-3"], "argument --batch-size: must be at least 1, not -3"),
        (["--rows-per-file", "0"], "argument --rows-per-file: must be at least 1"),
        (["--top", "0"], "argument --top: must be at least 1"),
    ],
)
def test_argument_ranges_are_one_line(bundle, tmp_path, args, message):
    result = _dataset_cli(bundle, tmp_path, *args, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_cluster_that_answers_gets_stderr_back_and_no_watchdog(capfd):
    """What Ray prints while connecting is kept off the terminal; once connected, stderr is the terminal again
    and the watchdog is gone (the process lives on past the timeout)."""
    import socket

    calls = []

    class Ray:
        def init(self, **kwargs):
            os.write(2, b"Ray's own warning\n")
            calls.append(kwargs["address"])

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        engine._connect(Ray(), address, 0.5)
    time.sleep(1.0)
    os.write(2, b"after\n")
    assert calls == [address] and capfd.readouterr().err == "after\n"
