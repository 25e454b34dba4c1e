"""Hostile and odd inputs, interrupted runs, full disks: one-line errors, no partial files.

Every bad input is generated here; nothing binary is checked in. Permission
cases need permission bits to matter, so as root the CLI runs without the
capabilities that let root ignore them (``setpriv``, from util-linux).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, default_sigint, synthetic_image
from PIL import Image

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


UNPRIVILEGED = (
    ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if os.geteuid() == 0
    else []
)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but holds a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def corpus(directory: Path) -> dict[str, tuple[str, str | None]]:
    """Write every case into ``directory``; returns name -> (expected outcome, error text or None)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(synthetic_image(120, 160))
    jpeg, png = encoded(rgb, "JPEG"), encoded(rgb, "PNG")
    frames = [Image.fromarray(synthetic_image(50, 70, seed=s)).convert("P") for s in range(3)]
    palette = rgb.convert("P")
    cases = {
        "empty.jpg": (b"", "error", "not an image"),
        "random.jpg": (rng.bytes(5000), "error", "not an image"),
        "text.jpg": (b"this is a text file, not a JPEG\n" * 10, "error", "not an image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "error", "cannot decode"),
        "truncated.png": (png[: len(png) // 2], "error", "cannot decode"),
        "bomb.png": (png_claiming(100_000, 100_000), "error", "10,000,000,000 pixels, over the limit of 100,000,000"),
        "tiny.png": (encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok", None),
        "strip.png": (encoded(Image.fromarray(synthetic_image(1, 10_000)), "PNG"), "ok", None),
        "gray16.png": (encoded(Image.fromarray(rng.integers(0, 65535, (80, 60), dtype=np.uint16)), "PNG"), "ok", None),
        "cmyk.jpg": (encoded(rgb.convert("CMYK"), "JPEG"), "ok", None),
        "palette_transparent.png": (encoded(palette, "PNG", transparency=0), "ok", None),
        "rgba.png": (encoded(rgb.convert("RGBA"), "PNG"), "ok", None),
        "la.png": (encoded(rgb.convert("LA"), "PNG"), "ok", None),
        "animated.gif": (encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), "ok", None),
    }
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"exif{orientation}.jpg"] = (encoded(rgb, "JPEG", exif=exif), "ok", None)
    expected = {}
    for name, (data, outcome, message) in cases.items():
        (directory / name).write_bytes(data)
        expected[name] = (outcome, message)
    (directory / "broken_link.jpg").symlink_to(directory / "does_not_exist.jpg")
    expected["broken_link.jpg"] = ("error", "no such file")
    odd_name = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes: not valid UTF-8
    (directory / odd_name).write_bytes(jpeg)
    expected[odd_name] = ("ok", None)
    return expected


def outputs_are_complete(directory: Path) -> list[Path]:
    """Every file in ``directory`` decodes fully; no temporary files are left. Returns the files."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert [p for p in files if p.name.startswith(".") or p.suffix == ".tmp"] == []
    for p in files:
        with Image.open(p) as image:
            image.load()  # raises on a truncated file
    return files


def test_each_bad_or_odd_image_has_its_documented_outcome(tiny_cli, tmp_path):
    inputs = tmp_path / "corpus"
    inputs.mkdir()
    expected = corpus(inputs)
    for name, (outcome, message) in expected.items():
        out_dir = tmp_path / "out" / name.encode("utf-8", "surrogateescape").hex()
        code, out, err = tiny_cli(inputs / name, "-o", f"{out_dir}/", "--json")
        record = json.loads(out.splitlines()[-1])
        if outcome == "ok":
            assert code == 0, (name, err)
            width, height = Image.open(record["output"]).size
            assert (width, height) == (record["width"], record["height"]), name
        else:
            assert code == 1, name
            assert err.count("\n") == 1 and err.startswith("npcam: error: ") and message in err, (name, err)
            assert str(inputs / name).encode("utf-8", "backslashreplace").decode() in err or name in err
            assert not out_dir.exists() or outputs_are_complete(out_dir) == []


def test_a_strip_keeps_its_shape(tiny_cli, tmp_path):
    Image.fromarray(synthetic_image(10_000, 1)).save(tmp_path / "tall.png")
    code, out, _ = tiny_cli(tmp_path / "tall.png", "--json")
    assert code == 0 and Image.open(json.loads(out)["output"]).size == (1, 10_000)


def test_pixel_limit_flag(tiny_cli, tmp_path):
    Image.fromarray(synthetic_image(300, 400)).save(tmp_path / "p.png")
    code, _, err = tiny_cli(tmp_path / "p.png", "--max-pixels", "100000")
    assert code == 1 and "120,000 pixels, over the limit of 100,000 (raise it with --max-pixels)" in err
    assert tiny_cli(tmp_path / "p.png", "--max-pixels", "120000")[0] == 0


def test_batch_of_20_good_and_10_bad(tiny_cli, tmp_path):
    data = tmp_path / "batch"
    data.mkdir()
    for i in range(20):
        Image.fromarray(synthetic_image(60 + i, 80, seed=i)).save(data / f"good{i:02d}.jpg")
    bad = {f"bad{i:02d}.{'jpg' if i % 2 else 'png'}": b"\0" * i for i in range(10)}
    for name, data_bytes in bad.items():
        (data / name).write_bytes(data_bytes)
    code, out, err = tiny_cli(data, "-o", f"{tmp_path}/out/")
    assert code == 1
    assert len(outputs_are_complete(tmp_path / "out")) == 20
    for name in bad:
        assert err.count(f"{data / name}:") == 1, name
    assert err.count("npcam: error:") == 10 and len(out.splitlines()) == 20


def test_full_disk_leaves_no_file(tiny_cli, tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    def to_dev_full(fd, mode="r", *args, **kwargs):
        os.close(fd)  # the temporary file stays, empty, as on a disk that just filled up
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", to_dev_full)
    code, _, err = tiny_cli(SAMPLE, "-o", f"{tmp_path}/out/")
    monkeypatch.undo()
    assert code == 1 and "No space left on device" in err and "chelsea.png" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_writing_over_a_special_file_is_refused(tiny_cli, tmp_path):
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)  # renaming over it would destroy it, as it would a device
    code, _, err = tiny_cli(SAMPLE, "-o", fifo)
    assert code == 1 and "is not a regular file" in err
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_existing_output_is_replaced_whole(tiny_cli, tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old content")
    assert tiny_cli(SAMPLE, "-o", target)[0] == 0
    assert Image.open(target).size == (451, 300)


def run_cli(args, cwd, unprivileged=False, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = (UNPRIVILEGED if unprivileged else []) + [sys.executable, "-m", "npcam", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


needs_setpriv = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="running as root without setpriv: permission bits cannot be enforced",
)


@needs_setpriv
def test_unreadable_file(tiny_bundle, tmp_path):
    Image.fromarray(synthetic_image(50, 50)).save(tmp_path / "locked.jpg")
    (tmp_path / "locked.jpg").chmod(0)
    result = run_cli(["-m", tiny_bundle, tmp_path / "locked.jpg"], tmp_path, unprivileged=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"npcam: error: {tmp_path / 'locked.jpg'}: permission denied"


@needs_setpriv
def test_unwritable_output_directory(tiny_bundle, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    result = run_cli(["-m", tiny_bundle, SAMPLE, "-o", f"{tmp_path}/ro/"], tmp_path, unprivileged=True)
    assert result.returncode == 1 and "Permission denied" in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "ro").iterdir()) == []


def test_broken_bundle_stops_before_any_image(tiny_bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, broken)
    (broken / "trunk.onnx").write_bytes(b"not onnx")
    result = run_cli(["-m", broken, SAMPLE, "-o", f"{tmp_path}/out/"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "trunk.onnx" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 60 photos of 0.75 MP explained in a subprocess
def test_ctrl_c_leaves_only_complete_files(tiny_bundle, tmp_path):
    data = tmp_path / "many"
    data.mkdir()
    # One photo encoded, its bytes under 60 names: the run's work (decode, explain, write) is per file whatever
    # the pixels, and encoding 60 PNGs of 0.75 MP took longer than the run.
    Image.fromarray(synthetic_image(750, 1000, seed=0)).save(data / "p00.png")
    for i in range(1, 60):
        (data / f"p{i:02d}.png").write_bytes((data / "p00.png").read_bytes())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "npcam", "-m", str(tiny_bundle), str(data), "-o", f"{out}/"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.jpg"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert 3 <= len(outputs_are_complete(out)) < 60


# Hostile bundles: each is an exported bundle with one crafted change and bundle.json's hashes updated, so that
# every other check passes. Each is refused at load in one line naming the file (exit 2), whatever the working
# directory holds; the runs are capped at 4 GiB of address space, so a check that failed would show as an error.

NOTES = 16 * 2**20  # bytes of notes.txt: more than any tensor the crafted trunks point at, so onnxruntime would read it


def _rehash(path: Path) -> None:
    import hashlib

    meta = json.loads((path / "bundle.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "bundle.json").write_text(json.dumps(meta))


def _edit_trunk(change):
    def craft(path: Path) -> None:
        import onnx

        trunk = onnx.load(str(path / "trunk.onnx"))
        change(trunk)
        (path / "trunk.onnx").write_bytes(trunk.SerializeToString())

    return craft


def _external(tensor, location: str = "notes.txt") -> None:
    """Move a tensor's data out to ``location`` (in the working directory, as onnxruntime would resolve it)."""
    import onnx

    length = len(tensor.raw_data) or 4 * int(np.prod(tensor.dims))
    for field in ("raw_data", "float_data", "int64_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _biggest_initializer(trunk):
    return max(trunk.graph.initializer, key=lambda t: len(t.raw_data))


def _constant_node(trunk) -> None:
    import onnx
    from onnx import helper

    value = helper.make_tensor("c", onnx.TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    _external(value)
    trunk.graph.node.insert(0, helper.make_node("Constant", [], ["unused_constant"], value=value))


def _subgraph(trunk) -> None:
    import onnx
    from onnx import helper

    weights = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    _external(weights)
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "branch", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], initializer=[weights],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "other", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        initializer=[helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [0.0] * 4)],
    )  # fmt: skip
    flag = helper.make_tensor("flag", onnx.TensorProto.BOOL, [], [True])
    trunk.graph.initializer.append(flag)
    trunk.graph.node.append(helper.make_node("If", ["flag"], ["unused_branch"], then_branch=branch, else_branch=other))


def _sparse(trunk) -> None:
    import onnx
    from onnx import helper

    values = helper.make_tensor("s_values", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    _external(values)
    indices = helper.make_tensor("s_indices", onnx.TensorProto.INT64, [2], [0, 3])
    trunk.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))


def _npy_claiming(path: Path, shape) -> None:
    """A .npy whose header claims ``shape`` but holds a few values: NumPy would allocate the claim first."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    path.write_bytes(header.getvalue() + np.zeros(4, np.float32).tobytes())


def _head_npz_bomb(path: Path) -> None:
    """head.npz with one more array of 1.1 GiB of zeros: about a megabyte compressed."""
    import zipfile

    with zipfile.ZipFile(path / "head.npz", "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.npy", "w", force_zip64=True) as member:
            count = (2**30 + 2**27) // 8
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (count,)})
            member.write(header.getvalue())
            block = bytes(2**24)
            for _ in range(count * 8 // len(block)):
                member.write(block)


def _edit_head(change):
    def craft(path: Path) -> None:
        spec = json.loads((path / "head.json").read_text())
        change(spec)
        (path / "head.json").write_text(json.dumps(spec))

    return craft


def _with_arrays(**arrays):
    def craft(path: Path) -> None:
        with np.load(path / "head.npz") as npz:
            kept = {name: npz[name] for name in npz.files}
        np.savez(path / "head.npz", **kept, **arrays)

    return craft


def _insert_ops(*ops):
    """Ops before the head's first op (their outputs unused: a load still computes them); INPUT is the head's input."""

    def change(spec):
        named = [{**op, "inputs": [spec["input"] if i == "INPUT" else i for i in op["inputs"]]} for op in ops]
        spec["ops"] = [*named, *spec["ops"]]

    return _edit_head(change)


def _both(*crafts):
    def craft(path: Path) -> None:
        for c in crafts:
            c(path)

    return craft


def _features_plus(trunk, nodes, initializers=()):
    """Add ``sum(extra) * 0``, made by ``nodes`` (their last output "extra"), to the trunk's features."""
    from onnx import helper

    for node in trunk.graph.node:
        node.output[:] = ["features_raw" if o == "features" else o for o in node.output]
    trunk.graph.initializer.extend(initializers)
    trunk.graph.node.extend([
        *nodes,
        helper.make_node("ReduceSum", ["extra"], ["extra_sum"], keepdims=0),
        helper.make_node("Add", ["features_raw", "extra_sum"], ["features"]),
    ])  # fmt: skip


def _constant_of_shape(trunk) -> None:
    import onnx
    from onnx import helper, numpy_helper

    zero = helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "big_shape")
    _features_plus(trunk, [helper.make_node("ConstantOfShape", ["big_shape"], ["extra"], value=zero)], [shape])


def _expand_by_a_constant_node(trunk) -> None:
    from onnx import helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1, 100_000, 100_000], np.int64), "v")
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    nodes = [helper.make_node("Constant", [], ["big_shape"], value=shape),
             helper.make_node("Expand", ["one", "big_shape"], ["extra"])]  # fmt: skip
    _features_plus(trunk, nodes, [one])


HOSTILE_BUNDLES = {
    "trunk_constant_of_shape_of_ten_billion_values": (
        "graph", _edit_trunk(_constant_of_shape), "trunk.onnx",
        "its ConstantOfShape node makes a tensor of 10,000,000,000 values from a constant shape"),
    "trunk_expand_to_ten_billion_values": (
        "graph", _edit_trunk(_expand_by_a_constant_node), "trunk.onnx", "its Expand node makes"),
    # name: (base bundle, craft, file named, message)
    "initializer_in_notes_txt": (
        "affine", _edit_trunk(lambda t: _external(_biggest_initializer(t))), "trunk.onnx", "'notes.txt'"),
    "initializer_outside_the_bundle": (
        "affine", _edit_trunk(lambda t: _external(_biggest_initializer(t), "../notes.txt")), "trunk.onnx",
        "'../notes.txt'"),
    "constant_node_in_notes_txt": ("graph", _edit_trunk(_constant_node), "trunk.onnx", "external file"),
    "subgraph_initializer_in_notes_txt": ("graph", _edit_trunk(_subgraph), "trunk.onnx", "tensor 'w'"),
    "sparse_initializer_in_notes_txt": ("graph", _edit_trunk(_sparse), "trunk.onnx", "tensor 's_values'"),
    "npy_header_claiming_a_terabyte": (
        "affine", lambda p: _npy_claiming(p / "fc_bias.npy", (2**38,)), "fc_bias.npy", "header claims"),
    "npz_array_claiming_a_terabyte": (
        "graph", lambda p: _npz_member_claiming(p), "head.npz", "header claims"),
    "npz_decompressing_to_over_a_gigabyte": ("graph", _head_npz_bomb, "head.npz", "over the limit of"),
    "head_input_of_ten_billion_values": (
        "graph", _edit_head(lambda spec: spec.update(input_shape=[-1, 100_000, 100_000])), "head.json",
        "over the limit of"),
    "expand_to_ten_billion_values": (
        "graph", _insert_ops({"op": "Expand", "inputs": ["INPUT"], "output": "big", "attrs": {"shape": [1, 128, 10**8]}}),
        "head.json", "op Expand ('big'): its shape would hold 12,800,000,000 values"),
    "reshape_to_ten_billion_values": (
        "graph", _insert_ops({"op": "Reshape", "inputs": ["INPUT"], "output": "big", "attrs": {"shape": [1, 10**5, 10**5]}}),
        "head.json", "cannot reshape"),
    "outer_product_of_two_constants": (
        "graph", _both(_with_arrays(column=np.ones((100_000, 1)), row=np.ones((1, 100_000))),
                       _insert_ops({"op": "Mul", "inputs": ["column", "row"], "output": "big"})),
        "head.json", "op Mul ('big') would hold 10,000,000,000 values"),
    "matmul_to_ten_billion_values": (
        "graph", _both(_with_arrays(column=np.ones((100_000, 1)), row=np.ones((1, 100_000))),
                       _insert_ops({"op": "MatMul", "inputs": ["column", "row"], "output": "big"})),
        "head.json", "op MatMul ('big') would hold"),
}  # fmt: skip


def _npz_member_claiming(path: Path) -> None:
    """Replace head.npz's c0 member by a .npy whose header claims a terabyte."""
    import zipfile

    with np.load(path / "head.npz") as npz:
        kept = {name: npz[name] for name in npz.files if name != "c0"}
    np.savez(path / "head.npz", **kept)
    _npy_claiming(path / "claim.npy", (2**38,))
    with zipfile.ZipFile(path / "head.npz", "a") as archive:
        archive.write(path / "claim.npy", "c0.npy")
    (path / "claim.npy").unlink()


def _limited_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


# The CLI run once per (arguments, working directory), in one process for all of them, so that the imports are paid
# once: one JSON line per run with its exit code, stdout and stderr (a traceback, and no exit code, if it raised).
CLI_RUNS = """
import contextlib, io, json, os, sys, traceback
from npcam.cli import main
for args, cwd in json.load(sys.stdin):
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = None
            traceback.print_exc()
    print(json.dumps({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


def _run_capped(runs: list[tuple[list, Path]]) -> list[subprocess.CompletedProcess]:
    """The CLI on each ``(arguments, working directory)`` of ``runs``, in one process with 4 GiB of address space."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    todo = json.dumps([([str(a) for a in args], str(cwd)) for args, cwd in runs])
    process = subprocess.run(
        [sys.executable, "-c", CLI_RUNS], input=todo, env=env, capture_output=True, text=True, timeout=600,
        preexec_fn=_limited_memory,
    )  # fmt: skip
    done = [json.loads(line) for line in process.stdout.splitlines()]
    assert len(done) == len(runs), f"the runs stopped after {len(done)} of {len(runs)}: {process.stderr[-3000:]}"
    return [subprocess.CompletedProcess(args, d["returncode"], d["stdout"], d["stderr"]) for (args, _), d in
            zip(runs, done)]  # fmt: skip


@pytest.fixture(scope="module")
def working_directories(tmp_path_factory) -> list[Path]:
    """One empty, one holding the files a crafted bundle points at (and its parent holds one too)."""
    tmp_path = tmp_path_factory.mktemp("cwds")
    empty, tempting = tmp_path / "empty" / "cwd", tmp_path / "tempting" / "cwd"
    for d in (empty, tempting):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (tempting / "notes.txt").write_bytes(rng.bytes(NOTES))
    (tempting.parent / "notes.txt").write_bytes(rng.bytes(NOTES))
    return [empty, tempting]


@pytest.mark.extras  # graph_bundle is exported from torch
def test_a_trunk_that_fails_at_run_time_is_one_line_per_image(graph_bundle, tmp_path):
    """A shape computed from the input cannot be checked at load: 10^5 times the image's shape fails to
    allocate in onnxruntime (the run has 4 GiB of address space), as one line for the image (exit 1)."""
    from onnx import helper, numpy_helper

    def craft(trunk):
        many = numpy_helper.from_array(np.array([100_000], np.int64), "many")
        nodes = [helper.make_node("Shape", ["image"], ["image_shape"]),
                 helper.make_node("Mul", ["image_shape", "many"], ["big_shape"]),
                 helper.make_node("ConstantOfShape", ["big_shape"], ["extra"])]  # fmt: skip
        _features_plus(trunk, nodes, [many])

    hostile = tmp_path / "hostile"
    shutil.copytree(graph_bundle, hostile)
    _edit_trunk(craft)(hostile)
    _rehash(hostile)
    (result,) = _run_capped([(["-m", hostile, SAMPLE, "-o", f"{tmp_path}/out/"], tmp_path)])
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"npcam: error: {hostile / 'trunk.onnx'}: onnxruntime cannot run it on this input")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.fixture(scope="module")
def hostile_runs(tiny_bundle, graph_bundle, working_directories, tmp_path_factory):
    """Each case of HOSTILE_BUNDLES: ``(its bundle, its output folder, the CLI's result from each working directory)``."""
    root = tmp_path_factory.mktemp("hostile")
    runs, cases = [], {}
    for case, (base, craft, _, _) in HOSTILE_BUNDLES.items():
        hostile, out = root / case / "hostile", root / case / "out"
        shutil.copytree(tiny_bundle if base == "affine" else graph_bundle, hostile)
        craft(hostile)
        _rehash(hostile)
        cases[case] = (hostile, out, len(runs))
        runs += [(["-m", hostile, SAMPLE, "-o", f"{out}/"], cwd) for cwd in working_directories]
    results = _run_capped(runs)
    n = len(working_directories)
    return {case: (hostile, out, results[i : i + n]) for case, (hostile, out, i) in cases.items()}


@pytest.mark.extras  # graph_bundle is exported from torch
@pytest.mark.parametrize("case", sorted(HOSTILE_BUNDLES))
def test_hostile_bundles_are_refused_at_load_in_one_line(case, hostile_runs, working_directories):
    _, _, name, message = HOSTILE_BUNDLES[case]
    hostile, out, results = hostile_runs[case]
    assert len(results) == len(working_directories) == 2
    for cwd, result in zip(working_directories, results):
        assert result.returncode == 2, (cwd, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("npcam: error: "), result.stderr
        assert f"{hostile / name}:" in result.stderr and message in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.extras  # graph_bundle is exported from torch
def test_exported_bundles_give_the_same_answer_from_any_working_directory(tiny_bundle, graph_bundle, working_directories):
    bundles = (tiny_bundle, graph_bundle)
    runs = [(["-m", path, SAMPLE, "-o", f"{path.name}.png", "--json", "--top", "3"], cwd) for path in bundles
            for cwd in working_directories]  # fmt: skip
    results = iter(_run_capped(runs))
    for _ in bundles:
        answers = []
        for cwd in working_directories:
            result = next(results)
            assert result.returncode == 0, result.stderr
            record = json.loads(result.stdout)
            assert len(record["maps"]) == 3
            answers.append((record, [np.asarray(Image.open(cwd / m["output"])) for m in record["maps"]]))
        assert answers[0][0] == answers[1][0]
        for a, b in zip(answers[0][1], answers[1][1]):
            np.testing.assert_array_equal(a, b)


# Out-of-range arguments, in every entry point: exit 2 and one line, before anything is loaded or written.

BAD_ARGUMENTS = [
    (["npcam", "IMAGE", "--threads", "0"], "argument --threads: must be between 1 and 1024, not 0"),
    (["npcam", "IMAGE", "--threads", "100000"], "argument --threads: must be between 1 and 1024, not 100000"),
    (["npcam", "IMAGE", "--top", "-1"], "argument --top: must be at least 1, not -1"),
    (["npcam", "IMAGE", "--max-pixels", "0"], "argument --max-pixels: must be at least 1, not 0"),
    (["npcam", "IMAGE", "--alpha", "nan"], "argument --alpha: must be between 0 (the photo) and 1"),
    (["npcam", "serve", "--port", "80000"], "argument --port: must be between 0 and 65535, not 80000"),
    (["npcam", "serve", "--port", "-1"], "argument --port: must be between 0 and 65535, not -1"),
    (["npcam", "serve", "--workers", "0"], "argument --workers: must be between 1 and 1024, not 0"),
    (["npcam", "serve", "--max-body", "0"], "argument --max-body: must be at least 1, not 0"),
    (["npcam", "serve", "--max-pixels", "-5"], "argument --max-pixels: must be at least 1, not -5"),
    (["npcam", "dataset", "IMAGE", "--model", "B", "--out", "D", "--connect-timeout", "-1"],
     "argument --connect-timeout: must be more than 0 and at most 86400 seconds, not -1"),
    (["npcam", "dataset", "IMAGE", "--model", "B", "--out", "D", "--batch-size", "0"],
     "argument --batch-size: must be at least 1, not 0"),
    (["export", "resnet18", "--opset", "0"], "argument --opset: must be between 7 and"),
    (["export", "torch", "m:f", "--opset", "99"], "argument --opset: must be between 7 and"),
    (["export", "onnx", "m.onnx", "--std", "0"], "--std values must be positive"),
    (["export", "onnx", "m.onnx", "--mean", "nan"], "--mean and --std values must be finite numbers"),
    (["export", "onnx", "m.onnx", "--std", "1", "2"], "--std takes 3 values (R G B) or 1"),
]  # fmt: skip


def entry_point(args: list[str]):
    """The ``main`` of ``args[0]`` (``npcam`` or ``export``) and its arguments, IMAGE standing for a real photo."""
    if args[0] == "export":
        from export.__main__ import main
    else:
        from npcam.cli import main
    return main, [str(SAMPLE) if a == "IMAGE" else a for a in args[1:]]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_argument_ranges_are_checked_in_every_entry_point_in_one_line(args, message, tmp_path, monkeypatch, capsys):
    # In-process: the parsers are what is tested here; the process's exit code is tested once per program below.
    main, rest = entry_point(args)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(rest)
    out, err = capsys.readouterr()
    assert exited.value.code == 2, err
    assert out == "" and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [BAD_ARGUMENTS[0], BAD_ARGUMENTS[-1]], ids=["npcam", "export"])
def test_argument_errors_are_exit_code_2_and_one_line_from_the_process(args, message, tmp_path):
    module = "export" if args[0] == "export" else "npcam"
    rest = [str(SAMPLE) if a == "IMAGE" else a for a in args[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", module, *rest], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
