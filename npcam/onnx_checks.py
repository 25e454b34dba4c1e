"""Checks on an ONNX trunk before onnxruntime sees it, by reading the protobuf wire format directly.

The bundle's reader (:mod:`npcam.bundle`) calls them: the runtime has no ``onnx`` package, and these need only
the bytes. Each refusal is one :class:`~npcam.errors.NpcamError` line naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import NpcamError

# The trunk is an ONNX ModelProto. onnxruntime reads a tensor whose data_location is EXTERNAL from a file
# named relative to the *working directory* when the model comes as bytes: the bytes hashed would not be
# the bytes run, and a bundle could read files beside wherever it runs. So a bundle's trunk must hold all
# its data. The walk below reads just enough of the protobuf wire format to find every tensor: which
# fields of which message hold sub-messages (field numbers from onnx.proto).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_SUBMESSAGES = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _TENSOR: {},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_MAX_NESTING = 64  # subgraphs in subgraphs; protobuf's own limit is 100


class _Malformed(Exception):
    pass


def check_self_contained(path: Path, model: bytes) -> None:
    """Refuse (one :class:`NpcamError` line naming ``path``) an ONNX model any of whose tensors is stored
    outside it: initializers, sparse initializers, Constant nodes, attributes of subgraphs and functions."""
    try:
        where = _external_tensor(memoryview(model), 0, len(model), _MODEL, 0)
    except _Malformed as e:
        raise NpcamError(f"{path}: not a usable ONNX model (malformed protobuf: {e})") from None
    if where is not None:
        name, location = where
        raise NpcamError(
            f"{path}: tensor {name!r} keeps its data in an external file ({location!r}); a bundle must hold all "
            f"its data (export the model again, or save it with onnx.save_model(..., save_as_external_data=False))"
        )


# A trunk's tensors that depend on no input (ConstantOfShape, Expand or Resize to a constant shape) are at
# most this many values (1 GiB in float32); real trunks' constants are their weights, far smaller. Beyond it
# onnxruntime would try to allocate them at the first image.
MAX_CONSTANT_VALUES = 2**28
_SHAPE_INPUT = {"ConstantOfShape": 0, "Expand": 1, "Resize": 3}  # the input that gives the output's shape
_INT64 = 7


def check_constant_shapes(path: Path, model: bytes) -> None:
    """Refuse an ONNX model with a node that makes a tensor of over :data:`MAX_CONSTANT_VALUES` values from
    a constant shape (an initializer or a Constant node), in the main graph or any subgraph."""
    try:
        found = _oversized(memoryview(model), 0, len(model), _MODEL, 0)
    except _Malformed as e:
        raise NpcamError(f"{path}: not a usable ONNX model (malformed protobuf: {e})") from None
    if found is not None:
        op, values = found
        raise NpcamError(
            f"{path}: its {op} node makes a tensor of {values:,} values from a constant shape, "
            f"over the limit of {MAX_CONSTANT_VALUES:,}"
        )


def _oversized(data: memoryview, start: int, end: int, kind: int, depth: int) -> tuple[str, int] | None:
    if depth > _MAX_NESTING:
        raise _Malformed(f"nested more than {_MAX_NESTING} deep")
    if kind == _GRAPH:
        shapes: dict[str, list[int]] = {}  # small int64 constants, by name
        uses: list[tuple[str, str]] = []  # (op_type, name of its shape input)
        for number, wire, value in _fields(data, start, end):
            if wire != 2:
                continue
            if number == 5:  # initializer
                name, ints = _small_int64(data, *value)
                if ints is not None:
                    shapes[name] = ints
            elif number == 1:  # node
                op, inputs, outputs, constant = _node(data, *value)
                if op == "Constant" and constant is not None and outputs:
                    shapes[outputs[0]] = constant
                if op in _SHAPE_INPUT and len(inputs) > _SHAPE_INPUT[op]:
                    uses.append((op, inputs[_SHAPE_INPUT[op]]))
        for op, name in uses:
            dims = shapes.get(name)
            if dims is not None and all(d >= 0 for d in dims) and math.prod(dims) > MAX_CONSTANT_VALUES:
                return op, math.prod(dims)
    children = _SUBMESSAGES[kind]
    for number, wire, value in _fields(data, start, end):
        if wire == 2 and number in children and children[number] != _TENSOR:
            found = _oversized(data, *value, children[number], depth + 1)
            if found is not None:
                return found
    return None


def _node(data: memoryview, start: int, end: int) -> tuple[str, list[str], list[str], list[int] | None]:
    """A NodeProto's op type, inputs, outputs and, for a Constant, its small int64 value."""
    op, inputs, outputs, constant = "", [], [], None
    for number, wire, value in _fields(data, start, end):
        if wire != 2:
            continue
        text = bytes(data[value[0] : value[1]])
        if number == 1:
            inputs.append(text.decode("utf-8", "replace"))
        elif number == 2:
            outputs.append(text.decode("utf-8", "replace"))
        elif number == 4:
            op = text.decode("utf-8", "replace")
        elif number == 5:  # an attribute: its tensor (field 5) holds a Constant's value
            for n, w, v in _fields(data, *value):
                if n == 5 and w == 2:
                    constant = _small_int64(data, *v)[1]
    return op, inputs, outputs, constant


def _small_int64(data: memoryview, start: int, end: int, most: int = 16) -> tuple[str, list[int] | None]:
    """A TensorProto's name and, if it is an int64 tensor of at most ``most`` values, the values."""
    name, dtype, raw, ints = "", None, None, []
    for number, wire, value in _fields(data, start, end):
        if number == 8 and wire == 2:
            name = bytes(data[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == 2 and wire == 0:
            dtype = value
        elif number == 9 and wire == 2:
            raw = value
        elif number == 7 and wire == 0:
            ints.append(value)
        elif number == 7 and wire == 2:
            i = value[0]
            while i < value[1] and len(ints) <= most:
                v, i = _varint(data, i, value[1])
                ints.append(v)
    if dtype != _INT64:
        return name, None
    if raw is not None:
        if (raw[1] - raw[0]) % 8 or raw[1] - raw[0] > 8 * most:
            return name, None
        return name, [int(v) for v in np.frombuffer(bytes(data[raw[0] : raw[1]]), dtype="<i8")]
    if len(ints) > most:
        return name, None
    return name, [v - (1 << 64) if v >= 1 << 63 else v for v in ints]


def _varint(data: memoryview, i: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed("a number runs past its message")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data: memoryview, start: int, end: int):
    """``(field number, wire type, value)`` of one message; a length-delimited value is its ``(start, end)``."""
    i = start
    while i < end:
        key, i = _varint(data, i, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i, end)
        elif wire == 1 or wire == 5:
            value, i = None, i + (8 if wire == 1 else 4)
        elif wire == 2:
            length, i = _varint(data, i, end)
            value, i = (i, i + length), i + length
        else:  # groups (3, 4) are not in onnx.proto
            raise _Malformed(f"wire type {wire}")
        if i > end:
            raise _Malformed("a field runs past its message")
        yield number, wire, value


def _external_tensor(data: memoryview, start: int, end: int, kind: int, depth: int) -> tuple[str, str] | None:
    """The (name, location) of the first tensor stored outside the model, in this message or below it."""
    if depth > _MAX_NESTING:
        raise _Malformed(f"nested more than {_MAX_NESTING} deep")
    if kind == _TENSOR:
        name, location, external = "", "", False
        for number, wire, value in _fields(data, start, end):
            if number == _TENSOR_DATA_LOCATION and wire == 0 and value != 0:
                external = True
            elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
                external = True
                entry = dict(
                    (n, bytes(data[v[0] : v[1]]).decode("utf-8", "replace"))
                    for n, w, v in _fields(data, *value)
                    if w == 2
                )  # StringStringEntryProto: key = 1, value = 2
                if entry.get(1) == "location":
                    location = entry.get(2, "")
            elif number == _TENSOR_NAME and wire == 2:
                name = bytes(data[value[0] : value[1]]).decode("utf-8", "replace")
        return (name, location) if external else None
    children = _SUBMESSAGES[kind]
    for number, wire, value in _fields(data, start, end):
        if wire == 2 and number in children:
            found = _external_tensor(data, *value, children[number], depth + 1)
            if found is not None:
                return found
    return None
