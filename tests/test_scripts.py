"""The evaluation scripts, on a manifest of the shipped photos (the dev set has its own tests where present)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLES

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


# The shipped photos with a label and a hand-drawn box (x0,y0,x1,y1, inclusive pixels).
MANIFEST = """file,imagenet_index,wnid,class_name,bboxes_xyxy,width,height,source,note
chelsea.png,285|281,n02124075,Egyptian cat,"60,0,400,299",451,300,skimage,face
coffee.jpg,967|968,n07920052,espresso,"100,30,450,330",600,400,skimage,cup
rocket.jpg,812,n04266014,space shuttle,,640,427,skimage,no box
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    path.write_text(MANIFEST)
    return path


def script(name, *args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_eval_localization(manifest, tiny_bundle, tmp_path):
    result = script("eval_localization.py", manifest, SAMPLES, "--model", tiny_bundle, "--method", "layercam",
                    "--sweep", "0.2,0.5", "--json", tmp_path / "r.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["threshold=0.2", "threshold=0.5"]
    fields = dict(item.split("=") for item in lines[-1].split())
    assert fields["n"] == "2" and set(fields) == {
        "n",
        "top1_cls",
        "gt_known_loc",
        "top1_loc",
    }  # the row without a box is skipped
    assert all(0 <= float(fields[k]) <= 1 for k in ("top1_cls", "gt_known_loc", "top1_loc"))
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"0.2", "0.5", "mean"}


def test_eval_localization_refuses_an_unknown_method(manifest, tiny_bundle):
    result = script("eval_localization.py", manifest, SAMPLES, "--model", tiny_bundle, "--method", "nope")
    assert result.returncode == 2 and "unknown method 'nope'" in result.stderr and "Traceback" not in result.stderr
