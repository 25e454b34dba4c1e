"""The fast tier (`pytest --fast`): the tests marked `fast`, with torch and the other heavy modules unimportable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import NOT_IN_FAST_TIER, REPO, FastTierImports

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


def test_the_fast_tier_refuses_the_heavy_modules_and_lets_the_runtime_through():
    hook = FastTierImports()
    for name in ("torch", "torch.onnx", "tensorflow", "ray.data", "cv2", "selenium.webdriver"):
        with pytest.raises(ModuleNotFoundError, match="not importable in the fast tier"):
            hook.find_spec(name)
    for name in ("npcam", "npcam.cli", "numpy", "PIL.Image", "onnxruntime", "onnx", "hypothesis", "export", "json"):
        assert hook.find_spec(name) is None  # left to the other finders
    assert "torch" in NOT_IN_FAST_TIER and not {"npcam", "numpy", "PIL", "onnxruntime", "onnx"} & NOT_IN_FAST_TIER


def test_every_fast_test_sets_up_without_the_heavy_modules():
    """`pytest --fast --setup-only`: the fast files import, and every fast test's fixtures are made, under the hook.

    A fast test that needs a fixture made with torch (`bundle`, `graph_bundle`, ...) fails here, in the full
    suite that CI runs; one that imports torch in its own body fails when the fast tier runs (`scripts/test.sh
    --fast`). The files that mark no test fast are not imported, and the summary names them."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--fast", "--setup-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.splitlines()[-1], result.stdout[-3000:]
    files = {line.split("::")[0].split()[-1] for line in result.stdout.splitlines() if "::" in line}
    assert {"tests/test_cli.py", "tests/test_boxes.py", "tests/test_robustness.py"} <= files
    assert not {"tests/test_parity.py", "tests/test_export.py", "tests/test_dataset.py"} & files
    left_out = result.stdout[result.stdout.index("fast tier: test files not collected") :]
    assert "test_parity.py" in left_out and "test_cli.py" not in left_out  # named in the summary
