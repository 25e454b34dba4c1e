"""Non-square native inputs end to end: export at HxW, bundle format 3, ``--size HxW``, ``--keep-aspect``.

Two small torch classifiers shaped like the wide and tall models met in practice: a text-line orientation
classifier (3x48x192, stride 16, a non-affine head: Grad-CAM) and a person re-identification net (3x256x128,
stride 32, a BNNeck head that folds to one affine layer: CAM). The references are independent of npcam: torch
on the same weights (its probabilities, and its CAM/Grad-CAM from autograd at the last pooled features,
upsampled with ``F.interpolate``) and, for the ONNX route, the original ONNX file in onnxruntime. Tolerances:
probabilities and full-resolution maps within 1e-4, as the other parity tests: float32 convolutions summed in
another order differ by ~1e-6 relative, so 1e-4 passes rounding and fails any wrong resize, layout or weight.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTOS, Server, http, record, synthetic_image
from PIL import Image
from torch import nn

import npcam
from export.__main__ import main as export_main
from npcam.cli import main as cli_main

TOLERANCE = 1e-4
MODULE = __name__  # the torch route imports the models below as MODULE:CALLABLE


def _seeded(cls, size, seed=0):
    """Seeded random weights, with BN statistics taken from random images (so that the signal neither dies out
    nor explodes through the layers and the scores depend on the image), then moved away from them."""
    torch.manual_seed(seed)
    net = cls()
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        net.train()(torch.rand(8, 3, *size) * 4 - 2)
    for m in norms:
        m.running_mean.add_(torch.empty_like(m.running_mean).uniform_(-0.2, 0.2))
        m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _block(cin, cout, stride):
    """Depthwise-separable, as in PP-LCNet."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Hardswish(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish(),
    )  # fmt: skip


class TextLine(nn.Module):
    """A text-line orientation classifier (0 or 180 degrees) on 3x48x192: features [32, 3, 12] at stride 16.

    The head is PP-LCNet's: pooling, a 1x1 conv, hardswish, then the FC, and a softmax output.
    """

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
            _block(8, 16, 2), _block(16, 24, 2), _block(24, 32, 2), _block(32, 32, 1),
        )  # fmt: skip
        self.last_conv = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, 2)

    def features(self, x):
        return self.trunk(x)

    def scores(self, features):
        pooled = F.adaptive_avg_pool2d(features, 1)
        return self.fc(torch.flatten(F.hardswish(self.last_conv(pooled)), 1))

    def forward(self, x):
        return torch.softmax(self.scores(self.features(x)), dim=-1)


class ReID(nn.Module):
    """A re-identification net on 3x256x128: features [40, 8, 4] at stride 32, BNNeck then a bias-free FC."""

    def __init__(self):
        super().__init__()
        widths = [3, 8, 16, 24, 32, 40]
        layers = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.neck = nn.BatchNorm1d(40)
        self.fc = nn.Linear(40, 12, bias=False)

    def features(self, x):
        return self.trunk(x)

    def scores(self, features):
        return self.fc(self.neck(features.mean(dim=(2, 3))))

    def forward(self, x):
        return self.scores(self.features(x))


class NHWC(nn.Module):
    """The text-line model as a Keras export sees it: [N, H, W, C] in."""

    def __init__(self):
        super().__init__()
        self.net = text_line()

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def text_line():
    return _seeded(TextLine, (48, 192))


def reid():
    return _seeded(ReID, (256, 128), seed=1)


NETS = {"text_line": (text_line, (48, 192), 16), "reid": (reid, (256, 128), 32)}


def torch_probabilities(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net.scores(net.features(torch.from_numpy(x))), dim=-1)[0].numpy()


def torch_map(net, x: np.ndarray, c: int, size) -> np.ndarray:
    """Torch's map of class ``c`` at ``size``: weights dy_c/dp (p: the pooled features, by autograd), summed
    over the feature maps, ReLU, max-scaled, then F.interpolate. For an affine head dy_c/dp is the FC row: CAM;
    for another head it is Grad-CAM's weights times h*w, the same map once scaled."""
    with torch.no_grad():
        features = net.features(torch.from_numpy(x))[0].double()
    pooled = features.mean(dim=(1, 2)).requires_grad_(True)
    scores = net.double().scores(pooled[None, :, None, None].expand(1, -1, *features.shape[1:]))
    (weights,) = torch.autograd.grad(scores[0, c], pooled)
    net.float()
    cam = torch.relu(torch.einsum("k,khw->hw", weights, features))
    cam = (cam / cam.max() if cam.max() > 0 else cam).float()
    return F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def check_against_torch(model, net, pred, name: str):
    """The prediction's probabilities and two classes' full-resolution maps against torch, on the same input."""
    want = torch_probabilities(net, pred.input)
    assert record(f"non-square probabilities, abs ({name})", np.abs(pred.probs - want).max()) <= TOLERANCE
    assert pred.top1 == int(want.argmax())
    size = pred.image.shape[:2]
    for c in (pred.top1, (pred.top1 + 1) % len(want)):
        got = model.cam(pred, c, size=size)
        assert got.shape == size
        error = np.abs(got - torch_map(net, pred.input, c, size)).max()
        assert record(f"non-square full-res map, abs ({name})", error) <= TOLERANCE, (name, c)


def export_torch(name: str, out, *size_args) -> npcam.Model:
    assert export_main(["torch", f"{MODULE}:{name}", *size_args, "--out", str(out)]) == 0
    return npcam.load(out)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Each model exported by the real torch route at its own size, given as HxW."""
    root = tmp_path_factory.mktemp("nonsquare")
    for name, (_, size, _) in NETS.items():
        export_torch(name, root / name, "--input-size", f"{size[0]}x{size[1]}")
    return {name: root / name for name in NETS}


@pytest.mark.parametrize("name", NETS)
def test_torch_route_exports_and_runs_at_the_native_non_square_size(bundles, name):
    build, size, stride = NETS[name]
    meta = json.loads((bundles[name] / "bundle.json").read_text())
    assert meta["format_version"] == 5 and meta["input_size"] == list(size) and meta["stride"] == stride
    assert [2, *size] in meta["check"]["inputs"]  # the self-check ran at the native size
    model, net = npcam.load(bundles[name]), build()
    assert model.bundle.input_size == size and not model.bundle.fixed_size
    assert model.head.kind == ("graph" if name == "text_line" else "affine")
    for photo in PHOTOS:
        pred = model.predict(photo)
        assert pred.input.shape == (1, 3, *size)  # what the trunk was fed
        assert pred.features.shape[1:] == (size[0] // stride, size[1] // stride)
        check_against_torch(model, net, pred, name)


def onnx_file(path, net, shape):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(shape),), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False
        )  # fmt: skip  (no dynamic axes: a fixed input)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_onnx_route_takes_a_fixed_non_square_input_as_the_native_size(tmp_path, layout, capsys):
    """No --input-size: the model's declared 1x3x48x192 (or 1x48x192x3) is the bundle's size."""
    net = NHWC() if layout == "NHWC" else text_line()
    shape = (1, 48, 192, 3) if layout == "NHWC" else (1, 3, 48, 192)
    onnx_file(tmp_path / "m.onnx", net, shape)
    assert export_main(["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")]) == 0
    assert "48x192 px" in capsys.readouterr().err
    model = npcam.load(tmp_path / "b")
    assert model.bundle.input_size == (48, 192) and model.bundle.meta["layout"] == layout
    original = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for photo in PHOTOS:
        pred = model.predict(photo)
        assert pred.input.shape == (1, 3, 48, 192)
        x = pred.input.transpose(0, 2, 3, 1).copy() if layout == "NHWC" else pred.input
        want = original.run(["y"], {"x": x})[0][0]
        assert record("non-square probabilities vs onnxruntime, abs", np.abs(pred.probs - want).max()) <= TOLERANCE
        check_against_torch(model, text_line(), pred, f"onnx {layout}")
    # A size the model does not declare does not fit it.
    args = ["onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "c"), "--input-size", "64x256"]
    assert export_main(args) == 1
    err = capsys.readouterr().err
    assert "input is 48x192 (height x width); --input-size 64x256 does not fit it" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_size_at_run_time(bundles, tmp_path, capsys):
    model, net = npcam.load(bundles["text_line"]), text_line()
    for size in ((64, 256), 96, "32x160"):
        pred = model.predict(PHOTOS[1], size=size)
        want = (size, size) if isinstance(size, int) else size if isinstance(size, tuple) else (32, 160)
        assert pred.input.shape == (1, 3, *want)
        check_against_torch(model, net, pred, "--size")
    options = npcam.Options(size=(64, 256)).checked(model)
    assert options.size == (64, 256)
    explanation = npcam.explain(model, PHOTOS[1], options)
    assert explanation.prediction.input.shape == (1, 3, 64, 256)
    code = cli_main(["-m", str(bundles["text_line"]), str(PHOTOS[1]), "-o", str(tmp_path / "o.png"), "--size", "64x256", "--json"])  # fmt: skip
    out = capsys.readouterr().out
    record_ = json.loads(out)
    width, height = Image.open(PHOTOS[1]).size
    assert code == 0 and (record_["height"], record_["width"]) == (height, width)
    assert abs(record_["score"] - float(model.predict(PHOTOS[1], size=(64, 256)).probs.max())) <= 1e-6
    assert Image.open(tmp_path / "o.png").size == (width, height)  # the map is in the photo's own pixels
    # A record-only run (reduced decode) sizes its decode from the larger side of a non-square input.
    code = cli_main(["-m", str(bundles["text_line"]), str(PHOTOS[1]), "-o", f"{tmp_path / 'r'}/", "--size", "64x256", "--json", "--no-overlay"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record_only = json.loads(captured.out)
    assert code == 0 and (record_only["height"], record_only["width"]) == (height, width)
    assert record_only["class"] == record_["class"] and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name, photo, expected",
    [
        ("text_line", (40, 400), (48, 480)),  # a text line: height to 48, width as the photo's
        ("text_line", (30, 1000), (48, 768)),  # wider than the cap: 4x the model's width
        ("text_line", (100, 100), (192, 192)),  # square: covers 48x192, so 192 a side
        ("reid", (300, 100), (384, 128)),  # a tall crop: width to 128, height as the photo's
        ("reid", (200, 100), (256, 128)),  # the model's own aspect: its own size
    ],
)
def test_keep_aspect_covers_the_model_input_keeping_the_photo_aspect(bundles, name, photo, expected):
    model, net = npcam.load(bundles[name]), NETS[name][0]()
    image = synthetic_image(*photo, seed=3)
    pred = model.predict(image, keep_aspect=True)
    assert pred.input.shape == (1, 3, *expected)
    check_against_torch(model, net, pred, f"--keep-aspect {name}")
    assert model.cam(pred, size=photo).shape == photo


def test_keep_aspect_from_the_cli_writes_the_photo_size(bundles, tmp_path, capsys):
    Image.fromarray(synthetic_image(40, 400)).save(tmp_path / "line.png")
    args = ["-m", str(bundles["text_line"]), str(tmp_path / "line.png"), "-o", str(tmp_path / "o.png")]
    assert cli_main([*args, "--keep-aspect", "--save-cam"]) == 0
    assert Image.open(tmp_path / "o.png").size == (400, 40) and np.load(tmp_path / "o.npy").shape == (40, 400)


def test_help_says_what_keep_aspect_does(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "smallest size that covers the input" in text and "48x192" in text and "S|HxW" in text


def test_version_2_square_bundles_still_load(tmp_path):
    """A bundle written before format 3 has one int side; it loads as that square and runs the same."""
    new = export_torch("reid", tmp_path / "new", "--input-size", "64")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "bundle.json").read_text())
    assert meta["format_version"] == 5 and meta["input_size"] == [64, 64]
    meta["format_version"], meta["input_size"] = 2, 64
    (tmp_path / "old" / "bundle.json").write_text(json.dumps(meta))
    old = npcam.load(tmp_path / "old")
    assert old.bundle.input_size == (64, 64)
    pred_old, pred_new = old.predict(PHOTOS[0]), new.predict(PHOTOS[0])
    assert pred_old.input.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(pred_old.probs, pred_new.probs)
    # A version-2 bundle with a pair is not what version 2 wrote.
    meta["input_size"] = [64, 64]
    (tmp_path / "old" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(npcam.NpcamError, match="key 'input_size' must be a positive integer"):
        npcam.load(tmp_path / "old")


def test_a_newer_format_version_is_refused_naming_the_version_needed(bundles, tmp_path, capsys):
    shutil.copytree(bundles["reid"], tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    assert cli_main(["-m", str(tmp_path / "b"), str(PHOTOS[0]), "-o", str(tmp_path / "o.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "o.jpg").exists()
    assert "bundle format version 99 needs an npcam that reads version 99" in err
    assert "this npcam reads versions 1 to 5" in err


BAD = ["48x", "0x10", "abc", "x192", "48x192x3", "-48"]


def argparse_error(capsys, call, option):
    """An argparse refusal: exit 2 and one error line naming the option (after argparse's usage)."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and option in errors[0] and "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("value", ["100000", "48x5000"])
def test_sizes_over_the_largest_side_are_refused_in_one_line(value, capsys):
    """A typo like --size 100000 would otherwise leave the trunk running for hours."""
    line = argparse_error(capsys, lambda: cli_main([str(PHOTOS[0]), "--size", value]), "--size")
    assert "at most 4096 on each side" in line
    line = argparse_error(capsys, lambda: export_main(["onnx", "m.onnx", "--input-size", value]), "--input-size")
    assert "at most 4096 on each side" in line
    with pytest.raises(npcam.NpcamError, match="at most 4096 on each side"):
        npcam.image.as_size((48, 5000))


@pytest.mark.parametrize("value", BAD)
def test_bad_sizes_are_refused_by_the_cli_and_the_exporter(value, tmp_path, capsys):
    line = argparse_error(capsys, lambda: cli_main([str(PHOTOS[0]), "--size", value]), "--size")
    assert "S or HxW" in line or "positive sides" in line
    line = argparse_error(
        capsys, lambda: export_main(["torch", f"{MODULE}:reid", "--input-size", value]), "--input-size"
    )
    assert "S or HxW" in line or "positive sides" in line
    argparse_error(capsys, lambda: export_main(["onnx", "m.onnx", "--input-size", value]), "--input-size")
    assert not any(tmp_path.iterdir())


def test_sizes_below_the_minimum_are_refused_in_one_line(bundles, tmp_path, capsys):
    line = argparse_error(capsys, lambda: export_main(["onnx", "m.onnx", "--input-size", "4x192"]), "--input-size")
    assert "each side must be at least 8" in line
    # The text-line model: stride 16, so each side needs 32 px (two feature cells).
    for size, side in (("16x192", "height"), ("48x31", "width")):
        code = cli_main(["-m", str(bundles["text_line"]), str(PHOTOS[0]), "-o", str(tmp_path / "o.jpg"), "--size", size])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"input size {size} is too small for this model: its {side} must be at least 32" in err
    assert not (tmp_path / "o.jpg").exists()
    with pytest.raises(npcam.NpcamError, match="its width must be at least 64"):  # the re-id model: stride 32
        npcam.load(bundles["reid"]).predict(PHOTOS[0], size=(256, 40))
    # A model whose own side is below two cells (48 px at a stride of 32) keeps that side as its minimum.
    shutil.copytree(bundles["text_line"], tmp_path / "s32")
    meta = json.loads((tmp_path / "s32" / "bundle.json").read_text())
    (tmp_path / "s32" / "bundle.json").write_text(json.dumps({**meta, "stride": 32}))
    coarse = npcam.load(tmp_path / "s32")
    assert coarse.predict(PHOTOS[0]).input.shape == (1, 3, 48, 192)
    assert coarse.predict(PHOTOS[0], size="48x64").input.shape == (1, 3, 48, 64)
    with pytest.raises(npcam.NpcamError, match=r"its height must be at least 48 \(2 feature cells at a stride of 32, or the model's own\)"):  # fmt: skip
        coarse.predict(PHOTOS[0], size=(40, 192))
    for bad in ((48, 0), (1.5, 2), "48x", (1, 2, 3), True):
        with pytest.raises(npcam.NpcamError, match="input size"):
            npcam.Options(size=bad).checked(npcam.load(bundles["reid"]))


@pytest.mark.slow  # Ray
def test_the_dataset_command_takes_hxw_and_refuses_bad_sizes(bundles, tmp_path, capsys):
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install '.[dataset]'")
    from npcam import dataset

    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_image(40, 400)).save(tmp_path / "in" / "line.png")
    args = [str(tmp_path / "in"), "--model", str(bundles["text_line"]), "--out", str(tmp_path / "rows")]
    for value in BAD:
        argparse_error(capsys, lambda v=value: dataset.main([*args, "--size", v]), "--size")
    assert dataset.main([*args, "--size", "16x192"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its height must be at least 32" in err
    assert not (tmp_path / "rows").exists()
    assert dataset.main([*args, "--size", "64x256"]) == 0
    import pyarrow.dataset as pds

    (row,) = pds.dataset(str(tmp_path / "rows"), format="parquet").to_table().to_pylist()
    model = npcam.load(bundles["text_line"])
    want = model.predict(tmp_path / "in" / "line.png", size=(64, 256))
    assert row["error"] is None and abs(row["score"] - float(want.probs.max())) <= 1e-6


def test_serve_takes_hxw_and_refuses_bad_sizes(bundles):
    pytest.importorskip("starlette", reason="npcam serve needs the serve extra: pip install '.[serve]'")
    pytest.importorskip("uvicorn", reason="npcam serve needs the serve extra: pip install '.[serve]'")
    running = Server(bundles["text_line"], "--workers", "1")
    try:
        status, _, body = http(f"{running.url}/model")
        assert status == 200 and json.loads(body)["input_size"] == [48, 192]
        photo = PHOTOS[1].read_bytes()
        status, _, body = http(f"{running.url}/explain?size=64x256", photo, method="POST")
        model = npcam.load(bundles["text_line"])
        want = model.predict(photo, size=(64, 256))
        assert status == 200 and abs(json.loads(body)["score"] - float(want.probs.max())) <= 1e-6
        for value, message in [*((v, "size must be S or HxW") for v in BAD if v != "0x10"),
                               ("0x10", "size must have positive sides"), ("48x5000", "at most 4096"),
                               ("16x192", "its height must be at least 32")]:  # fmt: skip
            status, _, body = http(f"{running.url}/explain?size={value}", photo, method="POST")
            error = json.loads(body)["error"]
            assert status == 422 and message in error and "\n" not in error, (value, error)
    finally:
        assert running.stop() == 0


def test_parse_size():
    from npcam.image import parse_size

    assert parse_size("224") == (224, 224) and parse_size("48x192") == (48, 192)
    assert parse_size(" 256 X 128 ") == (256, 128) and parse_size("48\u00d7192") == (48, 192)
    for bad in [*BAD, "", "4 8", "\u00b2", "48x192px"]:
        with pytest.raises(ValueError, match="must"):
            parse_size(bad)


def test_input_size_reduces_to_the_short_side_rule_for_a_square_model():
    from npcam.image import input_size

    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, size=(200, 2)):
        short = min(height, width)
        want = (
            min(max(round(height * 224 / short), 224), 896),
            min(max(round(width * 224 / short), 224), 896),
        )
        assert input_size(int(height), int(width), (224, 224), True) == want
        assert input_size(int(height), int(width), 224, True) == want


def test_native_size_from_the_declared_input_and_the_option():
    from export.errors import ExportError
    from export.sizes import native_size

    assert native_size([48, 192], None) == (48, 192) and native_size([48, 192], (48, 192)) == (48, 192)
    assert native_size(["H", "W"], None) == (224, 224) and native_size(["H", "W"], 128) == (128, 128)
    assert native_size([48, "W"], None) == (48, 48) and native_size([48, "W"], (48, 320)) == (48, 320)
    assert native_size([0, 0], (256, 128)) == (256, 128)  # 0: a dimension left unset
    for declared, wanted, shown, given in (
        ([48, 192], (64, 256), "48x192", "64x256"),
        ([48, "W"], 64, "48xW", "64x64"),
    ):
        with pytest.raises(
            ExportError, match=f"input is {shown} \\(height x width\\); --input-size {given} does not fit"
        ):
            native_size(declared, wanted)


def test_native_size_of_a_model_that_declares_no_input():
    from export.sizes import native_size

    assert native_size([], None) == (224, 224) and native_size([], 48) == (48, 48)  # a torch module: no declaration


class _LeNet(nn.Module):
    """MNIST's LeNet on one grey channel: conv 5 -> pool 2 -> conv 5 -> pool 2 -> Linear(16*4*4), so 28 to 31 px."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 5), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.MaxPool2d(2))
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


class _Only384(nn.Module):
    """A model made for 384 px with a stride of 16 (as a ViT-B/16 at 384 asserts its grid): 384 to 399 px."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        if x.shape[2] // 16 != 24 or x.shape[3] // 16 != 24:
            raise ValueError(f"expected a 24x24 grid, not {x.shape[2] // 16}x{x.shape[3] // 16}")
        return self.fc(x.mean(dim=(2, 3)))


class _Declared(nn.Module):
    """A module that says its input size as timm's models do; it would also run at 224."""

    pretrained_cfg = {"input_size": (3, 48, 192)}

    def forward(self, x):
        return x.mean(dim=(2, 3))


class _Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this module runs on nothing\nsecond line")


def test_the_torch_route_finds_the_modules_own_size():
    """Without --input-size: the size a module declares, else 224 where it runs, else the smallest side of the
    first band of sizes it runs at (searched above 224 first, then below: see export.from_torch.SEARCHED)."""
    from export.from_torch import input_size

    assert input_size(_Declared(), None, "m:declared") == (48, 192)
    assert input_size(_Declared(), 64, "m:declared") == (64, 64)  # --input-size wins
    assert input_size(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)), None, "m:gap") == (224, 224)
    assert input_size(_LeNet(), None, "m:lenet") == (28, 28)
    assert input_size(_Only384(), None, "m:vit384") == (384, 384)


def test_a_module_that_runs_at_no_size_asks_for_input_size_in_one_line():
    from export.errors import ExportError
    from export.from_torch import input_size

    with pytest.raises(ExportError) as e:
        input_size(_Broken(), None, "m:broken")
    message = str(e.value)
    assert "\n" not in message and message.startswith("m:broken: the module does not run on a 224x224 image")
    assert "RuntimeError: this module runs on nothing" in message and "--input-size" in message
