"""One index over an ONNX graph, built once per model: producers, consumers, constants, shapes, chain matching.

Every stage of :mod:`export.split` reads the graph through a :class:`GraphIndex`
instead of rescanning ``graph.node``. Control flow is part of the index: a
node's inputs include the outer tensors its subgraphs read without listing
them (*captured* tensors, as tf2onnx writes ``If`` branches), so that
dependency walks, trunk extraction and the head's kinds see them.
:func:`inline_constant_ifs` removes the ``If`` nodes whose condition is a
constant (Keras' ``keras_learning_phase``) before anything else looks at the graph.
The passes over a whole graph are here too: :func:`fuse_pads` (exact) and :func:`float_nodes` (which nodes
an int8 setting keeps in float).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A value's dimensions: numbers where static, the symbol (or ``"?"``) where not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name``, else ``default``."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``taken``."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node's attributes hold (If branches, Loop and Scan bodies)."""
    found = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            found.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            found.extend(a.graphs)
    return found


def captured(graph: onnx.GraphProto) -> list[str]:
    """Outer tensors a subgraph reads without defining them (nested subgraphs included), in first-use order."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    found: dict[str, None] = {}
    for node in graph.node:
        for name in [*node.input, *(c for g in subgraphs(node) for c in captured(g))]:
            if name and name not in defined:
                found[name] = None
        defined.update(node.output)
    return [o.name for o in graph.output if o.name not in defined and o.name not in found] + list(found)


def constant_of(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, in each of its attribute forms."""
    if node.op_type != "Constant" or not node.attribute:
        return None
    a = node.attribute[0]
    if a.name in ("value", "sparse_value"):
        return numpy_helper.to_array(a.t) if a.name == "value" else None
    if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
        return np.array(helper.get_attribute_value(a))
    return None


class GraphIndex:
    """The index of one (top-level) graph.

    Attributes
    ----------
    graph : the graph indexed
    producers : tensor name -> the node writing it
    consumers : tensor name -> the nodes reading it (captured reads in subgraphs included)
    constants : tensor name -> value, of initializers and Constant nodes
    initializers : names of the initializers
    position : ``id(node)`` -> the node's index in ``graph.node``
    opsets : the model's opset imports (to evaluate constant subexpressions)
    """

    def __init__(self, graph: onnx.GraphProto, opsets: Sequence[onnx.OperatorSetIdProto] = ()):
        self.graph = graph
        self.opsets = list(opsets) or [helper.make_opsetid("", 17)]
        self.initializers = {i.name for i in graph.initializer}
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.position: dict[int, int] = {}
        self._inputs: dict[int, list[str]] = {}
        for n, node in enumerate(graph.node):
            self.position[id(node)] = n
            reads = [i for i in node.input if i] + [c for g in subgraphs(node) for c in captured(g)]
            self._inputs[id(node)] = list(dict.fromkeys(reads))
            for name in self._inputs[id(node)]:
                self.consumers.setdefault(name, []).append(node)
            for o in node.output:
                if o:
                    self.producers[o] = node
            value = constant_of(node)
            if value is not None:
                self.constants[node.output[0]] = value

    def inputs(self, node: onnx.NodeProto) -> list[str]:
        """What ``node`` reads: its inputs, then the outer tensors its subgraphs capture."""
        return self._inputs[id(node)]

    def in_order(self, nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """``nodes`` in graph order, each once."""
        unique_nodes = {id(n): n for n in nodes}
        return sorted(unique_nodes.values(), key=lambda n: self.position[id(n)])

    def ancestors(self, names: Iterable[str], stop: Iterable[str] = ()) -> list[onnx.NodeProto]:
        """The nodes that ``names`` need (captured reads included), in graph order, not walking past ``stop``."""
        stop = set(stop)
        needed: dict[int, onnx.NodeProto] = {}
        todo = [n for n in names if n not in stop]
        while todo:
            node = self.producers.get(todo.pop())
            if node is None or id(node) in needed:
                continue
            needed[id(node)] = node
            todo += [i for i in self.inputs(node) if i not in stop]
        return self.in_order(needed.values())

    def match_parents(
        self, node: onnx.NodeProto, op_types: Sequence[str], input_index: int = 0
    ) -> list[onnx.NodeProto] | None:
        """The chain of parents with ``op_types``, reading upward through input ``input_index`` of each, or None.

        As onnxruntime's graph tools match a parent path: ``match_parents(softmax, ["Add", "MatMul"])`` is the
        Add feeding the Softmax and the MatMul feeding that Add.
        """
        chain = []
        for op in op_types:
            if input_index >= len(node.input):
                return None
            node = self.producers.get(node.input[input_index])
            if node is None or node.op_type != op:
                return None
            chain.append(node)
        return chain

    def constant(self, name: str, limit: int = 32) -> np.ndarray | None:
        """The value of ``name`` when it depends on constants only: stored, or computed by up to ``limit`` nodes."""
        if name in self.constants:
            return self.constants[name]
        nodes = self.ancestors([name], stop=self.constants)
        if not nodes or len(nodes) > limit:
            return None
        sources = {i for n in nodes for i in self.inputs(n)} - {o for n in nodes for o in n.output}
        if not sources <= set(self.constants) or any(subgraphs(n) for n in nodes):
            return None  # it reads a graph input or a computed tensor
        from onnx.reference import ReferenceEvaluator

        try:
            inits = [numpy_helper.from_array(np.asarray(self.constants[s]), s) for s in sorted(sources)]
            small = helper.make_graph(nodes, "constant", [], [helper.make_empty_tensor_value_info(name)], inits)
            value = ReferenceEvaluator(helper.make_model(small, opset_imports=self.opsets)).run(None, {})[0]
        except Exception:  # an op the reference evaluator lacks: not known to be constant
            return None
        self.constants[name] = np.asarray(value)
        return self.constants[name]


def index(model: onnx.ModelProto) -> GraphIndex:
    """The index of ``model``'s graph, knowing the model's opsets (to evaluate constant subexpressions)."""
    return GraphIndex(model.graph, model.opset_import)


def inline_constant_ifs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``If`` whose condition is a constant replaced by the branch it always takes.

    The branch's nodes take the If's place (so graph order stays topological),
    its initializers join the graph's, its local tensors are renamed where they
    would clash with the outer graph's, and its outputs become the If's outputs
    through Identity nodes. Captured outer tensors need nothing: the outer graph
    defines them. Nested constant Ifs are inlined in turn. ``model`` itself is
    not changed; it is returned as it is when there is nothing to inline.
    """
    result = None
    while True:
        graph = (result or model).graph
        found = index(result or model)
        choices = {}
        for node in graph.node:
            if node.op_type == "If":
                cond = found.constant(node.input[0])
                if cond is not None and cond.size == 1:
                    choices[id(node)] = attr(node, "then_branch" if bool(cond.reshape(())) else "else_branch")
        if not choices:
            return result or model
        if result is None:
            result = copy.deepcopy(model)
            continue  # index the copy, whose nodes are the ones to replace
        taken = {o for n in graph.node for o in n.output} | found.initializers | {i.name for i in graph.input}
        taken |= {o for n in graph.node for g in subgraphs(n) for o in _defined(g)}
        nodes = []
        for node in graph.node:
            branch = choices.get(id(node))
            if branch is None:
                nodes.append(node)
                continue
            inner, inits, renames = _renamed_branch(branch, taken, node.name or "if")
            graph.initializer.extend(inits)
            nodes += inner
            for out, value in zip(node.output, branch.output):
                if out:
                    name = unique(f"{node.name or 'if'}/{out}", taken)
                    taken.add(name)
                    nodes.append(helper.make_node("Identity", [renames.get(value.name, value.name)], [out], name=name))
        del graph.node[:]
        graph.node.extend(nodes)


def _defined(graph: onnx.GraphProto) -> set[str]:
    """Every tensor a graph (and its subgraphs) defines."""
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        for g in subgraphs(node):
            names |= _defined(g)
    return names


def _renamed_branch(branch: onnx.GraphProto, taken: set[str], prefix: str):
    """Copies of a branch's nodes and initializers, their tensors renamed where the name is ``taken``."""
    renames: dict[str, str] = {}
    for name in [i.name for i in branch.initializer] + [o for n in branch.node for o in n.output if o]:
        renames[name] = unique(f"{prefix}/{name}", taken) if name in taken else name
        taken.add(renames[name])
    inits = []
    for init in branch.initializer:
        copied = copy.deepcopy(init)
        copied.name = renames[init.name]
        inits.append(copied)
    nodes = []
    for node in branch.node:
        copied = copy.deepcopy(node)
        rename_reads(copied, renames)
        copied.output[:] = [renames.get(o, o) for o in copied.output]
        if copied.name:
            copied.name = unique(copied.name, taken)
            taken.add(copied.name)
        nodes.append(copied)
    return nodes, inits, renames


def rename_reads(node: onnx.NodeProto, renames) -> None:
    """Rename what ``node`` reads, inside its subgraphs too (where a subgraph does not define the name itself).

    ``renames`` is a mapping or a function of the name.
    """
    get = renames if callable(renames) else (lambda name: renames.get(name, name))
    node.input[:] = [get(i) if i else i for i in node.input]
    for g in subgraphs(node):
        _rename_in_subgraph(g, get, set())


def _rename_in_subgraph(graph: onnx.GraphProto, get, shadowed: set[str]) -> None:
    local = set(shadowed) | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        node.input[:] = [i if not i or i in local else get(i) for i in node.input]
        for g in subgraphs(node):
            _rename_in_subgraph(g, get, local)
        local.update(node.output)
    for o in graph.output:
        if o.name not in local:
            o.name = get(o.name)


def float_output(name: str) -> onnx.ValueInfoProto:
    """A float32 graph output of unknown shape."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def session(model: onnx.ModelProto):
    """A quiet onnxruntime session: the exporter probes models with inputs they may refuse, and reports itself.

    Severity 4 (fatal only): at 3, a failing run still prints an ``[E:onnxruntime:...]`` line
    although the exception that says the same is handled.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


PROBED_AT_ONCE = 256  # tensors whose shapes one run of the model gives (Values._probe_all): a ViT-L block has ~50


class Values:
    """Shapes of the model's tensors at one input size, from shape inference or, failing that, by running it.

    Used for the pooling's input and the head's shape arithmetic. The model
    is copied once, with its image input fixed to batch 1 at ``size``, ``(height, width)``.
    """

    def __init__(self, model: onnx.ModelProto, image: str, layout: str, size: tuple[int, int], channels: int = 3):
        self.model, self.image, self.layout, self.size, self.channels = model, image, layout, size, channels
        self._shapes: dict[str, list[int]] | None = None
        self._fixed: onnx.ModelProto | None = None
        self._probed = False
        input_dims = dims(next(i for i in model.graph.input if i.name == image))
        self.one_image = input_dims[0] == 1  # made for batch 1: its shape constants may say 1 for the batch

    def input_array(self, batch: int, seed: int = 0) -> np.ndarray:
        """A random float32 input of ``batch`` images in the model's own layout."""
        c, (h, w) = self.channels, self.size
        shape = (batch, c, h, w) if self.layout == "NCHW" else (batch, h, w, c)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def shapes(self) -> dict[str, list[int]]:
        """Static shapes of every tensor at batch 1, by ONNX shape inference on the fixed-size copy."""
        if self._shapes is None:
            fixed = self.fixed_size_copy()
            try:
                inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
            except Exception:  # shape inference is best-effort; unknown shapes stay unknown
                inferred = fixed
            self._shapes = {}
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                found = dims(v)
                if found and all(isinstance(d, int) and d > 0 for d in found):
                    self._shapes[v.name] = found
        return self._shapes

    def shape(self, name: str) -> list[int] | None:
        """One tensor's shape at batch 1: from shape inference, else by running the model in onnxruntime."""
        if name not in self.shapes() and not self._probed:
            self._probe_all()
        if name not in self._shapes:
            fixed = copy.deepcopy(self.fixed_size_copy())
            fixed.graph.output.append(float_output(name))
            try:
                value = session(fixed).run([name], {self.image: self.input_array(1)})[0]
            except Exception:
                return None
            self._shapes[name] = list(value.shape)
        return self._shapes[name]

    def _probe_all(self) -> None:
        """The shapes shape inference left unknown, of the tensors whose type it knows, from a few runs: one
        onnxruntime session per tensor took seconds on a transformer's hundreds of tensors, and all of them in
        one run would hold every activation of a large model at once."""
        self._probed = True
        fixed = self.fixed_size_copy()
        try:
            typed = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(fixed).graph.value_info}
        except Exception:  # shape inference is best-effort
            return
        known = {o.name for o in fixed.graph.output} | set(self._shapes)
        names = [o for n in fixed.graph.node for o in n.output if o and o not in known and typed.get(o)]
        for start in range(0, len(names), PROBED_AT_ONCE):
            chunk = names[start : start + PROBED_AT_ONCE]
            probe = copy.deepcopy(fixed)
            probe.graph.output.extend(helper.make_tensor_value_info(n, typed[n], None) for n in chunk)
            try:
                values = session(probe).run(chunk, {self.image: self.input_array(1)})
            except Exception:  # a type shape inference got wrong, or a model that fails: ask tensor by tensor
                continue
            for name, value in zip(chunk, values):
                self._shapes[name] = list(np.shape(value))

    def fixed_size_copy(self) -> onnx.ModelProto:
        """The model with its image input fixed to batch 1 at ``size`` (made once)."""
        if self._fixed is None:
            fixed = copy.deepcopy(self.model)
            image = next(i for i in fixed.graph.input if i.name == self.image)
            c, (h, w) = self.channels, self.size
            shape = [1, c, h, w] if self.layout == "NCHW" else [1, h, w, c]
            for d, v in zip(image.type.tensor_type.shape.dim, shape):
                d.Clear()
                d.dim_value = v
            del fixed.graph.value_info[:]
            self._fixed = fixed
        return self._fixed


# Ops that leave a tensor as it is at inference.
NOOPS = {"Identity", "Dropout"}


def is_noop(node: onnx.NodeProto) -> bool:
    """Identity, Dropout, and Casts to float: nothing at inference, in float64."""
    return node.op_type in NOOPS or (
        node.op_type == "Cast" and attr(node, "to") in (TensorProto.FLOAT, TensorProto.DOUBLE)
    )


def float_nodes(model: onnx.ModelProto, layers: tuple[str, ...]) -> list[str]:
    """Names of the nodes of ``model`` that ``layers`` (words of ``float=``, ``FLOAT_WORD``) keep in float."""
    weights = {i.name: i.dims for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    names = []
    for layer in layers:
        if layer.startswith("first"):  # at most a quarter of the convs: a small trunk keeps int8 ones
            names += [c.name for c in convs[: min(int(layer[5:] or 1), len(convs) // 4)]]
    if convs and "last" in layers:
        names.append(convs[-1].name)
    if "depthwise" in layers:
        for node in convs:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            dims = weights.get(node.input[1])
            if group > 1 and dims is not None and dims[1] == 1:  # one input channel per group
                names.append(node.name)
    if "add" in layers:
        names += [n.name for n in model.graph.node if n.op_type == "Add"]
    return list(dict.fromkeys(names))


def fuse_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each zero Pad of constant amounts that feeds one Conv folded into that Conv's pads.

    Exact, and it matters for int8: onnxruntime runs such a Pad in float, so each one costs a
    DequantizeLinear and a QuantizeLinear between two int8 convolutions (EfficientNet-Lite's "SAME"
    padding, once its amounts are constants at a fixed input size: 17 of them, ~3 ms of Lite0's ~10).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    fused = []
    for pad in (n for n in graph.node if n.op_type == "Pad"):
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        users = consumers.get(pad.output[0], [])
        value = pad.input[2] if len(pad.input) > 2 else ""
        if mode != "constant" or len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in outputs:
            continue
        if pad.input[1] not in initializers or (len(pad.input) > 3 and pad.input[3]):
            continue  # amounts computed at run time, or an axes input
        if value and (value not in initializers or numpy_helper.to_array(initializers[value]).any()):
            continue
        amounts = numpy_helper.to_array(initializers[pad.input[1]]).astype(int)
        conv = users[0]
        if len(amounts) != 8 or amounts[[0, 1, 4, 5]].any() or (amounts < 0).any() or conv.input[0] != pad.output[0]:
            continue
        attributes = {a.name: a for a in conv.attribute}
        if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        own = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
        total = [own[0] + amounts[2], own[1] + amounts[3], own[2] + amounts[6], own[3] + amounts[7]]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("pads", [int(v) for v in total])])
        conv.input[0] = pad.input[0]
        fused.append(pad)
    for pad in fused:
        graph.node.remove(pad)
    return model
