"""Imported int8 and dynamic-range TFLite bundles on other CPUs than this one, under qemu-user, against LiteRT.

onnxruntime picks its int8 kernels from the CPU it runs on, so a bundle exported and checked on one CPU can
compute differently on another. The exporter writes an int8 TFLite model's graph with uint8 activations and
weights (export/unsigned.py), and a dynamic-range model's hybrid convolutions as ConvInteger on uint8
(export/hybrid.py), so that onnxruntime's ``u8u8`` kernels, exact on every CPU, run them. This file runs the
same bundles, exported here, on:

- x86-64 as qemu's ``Haswell-noTSX``: AVX2 without VNNI and without AVX-512, whatever this machine has. These
  are the kernels whose ``u8s8`` products saturate (``vpmaddubsw``). On a CPU with VNNI this is how the suite
  covers AVX2-only x86; on an AVX2 machine the rest of the suite already runs them.
- aarch64 as a Cortex-A72 (NEON, no dot product) and a Neoverse-N1 (``UDOT``): onnxruntime's two ARM int8
  kernel families.

qemu's TCG emulates no VNNI or AVX-512 instruction (10.0 refuses ``avx-vnni`` and ``avx512f`` even on
``-cpu max``), so these kernels are covered only where the suite itself runs on such a CPU
(docs/robustness-and-testing.md). ``scripts/arm64_env.sh`` provides qemu-x86_64 and the aarch64 Python (see
tests/test_aarch64.py); without them these tests skip, naming the script.

Bounds (derived as in tests/test_tflite_keras.py): for int8 models, last-conv features within one quantization
step of LiteRT's (TFLite rounds the int32 sums back to int8 with a fixed-point multiplier and two roundings,
onnxruntime with one float rounding) and the output within the bundle's own int8 bound (bundle.json); for the
dynamic-range model, the limits of ``Hybrid`` (one step of the hybrid ops' input quantization through their
weights). Across CPUs an int8 model's features must be identical: the uint8 products are summed exactly in
int32 on every CPU and rescaled by the same float32 multiply and round-half-to-even, so the integers and their
dequantized float32 values are the same; a saturating kernel gives features many steps away.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import record
from test_aarch64 import OTHER_CPUS, emulated, run_script
from test_tflite_keras import Hybrid, TFLite, classifier, inputs, mobile, to_tflite

import npcam
from export import hybrid as export_hybrid
from export.__main__ import main as export_main

# The TFLite models of tests/test_tflite_keras.py that this machine's AVX2 kernels got wrong before the uint8
# graph: full-integer ``rgb`` (softmax output, any batch) and ``batch1`` (logits, one image at a time); and a
# dynamic-range one, whose hybrid convolutions run in ConvInteger (export/hybrid.py).
MODELS = ("rgb", "batch1", "mobile", "mobile_int32")  # mobile_int32: ConvInteger for every hybrid convolution

# Loads each bundle (argv: the inputs' .npz, the output .npz, then the bundles) and saves, for every input,
# the last conv's features and the output (probabilities or logits, as the model's), computed by npcam's
# runtime on this (emulated) CPU.
RUN = """
import sys, numpy as np, npcam
x = np.load(sys.argv[1])["x"]
out = {}
for b, path in enumerate(sys.argv[3:]):
    model = npcam.load(path)
    preds = [model.classify([np.zeros((1, 1, 3), np.uint8)], [xi[None]])[0] for xi in x]
    out[f"features{b}"] = np.array([p.features for p in preds])
    scores = np.concatenate([model.scores(xi[None]) for xi in x])
    out[f"outputs{b}"] = model.probabilities(scores) if model.bundle.meta["output"] != "logits" else scores
np.savez(sys.argv[2], **out)
"""


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory) -> dict:
    """The int8 models exported by the real command, LiteRT's features and outputs on the inputs, and this
    machine's own run of the bundles (the same script as the emulated CPUs run)."""
    root = tmp_path_factory.mktemp("cpus")
    bundles, want = [], []
    for kind in MODELS:
        path = root / f"{kind}.tflite"
        dynamic = kind.startswith("mobile")
        path.write_bytes(to_tflite(mobile(), "dynamic") if dynamic else to_tflite(classifier(kind), "int8"))
        with pytest.MonkeyPatch.context() as patch:
            if kind == "mobile_int32":
                patch.setattr(export_hybrid, "EXACT_IN_FLOAT32", 0)
            assert export_main(["tflite", str(path), "--out", str(root / kind)]) == 0
        bundles.append(root / kind)
    x = np.concatenate(inputs(npcam.load(bundles[0])))  # npcam's photos and random images, [N, 3, H, W]
    np.savez(root / "inputs.npz", x=x)
    for kind, bundle in zip(MODELS, bundles):
        if kind.startswith("mobile"):  # each input's own limits (tests/test_tflite_keras.py, Hybrid)
            runs = [Hybrid(root / f"{kind}.tflite").limits(xi[None]) for xi in x]
        else:  # one feature step, and the int8 bound of bundle.json
            reference = TFLite(root / f"{kind}.tflite")
            step = float(reference.quant(reference.ops["MEAN"]["inputs"][0])[0][0])
            bound = npcam.load(bundle).bundle.meta["source"]["int8_bound"]["bound"]
            runs = [(*reference.run(xi[None], grey=False), bound, step) for xi in x]
        want.append([np.array([r[i] for r in runs]) for i in range(4)])
    here = _run([sys.executable], {}, root, "here", bundles)
    return {"root": root, "bundles": bundles, "want": want, "here": here}


def _run(command: list[str], env: dict[str, str], root: Path, name: str, bundles: list[Path]) -> dict:
    out = root / f"{name}.npz"
    run_script(command, env, RUN, [str(root / "inputs.npz"), str(out), *map(str, bundles)], name)
    return dict(np.load(out))


@pytest.mark.parametrize("cpu", list(OTHER_CPUS))
def test_int8_tflite_bundles_compute_the_same_on_other_cpus(cpu, int8_bundles):
    arch, model = OTHER_CPUS[cpu]
    command, env = emulated(arch, model)
    got = _run(command, env, int8_bundles["root"], model, int8_bundles["bundles"])
    here = int8_bundles["here"]
    for b, kind in enumerate(MODELS):
        want_outputs, want_features, output_limits, feature_limits = int8_bundles["want"][b]
        features = got[f"features{b}"].transpose(0, 2, 3, 1).astype(np.float64)  # as LiteRT's, [N, h, w, C]
        outputs = got[f"outputs{b}"].astype(np.float64)
        assert features.shape == want_features.shape and features.max() > 0  # a real map, not an empty one
        if kind.startswith("mobile"):
            error = (np.abs(features - want_features) / feature_limits[:, None, None, :]).max()
        else:
            error = (np.abs(features - want_features) / feature_limits[:, None, None, None]).max()  # in steps
        assert record(f"{cpu}, TFLite {kind}: features vs LiteRT, of the limit", error) <= 1.001  # float32
        error = (np.abs(outputs - want_outputs).max(axis=1) / output_limits).max()
        assert record(f"{cpu}, TFLite {kind}: output vs LiteRT, of the limit", error) <= 1 + 1e-5
        differ = np.abs(got[f"features{b}"] - here[f"features{b}"]).max()
        if not kind.startswith("mobile"):  # int8: the same integers; dynamic range: float ops between them too
            assert record(f"{cpu}, TFLite int8 {kind}: features vs this CPU's, abs", differ) == 0
        else:
            record(f"{cpu}, TFLite dynamic {kind}: features vs this CPU's, abs", differ)
