"""Issue 27: graphs that end in NonMaxSuppression are cut before it, where the raw outputs are.

The YOLOv8-like net of tests/detectors.py, exported by TorchScript, gets an NMS appended (its boxes sliced and
transposed from the raw output, its scores sliced): once with the raw output still a graph output, once with the
NMS's selection as the only output (the cut then finds the raw output the NMS's inputs are sliced from). Both
bundles must be the plain file's: the same raw outputs (checked against the torch module too), the same
detections and the same Grad-CAM maps. An NMS whose boxes come from another tensor than its scores (an SSD that
decodes against anchors in the graph) is refused in one line.
"""

from __future__ import annotations

import detectors
import numpy as np
import onnx
import ssd_detectors
from onnx import TensorProto, helper, numpy_helper
from test_detect_export import RAW_TOL, _with_nms, cli, onnx_file, photo, refused_in_one_line, torch_outputs
from test_detect_ssd import onnx_file as ssd_file

import npcam
from export.api import run_onnx
from npcam import methods


def _only_nms(source, target):
    """The file of ``_with_nms`` with the NMS's selection as its only output."""
    _with_nms(source, target)
    model = onnx.load(target)
    selected = [o for o in model.graph.output if o.name == "selected"]
    del model.graph.output[:]
    model.graph.output.extend(selected)
    onnx.save(model, target)


def test_a_graph_ending_in_nms_is_cut_before_it(tmp_path):
    plain_file = onnx_file("yolov8", "torchscript", tmp_path)
    plain = npcam.load(run_onnx(plain_file, tmp_path / "plain", input_size=detectors.SIZE))
    net = detectors.yolov8()
    for name, make in (("both", _with_nms), ("only", _only_nms)):
        path = tmp_path / f"{name}.onnx"
        make(plain_file, path)
        assert any(n.op_type == "NonMaxSuppression" for n in onnx.load(path).graph.node)
        model = npcam.load(run_onnx(path, tmp_path / name, input_size=detectors.SIZE))
        assert model.bundle.meta["detect"]["decode"] == "yolo" and "NonMaxSuppression" not in {
            op.op for op in model.head.ops
        }
        image = photo(0)
        got, want = model.predict(image), plain.predict(image)
        np.testing.assert_array_equal(got.logits, want.logits)
        module = torch_outputs(net, got.input)[0].double().numpy().ravel()
        np.testing.assert_allclose(got.logits, module, rtol=RAW_TOL, atol=RAW_TOL)
        assert len(got.detections) >= 2 and got.detections == want.detections
        gradcam = methods.METHODS["gradcam"]
        size = tuple(got.input.shape[2:])
        np.testing.assert_array_equal(
            methods.maps(gradcam, model.probes(got, [0, 1]), size), methods.maps(gradcam, plain.probes(want, [0, 1]), size)
        )


def test_an_nms_fed_by_two_tensors_is_refused(tmp_path):
    """An SSD's boxes and scores reach the NMS from its two outputs: there is no one raw output to cut at."""
    model = onnx.load(ssd_file("tf", "torchscript", tmp_path))
    graph = model.graph
    boxes, scores = (o.name for o in graph.output)
    for name, value in (("b0", [0]), ("b4", [4]), ("ax", [2])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    graph.node.extend([
        helper.make_node("Slice", [boxes, "b0", "b4", "ax"], ["nms_boxes"]),
        helper.make_node("Transpose", [scores], ["nms_scores"], perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", ["nms_boxes", "nms_scores"], ["selected"]),
    ])  # fmt: skip
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("selected", TensorProto.INT64, None))
    path = tmp_path / "ssd_nms.onnx"
    onnx.save(model, path)
    size = "x".join(map(str, ssd_detectors.SIZE))
    refused_in_one_line(cli("onnx", path, "--out", tmp_path / "out", "--input-size", size), "NonMaxSuppression",
                        "export the model without NMS")  # fmt: skip
    assert not (tmp_path / "out").exists()
