"""The fast tier's rule (tests/tiers.py): what it follows, and that `pytest --fast` needs no torch to collect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tiers
from conftest import REPO


def needs_of(name: str) -> set[str]:
    """What calling the function or class ``name`` of conftest.py can import."""
    return tiers._needs("conftest", [tiers._module("conftest").defs[name]], True, set())


def test_helpers_are_followed_into_their_imports():
    assert {"torch", "export"} <= needs_of("random_resnet")  # imported inside the function
    assert "torch" in needs_of("resnet18_weights")  # and through random_resnet, which it calls
    assert all(tiers.allowed(n) for n in needs_of("tiny_bundle")), needs_of("tiny_bundle")


def test_a_parameter_is_not_the_fixture_of_the_same_name():
    # Server(bundle, ...) takes a path called `bundle`; the `bundle` fixture (which runs the exporter) is not called.
    assert "export" not in needs_of("Server")


def test_files_are_classified_by_their_imports():
    def extra(name):
        return {n for n in tiers.file_needs(Path(tiers.HERE / name)) if not tiers.allowed(n)}

    assert extra("test_boxes.py") == set()
    assert "torch" in extra("test_parity.py")
    assert {"ray", "pyarrow"} <= extra("test_dataset.py")  # through pytest.importorskip


def test_fast_collection_imports_none_of_the_heavy_modules(tmp_path):
    """`pytest --fast` collects with torch, the exporter, Ray and OpenCV unimportable, and leaves their files out."""
    blocked = ["torch", "export", "ray", "cv2", "torchcam", "starlette"]
    for name in blocked:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--fast", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line.split("::")[0] for line in result.stdout.splitlines() if "::" in line]
    assert "tests/test_cli.py" in collected and "tests/test_boxes.py" in collected
    assert not {"tests/test_parity.py", "tests/test_export.py", "tests/test_dataset.py"} & set(collected)
    assert "test_parity.py (" in result.stdout and "torch" in result.stdout  # named in the summary, with why
