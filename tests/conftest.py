"""Shared fixtures: a seeded random-init ResNet-18, exported by the real export path.

Exactness is checked against torch on the same weights; the official ResNet-18
weights cannot be downloaded on the project's machines, and random weights
exercise every layer just as well. The core tests use only the photos in
``samples/`` (public domain) and generated images; tests on the larger
``../shared/eval`` set skip, with a message, when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO.parent / "shared" / "eval"
SAMPLES = REPO / "samples"
SAMPLE = SAMPLES / "chelsea.png"
PHOTOS = [SAMPLES / "chelsea.png", SAMPLES / "coffee.jpg", SAMPLES / "rocket.jpg"]

needs_eval = pytest.mark.skipif(
    not EVAL.is_dir(), reason=f"{EVAL} is absent: the dev photo set is not beside this clone"
)

# Largest errors seen by the parity tests, printed at the end of the run.
MEASURED: dict[str, float] = {}


def record(name: str, value: float) -> float:
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(value))
    return value


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("npcam vs references: largest errors measured")
        for name, value in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{name}: {value:.2e}")


def random_resnet(name: str = "resnet18", seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """A torchvision-layout ResNet with seeded random weights and non-trivial BN statistics."""
    from export import resnet

    torch.manual_seed(seed)
    net = getattr(resnet, name)(num_classes=num_classes)
    randomize_bn(net)
    return net.eval()


def randomize_bn(net: torch.nn.Module) -> torch.nn.Module:
    """BN statistics away from their defaults (0, 1), which would leave BN folding untested."""
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(random_resnet().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def bundle(resnet18_weights, tmp_path_factory) -> Path:
    from export.__main__ import run

    return run("resnet18", tmp_path_factory.mktemp("bundles") / "resnet18", resnet18_weights)


@pytest.fixture(scope="session")
def torch_net(resnet18_weights) -> torch.nn.Module:
    """The reference: the same weights loaded into a fresh torch module."""
    from export import resnet

    net = resnet.resnet18()
    net.load_state_dict(torch.load(resnet18_weights, weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def model(bundle):
    import npcam

    return npcam.load(bundle)


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture, uint8 ``[H, W, 3]``."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    base = 255 * (0.5 + 0.4 * np.sin(6 * x + 3 * y + np.array([0, 2, 4], dtype=np.float32)))
    noise = rng.integers(-20, 20, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def cli(bundle, capsys, tmp_path, monkeypatch):
    """Run the CLI in-process on the test bundle, from an empty working directory.

    Returns a function of the arguments giving ``(exit code, stdout, stderr)``.
    """
    from npcam.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args):
        code = main(["-m", str(bundle), *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


class Server:
    """``npcam serve`` in a subprocess on a free loopback port; ``url`` once it listens."""

    def __init__(self, bundle: Path, *args: str):
        import os
        import subprocess
        import sys

        command = [sys.executable, "-m", "npcam", "serve", "--model", str(bundle), "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        first = self.process.stderr.readline()  # the start-up line names the URL
        self.log.append(first)
        if "http://" not in first:
            self.process.kill()
            raise RuntimeError(f"npcam serve did not start: {first}{self.process.stderr.read()}")
        self.url = first[first.index("http://") :].split()[0].rstrip("/")

    def stop(self, signal_number=None) -> int:
        import signal

        self.process.send_signal(signal_number or signal.SIGTERM)
        _, rest = self.process.communicate(timeout=60)
        self.log.append(rest)
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
