"""GPTQ rounding of an int8 trunk's convolution weights: each weight's rounding error is compensated by the
weights not yet rounded, weighted by the second moments of the convolution's inputs on the calibration images.

Rounding to nearest makes each weight's error as small as it can be, but not the error of the convolution's
output, which is what the network passes on. GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023, after Optimal Brain Quantization) rounds an output
channel's weights one input at a time and spreads each rounding error over the inputs still to round, so
that ``E[(w - q) . x]^2`` stays small for the inputs ``x`` the convolution sees. It needs ``H = E[x x^T]``
per convolution (per group), measured here on the calibration images through the float model. The scales
and the integer range stay those onnxruntime's quantizer chose; only the integers change.

The objective and the algorithm are the paper's; this implementation is written for convolutions on NumPy
arrays: inputs are the convolution's windows (im2col), one ``H`` per group, depthwise convolutions batched.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DAMPING = 0.01  # of the mean diagonal of H, added to it: H from a few images is singular for wide layers
BLOCK = 128  # columns rounded together before their error is passed to the rest (a BLAS-sized update)


def _attribute(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.type == onnx.AttributeProto.INTS else a.i
    return default


def windows(x: np.ndarray, conv: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray:
    """The input windows a Conv multiplies with its weights: float ``[C, H, W]`` to ``[C, kh*kw, P]``
    (``P`` output positions, in the weights' own (kh, kw) order)."""
    kh, kw = kernel
    strides = _attribute(conv, "strides", [1, 1])
    pads = _attribute(conv, "pads", [0, 0, 0, 0])
    dilations = _attribute(conv, "dilations", [1, 1])
    padded = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = ((kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1)
    view = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(1, 2))
    view = view[:, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]  # C, H', W', kh, kw
    channels = x.shape[0]
    return view.reshape(channels, -1, kh * kw).transpose(0, 2, 1)


def second_moments(model: onnx.ModelProto, convs: list[onnx.NodeProto], inputs: list[np.ndarray],
                   input_name: str = "image") -> dict[str, np.ndarray]:
    """``H = E[x x^T]`` over the input windows of each of ``convs`` (nodes of the float ``model``), per group:
    float64 ``[G, K, K]`` with ``K = C/G * kh * kw`` in the weights' (c, kh, kw) order.

    ``inputs``: float32 ``[1, 3, H, W]`` network inputs, run one at a time.
    """
    probe = copy.deepcopy(model)
    have = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(c.input[0] for c in convs):
        if name not in have:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    weights = {i.name: i.dims for i in model.graph.initializer}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for x in inputs:
        values = dict(zip(names, session.run(None, {input_name: x})))
        for conv in convs:
            dims = weights[conv.input[1]]
            groups = _attribute(conv, "group", 1)
            patches = windows(values[conv.input[0]][0].astype(np.float64), conv, (dims[2], dims[3]))
            grouped = patches.reshape(groups, -1, patches.shape[2])  # G, C/G * kh*kw, P
            sums[conv.name] = sums.get(conv.name, 0) + np.matmul(grouped, grouped.transpose(0, 2, 1))
            counts[conv.name] = counts.get(conv.name, 0) + patches.shape[2]
    return {name: sums[name] / counts[name] for name in sums}


def gptq(targets: np.ndarray, moments: np.ndarray, qmin: int, qmax: int, damping: float = DAMPING) -> np.ndarray:
    """Integers for ``targets`` (float64 ``[G, M, K]``: the weights over their scale, plus their zero point)
    that keep ``(t - q) . x`` small for inputs of second moments ``moments`` (``[G, K, K]``): int64
    ``[G, M, K]`` in ``[qmin, qmax]``.

    Columns are rounded in order of decreasing ``H`` diagonal (the inputs with most energy first, as GPTQ's
    "act order"), in blocks of ``BLOCK``; a column no input ever reached (zero diagonal) is rounded to nearest.
    """
    groups, rows, columns = targets.shape
    out = np.empty(targets.shape, np.int64)
    for g in range(groups):
        h = moments[g].copy()
        dead = np.diag(h) <= 0
        h[dead, dead] = 1.0
        order = np.argsort(-np.diag(h), kind="stable")
        w = targets[g][:, order].copy()
        h = h[np.ix_(order, order)]
        h[np.diag_indices(columns)] += damping * np.mean(np.diag(h))
        # The upper Cholesky factor of H^-1: its row j passes column j's error on to the columns after it.
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
        q = np.empty_like(w)
        for start in range(0, columns, BLOCK):
            end = min(start + BLOCK, columns)
            errors = np.empty((rows, end - start))
            for j in range(start, end):
                q[:, j] = np.clip(np.round(w[:, j]), qmin, qmax)
                errors[:, j - start] = (w[:, j] - q[:, j]) / upper[j, j]
                w[:, j + 1 : end] -= np.outer(errors[:, j - start], upper[j, j + 1 : end])
            w[:, end:] -= errors @ upper[start:end, end:]
        out[g][:, order] = q.astype(np.int64)
    return out


def round_weights(quantized: onnx.ModelProto, original: onnx.ModelProto, inputs: list[np.ndarray],
                  reduce_range: bool = False, damping: float = DAMPING) -> int:
    """Re-round, in place, the integer weights of every Conv of the QDQ model ``quantized`` whose weights come
    through a DequantizeLinear of an initializer (per output channel or per tensor), by :func:`gptq` with
    ``H`` measured on ``inputs`` through ``original``, the float model ``quantized`` was made from (the same
    node names). The integer range is the quantizer's: signed weights symmetric, 7-bit with ``reduce_range``.
    Returns how many Convs were re-rounded.
    """
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    initializers = {i.name: i for i in quantized.graph.initializer}
    made_by = {o: n for n in quantized.graph.node for o in n.output}
    float_convs = {n.name: n for n in original.graph.node if n.op_type == "Conv"}
    float_weights = {i.name: i for i in original.graph.initializer}
    jobs = []
    for conv in quantized.graph.node:
        if conv.op_type != "Conv" or conv.name not in float_convs:
            continue
        dq, source = made_by.get(conv.input[1]), float_convs[conv.name]
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        if source.input[1] not in float_weights or any(i not in initializers for i in dq.input[1:]):
            continue
        rows = float_weights[source.input[1]].dims[0]
        scale = numpy_helper.to_array(initializers[dq.input[1]])
        if scale.size != 1 and (scale.size != rows or _attribute(dq, "axis", 1) != 0):
            continue  # blocked or along another axis: not what quantize_static writes for a Conv
        jobs.append((dq, source))
    if not jobs:
        return 0
    moments = second_moments(original, [source for _, source in jobs], inputs)
    for dq, source in jobs:
        stored = initializers[dq.input[0]]
        integers = numpy_helper.to_array(stored)
        weights = numpy_helper.to_array(float_weights[source.input[1]]).astype(np.float64)
        rows = weights.shape[0]
        scale = np.broadcast_to(numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float64).ravel(), (rows,))
        zero = numpy_helper.to_array(initializers[dq.input[2]]) if len(dq.input) > 2 else np.zeros(1)
        targets = weights.reshape(rows, -1) / scale[:, None] + np.broadcast_to(zero.astype(np.float64).ravel(), (rows,))[:, None]
        signed = stored.data_type == TensorProto.INT8
        qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(stored.data_type, reduce_range, symmetric=signed))
        h = moments[source.name]
        q = gptq(targets.reshape(h.shape[0], rows // h.shape[0], -1), h, qmin, qmax, damping)
        stored.CopyFrom(numpy_helper.from_array(q.reshape(integers.shape).astype(integers.dtype), stored.name))
    return len(jobs)
