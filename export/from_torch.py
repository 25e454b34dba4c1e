"""Torch modules to ONNX, for the one head finder in :mod:`export.split` (needs torch).

The built-in architectures and ``npcam-export torch MODULE:CALLABLE`` both
come through here: the whole classifier is exported, and the splitter finds
its last global pooling, as for any ONNX file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from npcam.image import as_size

from .errors import ExportError
from .graph import first_line
from .sizes import DEFAULT, SMALLEST


def load_callable(spec: str) -> nn.Module:
    """``package.module:callable`` -> the ``nn.Module`` it returns (the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExportError(f"{spec!r}: expected MODULE:CALLABLE, e.g. mypkg.models:build")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ExportError(f"{spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ExportError(f"{spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    try:
        net = target() if callable(target) and not isinstance(target, nn.Module) else target
    except Exception as e:
        raise ExportError(f"{spec}: calling it failed ({type(e).__name__}: {e})") from None
    if not isinstance(net, nn.Module):
        raise ExportError(f"{spec}: returned a {type(net).__name__}, not a torch nn.Module")
    return net.eval()


def load_weights(net: nn.Module, state: dict, source: Path, name: str) -> None:
    """``load_state_dict(strict=True)``, with a one-line error naming what does not fit."""
    own = net.state_dict()
    problems = (
        [f"missing {k}" for k in own if k not in state]
        + [f"unexpected {k}" for k in state if k not in own]
        + [
            f"{k} is {list(state[k].shape)}, not {list(own[k].shape)}"
            for k in own
            if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
        ]
    )
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ExportError(f"{source}: not {name} weights ({'; '.join(problems[:3])}{more})")
    net.load_state_dict(state, strict=True)


# Square sides tried, in this order, for a module that runs neither at the size it declares nor at 224 px: larger
# ones first, up to 512, then smaller ones, nearest first (every 8th, then every side below 64), then up to 1024.
# Larger first: a model whose learned position embedding is added to its tokens also runs, by broadcasting, at
# a size of a single patch. Where one runs, the smallest side of its band is taken (a stride-s model runs at
# s*h to s*h+s-1, and was made for s*h).
SEARCHED = [*range(232, 513, 8), *range(216, 63, -8), *range(63, SMALLEST - 1, -1), *range(520, 1025, 8)]
SEARCH_SECONDS = 60.0  # a module that runs at no square size stops the search (each try runs it)


def input_size(net: nn.Module, requested: int | tuple[int, int] | None, spec: str) -> tuple[int, int]:
    """The ``(H, W)`` to export ``net`` at: ``requested`` (``--input-size``), else the module's own size.

    The module's own size is the one it declares (timm's ``pretrained_cfg`` or ``default_cfg``
    ``input_size``), else 224x224 where it runs there, else the first square it runs at in the order of
    :data:`SEARCHED` (a ViT's learned position embedding, a VGG-style Flatten over a map of one size: a module
    made for one size). Refuses in one line when none runs.
    """
    wanted = as_size(requested)
    if wanted is not None:
        return wanted
    for name in ("pretrained_cfg", "default_cfg"):
        config = getattr(net, name, None)
        declared = config.get("input_size") if isinstance(config, dict) else None
        if isinstance(declared, (tuple, list)) and len(declared) == 3 and all(isinstance(d, int) for d in declared):
            return int(declared[1]), int(declared[2])
    problem = _runs(net, DEFAULT)
    if problem is None:
        return DEFAULT
    started, tried = time.monotonic(), []
    for side in SEARCHED:
        if time.monotonic() - started > SEARCH_SECONDS:
            break
        tried.append(side)
        if _runs(net, (side, side)) is None:
            while side > SMALLEST and _runs(net, (side - 1, side - 1)) is None:
                side -= 1
            return side, side
    searched = (
        f"any square image from {SMALLEST} to {max(SEARCHED)} px"
        if len(tried) == len(SEARCHED)
        else f"the {len(tried)} square sizes it was tried at in {SEARCH_SECONDS:.0f} s"
    )
    raise ExportError(
        f"{spec}: the module does not run on a 224x224 image ({problem}), nor on {searched}; "
        "give its input size with --input-size S or HxW"
    )


def _runs(net: nn.Module, size: tuple[int, int]) -> str | None:
    """None when the module runs on a ``size`` image (RGB or grey), else what went wrong (one line)."""
    problem = None
    for channels in (3, 1):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net.eval()(torch.zeros(1, channels, *size))
            return None
        except Exception as e:  # the module says no in its own way
            problem = problem or f"{type(e).__name__}: {first_line(e)}"
    return problem


def to_onnx(
    net: nn.Module,
    input_size: tuple[int, int],
    opset: int,
    output_names: Sequence[str] = ("scores",),
    dynamic_size: bool = True,
) -> onnx.ModelProto:
    """The whole classifier as ONNX, traced at ``input_size`` ``(H, W)``, with dynamic batch, height and width
    where torch can trace them (a detector's, ``dynamic_size`` False, has its head's exact shapes: batch only).
    ``output_names`` names the module's outputs in order (a detector's several)."""
    dummy = torch.zeros(1, _input_channels(net, input_size), *input_size)
    batch = {name: {0: "N"} for name in output_names}
    axes = {"input": {0: "N", 2: "H", 3: "W"}, **batch}
    for dynamic_axes in ((axes,) if dynamic_size else ()) + ({"input": {0: "N"}, **batch}, None):
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad(), _no_mha_fast_path():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    net.eval(),
                    (dummy,),
                    buffer,
                    input_names=["input"],
                    output_names=list(output_names),
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            return onnx.load_from_string(buffer.getvalue())
        except Exception as e:  # torch's exporter raises many types
            error = e
    raise ExportError(
        f"torch could not export the module to ONNX ({type(error).__name__}: {str(error).splitlines()[0]})"
    )


@contextlib.contextmanager
def _no_mha_fast_path():
    """nn.MultiheadAttention's inference fast path (one fused op) does not export: its plain ops do."""
    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha else None
    if mha:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha:
            mha.set_fastpath_enabled(before)


def module_outputs(net: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every named submodule's output (a tensor) on ``x`` float32 ``[N,3,H,W]``, by forward hooks."""
    outputs: dict[str, np.ndarray] = {}
    hooks = []
    for name, module in net.named_modules():
        if not name:
            continue

        def keep(module, inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                outputs[name] = output.detach().float().numpy().copy()

        hooks.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad(), _no_mha_fast_path():
            net.eval()(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _onnx_values(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every float tensor the ONNX model computes on ``x``, by name (graph order)."""
    from .graph import float_output, session

    probe = copy.deepcopy(model)
    known = {o.name for o in probe.graph.output}
    try:  # only float tensors become outputs: shape arithmetic is int64
        typed = onnx.shape_inference.infer_shapes(probe).graph.value_info
    except Exception:  # shape inference is best-effort
        return {}
    floats = {v.name for v in typed if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names = [o for n in probe.graph.node for o in n.output if o in floats]
    probe.graph.output.extend(float_output(name) for name in names if name not in known)
    wanted = [o.name for o in probe.graph.output]
    image = next(i.name for i in probe.graph.input if i.name not in {t.name for t in probe.graph.initializer})
    try:
        run = session(probe)
    except Exception:  # an output onnxruntime cannot type (ints of shape arithmetic): keep the float ones only
        return {}
    try:
        results = run.run(None, {image: x})
    except Exception:  # onnxruntime's own types
        return {}
    return {k: v for k, v in zip(wanted, results) if isinstance(v, np.ndarray) and v.dtype == np.float32}


def _probe_input(model: onnx.ModelProto, size: tuple[int, int]) -> np.ndarray:
    """A random image for the model at ``size`` ``(H, W)``, with its channels."""
    image = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    channels = image.type.tensor_type.shape.dim[1].dim_value or 3
    return np.random.default_rng(11).standard_normal([1, channels, *size]).astype(np.float32)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1e-6))


def tensor_of_module(net: nn.Module, model: onnx.ModelProto, path: str, spec: str, size: tuple[int, int]) -> str:
    """The ONNX tensor that holds module ``path``'s output: the first in graph order with the same values."""
    return tensors_of_modules(net, model, [path], spec, size)[0]


def tensors_of_modules(
    net: nn.Module, model: onnx.ModelProto, paths: Sequence[str], spec: str, size: tuple[int, int]
) -> list[str]:
    """:func:`tensor_of_module` for several module paths, the model and the module run once."""
    modules = dict(net.named_modules())
    for path in paths:
        if path not in modules or not path:
            near = [n for n in modules if n and n.split(".")[-1] == path.split(".")[-1]][:3]
            raise ExportError(
                f"{spec}: --layer {path!r} is not a module path of the model"
                + (f" (maybe {', '.join(near)})" if near else "")
            )
    if not paths:
        return []
    x = _probe_input(model, size)
    outputs = module_outputs(net, x)
    values = _onnx_values(model, x)
    found = []
    for path in paths:
        wanted = outputs.get(path)
        if wanted is None:
            raise ExportError(f"{spec}: --layer {path!r} does not output one tensor")
        name = next((name for name, value in values.items() if _same(value, wanted)), None)
        if name is None:
            raise ExportError(
                f"{spec}: --layer {path!r}: no tensor of the ONNX export holds its output (torch fused it away)"
            )
        found.append(name)
    return found


def module_of_tensor(net: nn.Module, model: onnx.ModelProto, tensor: str, size: tuple[int, int]) -> str | None:
    """The module path whose output is ONNX tensor ``tensor`` (the outermost such module), or None."""
    return modules_of_tensors(net, model, [tensor], size)[0]


def modules_of_tensors(
    net: nn.Module, model: onnx.ModelProto, tensors: Sequence[str], size: tuple[int, int]
) -> list[str | None]:
    """:func:`module_of_tensor` for several tensors, the model and the module run once."""
    x = _probe_input(model, size)
    values = _onnx_values(model, x)
    outputs = module_outputs(net, x)
    found: list[str | None] = []
    for tensor in tensors:
        matches = [name for name, out in outputs.items() if tensor in values and _same(out, values[tensor])]
        found.append(min(matches, key=lambda name: name.count(".")) if matches else None)
    return found


def _input_channels(net: nn.Module, input_size: tuple[int, int]) -> int:
    """3 (RGB), or 1 for a module that takes grey images (tried when 3 channels fail)."""
    for channels in (3, 1):
        try:
            with torch.no_grad():
                net.eval()(torch.zeros(1, channels, *input_size))
            return channels
        except Exception:  # the module says no in its own way
            continue
    return 3  # let the export report what goes wrong


class Trunk(nn.Module):
    """A built-in architecture's conv trunk as a module of its own (TorchCAM hooks a module's output)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x)


def reference(net: nn.Module):
    """The module as the self-check's reference: float32 ``[N,3,H,W]`` in, its output as NumPy."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = net.eval()(torch.from_numpy(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().numpy()

    return run


def flat_outputs(out) -> list[torch.Tensor]:
    """A module's output as the tensors the ONNX export lists, in its order (tuples and lists flattened)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flat_outputs(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in flat_outputs(item)]
    return []


def output_ranks(net: nn.Module, input_size: tuple[int, int]) -> list[int]:
    """The ranks of the module's outputs on an image of ``input_size`` (a detector has one of rank 3), or [] when
    it does not run there."""
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, _input_channels(net, input_size), *input_size))
    except Exception:  # the module says no in its own way; the export reports it
        return []
    return [t.dim() for t in flat_outputs(out)]


def outputs_reference(net: nn.Module, names: Sequence[str]):
    """A detector module as its self-check's reference: float32 ``[N,3,H,W]`` in, ``{name: output}`` out, the
    outputs named in the order of the module's (as its ONNX export names them)."""

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = flat_outputs(net.eval()(torch.from_numpy(x)))
        return {name: t.detach().float().numpy() for name, t in zip(names, out)}

    return run
