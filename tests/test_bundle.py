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


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def rehash(path):
    """Update bundle.json after a deliberate change, so that the hash check is not what fails."""
    meta = json.loads((path / "bundle.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "bundle.json").write_text(json.dumps(meta))


def test_missing_directory_says_how_to_export(tmp_path):
    with pytest.raises(NpcamError, match="python -m export"):
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
    assert npcam.load(copy, verify=False).fc_weight[0, 0] == 2 * w[0, 0]


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
    with pytest.raises(NpcamError, match="512 channels"):
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
    with pytest.raises(NpcamError, match="999 labels"):
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
