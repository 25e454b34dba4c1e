"""Which integers onnxruntime's int8 convolution kernels compute on this CPU.

    python scripts/int8_kernels.py [--json]

One quantized convolution (QuantizeLinear -> DequantizeLinear -> Conv -> QuantizeLinear, which onnxruntime
fuses into QLinearConv), with activations over the whole 8-bit range and int8 weights over theirs, as an int8
TFLite model has them. It runs as ``u8s8`` (uint8 activations, int8 weights: what onnxruntime makes of an
int8 QDQ graph on x86) and as ``u8u8`` (weights + 128 with zero point 128, as export/unsigned.py writes
them), and is compared, in output steps, with:

- the exact integer arithmetic, in NumPy (int64 sums, the requantization in float64);
- the ``vpmaddubsw`` model: uint8 x int8 products added in pairs of adjacent input channels into int16 with
  saturation, then widened and summed (onnxruntime's AVX2 and AVX-512 ``u8s8`` kernels without VNNI).

On an AVX2 CPU without VNNI the ``u8s8`` run matches the saturating model and lies many steps from the exact
one; with VNNI, on aarch64, or on SSE-only x86 it matches the exact one. ``u8u8`` matches the exact one
everywhere (its kernels widen to 16 bits before they multiply). A cell may be one step off where the exact
value lies within float32 rounding of a rounding boundary (onnxruntime requantizes in float32).
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CHANNELS, OUT, SIZE = 16, 16, 12
SCALE_IN, ZERO_IN, SCALE_OUT, ZERO_OUT = 0.02, -3, 0.05, -10  # int8 zero points, as TFLite writes them


def _model(weights: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray, unsigned_weights: bool) -> bytes:
    """The QDQ convolution with uint8 activations, int8 weights or (``unsigned_weights``) uint8 ones."""
    shift = 128 if unsigned_weights else 0
    dtype = np.uint8 if unsigned_weights else np.int8
    initializers = [
        numpy_helper.from_array((weights.astype(np.int16) + shift).astype(dtype), "w"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.full(OUT, shift, dtype), "w_zero"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array((weight_scale * np.float32(SCALE_IN)).astype(np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(OUT, np.int32), "b_zero"),
        numpy_helper.from_array(np.array(SCALE_IN, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(ZERO_IN + 128, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array(SCALE_OUT, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(ZERO_OUT + 128, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zero"], ["bf"], axis=0),
        helper.make_node("Conv", ["xf", "wf", "bf"], ["yf"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, OUT, SIZE, SIZE])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _sums(q_plus_128: np.ndarray, weights: np.ndarray, saturate: bool) -> np.ndarray:
    """``sum (q + 128) w`` over 3x3 windows (the uint8 values, padded with the zero point), int64
    ``[1, OUT, SIZE, SIZE]``; ``saturate``: products added in pairs of channels into int16 first."""
    padded = np.pad(q_plus_128, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=ZERO_IN + 128)
    total = np.zeros((1, OUT, SIZE, SIZE), np.int64)
    for i in range(3):
        for j in range(3):
            window = padded[:, None, :, i : i + SIZE, j : j + SIZE]  # [1, 1, C, H, W]
            products = window * weights[None, :, :, i, j, None, None].astype(np.int64)  # [1, OUT, C, H, W]
            if saturate:
                products = np.clip(products[:, :, 0::2] + products[:, :, 1::2], -32768, 32767)
            total += products.sum(axis=2)
    return total


def run(seed: int = 0) -> dict:
    """The experiment: for each run, the largest distance in output steps from each model, and the fraction
    of cells off; also the CPU and how many channel pairs pass the int16 range."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(-127, 128, (OUT, CHANNELS, 3, 3)).astype(np.int8)
    weight_scale = rng.uniform(0.001, 0.003, OUT).astype(np.float32)
    bias = rng.integers(-2000, 2000, OUT).astype(np.int32)
    x = rng.uniform(-128 * SCALE_IN, 127 * SCALE_IN, (1, CHANNELS, SIZE, SIZE)).astype(np.float32)
    q = np.clip(np.round(x / np.float32(SCALE_IN)) + ZERO_IN, -128, 127).astype(np.int64) + 128  # uint8 values
    rescale = (weight_scale.astype(np.float64) * SCALE_IN / SCALE_OUT)[None, :, None, None]
    weight_sums = weights.astype(np.int64).sum(axis=(1, 2, 3))[None, :, None, None]
    models = {}
    for name, saturate in (("exact", False), ("vpmaddubsw", True)):
        sums = _sums(q, weights, saturate) - (ZERO_IN + 128) * weight_sums + bias[None, :, None, None]
        models[name] = np.clip(np.round(sums * rescale) + ZERO_OUT + 128, 0, 255)
    # how often a channel pair's uint8 x int8 sum leaves int16 (the kernel's centre tap)
    products = q[:, None] * weights[None, :, :, 1, 1, None, None].astype(np.int64)
    pairs = products[:, :, 0::2] + products[:, :, 1::2]
    result = {
        "cpu": platform.machine(),
        "pairs_beyond_int16": float(np.mean(np.abs(pairs) > 32767)),
    }
    for kernels, unsigned in (("u8s8", False), ("u8u8", True)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            _model(weights, weight_scale, bias, unsigned), options, providers=["CPUExecutionProvider"]
        )
        got = session.run(None, {"x": x})[0].astype(np.int64)
        result[kernels] = {
            name: {"max_steps": int(np.abs(got - want).max()), "cells_off": float(np.mean(got != want))}
            for name, want in models.items()
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    result = run()
    if parser.parse_args().json:
        print(json.dumps(result))
        return
    print(f"{result['cpu']}: {result['pairs_beyond_int16']:.1%} of channel pairs pass the int16 range")
    for kernels in ("u8s8", "u8u8"):
        line = ", ".join(
            f"vs {name}: {r['max_steps']} steps at most, {r['cells_off']:.1%} of cells off"
            for name, r in result[kernels].items()
        )
        print(f"{kernels}: {line}")


if __name__ == "__main__":
    main()
