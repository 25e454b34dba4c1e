"""npcam's runtime on linux/aarch64, under qemu-user, against the same run on this machine.

``scripts/arm64_env.sh`` puts an arm64 Python 3.11 (Debian's packages, unpacked), aarch64 wheels of
numpy, pillow and onnxruntime (the versions this venv has) and a static qemu-aarch64 >= 8.1 into
``$NPCAM_ARM64_CACHE`` (default ``~/.cache/npcam/arm64``); without them these tests skip, naming the
script. The emulated Python has nothing else: no torch, no onnx, so the runs also show that the runtime
needs only its three packages.

The CLI runs the same bundles on the same images, once per architecture, and the float32 outputs are
compared. Both run the same onnxruntime version; what differs is its kernels (NEON instead of AVX2/AVX-512)
and so the order of float32 sums. The bundles are built here from ONNX graphs (the torch-free ``onnx``
export route), small enough that emulation takes seconds: strided, depthwise and 1x1 convolutions, max
pooling, ReLU6 and a residual add, the ops of the project's ResNet and EfficientNet-Lite trunks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, record, synthetic_image
from PIL import Image

CACHE = Path(os.environ.get("NPCAM_ARM64_CACHE", "~/.cache/npcam/arm64")).expanduser()
# cortex-a72 (a Raspberry Pi 4's core) emulates faster than qemu's default "max" CPU, whose SVE and pointer
# authentication cost time (issue 20: ~10x on full-size runs).
QEMU_CPU = "cortex-a72"
# Maps are normalized to [0, 1]; 1e-4 is far below a visible change (1/255 = 3.9e-3) and far above float32
# rounding differences between kernels (measured: below 1e-6). A wrong weight, layout or upsampling shows as >1e-2.
MAP_ATOL = 1e-4
# Probabilities: float32 logits, sums of hundreds of terms, differ by ~1e-6 relative between kernel orders;
# 1e-5 absolute leaves ten times that, while a real fault (a flipped channel, a different resize) moves
# probabilities by far more.
PROB_ATOL = 1e-5


def _ready() -> dict[str, str]:
    """The cache's description of itself (``ready``), or skip saying how to make it."""
    how = "run `bash scripts/arm64_env.sh` (it needs Debian's archive and PyPI) or set NPCAM_ARM64_CACHE"
    ready = CACHE / "ready"
    if not ready.is_file():
        pytest.skip(f"no emulated aarch64 Python in {CACHE}: {how}")
    info = dict(line.split(": ", 1) for line in ready.read_text().splitlines() if ": " in line)
    from importlib.metadata import version

    here = " ".join(f"{p}=={version(p)}" for p in ("numpy", "pillow", "onnxruntime"))
    if info.get("wheels") != here:
        pytest.skip(f"{CACHE} has {info.get('wheels')}, this venv {here}: {how} again")
    return info


# The CPUs that tests/test_cpus.py and tests/test_int8_onnx.py run int8 bundles on, name: (qemu binary, -cpu
# model): onnxruntime's int8 kernel families that this machine may not have (x86 AVX2 without VNNI, whose u8s8
# products saturate; aarch64 NEON without and with the dot-product instructions)
OTHER_CPUS = {
    "x86-64 AVX2, no VNNI or AVX-512 (qemu Haswell)": ("x86_64", "Haswell-noTSX"),
    "aarch64 Cortex-A72 (NEON, no dot product)": ("aarch64", "cortex-a72"),
    "aarch64 Neoverse-N1 (dot product)": ("aarch64", "neoverse-n1"),
}


def emulated(arch: str, cpu: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run Python on an emulated CPU (``arch`` aarch64 or x86_64, ``cpu`` qemu's
    ``-cpu`` model), or skip saying how to get them. The x86 command runs this venv's Python: the caller sets
    its PYTHONPATH (the aarch64 one names the emulated site-packages and the repository)."""
    if arch == "aarch64":
        _ready()  # skips, naming scripts/arm64_env.sh, without the emulated aarch64 Python
        env = {
            "QEMU_LD_PREFIX": str(CACHE / "root"),
            "QEMU_CPU": cpu,
            "PYTHONPATH": f"{CACHE / 'site'}{os.pathsep}{REPO}",
        }
        return [str(CACHE / "qemu-aarch64"), str(CACHE / "root" / "usr" / "bin" / "python3.11")], env
    qemu = CACHE / "qemu-x86_64"
    if not os.access(qemu, os.X_OK):
        pytest.skip(f"no {qemu}: run `bash scripts/arm64_env.sh` (it needs Debian's archive) or set NPCAM_ARM64_CACHE")
    return [str(qemu), sys.executable], {"QEMU_CPU": cpu}


def run_script(command: list[str], env: dict[str, str], script: str, args: list[str], name: str) -> None:
    """``python -c script args`` with ``command`` (this machine's Python, or one of :func:`emulated`'s), in a
    clean environment: this repository on PYTHONPATH, then ``env``. Fails the test with its stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    base.update({"PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1", **env})
    done = subprocess.run(
        [*command, "-c", script, *args], env=base, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def arm64() -> list[str]:
    """The command that starts the emulated aarch64 Python."""
    _ready()
    python = CACHE / "root" / "usr" / "bin" / "python3.11"
    # ELF e_machine 183 is AArch64: the interpreter really is an ARM binary (qemu-user runs nothing else).
    with open(python, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183
    return [str(CACHE / "qemu-aarch64"), str(python)]


def _env(arm: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(CACHE / "site"), str(REPO)] if arm else [str(REPO)])
    env["PYTHONNOUSERSITE"] = "1"
    if arm:
        env.update(QEMU_LD_PREFIX=str(CACHE / "root"), QEMU_CPU=QEMU_CPU)
    return env


def run_python(command: list[str], args: list[str], arm: bool, cwd: Path, stderr: bool = False):
    """``python ARGS`` on this machine or the emulated one; its stdout (and its stderr, with ``stderr``)."""
    done = subprocess.run(
        [*command, *args], cwd=cwd, env=_env(arm), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{'aarch64' if arm else 'x86'} {args}: exit {done.returncode}\n{done.stderr}"
    return (done.stdout, done.stderr) if stderr else done.stdout


def tiny_classifier(path: Path, hidden: bool, seed: int = 0) -> Path:
    """A small random-weight ONNX image classifier (10 classes, 64 px input), saved to ``path``.

    ``hidden`` adds a ReLU layer to the classifier, which makes the head a graph (Grad-CAM) rather than
    an affine one (CAM).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = []

    def w(name, *shape, scale):
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def conv(x, out, cin, cout, k, stride=1, group=1):
        pad = k // 2
        return helper.make_node(
            "Conv",
            [
                x,
                w(f"{out}_w", cout, cin // group, k, k, scale=1.5 / np.sqrt(cin // group * k * k)),
                w(f"{out}_b", cout, scale=0.1),
            ],
            [out],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=group,
        )

    nodes = [
        conv("image", "c1", 3, 16, 3, stride=2),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        conv("p1", "dw", 16, 16, 3, group=16),  # depthwise, as in EfficientNet-Lite
        helper.make_node("Clip", ["dw", "zero", "six"], ["r6"]),
        conv("r6", "pw", 16, 16, 1),
        helper.make_node("Add", ["pw", "p1"], ["res"]),  # residual, as in ResNet
        conv("res", "c2", 16, 32, 3),
        helper.make_node("Relu", ["c2"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
    ]
    weights += [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]
    if hidden:
        nodes += [
            helper.make_node("Gemm", ["flat", w("h_w", 24, 32, scale=0.3), w("h_b", 24, scale=0.1)], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node(
                "Gemm", ["hr", w("fc_w", 10, 24, scale=0.4), w("fc_b", 10, scale=0.1)], ["scores"], transB=1
            ),
        ]
    else:
        nodes.append(
            helper.make_node(
                "Gemm", ["flat", w("fc_w", 10, 32, scale=0.4), w("fc_b", 10, scale=0.1)], ["scores"], transB=1
            )
        )
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory) -> dict[str, Path]:
    """Bundles exported by the ``onnx`` route: an affine head (CAM), a graph head (Grad-CAM), and the affine
    model's int8 trunk once with each of the exporter's quantization settings (chosen here, not by timing),
    and with every conv in int8 (``u8s8``, 8-bit weights, not portable to x86 without VNNI but measured the
    same on aarch64; ``u8u8``)."""
    from export import quantize
    from export.api import run_onnx

    tmp = tmp_path_factory.mktemp("arm64-bundles")
    models = {kind: tiny_classifier(tmp / f"{kind}.onnx", hidden=kind == "graph") for kind in ("affine", "graph")}
    bundles = {kind: run_onnx(path, out=tmp / kind) for kind, path in models.items()}
    calibration = tmp / "calibration"
    calibration.mkdir()
    for i in range(8):
        Image.fromarray(synthetic_image(120, 150, seed=10 + i)).save(calibration / f"{i}.png")
    for name in dict.fromkeys((*quantize.SETTINGS, "u8s8", "u8u8")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quantize, "SETTINGS", (name,))
            out = tmp / name.replace(" ", "_").replace("=", "_")
            bundles[f"int8 {name}"] = run_onnx(models["affine"], out=out, int8=calibration)
    return bundles


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The shipped sample and a generated photo of odd size, in one folder (the CLI's directory mode)."""
    folder = tmp_path_factory.mktemp("arm64-images")
    shutil.copyfile(SAMPLE, folder / SAMPLE.name)
    Image.fromarray(synthetic_image(131, 97, seed=3)).save(folder / "generated.png")
    return folder


def run_both(arm64, bundle: Path, images: Path, tmp: Path, *options: str) -> dict[str, dict[str, dict]]:
    """The CLI with ``--json --save-cam`` on x86 and on aarch64: ``{arch: {image name: record}}``."""
    out = {}
    for arch, command in (("x86", [sys.executable]), ("aarch64", arm64)):
        (tmp / arch).mkdir()
        args = ["-m", "npcam", "-m", str(bundle), "--json", "--save-cam", "-o", f"{arch}/", *options, str(images)]
        lines = run_python(command, args, arch == "aarch64", tmp).splitlines()
        out[arch] = {Path(r["image"]).name: r for r in map(json.loads, lines)}
    return out


def compare(runs: dict[str, dict[str, dict]], tmp: Path, what: str, map_atol: float, prob_atol: float) -> None:
    x86, arm = runs["x86"], runs["aarch64"]
    assert set(x86) == set(arm) == {SAMPLE.name, "generated.png"}
    for name, want in x86.items():
        got = arm[name]
        assert "error" not in want and "error" not in got, (want, got)
        for key in ("width", "height", "method", "class", "label"):
            assert got[key] == want[key], (name, key)
        assert [t["class"] for t in got["top5"]] == [t["class"] for t in want["top5"]], name
        scores = [np.array([t["score"] for t in r["top5"]]) for r in (got, want)]
        assert record(f"aarch64 vs x86 {what} top-5 probability, abs", np.abs(scores[0] - scores[1]).max()) <= prob_atol
        assert len(got["maps"]) == len(want["maps"]) >= 1, name
        for m_got, m_want in zip(got["maps"], want["maps"]):
            a, b = np.load(tmp / m_got["cam"]), np.load(tmp / m_want["cam"])
            assert a.shape == b.shape == (want["height"], want["width"]) and a.dtype == np.float32
            assert b.max() > 0.5  # a real map, not an empty one that any run would match
            assert record(f"aarch64 vs x86 {what} map, abs", np.abs(a - b).max()) <= map_atol, name
            # The overlays' JPEG bytes may differ (a map value rounding the other way); both are the photo's size.
            for m in (m_got, m_want):
                with Image.open(tmp / m["output"]) as overlay:
                    assert overlay.format == "JPEG" and overlay.size == (want["width"], want["height"])


def test_cam_on_aarch64_matches_x86(arm64, tiny_bundles, images, tmp_path):
    runs = run_both(arm64, tiny_bundles["affine"], images, tmp_path, "--top", "2")
    assert all(len(r["maps"]) == 2 and r["method"] == "cam" for r in runs["aarch64"].values())
    compare(runs, tmp_path, "CAM", MAP_ATOL, PROB_ATOL)


def test_gradcam_on_aarch64_matches_x86(arm64, tiny_bundles, images, tmp_path):
    runs = run_both(arm64, tiny_bundles["graph"], images, tmp_path, "--method", "gradcam")
    assert all(r["method"] == "gradcam" for r in runs["aarch64"].values())
    compare(runs, tmp_path, "Grad-CAM", MAP_ATOL, PROB_ATOL)


@pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)
def test_cpu_name_on_aarch64(arm64, tmp_path):
    """The name an int8 bundle records, read from the emulated CPU's /proc/cpuinfo (qemu's cortex-a72)."""
    name = run_python(arm64, ["-c", "from export.cpuinfo import this_cpu; print(this_cpu())"], True, tmp_path)
    assert name.strip() == "ARM Cortex-A72 (aarch64, 0x41:0xd08; asimd)"


# Runs the API on bundles and images (argv: output folder, then bundles and images after "--"), saving each
# image's features, logits, probabilities and every class's CAM at feature resolution.
PREDICT = """
import sys, numpy as np, npcam
out, rest = sys.argv[1], sys.argv[2:]
cut = rest.index("--")
for b, bundle in enumerate(rest[:cut]):
    model = npcam.load(bundle)
    for i, image in enumerate(rest[cut + 1:]):
        p = model.predict(image)
        maps = model.cam(p, classes=list(range(len(p.logits))))
        np.savez(f"{out}/{b}_{i}.npz", features=p.features, logits=p.logits, probs=p.probs, maps=maps)
"""


def output_step(bundle: Path) -> np.ndarray:
    """The quantization step of the int8 trunk's output: the scale of the DequantizeLinear that makes it."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(bundle / "trunk.onnx").graph
    node = next(n for n in graph.node if n.output[0] == graph.output[0].name)
    assert node.op_type == "DequantizeLinear"
    scale = next(i for i in graph.initializer if i.name == node.input[1])
    return numpy_helper.to_array(scale).astype(np.float64)


def test_int8_on_aarch64_is_within_a_quantization_step_of_x86(arm64, tiny_bundles, images, tmp_path):
    """The portability checked: the int8 trunk's features on aarch64 are within one step of their quantization
    grid of x86's (integer products accumulate exactly on every CPU; a rescale to 8 bits may round the other
    way). The head's answers are held to what the feature difference can move them: for features within d
    of each other, a logit of class j
    moves by at most d * sum_c |W_jc| (the pooled features move by at most d), a probability by at most
    exp(2 * max logit change) - 1, and a CAM (ReLU, divided by its peak A) by at most 2 * d * sum_c |W_jc| / A;
    each with the float32 tolerances above on top. Measured d here decides the bounds, so an exact match is
    held to float32 rounding.

    A trunk that its bundle says is not the same on both (8-bit ``u8s8`` measured on x86 without VNNI, whose
    kernels saturate: ``int8.same_on`` lists this family alone) is not compared: loading it on aarch64 must
    print the portability warning instead."""
    import npcam
    from npcam.cpu import cpu_family

    names = [n for n in tiny_bundles if n.startswith("int8")]
    bundles = [str(tiny_bundles[n]) for n in names]
    photos = sorted(str(p) for p in images.iterdir())
    for arch, command in (("x86", [sys.executable]), ("aarch64", arm64)):
        (tmp_path / arch).mkdir()
        _, err = run_python(command, ["-c", PREDICT, arch, *bundles, "--", *photos], arch == "aarch64", tmp_path, True)
    here = cpu_family()
    for b, name in enumerate(names):
        same_on = npcam.load(tiny_bundles[name]).bundle.int8_same_on
        if same_on is not None and not {here, "aarch64"} <= set(same_on):
            assert "its int8 trunk" in err and "may differ" in err, (name, same_on, err)  # the warning, on aarch64
            continue
        step = output_step(tiny_bundles[name])
        fc_weight = npcam.load(tiny_bundles[name]).head.weight.astype(np.float64)  # [K, C]
        weight = np.abs(fc_weight).sum(axis=1)  # [K]
        for i in range(len(photos)):
            want, got = (np.load(tmp_path / arch / f"{b}_{i}.npz") for arch in ("x86", "aarch64"))
            # features lie on the grid: compare in steps (per-tensor or per-channel scale)
            steps = np.abs(got["features"] - want["features"]) / step.reshape(-1, 1, 1)
            record(f"aarch64 vs x86 {name} features, quantization steps", steps.max())
            assert steps.max() <= 1 + 1e-3, (name, photos[i])
            d = float(np.abs(got["features"] - want["features"]).max())
            logit_tol = d * weight + 1e-5 * (1 + np.abs(want["logits"]))
            assert np.all(np.abs(got["logits"] - want["logits"]) <= logit_tol), (name, photos[i])
            prob_tol = np.expm1(2 * logit_tol.max()) + PROB_ATOL
            assert np.abs(got["probs"] - want["probs"]).max() <= prob_tol, (name, photos[i])
            peak = np.maximum(np.einsum("kc,chw->khw", fc_weight, want["features"]), 0).max(axis=(1, 2))
            top1 = int(np.argmax(want["logits"]))
            assert peak[top1] > 0
            for k in np.flatnonzero(peak > 2 * d * weight):  # where the peak cannot vanish, the bound holds
                map_tol = 2 * d * weight[k] / peak[k] + MAP_ATOL
                map_error = np.abs(got["maps"][k] - want["maps"][k]).max()
                assert map_error <= map_tol, (name, photos[i], k)
                record(f"aarch64 vs x86 {name} map, abs", map_error)
            assert top1 in np.flatnonzero(peak > 2 * d * weight)
