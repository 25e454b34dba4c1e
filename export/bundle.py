"""Writing a model bundle: ONNX trunk, FC arrays, labels, metadata; then checking it.

Everything is written into a temporary directory beside the target and
renamed into place only after the self-check passes, so a failed or
interrupted export leaves the previous bundle (or nothing) behind.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import npcam
from npcam.model import FILES, FORMAT, FORMAT_VERSION

from .archs import Arch
from .weights import ExportError

OPSET = 17
TOLERANCE = 1e-4  # relative: max |npcam - torch| / max |torch|
LABELS = Path(__file__).with_name("imagenet_classes.txt")


class _Trunk(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x)


def export_bundle(
    arch: Arch, net: nn.Module, out: Path, source: Path, opset: int = OPSET, calibrate: Path | None = None
) -> dict:
    """Export ``net`` (weights loaded, any mode) as a bundle at ``out``.

    With ``calibrate`` (a directory of images) the trunk is quantized to int8
    after the fp32 trunk has passed the self-check. Returns the bundle
    metadata and the checks' results.
    """
    net = net.eval()
    out = out.expanduser().absolute()
    if out.exists() and not (out / "bundle.json").is_file():
        raise ExportError(f"{out}: exists and is not an npcam bundle; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        meta = _write(arch, net, tmp, source, opset)
        meta["check"] = self_check(arch, net, tmp)
        if calibrate is not None:
            meta["int8"] = _quantize(tmp, meta, calibrate)
        _replace_dir(tmp, out)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(arch: Arch, net: nn.Module, tmp: Path, source: Path, opset: int) -> dict:
    fc = getattr(net, arch.fc_name)
    dummy = torch.zeros(1, 3, arch.input_size, arch.input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The exporter restores the wrapper's train/eval mode afterwards, so it must be eval too.
        torch.onnx.export(
            _Trunk(net).eval(),
            (dummy,),
            str(tmp / "trunk.onnx"),
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "h", 3: "w"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    np.save(tmp / "fc_weight.npy", fc.weight.detach().numpy().astype(np.float32))
    np.save(tmp / "fc_bias.npy", fc.bias.detach().numpy().astype(np.float32))
    labels = LABELS.read_text(encoding="utf-8").splitlines()
    if len(labels) != fc.out_features:
        raise ExportError(f"{arch.name}: {fc.out_features} classes, but {LABELS.name} has {len(labels)} labels")
    (tmp / "labels.json").write_text(json.dumps(labels, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch.name,
        "input_size": arch.input_size,
        "mean": list(arch.mean),
        "std": list(arch.std),
        "channels": fc.in_features,
        "classes": fc.out_features,
        "files": {name: _sha256(tmp / name) for name in FILES},
        "source_weights": {"name": source.name, "sha256": _sha256(source)},
        "precision": "fp32",
        "opset": opset,
        "versions": {
            "npcam": npcam.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_meta(tmp, meta)
    return meta


def _write_meta(bundle: Path, meta: dict) -> None:
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _quantize(bundle: Path, meta: dict, calibrate: Path) -> dict:
    """Quantize the bundle's trunk in place; returns how closely it follows fp32."""
    from .quantize import agreement, calibration_inputs, quantize_trunk

    fp32 = npcam.load(bundle)
    inputs = calibration_inputs(calibrate, fp32)
    quantize_trunk(bundle / "trunk.onnx", inputs)
    meta["precision"] = "int8"
    meta["calibration"] = {"images": len(inputs), "method": "MinMax", "format": "QDQ, per-channel weights"}
    meta["files"]["trunk.onnx"] = _sha256(bundle / "trunk.onnx")
    _write_meta(bundle, meta)
    result = agreement(fp32, npcam.load(bundle), inputs)
    if result["top1_agreement"] < 0.8:
        raise ExportError(
            f"int8 trunk agrees with fp32 on only {result['top1_agreement']:.0%} of the calibration images"
        )
    return result


def self_check(arch: Arch, net: nn.Module, bundle: Path) -> dict:
    """Compare the bundle (onnxruntime + NumPy) with torch on random input.

    Checks a square batch of two at the native size and one non-square image,
    since ``--keep-aspect`` feeds other shapes and padding can depend on them. Raises above ``TOLERANCE``.
    """
    net = net.eval()
    model = npcam.load(bundle)
    rng = np.random.default_rng(0)
    s = arch.input_size
    errors = {"features": 0.0, "logits": 0.0}
    # s+48 and s-40 reach an odd size at some stride-2 layer, where "SAME" padding differs.
    for shape in [(2, 3, s, s), (1, 3, s + 48, s - 40)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        with torch.no_grad():
            want_features = net.trunk(torch.from_numpy(x)).numpy()
            want_logits = net(torch.from_numpy(x)).numpy()
        got_features = model.features(x)
        got_logits = npcam.logits(got_features, model.fc_weight, model.fc_bias)
        errors["features"] = max(errors["features"], _relative_error(got_features, want_features))
        errors["logits"] = max(errors["logits"], _relative_error(got_logits, want_logits))
    for name, err in errors.items():
        if not err <= TOLERANCE:
            raise ExportError(f"self-check failed: {name} differ from torch by {err:.2e} (relative, limit {TOLERANCE})")
    return errors


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an old bundle only once the new one is complete."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "bundle")
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old / "bundle", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
