"""An int8 QDQ graph rewritten to uint8: the same integers, computed exactly by onnxruntime on every CPU.

A QDQ graph with int8 activations and int8 weights (what tf2onnx writes for an int8 TFLite model) is run by
onnxruntime's fused int8 kernels. On x86 CPUs without VNNI onnxruntime first turns the int8 activations into
uint8 and runs the convolutions in its ``u8s8`` kernels. Those multiply with ``vpmaddubsw``, which adds two
uint8 x int8 products into int16 with saturation (255 * 127 * 2 > 32767), so on AVX2 (and AVX-512 without VNNI)
the accumulations are not the integers the model defines. With VNNI (``vpdpbusd``) and on aarch64 they are.

Adding 128 to every int8 value and to its zero point changes no real value (``(q + 128) - (z + 128) = q - z``)
and makes every matrix product ``u8u8``. onnxruntime's ``u8u8`` kernels widen to 16 bits before they multiply
(``vpmaddwd``; ``vpdpbuud`` with AVX-VNNI-INT8; ``UDOT``/``UMULL`` on aarch64), so the int32 accumulations are
exact on every CPU, and the graph says so itself: the runtime needs no setting. docs/tflite-keras.md has the
measurements.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .graph import captured, constant_of, subgraphs, unique

SHIFT = 128  # int8 q -> uint8 q + 128, zero point z -> z + 128
# Ops that only move, select or compare int8 values: adding 128 to their int8 inputs adds 128 to their outputs.
# Which inputs carry values (the others are shapes, indices, axes); None: all of them.
MOVES: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,), "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Flatten": (0,), "Transpose": (0,),
    "Slice": (0,), "Split": (0,), "Gather": (0,), "Tile": (0,), "Expand": (0,), "DepthToSpace": (0,),
    "SpaceToDepth": (0,), "MaxPool": (0,), "Pad": (0, 2), "Concat": None,
}  # fmt: skip


def unsigned_int8(model: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, int]:
    """``model`` with its int8 activations and int8 weights as uint8 (values and zero points + 128).

    Parameters
    ----------
    model : the converted graph, with float input and output; modified in place and returned.
    source : the original file's name, for error messages.

    Returns
    -------
    (model, count): ``count`` is the number of int8 tensors rewritten, 0 for a graph without any.

    Raises
    ------
    ExportError : an int8 tensor read by an op that computes with its integers (not a DequantizeLinear, not a
        move of values), or an int8 graph with subgraphs, where the shift would change a result.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    taken = {*initializers, *producers, *(i.name for i in graph.input)}
    copies: dict[str, str] = {}  # an int8 constant's name -> its uint8 copy's (one copy however many read it)

    def int8_constant(name: str) -> np.ndarray | None:
        if name in initializers:
            value = numpy_helper.to_array(initializers[name])
        else:
            value = constant_of(producers[name]) if name in producers else None
        return value if value is not None and value.dtype == np.int8 else None

    def add(value: np.ndarray, base: str) -> str:
        name = unique(base, taken)
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def shift(node: onnx.NodeProto, i: int) -> bool:
        """Point ``node.input[i]`` at the uint8 copy of the int8 constant it reads; False if it reads none."""
        name = node.input[i] if i < len(node.input) else ""
        value = int8_constant(name) if name else None
        if value is None:
            return False
        if name not in copies:
            copies[name] = add((value.astype(np.int16) + SHIFT).astype(np.uint8), f"{name}_uint8")
        node.input[i] = copies[name]
        return True

    # Where int8 values start: QuantizeLinear outputs (an int8 zero point), and dequantized int8 constants (weights).
    starts: list[str] = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and shift(node, 2):
            starts.append(node.output[0])
        elif node.op_type == "DequantizeLinear" and shift(node, 0):
            shift(node, 2)
    if not starts:
        _drop_unread(graph, set(copies))
        return model, len(copies)
    if any(subgraphs(n) for n in graph.node):
        raise ExportError(f"{source}: an int8 graph with control flow (If, Loop, Scan) is not supported")

    reached: set[str] = set()
    while starts:
        name = starts.pop()
        if name in reached:
            continue
        reached.add(name)
        for node in consumers.get(name, []):
            if node.op_type == "DequantizeLinear" and node.input[0] == name:
                if not shift(node, 2) and (len(node.input) < 3 or node.input[2] not in copies.values()):
                    raise ExportError(f"{source}: the int8 tensor {name!r} is dequantized without an int8 zero point")
                continue
            carried = MOVES.get(node.op_type, ())
            carried = range(len(node.input)) if carried is None else carried
            if not any(i < len(node.input) and node.input[i] == name for i in carried):
                raise ExportError(
                    f"{source}: the int8 tensor {name!r} is read by {node.op_type} {node.name!r}, which computes with "
                    "its integers, so npcam cannot run this int8 graph in exact integer kernels"
                )
            for i in carried:
                if i < len(node.input) and node.input[i] not in reached:
                    shift(node, i)  # an int8 constant beside the activation (a Concat input, a Pad's value)
            if node.op_type == "Pad" and _pads_with_default_zero(node):
                node.input.extend([""] * (3 - len(node.input)))
                node.input[2] = add(np.array(SHIFT, np.uint8), f"{name}_pad_value_uint8")  # int8 0 is uint8 128
            starts.extend(o for o in node.output if o)
    if any(o.name in reached for o in graph.output):
        raise ExportError(f"{source}: the converted graph gives an int8 output (npcam needs real-valued scores)")
    for value in graph.value_info:
        if value.name in reached and value.type.tensor_type.elem_type == TensorProto.INT8:
            value.type.tensor_type.elem_type = TensorProto.UINT8
    _drop_unread(graph, set(copies))
    return model, len(reached) + len(copies)


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the int8 initializers in ``names`` that nothing reads any more (their uint8 copies replaced them),
    so that the weights are not stored twice."""
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    read |= {c for n in graph.node for g in subgraphs(n) for c in captured(g)}
    kept = [i for i in graph.initializer if i.name not in names or i.name in read]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _pads_with_default_zero(node: onnx.NodeProto) -> bool:
    """A constant-mode Pad without a value input pads with 0, which after the shift must be 128."""
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
    return mode == b"constant" and (len(node.input) < 3 or not node.input[2])
