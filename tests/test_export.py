"""The export path: torchvision-compatible definitions, weight sources, atomic bundles."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import SHARED, random_resnet

import npcam
from export import bundle as bundle_mod
from export import resnet
from export.__main__ import main, run
from export.archs import ARCHS
from export.weights import ExportError, find_weights


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_resnets_have_torchvisions_parameter_count(name, params):
    net = getattr(resnet, name)()
    assert sum(p.numel() for p in net.parameters()) == params  # torchvision's published counts


def test_state_dict_uses_torchvision_names():
    keys = resnet.resnet18().state_dict().keys()
    for k in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.num_batches_tracked",
        "layer4.1.bn2.bias",
        "fc.weight",
        "fc.bias",
    ]:
        assert k in keys


def test_bundle_files_and_metadata(bundle, resnet18_weights):
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["arch"] == "resnet18" and meta["input_size"] == 224 and meta["channels"] == 512
    for name, digest in meta["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    assert meta["source_weights"]["sha256"] == hashlib.sha256(resnet18_weights.read_bytes()).hexdigest()
    assert set(meta["versions"]) >= {"torch", "onnx", "onnxruntime", "npcam"}
    assert np.load(bundle / "fc_weight.npy").shape == (1000, 512)
    assert np.load(bundle / "fc_bias.npy").dtype == np.float32


def test_labels_are_imagenet_order(bundle):
    labels = json.loads((bundle / "labels.json").read_text())
    synsets = (SHARED / "labels" / "synset_words.txt").read_text().splitlines()
    assert labels == [line.split(" ", 1)[1] for line in synsets]


def test_trunk_has_dynamic_batch_and_size(model):
    x = np.zeros((3, 3, 160, 320), dtype=np.float32)
    assert model.features(x).shape == (3, 512, 5, 10)


def test_export_reports_relative_errors(resnet18_weights, tmp_path, capsys):
    assert main(["resnet18", "--weights", str(resnet18_weights), "--out", str(tmp_path / "b")]) == 0
    assert "self-check vs torch" in capsys.readouterr().err
    assert npcam.load(tmp_path / "b").arch == "resnet18"


def test_wrong_weights_are_refused_and_nothing_written(tmp_path, capsys):
    weights = tmp_path / "r34.pth"
    torch.save(random_resnet("resnet34").state_dict(), weights)
    out = tmp_path / "bundle"
    assert main(["resnet18", "--weights", str(weights), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not resnet18 weights" in err and "unexpected layer1.2" in err
    assert list(tmp_path.iterdir()) == [weights]


def test_failed_self_check_leaves_old_bundle_and_no_temp(resnet18_weights, tmp_path, monkeypatch):
    out = run("resnet18", tmp_path / "b", resnet18_weights)
    before = (out / "bundle.json").read_text()

    def broken(*args):
        raise ExportError("self-check failed: simulated")

    monkeypatch.setattr(bundle_mod, "self_check", broken)
    with pytest.raises(ExportError):
        run("resnet18", out, resnet18_weights)
    assert (out / "bundle.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(resnet18_weights, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="not an npcam bundle"):
        run("resnet18", tmp_path / "photos", resnet18_weights)
    assert (tmp_path / "photos" / "keep.jpg").exists()


def test_download_checks_hash_prefix(resnet18_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    digest = hashlib.sha256(resnet18_weights.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    good.write_bytes(resnet18_weights.read_bytes())
    arch = ARCHS["resnet18"].__class__(name="resnet18", build=resnet.resnet18, urls=(good.as_uri(),))
    path = find_weights(arch)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / good.name
    assert path.read_bytes() == good.read_bytes()
    assert find_weights(arch) == path  # now from the cache

    bad = tmp_path / "resnet18-00000000.pth"
    bad.write_bytes(resnet18_weights.read_bytes())
    arch = arch.__class__(name="resnet18", build=resnet.resnet18, urls=(bad.as_uri(),))
    with pytest.raises(ExportError, match="does not match"):
        find_weights(arch)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / bad.name).exists()
    assert not list((tmp_path / "torch" / "hub" / "checkpoints").glob(".*"))


def test_no_weights_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    arch = ARCHS["resnet18"].__class__(
        name="resnet18", build=resnet.resnet18, urls=((tmp_path / "nowhere-abc123.pth").as_uri(),)
    )
    with pytest.raises(ExportError) as e:
        find_weights(arch)
    assert "torch hub cache" in str(e.value) and "downloading" in str(e.value) and "--weights" in str(e.value)


def test_int8_export_quantizes_the_trunk(resnet18_weights, tmp_path):
    import onnx
    from conftest import synthetic_image
    from PIL import Image

    images = tmp_path / "calibration"
    images.mkdir()
    for i in range(6):
        Image.fromarray(synthetic_image(200, 260, seed=i)).save(images / f"{i}.jpg")
    out = run("resnet18", tmp_path / "b8", resnet18_weights, int8=images)
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["precision"] == "int8" and meta["calibration"]["images"] == 6
    ops = {n.op_type for n in onnx.load(out / "trunk.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    model = npcam.load(out)  # hashes were updated after quantizing
    assert model.predict(images / "0.jpg").features.shape == (512, 7, 7)


def test_int8_without_images_is_a_clear_error(resnet18_weights, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "resnet18",
            "--weights",
            str(resnet18_weights),
            "--out",
            str(tmp_path / "b"),
            "--int8",
            str(tmp_path / "empty"),
        ]
    )
    assert code == 1 and "no images to calibrate" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
