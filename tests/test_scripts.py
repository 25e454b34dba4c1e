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


def test_eval_localization_takes_size_fine(manifest, tiny_bundle):
    """``--size fine`` is the bundle's fine size (288 for this 224 px bundle), as in the CLI."""
    fine, explicit = (script("eval_localization.py", manifest, SAMPLES, "--model", tiny_bundle, "--size", size)
                      for size in ("fine", "288"))  # fmt: skip
    assert fine.returncode == 0 and explicit.returncode == 0, fine.stderr + explicit.stderr
    assert fine.stdout == explicit.stdout and fine.stdout.startswith("n=2 ")


@pytest.mark.extras  # the exported ResNet-18 (torch)
def test_localization_sizes_pairs_sizes_with_the_products_metrics(manifest, bundle, tmp_path):
    """scripts/localization_sizes.py: 'fine' is the run at 288 (this bundle is 224 px); its GT-known and Top-1
    Loc agree with eval_localization.py's, which gets there another way (batched predict, then model.cam); the
    base size has no paired difference and every other size has one, inside its own interval's reach."""
    out = tmp_path / "sizes.json"
    result = script("localization_sizes.py", manifest, SAMPLES, "--model", bundle, "--sizes", "native,fine,288",
                    "--methods", "cam,layercam", "--boot", "200", "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {(r["method"], r["size"]) for r in rows} == {(m, s) for m in ("cam", "layercam")
                                                        for s in ("native", "fine", "288")}  # fmt: skip
    by = {(r["method"], r["size"]): r for r in rows}
    for m in ("cam", "layercam"):
        assert by[(m, "fine")]["input"] == by[(m, "288")]["input"] == [288, 288]
        for key in ("gt_known", "top1_loc", "maxboxacc"):
            assert by[(m, "fine")][key] == by[(m, "288")][key]
            estimate, low, high = by[(m, "native")][key]
            assert 0 <= low <= estimate <= high <= 1
        assert "d_gt_known" not in by[(m, "native")] and "d_maxboxacc" in by[(m, "fine")]
    assert "time native" in result.stdout and "time fine" in result.stdout
    for size, flag in (("native", []), ("288", ["--size", "288"])):
        reference = script("eval_localization.py", manifest, SAMPLES, "--model", bundle, "--method", "cam", *flag)
        fields = dict(kv.split("=") for kv in reference.stdout.split())
        assert by[("cam", size)]["n"] == int(fields["n"]) == 2
        # eval_localization.py prints 4 decimals: the tolerance is its rounding, not a difference allowed.
        assert by[("cam", size)]["gt_known"][0] == pytest.approx(float(fields["gt_known_loc"]), abs=1e-4)
        assert by[("cam", size)]["top1_loc"][0] == pytest.approx(float(fields["top1_loc"]), abs=1e-4)


def test_localization_sizes_refuses_a_bad_size_in_one_line(manifest, tiny_bundle):
    result = script("localization_sizes.py", manifest, SAMPLES, "--model", tiny_bundle, "--sizes", "native,fin")
    assert result.returncode == 2 and "localization_sizes: error:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
