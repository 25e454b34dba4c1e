"""Explanation methods: each one gives the explained layer's channels (or values) their weights.

What each method computes, its cost, and which to use are in docs/methods.md (the one description of the
methods). The notation there is used here: ``A`` the explained layer on its grid ``[C, h, w]``, ``G`` the
targets' gradient (:class:`npcam.probe.Probe`).

A method is a function of a :class:`~npcam.probe.Probe` that returns channel weights ``[k, C]`` or
per-position weights ``[k, C, h, w]``. :func:`maps` is the one step after it, the same for every method:
the weights are combined with ``A`` (:func:`npcam.cam.weighted_maps`), then each map's positive part is scaled
to [0, 1] (:func:`npcam.cam.normalize`) and upsampled. Two methods are declared exceptions that give maps
``[k, h, w]`` directly (``gives_maps``): Eigen-CAM (a principal component, no weights) and Recipro-CAM (a
score per position); D-RISE's maps are of the network input itself (``at_input``), the same whatever the layer.
Options of a method (D-RISE's masks) are the probe's :attr:`~npcam.probe.Probe.options`. To add a method: write ``fn(probe) -> weights`` in a module here and register it in
:data:`METHODS`. A method that runs many passes calls ``probe.check()`` between its batches and
``probe.progress(done, total)`` after them, so that Ctrl-C and the server's time limit stop it there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..cam import normalize, weighted_maps
from ..errors import NpcamError
from ..probe import Probe
from ..upsample import upsample
from . import ablation, cam, drise, eigen, gradient, recipro, score


@dataclass(frozen=True)
class Method:
    """A named explanation method (described in docs/methods.md).

    ``summary`` is the one line that ``--help`` and ``GET /model`` show. ``weights(probe)`` returns float64
    channel weights ``[k, C]`` or per-position weights ``[k, C, h, w]``, or, when ``gives_maps``, raw maps
    ``[k, h, w]``. ``at_input`` (with ``gives_maps``): the maps are of the network input ``[k, H_in, W_in]``,
    not of a layer, so a model of several layers computes them once. ``affine_only``: defined only on an affine
    head (CAM). ``extra_passes``: runs the whole network many times; ``head_passes``: runs the head once per
    channel or position when the head is not affine (:meth:`multi_pass`).
    """

    name: str
    summary: str
    weights: Callable[[Probe], np.ndarray]
    gives_maps: bool = False
    at_input: bool = False
    affine_only: bool = False
    extra_passes: bool = False
    head_passes: bool = False

    def multi_pass(self, head_kind: str) -> bool:
        """Whether this method runs many network or head passes on a head of this kind (it is expensive)."""
        return self.extra_passes or (self.head_passes and head_kind != "affine")

    def raw_maps(self, probe: Probe) -> np.ndarray:
        """The maps before the ReLU and scaling, float64 ``[k, h, w]``: the weights combined with ``A``."""
        out = self.weights(probe)
        return out if self.gives_maps else weighted_maps(probe.features, out)


def maps(method: Method, probes: Probe | Sequence[Probe], size: tuple[int, int] | None = None) -> np.ndarray:
    """The one step every method ends in: its raw maps' positive parts, each scaled to [0, 1] by its max, and
    upsampled to ``size`` ``(H, W)`` (None: the layer's ``(h, w)``). Returns float32 ``[k, h, w]`` or
    ``[k, H, W]``.

    Explained at several layers (a detector's maps, one per stride), each layer's map is made so and upsampled to
    ``size`` (which is then needed), and the maps are averaged and scaled to [0, 1] again, as pytorch-grad-cam
    combines layers: each layer counts alike, whatever the scale of its activations (docs/methods.md). A method
    ``at_input`` gives maps of the network input ``[k, H_in, W_in]`` (upsampled to ``size`` if given) once.
    """
    probes = [probes] if isinstance(probes, Probe) else list(probes)
    if method.at_input:  # of the input itself: one computation, whatever the layers
        out = normalize(method.raw_maps(probes[0]))
        return out if size is None or tuple(size) == out.shape[1:] else upsample(out, size)
    if len(probes) == 1:
        out = normalize(method.raw_maps(probes[0]))
        return out if size is None else upsample(out, size)
    if size is None:
        raise ValueError("maps at several layers need a size to be combined at")
    return normalize(np.mean(per_layer(method, probes, size), axis=0))


def per_layer(method: Method, probes: Sequence[Probe], size: tuple[int, int]) -> list[np.ndarray]:
    """Each layer's maps on its own, scaled to [0, 1] and upsampled to ``size``: float32 ``[k, H, W]`` each."""
    return [upsample(normalize(method.raw_maps(probe)), size) for probe in probes]


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "cam", "the paper's CAM: the FC row's weights (affine heads; the default there)", cam.cam, affine_only=True
        ),
        Method(
            "gradcam",
            "Grad-CAM: the head's gradient (equals cam on an affine head; the default otherwise)",
            gradient.gradcam,
        ),
        Method(
            "hirescam", "HiResCAM: sum_C G*A elementwise (equals gradcam on a globally pooled head)", gradient.hirescam
        ),
        Method("xgradcam", "XGrad-CAM: sum(G*A)/sum(A) (equals gradcam on a globally pooled head)", gradient.xgradcam),
        Method("layercam", "Layer-CAM: the gradient's positive part times A", gradient.layercam),
        Method("gradcampp", "Grad-CAM++ (also gradcam++): with G^2 and G^3, as pytorch-grad-cam", gradient.gradcampp),
        Method(
            "ablationcam",
            "Ablation-CAM: the score's drop when each channel is zeroed",
            ablation.ablation_weights,
            head_passes=True,
        ),
        Method(
            "eigencam",
            "Eigen-CAM: first principal component of the features (class-agnostic)",
            eigen.eigencam_maps,
            gives_maps=True,
        ),
        Method(
            "scorecam",
            "Score-CAM: one network pass per distinct channel mask, as TorchCAM (slow)",
            score.score_weights,
            extra_passes=True,
        ),
        Method(
            "softmax",
            "the seed tutorial's variant: softmax over the FC row (affine heads)",
            cam.softmax_weights,
            affine_only=True,
        ),
        Method(
            "drise",
            "D-RISE: random masks weighted by the detection's similarity (RISE: the class's probability); "
            "--masks N passes (slow), --mask-cells, --seed",
            drise.drise_maps,
            gives_maps=True,
            at_input=True,
            extra_passes=True,
        ),
        Method(
            "reciprocam",
            "Recipro-CAM: the class's probability with one position of A kept (h*w head passes)",
            recipro.reciprocam_maps,
            gives_maps=True,
            head_passes=True,
        ),
    ]
}
ALIASES = {"gradcam++": "gradcampp", "rise": "drise"}


def names() -> str:
    """The valid method names for a message: ``"cam, gradcam, ... (or gradcam++)"``."""
    return f"{', '.join(METHODS)} (or {', '.join(ALIASES)})"


def resolve(name: str | None, head_kind: str | None = None, source: object = None, task: str = "classify") -> Method:
    """The method called ``name`` (case-insensitive, or an alias), checked against a head of ``head_kind``.

    The one place that turns a name into a method: every front-end goes
    through it. One-line errors name the valid methods, or say why this head
    cannot take the method. ``head_kind`` None skips the head check; ``name``
    None is that head's (and task's) :func:`default_name`. ``source`` (a bundle's path)
    opens the head-check's error: the bundle, not the name, is at fault there.
    """
    if name is None:
        if head_kind is None:
            raise ValueError("resolve(None) needs the head_kind whose default it is")
        name = default_name(head_kind, task)
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise NpcamError(f"unknown method {name!r}; choose one of {names()}")
    method = METHODS[key]
    if head_kind is not None and not allows(method, head_kind):
        raise NpcamError(
            ("" if source is None else f"{source}: ")
            + f"method {method.name} needs a head that is one affine layer after global "
            f"pooling (CAM is defined only there); this model's head is not, so use gradcam"
        )
    return method


def default_name(head_kind: str, task: str = "classify") -> str:
    """``cam`` for an affine head (where CAM is defined), ``gradcam`` for any other; ``hirescam`` for a detector.

    A detection is one candidate at one place: Grad-CAM averages the gradient over the positions, so detections of
    one class on one map get nearly the same map, while HiResCAM keeps it where it is (ODAM's element-wise
    product, Zhao et al., ICLR 2023)."""
    if task == "detect":
        return "hirescam"
    return "cam" if head_kind == "affine" else "gradcam"


def allows(method: Method, head_kind: str) -> bool:
    """Whether a head of ``head_kind`` can take ``method`` (CAM's weights exist only on an affine head)."""
    return not (method.affine_only and head_kind != "affine")


def allowed(head_kind: str) -> list[str]:
    """The names of every method a head of ``head_kind`` can take, in :data:`METHODS` order."""
    return [name for name, m in METHODS.items() if allows(m, head_kind)]
