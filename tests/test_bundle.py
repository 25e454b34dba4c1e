"""Broken bundles give one clear error at load time, and nothing in them is executed."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest

import npcam
from npcam import NpcamError

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def rehash(path):
    """Update bundle.json after a deliberate change, so that the hash check is not what fails."""
    meta = json.loads((path / "bundle.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "bundle.json").write_text(json.dumps(meta))


def test_missing_directory_says_how_to_export(tmp_path):
    with pytest.raises(NpcamError, match="npcam-export"):
        npcam.load(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["trunk.onnx", "fc_weight.npy", "fc_bias.npy", "labels.json", "bundle.json"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    with pytest.raises(NpcamError, match=name):
        npcam.load(copy)


def test_modified_file_fails_the_hash(copy):
    w = np.load(copy / "fc_weight.npy")
    np.save(copy / "fc_weight.npy", w * 2)
    with pytest.raises(NpcamError, match="sha256 does not match"):
        npcam.load(copy)
    assert npcam.load(copy, verify=False).head.weight[0, 0] == 2 * w[0, 0]


@pytest.mark.parametrize("content", [b"", b"garbage" * 100])
def test_garbage_onnx(copy, content):
    (copy / "trunk.onnx").write_bytes(content)
    rehash(copy)
    with pytest.raises(NpcamError, match="trunk.onnx: not a usable ONNX model"):
        npcam.load(copy)


def test_truncated_onnx(copy):
    data = (copy / "trunk.onnx").read_bytes()
    (copy / "trunk.onnx").write_bytes(data[: len(data) // 2])
    rehash(copy)
    with pytest.raises(NpcamError, match="trunk.onnx"):
        npcam.load(copy)


def test_channels_that_do_not_match_the_fc(copy):
    np.save(copy / "fc_weight.npy", np.zeros((1000, 256), dtype=np.float32))
    rehash(copy)
    with pytest.raises(NpcamError, match="512 channels, the head expects 256"):
        npcam.load(copy)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((1000, 512), dtype=np.float64), "dtype float64"),
        (np.zeros((1000,), dtype=np.float32), "shape"),
        (np.full((1000, 512), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((999, 512), dtype=np.float32), "fc_bias.npy"),
    ],
)
def test_bad_fc_weight(copy, array, message):
    np.save(copy / "fc_weight.npy", array)
    rehash(copy)
    with pytest.raises(NpcamError, match=message):
        npcam.load(copy)


@pytest.mark.parametrize("keep", [0, 6, 100])
def test_truncated_npy(copy, keep):
    data = (copy / "fc_bias.npy").read_bytes()
    (copy / "fc_bias.npy").write_bytes(data[:keep])
    rehash(copy)
    with pytest.raises(NpcamError, match="fc_bias.npy: not a"):
        npcam.load(copy)


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_disguised_as_npy_is_never_unpickled(copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(copy / "fc_weight.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    rehash(copy)
    with pytest.raises(NpcamError, match="not a plain .npy array"):
        npcam.load(copy)
    (copy / "fc_bias.npy").write_bytes(pickle.dumps(Boom()))
    rehash(copy)
    with pytest.raises(NpcamError):
        npcam.load(copy)
    assert not (tmp_path / "PWNED").exists()


def test_labels_of_the_wrong_length(copy):
    (copy / "labels.json").write_text(json.dumps(["a"] * 999))
    rehash(copy)
    with pytest.raises(NpcamError, match="999 labels, but the head has 1000 classes"):
        npcam.load(copy)


def test_bundle_json_not_json(copy):
    (copy / "bundle.json").write_text("{nope")
    with pytest.raises(NpcamError, match="bundle.json: not valid JSON"):
        npcam.load(copy)


def test_future_format_version(copy):
    meta = json.loads((copy / "bundle.json").read_text())
    meta["format_version"] = 99
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(NpcamError, match="format version 99"):
        npcam.load(copy)


def test_version_1_bundles_keep_loading(copy, tiny_model):
    """Bundles written before format 2 (no head, fixed_size or stride keys) load as affine, dynamic, stride 32."""
    meta = json.loads((copy / "bundle.json").read_text())
    for key in ("head", "fixed_size", "stride", "layout", "output", "check", "channels", "classes"):
        meta.pop(key, None)
    meta["format_version"], meta["input_size"] = 1, 224  # one side: a square
    (copy / "bundle.json").write_text(json.dumps(meta))
    old = npcam.load(copy)
    assert old.head.kind == "affine" and not old.bundle.fixed_size and old.bundle.stride == 32
    x = np.zeros((1, 3, 224, 224), np.float32)
    np.testing.assert_array_equal(old.scores(x), tiny_model.scores(x))


@pytest.mark.parametrize("key", ["arch", "input_size", "mean", "std", "files", "head"])
def test_each_missing_key_is_named(copy, key):
    meta = json.loads((copy / "bundle.json").read_text())
    del meta[key]
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(NpcamError, match=f"bundle.json: missing key {key}$"):
        npcam.load(copy)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("head", "conv", "key 'head' must be one of affine, graph"),
        ("input_size", "224", r"key 'input_size' must be \[height, width\] in positive integers"),
        ("input_size", [224, 0], r"key 'input_size' must be \[height, width\]"),
        ("input_size", 224, r"key 'input_size' must be \[height, width\]"),
        ("stride", 0, "key 'stride' must be a positive integer"),
        ("mean", [0.5, 0.5], "key 'mean' must be a list of 3 numbers"),
        ("fixed_size", "yes", "key 'fixed_size' must be true or false"),
    ],
)
def test_each_wrong_key_is_named(copy, key, value, message):
    meta = json.loads((copy / "bundle.json").read_text())
    meta[key] = value
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(NpcamError, match=message):
        npcam.load(copy)


@pytest.fixture
def graph_copy(graph_bundle, tmp_path):
    dst = tmp_path / "graph"
    shutil.copytree(graph_bundle, dst)
    return dst


@pytest.mark.extras  # graph_bundle is exported from torch
def test_graph_head_files(graph_copy):
    assert sorted(p.name for p in graph_copy.iterdir()) == [
        "bundle.json",
        "head.json",
        "head.npz",
        "labels.json",
        "trunk.onnx",
    ]
    spec = json.loads((graph_copy / "head.json").read_text())
    assert [op["op"] for op in spec["ops"]] == ["Flatten", "Gemm", "Relu", "Gemm"] and spec["input_shape"] == [
        -1,
        128,
        1,
        1,
    ]


@pytest.mark.extras  # graph_bundle is exported from torch
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda spec: spec["ops"][0].update(op="Exec"), "unsupported op Exec"),
        (
            lambda spec: spec["ops"][1].update(inputs=["nowhere", "c0"]),
            "reads 'nowhere', which is neither computed nor in head.npz",
        ),
        (lambda spec: spec.pop("ops"), "head.json: not a head description"),
    ],
)
def test_broken_graph_head_description(graph_copy, change, message):
    spec = json.loads((graph_copy / "head.json").read_text())
    change(spec)
    (graph_copy / "head.json").write_text(json.dumps(spec))
    rehash(graph_copy)
    with pytest.raises(NpcamError, match=message):
        npcam.load(graph_copy)


@pytest.mark.extras  # graph_bundle is exported from torch
def test_graph_head_arrays_are_never_unpickled(graph_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(graph_copy / "head.npz", c0=np.array([Boom()], dtype=object))
    rehash(graph_copy)
    with pytest.raises(NpcamError, match="head.npz: not a plain .npz of arrays"):
        npcam.load(graph_copy)
    assert not (tmp_path / "PWNED").exists()
