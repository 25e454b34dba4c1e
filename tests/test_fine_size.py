"""``size="fine"`` (``--size fine``): 9/7 of the bundle's input size in whole feature cells, in every front-end."""

from __future__ import annotations

import json
import math

import pytest
import tiny_detector as td
from conftest import synthetic_image
from PIL import Image

import npcam
from npcam.cli import main as cli_main
from npcam.errors import NpcamError
from npcam.explain import Options
from npcam.image import FINE_SCALE, fine_size
from npcam.serve import options_from_query


@pytest.mark.parametrize(
    "native, stride, fine",
    [
        ((224, 224), 32, (288, 288)),  # ResNet, EfficientNet-Lite0: the size measured in docs/methods.md
        ((240, 240), 32, (320, 320)),  # Lite1: 308.6 rounds to 10 cells
        ((260, 260), 32, (320, 320)),  # Lite2: 334.3 rounds to 10 cells
        ((48, 192), 32, (64, 256)),  # a text-line model: each side on its own
        ((48, 192), 16, (64, 240)),
        ((8, 8), 32, (32, 32)),  # never below one cell
    ],
)
def test_fine_size_is_nine_sevenths_in_whole_cells(native, stride, fine):
    assert fine_size(native, stride) == fine
    for side, scaled in zip(native, fine):
        assert scaled % stride == 0
        # Rounding to whole cells moves a side by at most half a cell (or up to the one-cell floor).
        assert abs(scaled - side * FINE_SCALE) <= stride / 2 or scaled == stride


def test_options_resolve_fine_to_the_bundles_scaled_size(tiny_model):
    checked = Options(size="fine").checked(tiny_model)
    assert checked.size == (288, 288) == fine_size(tiny_model.bundle.input_size, tiny_model.bundle.stride)
    assert Options(size="fine", keep_aspect=True).checked(tiny_model).size == (288, 288)  # the short side's


def test_cli_fine_is_the_same_run_as_its_size(tiny_cli, tmp_path):
    """``--size fine`` and ``--size 288`` (the tiny bundle is 224 px at stride 32) write the same files."""
    photo = tmp_path / "p.png"
    Image.fromarray(synthetic_image(300, 451)).save(photo)
    outputs = {}
    for size in ("fine", "288", "224"):
        out = tmp_path / f"o-{size}.png"
        code, stdout, err = tiny_cli(photo, "-o", out, "--size", size, "--json", "--bbox", "--save-cam")
        assert code == 0, err
        record = json.loads(stdout)
        outputs[size] = (out.read_bytes(), out.with_suffix(".npy").read_bytes(), record["bbox"], record["top5"])
    assert outputs["fine"] == outputs["288"]
    assert outputs["fine"][1] != outputs["224"][1]  # and not the default's map


def test_cli_refuses_a_misspelt_fine(tiny_cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tiny_cli(tmp_path / "none.png", "--size", "fin")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --size" in err and "'fin'" in err and len(err.strip().splitlines()) == 1


def test_serve_takes_size_fine(tiny_model):
    options, _ = options_from_query({"size": "fine"}, max_pixels=10**6)
    assert options.size == "fine" and options.checked(tiny_model).size == (288, 288)
    options, _ = options_from_query({"size": " FINE "}, max_pixels=10**6)
    assert options.size == "fine"


def test_scaled_side_never_exceeds_half_a_cell_from_nine_sevenths():
    """Over every side a bundle may have (8..4096 at strides 8, 16, 32), the rounding bound above holds."""
    for stride in (8, 16, 32):
        for side in range(8, 4097, 7):
            (scaled,) = fine_size((side,), stride)
            assert scaled % stride == 0 and scaled >= stride
            assert scaled == stride or math.isclose(scaled, side * FINE_SCALE, abs_tol=stride / 2)


def test_a_detector_refuses_fine_in_one_line(tmp_path, capsys):
    """'fine' was measured on a classifier's class maps; a detector's input size changes what it detects, so
    the library, the CLI and the server refuse it there instead of running the detector at another size."""
    directory = td.bundle(tmp_path / "detector")
    model = npcam.load(directory)
    with pytest.raises(NpcamError, match="size=fine is for a classifier's maps, not a detector's"):
        Options(size="fine").checked(model)
    options, _ = options_from_query({"size": "fine"}, max_pixels=10**6)
    with pytest.raises(NpcamError, match="not a detector's"):
        options.checked(model)
    photo = tmp_path / "p.png"
    Image.fromarray(synthetic_image(90, 120)).save(photo)
    code = cli_main([str(photo), "-m", str(directory), "-o", str(tmp_path / "o.png"), "--size", "fine"])
    err = capsys.readouterr().err
    assert code == 2 and "not a detector's" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()
