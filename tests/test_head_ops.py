"""The head engine's ops on spatial and token inputs (npcam.head), each against two independent references.

For every op and attribute set:

- its forward against onnxruntime running a one-node ONNX model with the same attributes (the reference for
  ONNX's semantics: pads, ceil_mode, clamped slices, groups...). onnxruntime computes in float32 on the same
  float32 inputs, so the two differ by float32 rounding: each output value is a sum or product of at most a
  few hundred O(1) terms, which float32 keeps within ~100 eps = 1.2e-5 relative; the test allows 2e-5.
- its vector-Jacobian product against central finite differences of the float64 forward, the op sitting in
  a head (op -> Flatten -> Gemm to 3 classes, so that the cotangents are random mixtures). With step
  h = 1e-6 the truncation error is h^2/6 |f'''| ~ 1e-13 and the rounding error eps |f| / h ~ 1e-10 for
  scores of O(1): the test allows 1e-7 absolute + 1e-6 relative, far below any real error (a wrong index or
  a missing term is O(1)).
- its static shape (what bounds a hostile head.json before anything is computed) against the computed one,
  for every head built here (the autouse fixture).

Then composed heads: a ViT last block (LayerNorm -> attention, where the batch axis moves through Reshape,
Transpose and Gather -> residual Add with a side input -> LayerNorm -> MLP with Gelu -> Add -> LayerNorm ->
Gather CLS -> Gemm) and a VGG-like Flatten head, against onnxruntime for the forward and torch autograd for
the gradient, on the same weights.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from npcam.head import MAX_VALUES, GraphHead, Op, infer_shapes
from npcam.head.ops.erf import erf

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

RNG = np.random.default_rng(19)
FD_RTOL, FD_ATOL = 1e-6, 1e-7  # see the module docstring
ORT_TOL = 2e-5


@pytest.fixture(autouse=True)
def static_shapes_are_the_computed_ones(monkeypatch):
    """Every head built in these tests: the statically inferred shapes are the ones the forward computes."""
    build = GraphHead.__init__

    def checked(self, *args, **kwargs):
        build(self, *args, **kwargs)
        sides = {name: np.zeros((1, *shape[1:])) for name, shape in self.sides.items()}
        zeros = {name: np.zeros((1, *shape[1:])) for name, shape in self.inputs.items()}
        computed = {name: value.shape for name, value in self._run(zeros, sides).items()}
        assert computed == {name: self.shapes[name] for name in computed}

    monkeypatch.setattr(GraphHead, "__init__", checked)


def finite_difference(head: GraphHead, x: np.ndarray, classes, sides=None, step=1e-6) -> np.ndarray:
    x = x.reshape(-1)
    grads = np.zeros((len(classes), x.size))
    for i in range(x.size):
        up, down = x.copy(), x.copy()
        up[i] += step
        down[i] -= step
        diff = head.forward_float64(up[None], sides)[0] - head.forward_float64(down[None], sides)[0]
        grads[:, i] = diff[classes] / (2 * step)
    return grads


def run_ort(nodes, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray], output: str, opset: int) -> np.ndarray:
    """Run an ONNX graph of ``nodes`` in onnxruntime: float32 inputs, initializers as given (floats in float32)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ops as written
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([output], {k: v.astype(np.float32) for k, v in inputs.items()})[0]


# One op on the head's input x. `inputs` lists the op's inputs in order, "x" among them; `consts` are arrays
# of the head (and initializers for onnxruntime); `onnx` gives what ONNX wants as constant inputs where npcam
# takes attributes (Slice's starts, a Reduce's axes from opset 18), or other ONNX attributes.


class Case:
    def __init__(self, op, shape, attrs=None, inputs=("x",), consts=None, onnx_inputs=None, onnx_attrs=None,
                 opset=17, positive=False):  # fmt: skip
        self.op, self.shape, self.attrs, self.inputs = op, tuple(shape), dict(attrs or {}), tuple(inputs)
        self.consts = dict(consts or {})
        self.onnx_inputs = onnx_inputs  # None: the same inputs; else (names, extra int64 arrays)
        self.onnx_attrs = self.attrs if onnx_attrs is None else onnx_attrs
        self.opset, self.positive = opset, positive

    def __repr__(self):
        return f"{self.op}{self.shape}{self.attrs}"


def _slice_case(shape, starts, ends, axes, steps):
    extra = {
        "starts": np.array(starts, np.int64),
        "ends": np.array(ends, np.int64),
        "axes": np.array(axes, np.int64),
        "steps": np.array(steps, np.int64),
    }
    attrs = {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
    return Case("Slice", shape, attrs, onnx_inputs=(("x", "starts", "ends", "axes", "steps"), extra), onnx_attrs={})


def _resize_case(shape, attrs, scales=None, sizes=None):
    """Resize with constant scales or sizes (inputs in ONNX, attributes in npcam), opset 19 (every transform)."""
    extra = {"scales": np.array(scales, np.float32)} if scales else {"sizes": np.array(sizes, np.int64)}
    names = ("x", "", "scales") if scales else ("x", "", "", "sizes")
    npcam_attrs = {**attrs, **({"scales": list(scales)} if scales else {"sizes": list(sizes)})}
    return Case("Resize", shape, npcam_attrs, onnx_inputs=(names, extra), onnx_attrs=attrs, opset=19)


INT64_MAX = 2**63 - 1
CASES = [
    # MaxPool: VGG's 2x2 stride 2; overlapping 3x3 stride 2 with pads (ResNet's stem); ceil_mode where the
    # last window would start in the end padding and is dropped; dilations; asymmetric pads; 1-D.
    Case("MaxPool", (1, 3, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case("MaxPool", (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    Case("MaxPool", (1, 2, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    Case("MaxPool", (1, 2, 5, 5), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    Case("MaxPool", (1, 2, 7, 8), {"kernel_shape": [2, 3], "strides": [1, 2], "dilations": [2, 2]}),
    Case("MaxPool", (1, 2, 6, 6), {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [0, 1, 2, 0]}),
    Case("MaxPool", (1, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}),
    Case("MaxPool", (1, 2, 5, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    # AveragePool: with and without the pads in the count, ceil_mode's overhang never counted.
    Case("AveragePool", (1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case("AveragePool", (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    Case("AveragePool", (1, 2, 7, 7),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    Case("AveragePool", (1, 2, 6, 7),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}),
    Case("AveragePool", (1, 2, 6, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1}),
    Case("GlobalMaxPool", (1, 4, 3, 5)),
    Case("GlobalAveragePool", (1, 4, 3, 5)),
    Case("ReduceMax", (1, 4, 3, 5), {"axes": [2, 3], "keepdims": 0}),
    Case("ReduceMin", (1, 4, 3, 5), {"axes": [1], "keepdims": 1}),
    Case("ReduceMax", (1, 5, 6), {"axes": [-1], "keepdims": 1}),
    Case("Flatten", (1, 3, 2, 4), {"axis": 1}),
    Case("Concat", (1, 3, 4), {"axis": 1}, inputs=("cls", "x"), consts={"cls": RNG.standard_normal((1, 1, 4))}),
    Case("Concat", (1, 3, 2, 2), {"axis": -3}, inputs=("x", "c"), consts={"c": RNG.standard_normal((1, 2, 2, 2))}),
    # Gather with constant indices: a scalar removes the axis (x[:, 0], the CLS token), 1-D, negative, 2-D.
    Case("Gather", (1, 5, 4), {"axis": 1}, inputs=("x", "i"), consts={"i": np.array(0, np.int64)}),
    Case("Gather", (1, 5, 4), {"axis": 1}, inputs=("x", "i"), consts={"i": np.array([0, -1], np.int64)}),
    Case("Gather", (1, 5, 4), {"axis": 2}, inputs=("x", "i"), consts={"i": np.array([3, 1, 3], np.int64)}),
    Case("Gather", (1, 6, 3), {"axis": -2}, inputs=("x", "i"), consts={"i": np.array([[1, 2], [5, 1]], np.int64)}),
    # Slice: the patch tokens x[:, 1:], negative starts, clamped ends, negative and larger steps.
    _slice_case((1, 5, 4), [1], [INT64_MAX], [1], [1]),
    _slice_case((1, 6, 5), [-4, 0], [-1, 100], [1, 2], [1, 2]),
    _slice_case((1, 6, 5), [-1, 10], [-INT64_MAX, -7], [1, 2], [-2, -1]),
    _slice_case((1, 4, 6), [2], [-100], [-1], [-3]),
    Case("Softmax", (1, 2, 3, 5), {"axis": -1}, opset=13),
    Case("Softmax", (1, 2, 3, 5), {"axis": 1}, opset=13),
    Case("LogSoftmax", (1, 4, 3), {"axis": 1}, opset=13),
    Case("LogSoftmax", (1, 7), {}, opset=13),
    Case("MatMul", (1, 2, 3, 4), inputs=("x", "m"), consts={"m": RNG.standard_normal((4, 5))}),
    Case("MatMul", (1, 2, 3, 4), inputs=("m", "x"), consts={"m": RNG.standard_normal((2, 5, 3))}),
    Case("MatMul", (1, 4), inputs=("x", "m"), consts={"m": RNG.standard_normal(4)}),
    Case("Gemm", (1, 4), {"transB": 1, "alpha": 0.5, "beta": 2.0}, inputs=("x", "w", "b"),
         consts={"w": RNG.standard_normal((3, 4)), "b": RNG.standard_normal(3)}),
    Case("Gemm", (1, 4), {"transA": 1}, inputs=("x", "w"), consts={"w": RNG.standard_normal((1, 3))}),
    Case("Gemm", (1, 4), {"transB": 1}, inputs=("w", "x"), consts={"w": RNG.standard_normal((3, 4))}),
    Case("Gemm", (1, 4), {"transA": 1, "transB": 1}, inputs=("w", "x"), consts={"w": RNG.standard_normal((4, 2))}),
    Case("Gemm", (1, 4), {"transB": 0}, inputs=("w", "x", "b"),
         consts={"w": RNG.standard_normal((3, 1)), "b": RNG.standard_normal((3, 4))}),
    Case("Transpose", (1, 2, 3, 4), {"perm": [0, 2, 3, 1]}),
    Case("Transpose", (1, 2, 3, 4), {"perm": [2, 0, 3, 1]}),
    Case("LayerNormalization", (1, 5, 6), {"axis": -1, "epsilon": 1e-6}, inputs=("x", "g", "b"),
         consts={"g": RNG.uniform(0.5, 1.5, 6), "b": RNG.standard_normal(6)}),
    Case("LayerNormalization", (1, 3, 2, 4), {"axis": 2}, inputs=("x", "g"), consts={"g": RNG.uniform(0.5, 1.5, (2, 4))}),
    Case("Gelu", (1, 5, 7), {}, opset=20),
    Case("Gelu", (1, 5, 7), {"approximate": "tanh"}, opset=20),
    Case("Erf", (1, 5, 7)),
    Case("Where", (1, 3, 4), inputs=("c", "x", "k"),
         consts={"c": RNG.random((3, 4)) > 0.5, "k": RNG.standard_normal((1, 4))}),
    Case("Where", (1, 3, 4), inputs=("c", "k", "x"), consts={"c": RNG.random((1, 4)) > 0.5, "k": np.array(-2.0)}),
    # Pad (constant): pads and crops (negative pads), on all axes or some (opset 18's axes)
    Case("Pad", (1, 2, 3, 4), {"pads": [0, 0, 1, 2, 0, 0, 2, 0], "constant_value": 0.5},
         onnx_inputs=(("x", "pads", "value"), {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64),
                                                "value": np.array(0.5)}), onnx_attrs={}, opset=13),
    Case("Pad", (1, 3, 5), {"pads": [-1, 2, 1, -2], "axes": [1, 2]}, onnx_attrs={}, opset=18,
         onnx_inputs=(("x", "pads", "", "axes"), {"pads": np.array([-1, 2, 1, -2], np.int64),
                                                  "axes": np.array([1, 2], np.int64)})),
    # Conv: VGG's 3x3 pad 1; strides, dilations and groups; asymmetric pads; depthwise; 1x1 on a map; 1-D.
    Case("Conv", (1, 3, 6, 6), {"pads": [1, 1, 1, 1]}, inputs=("x", "w", "b"),
         consts={"w": RNG.standard_normal((4, 3, 3, 3)), "b": RNG.standard_normal(4)}),
    Case("Conv", (1, 4, 9, 8), {"strides": [2, 2], "dilations": [2, 1], "group": 2, "pads": [1, 0, 2, 1]},
         inputs=("x", "w"), consts={"w": RNG.standard_normal((6, 2, 3, 2))}),
    Case("Conv", (1, 3, 5, 5), {"group": 3, "pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}, inputs=("x", "w", "b"),
         consts={"w": RNG.standard_normal((3, 1, 3, 3)), "b": RNG.standard_normal(3)}),
    Case("Conv", (1, 3, 4, 5), {}, inputs=("x", "w"), consts={"w": RNG.standard_normal((2, 3, 1, 1))}),
    Case("Conv", (1, 2, 9), {"strides": [3], "pads": [2, 1]}, inputs=("x", "w"), consts={"w": RNG.standard_normal((3, 2, 4))}),
    Case("Conv", (1, 2, 5, 6), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, inputs=("x", "w"),
         consts={"w": RNG.standard_normal((3, 2, 3, 3))}),
    # Resize: a neck's nearest 2x upsampling (torch's nn.Upsample: asymmetric, floor), scales or sizes; linear
    # with each coordinate transformation; non-integer scales where rounding and the edge clamp matter.
    *[_resize_case(shape, attrs, scales=scales, sizes=sizes) for shape, attrs, scales, sizes in [
        ((1, 2, 3, 4), {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
         [1, 1, 2, 2], None),
        ((1, 2, 3, 4), {"mode": "nearest"}, None, [1, 2, 6, 8]),
        ((1, 2, 5, 3), {"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, [1, 1, 1.5, 2.5], None),
        ((1, 2, 5, 4), {"mode": "nearest", "coordinate_transformation_mode": "align_corners",
                        "nearest_mode": "ceil"}, None, [1, 2, 7, 3]),
        ((1, 2, 5, 4), {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
         [1, 1, 0.6, 2], None),
        ((1, 2, 3, 4), {"mode": "linear"}, [1, 1, 2, 2], None),
        ((1, 2, 3, 4), {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [1, 2, 7, 5]),
        ((1, 2, 3, 4), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, None, [1, 2, 1, 9]),
        ((1, 2, 6, 4), {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, [1, 1, 0.5, 1.75], None),
        ((1, 2, 5, 4), {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
         [1, 1, 1.7, 0.8], None),
    ]],
]  # fmt: skip


def case_head(case: Case, output="scores", flatten=False) -> tuple[GraphHead, int]:
    """x -> op -> Reshape to one row (Flatten with flatten=True) -> Gemm to 3 classes (or the op's output
    itself, with output="y"). One row: some cases move the batch axis (Gemm with x as B, a Transpose)."""
    y_shape = infer_shapes([Op(case.op, case.inputs, "y", case.attrs)], case.consts, {"x": (-1, *case.shape[1:])})["y"]
    width = math.prod(y_shape)
    arrays = {**case.consts, "w_out": RNG.standard_normal((3, width))}
    ops = [
        Op(case.op, case.inputs, "y", case.attrs),
        Op("Flatten", ("y",), "flat", {"axis": 1}) if flatten else Op("Reshape", ("y",), "flat", {"shape": [1, -1]}),
        Op("Gemm", ("flat", "w_out"), "scores", {"transB": 1}),
    ]
    return GraphHead(ops if output == "scores" else ops[:1], arrays, (-1, *case.shape[1:]), "x", output), width


def case_input(case: Case) -> np.ndarray:
    x = RNG.standard_normal(case.shape)
    return np.abs(x) + 0.1 if case.positive else x


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_matches_onnxruntime(case):
    head, _ = case_head(case, output="y")
    x = case_input(case).astype(np.float32)
    names, extra = case.onnx_inputs or (case.inputs, {})
    node = helper.make_node(case.op, list(names), ["y"], **case.onnx_attrs)
    want = run_ort([node], {"x": x}, {**case.consts, **extra}, "y", case.opset)
    got = head.forward_float64(x.astype(np.float64)).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=ORT_TOL, atol=ORT_TOL)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vjp_matches_finite_differences(case):
    head, _ = case_head(case)
    x = case_input(case)
    classes = [0, 1, 2]
    np.testing.assert_allclose(
        head.gradient(x, classes), finite_difference(head, x, classes), rtol=FD_RTOL, atol=FD_ATOL
    )


def test_max_pool_routes_ties_to_the_first_maximum_in_the_window():
    """torch's rule for equal values: the first in row order wins, each window on its own."""
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0  # the shared centre is the max of all four overlapping 2x2 windows
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = 0.5  # ties elsewhere do not matter
    head = GraphHead(
        [Op("MaxPool", ("x",), "scores", {"kernel_shape": [2, 2], "strides": [1, 1]})], {}, (-1, 1, 3, 3), "x"
    )
    g = head.gradient(x, [0, 1, 2, 3]).reshape(4, 3, 3)
    assert (g[:, 1, 1] == 1).all() and g.sum() == 4
    flat = GraphHead(
        [Op("MaxPool", ("x",), "scores", {"kernel_shape": [2, 2], "strides": [2, 2]})], {}, (-1, 1, 2, 2), "x"
    )
    assert flat.gradient(np.ones((1, 1, 2, 2)), [0]).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    glob = GraphHead([Op("GlobalMaxPool", ("x",), "scores")], {}, (-1, 1, 2, 2), "x")
    assert glob.gradient(np.array([0.0, 3.0, 3.0, 1.0]), [0]).tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.extras  # torch autograd is the reference
def test_reduce_max_shares_the_gradient_between_ties_as_torch_amax():
    import torch

    x = np.array([[1.0, 4.0, 4.0, 2.0]])
    head = GraphHead([Op("ReduceMax", ("x",), "scores", {"axes": [1], "keepdims": 1})], {}, (-1, 4), "x")
    t = torch.tensor(x, requires_grad=True)
    torch.amax(t, dim=1).sum().backward()
    np.testing.assert_array_equal(head.gradient(x, [0]), t.grad.numpy())


def test_two_computed_operands_with_a_batch_of_classes():
    """MatMul, Add and Concat where both operands depend on x, and Softmax on a middle axis: the class axis of
    the cotangent must broadcast against forward values of batch 1 on both sides."""
    ops = [
        Op("Gather", ("x", "zero"), "a", {"axis": 1}),  # [1, 3, 4]
        Op("Gather", ("x", "one"), "b", {"axis": 1}),
        Op("Transpose", ("b",), "bt", {"perm": [0, 2, 1]}),  # [1, 4, 3]
        Op("MatMul", ("a", "bt"), "s", {}),  # [1, 3, 3]
        Op("Softmax", ("s",), "p", {"axis": 1}),
        Op("MatMul", ("p", "a"), "o", {}),  # [1, 3, 4]
        Op("Add", ("o", "b"), "r", {}),
        Op("Concat", ("r", "a", "p"), "c", {"axis": 2}),  # [1, 3, 11]
        Op("Tanh", ("c",), "t", {}),
        Op("Flatten", ("t",), "f", {"axis": 1}),
        Op("Gemm", ("f", "w"), "scores", {"transB": 1}),
    ]
    arrays = {"zero": np.array(0), "one": np.array(1), "w": RNG.standard_normal((4, 33))}
    head = GraphHead(ops, arrays, (-1, 2, 3, 4), "x")
    x = RNG.standard_normal((1, 2, 3, 4))
    classes = [3, 0, 2]
    np.testing.assert_allclose(
        head.gradient(x, classes), finite_difference(head, x, classes), rtol=FD_RTOL, atol=FD_ATOL
    )


def test_side_inputs_are_constants_and_share_a_batch_of_one():
    ops = [
        Op("Mul", ("x", "r"), "m"),
        Op("Add", ("m", "r"), "a"),
        Op("Tanh", ("r",), "tr"),  # depends on the side only: a constant for the gradient
        Op("Mul", ("a", "tr"), "u"),
        Op("ReduceSum", ("u",), "scores", {"axes": [2], "keepdims": 0}),
    ]
    head = GraphHead(ops, {}, (-1, 3, 2), "x", sides={"r": (-1, 3, 2)})
    x, r = RNG.standard_normal((1, 3, 2)), RNG.standard_normal((1, 3, 2))
    g = head.gradient(x, [0, 2], {"r": r})
    np.testing.assert_allclose(g, finite_difference(head, x, [0, 2], {"r": r}), rtol=FD_RTOL, atol=FD_ATOL)
    want = np.zeros((2, 3, 2))
    want[0, 0], want[1, 2] = r[0, 0] * np.tanh(r[0, 0]), r[0, 2] * np.tanh(r[0, 2])
    np.testing.assert_allclose(g.reshape(2, 3, 2), want, rtol=1e-15)
    batch = RNG.standard_normal((4, 3, 2))
    rows = np.vstack([head.forward_float64(row[None], {"r": r}) for row in batch])
    np.testing.assert_array_equal(head.forward_float64(batch, {"r": r}), rows)
    with pytest.raises(ValueError, match="side input 'r'"):
        head.forward(x)


def test_shapes_over_the_budget_are_refused_before_anything_runs():
    side = int(math.isqrt(MAX_VALUES)) + 1
    with pytest.raises(ValueError, match="its windows"):  # the im2col copy of a huge kernel on a huge map
        infer_shapes([Op("Conv", ("x", "w"), "y", {"pads": [60, 60, 60, 60]})], {"w": np.zeros((1, 64, 121, 121))},
                     {"x": (-1, 64, 128, 128)})  # fmt: skip
    with pytest.raises(ValueError, match="its padded input"):  # a small output of a huge padded map
        infer_shapes([Op("MaxPool", ("x",), "y", {"kernel_shape": [1], "strides": [10**9], "pads": [0, 10**9]})], {},
                     {"x": (-1, 2, 4)})  # fmt: skip
    with pytest.raises(ValueError, match="its padded input"):
        infer_shapes([Op("AveragePool", ("x",), "y", {"kernel_shape": [1], "strides": [1], "pads": [0, 10**9],
                     "count_include_pad": 1})], {}, {"x": (-1, 2, 4)})  # fmt: skip
    with pytest.raises(ValueError, match="side input 's'"):
        infer_shapes([], {}, {"x": (-1, 4)}, {"s": (-1, side, side)})
    with pytest.raises(ValueError, match="empty"):
        infer_shapes([Op("Slice", ("x",), "y", {"starts": [3], "ends": [1], "axes": [1]})], {}, {"x": (-1, 4)})
    with pytest.raises(ValueError, match="op Pad .* pads must be an attribute"):
        infer_shapes([Op("Pad", ("x", "p"), "y")], {"p": np.zeros(4, np.int64)}, {"x": (-1, 4)})
    with pytest.raises(ValueError, match="groups"):
        infer_shapes([Op("Conv", ("x", "w"), "y", {"group": 2})], {"w": np.zeros((3, 2, 1, 1))}, {"x": (-1, 4, 3, 3)})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_erf_is_accurate_to_a_few_ulps(dtype):
    """Against the C library's erf (correctly rounded to within 1 ulp) on a dense grid over every piece."""
    x = np.concatenate([np.linspace(-7, 7, 200_001), np.geomspace(1e-300, 1, 1000), [0.0, -0.0, 1.0, 3.0, 6.0]])
    want = np.array([math.erf(v) for v in x])
    got = erf(x.astype(dtype))
    assert got.dtype == dtype
    if dtype == np.float64:
        assert np.abs(got - want).max() <= 2e-15  # ~10 ulp of 1: exp(-x^2)'s rounding in erfc
        small = np.abs(x) < 1
        assert (np.abs(got - want)[small] <= 4e-15 * np.abs(want[small])).all()
    else:
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=4e-7, atol=2e-7)  # a few float32 ulps
    assert np.isnan(erf(np.array([np.nan])))[0] and erf(np.array([-np.inf, np.inf])).tolist() == [-1.0, 1.0]


# A ViT's last block, cut after its first LayerNorm: the head's input is norm1's output, the side input the
# block's input (the residual stream), as pytorch-grad-cam's blocks[-1].norm1 hook sees it.

L, D, HEADS, MLP, K = 5, 8, 2, 16, 4  # 1 CLS token + a 2x2 patch grid


def vit_weights() -> dict[str, np.ndarray]:
    r = np.random.default_rng(7)
    return {
        "wqkv": r.standard_normal((D, 3 * D)) / math.sqrt(D), "bqkv": r.standard_normal(3 * D) * 0.1,
        "wo": r.standard_normal((D, D)) / math.sqrt(D), "bo": r.standard_normal(D) * 0.1,
        "g2": r.uniform(0.5, 1.5, D), "b2": r.standard_normal(D) * 0.1,
        "w1": r.standard_normal((D, MLP)) / math.sqrt(D), "b1": r.standard_normal(MLP) * 0.1,
        "w2": r.standard_normal((MLP, D)) / math.sqrt(MLP), "bm": r.standard_normal(D) * 0.1,
        "g3": r.uniform(0.5, 1.5, D), "b3": r.standard_normal(D) * 0.1,
        "wh": r.standard_normal((K, D)), "bh": r.standard_normal(K) * 0.1,
        "scale": np.array(1 / math.sqrt(D // HEADS)), "cls": np.array(0, np.int64),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64),
        "sqrt2": np.array(math.sqrt(2)), "one": np.array(1.0), "half": np.array(0.5),
    }  # fmt: skip


def vit_ops(gelu: str) -> list[Op]:
    """The block as torch's exporter writes timm's Attention and Mlp (the batch moves to axis 1 and back)."""
    if gelu == "Gelu":
        mlp = [Op("Gelu", ("h1",), "h2")]
    else:  # before opset 20: x * 0.5 * (1 + erf(x / sqrt 2))
        mlp = [
            Op("Div", ("h1", "sqrt2"), "e0"),
            Op("Erf", ("e0",), "e1"),
            Op("Add", ("e1", "one"), "e2"),
            Op("Mul", ("h1", "e2"), "e3"),
            Op("Mul", ("e3", "half"), "h2"),
        ]
    return [
        Op("MatMul", ("x", "wqkv"), "q0"),
        Op("Add", ("q0", "bqkv"), "q1"),
        Op("Reshape", ("q1",), "q2", {"shape": [-1, L, 3, HEADS, D // HEADS]}),
        Op("Transpose", ("q2",), "q3", {"perm": [2, 0, 3, 1, 4]}),  # [3, B, H, L, d]
        Op("Gather", ("q3", "i0"), "q", {"axis": 0}),
        Op("Gather", ("q3", "i1"), "k", {"axis": 0}),
        Op("Gather", ("q3", "i2"), "v", {"axis": 0}),
        Op("Transpose", ("k",), "kt", {"perm": [0, 1, 3, 2]}),
        Op("MatMul", ("q", "kt"), "s0"),
        Op("Mul", ("s0", "scale"), "s1"),
        Op("Softmax", ("s1",), "p", {"axis": -1}),
        Op("MatMul", ("p", "v"), "o0"),
        Op("Transpose", ("o0",), "o1", {"perm": [0, 2, 1, 3]}),
        Op("Reshape", ("o1",), "o2", {"shape": [-1, L, D]}),
        Op("MatMul", ("o2", "wo"), "o3"),
        Op("Add", ("o3", "bo"), "o4"),
        Op("Add", ("r", "o4"), "r1"),  # the residual: the side input
        Op("LayerNormalization", ("r1", "g2", "b2"), "n2", {"axis": -1, "epsilon": 1e-6}),
        Op("MatMul", ("n2", "w1"), "h0"),
        Op("Add", ("h0", "b1"), "h1"),
        *mlp,
        Op("MatMul", ("h2", "w2"), "m0"),
        Op("Add", ("m0", "bm"), "m1"),
        Op("Add", ("r1", "m1"), "r2"),
        Op("LayerNormalization", ("r2", "g3", "b3"), "n3", {"axis": -1, "epsilon": 1e-6}),
        Op("Gather", ("n3", "cls"), "c", {"axis": 1}),
        Op("Gemm", ("c", "wh", "bh"), "scores", {"transB": 1}),
    ]


def onnx_of(ops: list[Op], arrays: dict[str, np.ndarray]) -> list:
    """The same ops as ONNX nodes (the exporter's attrs back to opset 17's inputs where ONNX wants them)."""
    nodes = []
    for o in ops:
        attrs = dict(o.attrs)
        inputs = list(o.inputs)
        if o.op == "Reshape":
            name = f"{o.output}_shape"
            arrays[name] = np.array(attrs.pop("shape"), np.int64)
            inputs.append(name)
        nodes.append(helper.make_node(o.op, inputs, [o.output], **attrs))
    return nodes


def torch_vit_block(w: dict[str, np.ndarray], x, r, gelu: str):
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in w.items()}
    qkv = (x @ t["wqkv"] + t["bqkv"]).reshape(-1, L, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5, dim=-1)
    r1 = r + ((attn @ v).transpose(1, 2).reshape(-1, L, D) @ t["wo"] + t["bo"])
    h = F.gelu(F.layer_norm(r1, (D,), t["g2"], t["b2"], eps=1e-6) @ t["w1"] + t["b1"])
    r2 = r1 + (h @ t["w2"] + t["bm"])
    return F.layer_norm(r2, (D,), t["g3"], t["b3"], eps=1e-6)[:, 0] @ t["wh"].T + t["bh"]


@pytest.mark.extras  # torch autograd is the reference
@pytest.mark.parametrize("gelu", ["Gelu", "Erf"])
def test_vit_last_block_against_onnxruntime_and_torch_autograd(gelu):
    import torch

    w = vit_weights()
    ops = vit_ops(gelu)
    head = GraphHead(ops, w, (-1, L, D), "x", sides={"r": (-1, L, D)})
    r = np.random.default_rng(3)
    x, res = r.standard_normal((2, L, D)), r.standard_normal((2, L, D))
    # forward: onnxruntime on the ONNX graph of the same nodes, float32 (tolerance as for one op: sums of at
    # most 16 terms through ~25 ops, each within a few float32 ulps relative)
    inits = dict(w)
    want = run_ort(onnx_of(ops, inits), {"x": x, "r": res}, inits, "scores", 20 if gelu == "Gelu" else 17)
    np.testing.assert_allclose(head.forward_float64(x, {"r": res}), want, rtol=1e-4, atol=1e-4)
    # gradient: torch autograd, float64 on both sides (rounding only, ~1e-14; 1e-10 allows for conditioning)
    for i in range(2):
        xt = torch.tensor(x[i : i + 1], requires_grad=True)
        scores = torch_vit_block(w, xt, torch.from_numpy(res[i : i + 1]), gelu)
        classes = [2, 0, 3]
        want_g = np.stack(
            [torch.autograd.grad(scores[0, c], xt, retain_graph=True)[0].numpy().ravel() for c in classes]
        )
        got = head.gradient(x[i], classes, {"r": res[i : i + 1]})
        trace = head.trace(x[i], {"r": res[i : i + 1]})
        np.testing.assert_array_equal(head.gradient(None, classes, trace=trace), got)
        np.testing.assert_array_equal(trace["scores"], head.forward_float64(x[i], {"r": res[i]}))
        np.testing.assert_allclose(got, want_g, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(head.forward_float64(x[i], {"r": res[i]}), scores.detach().numpy(), rtol=1e-12)
        # float32 precision: float32 rounding (6e-8) through the block, amplified by the LayerNorms and
        # the softmax: 1e-4 of the gradient's scale
        head32 = GraphHead(ops, w, (-1, L, D), "x", sides={"r": (-1, L, D)}, precision="float32")
        got32 = head32.gradient(x[i], classes, {"r": res[i : i + 1]})
        assert got32.dtype == np.float64
        np.testing.assert_allclose(got32, want_g, rtol=0, atol=1e-4 * np.abs(want_g).max())


@pytest.mark.extras  # torch autograd is the reference
def test_vgg_like_flatten_head_against_onnxruntime_and_torch_autograd():
    """conv 3x3 -> ReLU -> MaxPool 2 -> Flatten -> Linear -> ReLU -> Linear, cut before the conv."""
    import torch
    import torch.nn.functional as F

    r = np.random.default_rng(11)
    w = {
        "cw": r.standard_normal((6, 4, 3, 3)) / 6, "cb": r.standard_normal(6) * 0.1,
        "w1": r.standard_normal((10, 6 * 3 * 3)) / 7, "b1": r.standard_normal(10) * 0.1,
        "w2": r.standard_normal((5, 10)) / 3, "b2": r.standard_normal(5) * 0.1,
    }  # fmt: skip
    ops = [
        Op("Conv", ("x", "cw", "cb"), "c", {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}),
        Op("Relu", ("c",), "c1"),
        Op("MaxPool", ("c1",), "p", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        Op("Flatten", ("p",), "f", {"axis": 1}),
        Op("Gemm", ("f", "w1", "b1"), "h", {"transB": 1}),
        Op("Relu", ("h",), "h1"),
        Op("Gemm", ("h1", "w2", "b2"), "scores", {"transB": 1}),
    ]
    head = GraphHead(ops, w, (-1, 4, 6, 7), "x")
    x = r.standard_normal((2, 4, 6, 7))
    want = run_ort(onnx_of(ops, dict(w)), {"x": x}, w, "scores", 17)
    np.testing.assert_allclose(head.forward_float64(x), want, rtol=ORT_TOL, atol=ORT_TOL)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    xt = torch.tensor(x[:1], requires_grad=True)
    p = F.max_pool2d(F.relu(F.conv2d(xt, t["cw"], t["cb"], padding=1)), 2)
    scores = F.relu(p.flatten(1) @ t["w1"].T + t["b1"]) @ t["w2"].T + t["b2"]
    want_g = np.stack([torch.autograd.grad(scores[0, c], xt, retain_graph=True)[0].numpy().ravel() for c in range(5)])
    np.testing.assert_allclose(head.gradient(x[0], range(5)), want_g, rtol=1e-10, atol=1e-13)


BATCH_FIRST = [c for c in CASES if c.op != "Gemm" and not (c.op == "Transpose" and c.attrs["perm"][0] != 0)]


@pytest.mark.parametrize("case", BATCH_FIRST, ids=repr)
def test_a_batch_gives_each_image_its_own_scores(case):
    """Constants of batch 1 (a CLS token to Concat) broadcast; nothing mixes images. Equal to rounding: a
    matrix product over N rows may sum in another order than over one."""
    head, _ = case_head(case, flatten=True)
    x = RNG.standard_normal((3, *case.shape[1:]))
    rows = np.vstack([head.forward_float64(row[None]) for row in x])
    np.testing.assert_allclose(head.forward_float64(x), rows, rtol=1e-13, atol=1e-13)


def test_recommended_precision_is_float32_only_for_big_spatial_and_token_heads():
    from npcam.head import FLOAT32_WORK, recommended_precision

    small = GraphHead(vit_ops("Gelu"), vit_weights(), (-1, L, D), "x", sides={"r": (-1, L, D)})
    assert recommended_precision(small, "tokens") == "float64"
    wide = 1 + FLOAT32_WORK // 512
    ops = [Op("Flatten", ("x",), "f"), Op("Gemm", ("f", "w"), "scores", {"transB": 1})]
    big = GraphHead(ops, {"w": np.zeros((wide, 512), np.float32)}, (-1, 32, 4, 4), "x")
    assert recommended_precision(big, "spatial") == "float32"
    assert recommended_precision(big, "pooled") == "float64"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float32_heads_compute_in_float32(case, monkeypatch):
    """Nothing upcasts a float32 head to float64 on the way, forward or backward (which would be as slow as
    float64), and its gradient is the float64 one to float32 rounding: each value is a sum of at most a few
    hundred O(1) terms, within ~100 eps32 = 1.2e-5 of the largest; the test allows 1e-4."""
    import npcam.head

    def checked(rule):
        def backward(a, at, y, dy, v):
            grads = rule.backward(a, at, y, dy, v)
            assert all(g.dtype == y.dtype == dy.dtype for g in grads if g is not None)
            return grads

        return npcam.head.Rule(rule.forward, backward, rule.shape)

    for name, rule in list(npcam.head.OPS.items()):
        monkeypatch.setitem(npcam.head.OPS, name, checked(rule))
    head64, _ = case_head(case)
    head32 = GraphHead(head64.ops, head64.arrays, head64.input_shape, "x", precision="float32")
    x = case_input(case)
    values = head32._run(x.reshape(1, -1))
    assert values and {n: v.dtype for n, v in values.items()} == {n: np.dtype(np.float32) for n in values}
    g64, g32 = head64.gradient(x, [0, 2]), head32.gradient(x, [0, 2])
    assert g32.dtype == np.float64
    np.testing.assert_allclose(g32, g64, rtol=0, atol=1e-4 * np.abs(g64).max())


def test_a_head_of_several_inputs_has_each_inputs_exact_gradient():
    """A detector's head takes one map per stride: two maps of different sizes, each through its own 1x1 conv,
    flattened and joined. Each input's vector-Jacobian product against central differences (FD tolerances as
    above), and zero where an input does not reach the output."""
    rng = np.random.default_rng(3)
    arrays = {"w1": rng.normal(size=(6, 3, 1, 1)), "w2": rng.normal(size=(6, 5, 1, 1)), "w3": rng.normal(size=(1, 2, 1, 1))}
    ops = [
        Op("Conv", ("a", "w1"), "ca"),
        Op("Conv", ("b", "w2"), "cb"),
        Op("Sigmoid", ("ca",), "sa"),
        Op("Reshape", ("sa",), "ra", {"shape": [1, 6, -1]}),
        Op("Reshape", ("cb",), "rb", {"shape": [1, 6, -1]}),
        Op("Concat", ("ra", "rb"), "out", {"axis": 2}),
        Op("Conv", ("c", "w3"), "unused"),
    ]
    inputs = {"a": (-1, 3, 4, 4), "b": (-1, 5, 2, 2), "c": (-1, 2, 2, 2)}
    head = GraphHead(ops, arrays, None, output="out", layout="spatial", inputs=inputs)
    assert (head.input, head.input_shape, head.output_shape, head.classes) == ("a", (-1, 3, 4, 4), (1, 6, 20), 120)
    x = {name: rng.normal(size=(1, *shape[1:])) for name, shape in inputs.items()}
    seed = rng.normal(size=(2, 1, 6, 20))
    got = head.vjp_inputs(x, seed)
    np.testing.assert_array_equal(got["a"], head.vjp(x, seed))
    assert not got["c"].any() and got["c"].shape == (2, 8)
    step = 1e-6
    for name in ("a", "b"):
        for i in range(x[name].size):
            up, down = ({k: v.copy() for k, v in x.items()} for _ in range(2))
            up[name].flat[i] += step
            down[name].flat[i] -= step
            change = head.forward_float64(up) - head.forward_float64(down)
            want = seed.reshape(2, -1) @ change[0] / (2 * step)
            np.testing.assert_allclose(got[name][:, i], want, rtol=FD_RTOL, atol=FD_ATOL)
    with pytest.raises(ValueError, match="takes the inputs"):
        head.forward(x["a"])
