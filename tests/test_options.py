"""One options path: Options validates in its own words, the front-ends say it in theirs, with the same limits."""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest
from conftest import REPO, imagenet_labels, synthetic_image, tiny_trunk
from PIL import Image

import npcam
from npcam import bundle as bundles
from npcam import methods
from npcam.arguments import flag_words
from npcam.cli import main
from npcam.explain import MAX_TOP, Options
from npcam.head import AffineHead
from npcam.image import read_photo

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


@pytest.fixture(scope="module")
def fixed_bundle(tmp_path_factory):
    """A tiny bundle whose trunk takes only its own 224 px input (``fixed_size``)."""
    rng = np.random.default_rng(3)
    head = AffineHead(rng.normal(0, 0.5, (1000, 512)).astype(np.float32), np.zeros(1000, np.float32))
    directory = tmp_path_factory.mktemp("fixed") / "b"
    directory.mkdir()
    meta = {"arch": "tiny", "input_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3, "stride": 32, "fixed_size": True}
    bundles.write(directory, tiny_trunk(), head, imagenet_labels(), meta)
    return directory


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(synthetic_image(120, 160)).save(path)
    return path


@pytest.mark.parametrize(
    "options, library, flag",
    [
        (Options(keep_aspect=True), "keep_aspect cannot be used", ["--keep-aspect"]),
        (Options(size=160), "size=160x160 cannot be used", ["--size", "160"]),
        (Options(size="fine"), "size=fine cannot be used", ["--size", "fine"]),
    ],
)
def test_library_names_fields_and_the_cli_names_flags(fixed_bundle, photo, capsys, options, library, flag):
    with pytest.raises(npcam.NpcamError) as e:
        options.checked(npcam.load(fixed_bundle))
    assert library in str(e.value) and "--" not in str(e.value)
    code = main([str(photo), "-m", str(fixed_bundle), "-o", str(photo.with_name("out.png")), *flag])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag_words(library)}" in err and " ".join(flag) in err, err
    assert not photo.with_name("out.png").exists()


def test_image_limit_is_in_library_words(photo):
    with pytest.raises(npcam.NpcamError, match=r"over the limit of 100 \(raise it with max_pixels\)$"):
        read_photo(photo, 100, str(photo))


@pytest.mark.parametrize(
    "options, message",
    [
        (Options(alpha=1.5), "alpha must be between 0.0 and 1.0, not 1.5"),
        (Options(alpha=math.nan), "alpha must be between 0.0 and 1.0, not nan"),
        (Options(top=0), f"top must be between 1 and {MAX_TOP}, not 0"),
        (Options(top=MAX_TOP + 1), f"top must be between 1 and {MAX_TOP}, not {MAX_TOP + 1}"),
        (Options(max_pixels=0), "max_pixels must be at least 1, not 0"),
        (Options(max_side=0), "max_side must be at least 1, not 0"),
    ],
)
def test_options_check_every_limit_once(tiny_model, options, message):
    with pytest.raises(npcam.NpcamError) as e:
        options.checked(tiny_model)
    assert str(e.value) == message
    assert Options(alpha=1.0, top=MAX_TOP).checked(tiny_model).top == MAX_TOP  # the bounds themselves are allowed


@pytest.mark.parametrize("prog", [[], ["dataset"]])
def test_cli_and_dataset_have_the_max_side_limit(tiny_bundle, photo, tmp_path, capsys, prog):
    extra = ["--out", str(tmp_path / "d")] if prog else []
    with pytest.raises(SystemExit) as e:
        main([*prog, str(photo), "-m", str(tiny_bundle), *extra, "--max-side", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --max-side: must be at least 1, not 0" in err and err.count("\n") == 1, err
    assert flag_words("max_side must be at least 1, not 0") == "--max-side must be at least 1, not 0"


@pytest.mark.parametrize("prog", [[], ["dataset"]])
def test_cli_and_dataset_have_the_top_limit(tiny_bundle, photo, tmp_path, capsys, prog):
    extra = ["--out", str(tmp_path / "d")] if prog else []
    with pytest.raises(SystemExit) as e:
        main([*prog, str(photo), "-m", str(tiny_bundle), *extra, "--top", str(MAX_TOP + 1)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --top: must be at most {MAX_TOP}, not {MAX_TOP + 1}" in err, err
    assert err.count("\n") == 1


def test_resolve_names_aliases_and_heads():
    assert methods.resolve("gradcam++").name == "gradcampp" and methods.resolve("GradCAM").name == "gradcam"
    assert methods.resolve("GRADCAM++", "graph").name == "gradcampp"
    with pytest.raises(npcam.NpcamError, match=r"^unknown method 'nope'; choose one of cam, .* \(or gradcam\+\+, rise\)$"):
        methods.resolve("nope", "affine")
    for name in ("cam", "softmax"):
        assert methods.resolve(name, "affine").name == name
        with pytest.raises(npcam.NpcamError, match=f"^method {name} needs a head that is one affine layer"):
            methods.resolve(name, "graph")
    assert methods.allowed("affine") == list(methods.METHODS)
    assert methods.allowed("graph") == [n for n in methods.METHODS if n not in ("cam", "softmax")]


def test_flag_words():
    assert flag_words("x.jpg: 9 pixels (raise it with max_pixels)") == "x.jpg: 9 pixels (raise it with --max-pixels)"
    assert flag_words("size=48x192 and keep_aspect") == "--size 48x192 and --keep-aspect"
    assert flag_words("the input size 10x10 is too small") == "the input size 10x10 is too small"
    assert flag_words("mask_cells=200 is more than 64") == "--mask-cells 200 is more than 64"


def test_front_ends_import_only_the_shared_arguments():
    """cli, serve and dataset are adapters over npcam.arguments and the library; none imports another."""
    front_ends = {"cli", "serve", "dataset"}
    for name in front_ends:
        tree = ast.parse((REPO / "npcam" / f"{name}.py").read_text())
        imported = {
            (node.module or "").lstrip(".").removeprefix("npcam.")
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not imported & (front_ends - {name}), (name, imported)
        assert "arguments" in imported, name
