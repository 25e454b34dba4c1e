"""Explanation methods, without autograd: each one gives the feature channels their weights.

What each method computes, its cost, and which to use are in docs/methods.md
(the one description of the methods). The notation there is used here: ``A``
the explained layer on its grid ``[C, h, w]`` (``prediction.features``).
On a globally pooled head, ``p`` is its spatial mean, ``y = f(p)`` the head's
class scores and ``G = dy_c/dp`` the head's gradient (:mod:`npcam.head`): the
closed forms. On any other head (a spatial map or tokens), ``G = dy_c/dA``
``[k, C, h, w]`` (:meth:`npcam.model.Model.grid_gradient`) and each method has
its general definition, as pytorch-grad-cam computes it.

A method gives channel weights ``[k, C]`` or per-position weights
``[k, C, h, w]``; :func:`npcam.cam.weighted_maps` combines them with ``A``, and
every map then goes through the same ReLU and max scaling (:func:`npcam.cam.normalize`).
To add a method: write a function ``(model, prediction, classes, progress, should_stop) -> [k, h, w]``
raw maps and register it in :data:`METHODS`. A method that runs many passes calls
:func:`check` between its batches, so that Ctrl-C and the server's time limit
stop it there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .cam import softmax, weighted_maps
from .errors import NpcamError
from .upsample import upsample

if TYPE_CHECKING:
    from .model import Model, Prediction

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


class Cancelled(Exception):
    """A multi-pass method stopped between two batches because ``should_stop()`` said so."""


def check(should_stop: ShouldStop | None) -> None:
    """Raise :class:`Cancelled` if ``should_stop`` is given and returns true."""
    if should_stop is not None and should_stop():
        raise Cancelled


@dataclass(frozen=True)
class Method:
    """A named explanation method (described in docs/methods.md).

    ``summary`` is the one line that ``--help`` and ``GET /model`` show.
    ``maps(model, prediction, classes, progress, should_stop)`` returns float64 ``[k, h, w]`` raw maps.
    ``extra_passes``: runs the whole network many times; ``head_passes``: runs
    the head once per channel when the head is not affine (:meth:`multi_pass`).
    """

    name: str
    summary: str
    maps: Callable[..., np.ndarray]
    affine_only: bool = False
    extra_passes: bool = False
    head_passes: bool = False

    def multi_pass(self, head_kind: str) -> bool:
        """Whether this method runs many network or head passes on a head of this kind (it is expensive)."""
        return self.extra_passes or (self.head_passes and head_kind != "affine")


def _pooled(model: Model) -> bool:
    """Whether the head starts at the globally average-pooled vector (the closed forms hold)."""
    return model.head.layout == "pooled"


def _head_gradient(model: Model, pred: Prediction, classes: Sequence[int]) -> np.ndarray:
    return model.head.gradient(pred.pooled, classes)


# General definitions, on a head that is not globally pooled: pure functions of A [C, h, w] and G [k, C, h, w].


def gradcam_weights(gradient: np.ndarray) -> np.ndarray:
    """Grad-CAM's channel weights, the spatial mean of ``G``: ``[k, C, h, w]`` to float64 ``[k, C]``."""
    return gradient.mean(axis=(2, 3), dtype=np.float64)


def xgradcam_weights(gradient: np.ndarray, features: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """XGrad-CAM's channel weights ``sum_ij(G A) / (sum_ij A + eps)``: float64 ``[k, C]``.

    ``eps`` is pytorch-grad-cam's 1e-7. Parameters: ``gradient`` float ``[k, C, h, w]``,
    ``features`` float ``[C, h, w]``.
    """
    a = features.astype(np.float64)
    return (gradient * a).sum(axis=(2, 3)) / (a.sum(axis=(1, 2)) + eps)


def gradcampp_general_weights(gradient: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Grad-CAM++'s channel weights from the full gradient, as pytorch-grad-cam computes them: float64 ``[k, C]``.

    ``alpha_ij = g^2 / (2 g^2 + S_k g^3)`` with ``g = G[k, :, i, j]`` and
    ``S_k = sum_ij A_k``, 0 where ``g = 0``; ``w_k = sum_ij max(g, 0) alpha_ij``.
    As in :func:`gradcampp_weights`, npcam leaves out pytorch-grad-cam's eps of
    1e-6 in the denominator (it outweighs ``g^2`` for small gradients), so
    where ``g != 0`` alpha is ``1 / (2 + S_k g)``, and a zero denominator gives 0.
    On a pooled head (``g = G/hw`` everywhere) this is :func:`gradcampp_weights` over hw.

    Parameters
    ----------
    gradient : float ``[k, C, h, w]``
    features : float ``[C, h, w]``
    """
    g = gradient.astype(np.float64, copy=False)
    sums = features.astype(np.float64).sum(axis=(1, 2))[None, :, None, None]
    g2 = g * g
    denominator = 2 * g2 + sums * g2 * g
    alpha = np.divide(g2, denominator, out=np.zeros_like(g), where=(g != 0) & (denominator != 0))
    return (np.maximum(g, 0) * alpha).sum(axis=(2, 3))


def _grid_gradient(model: Model, pred: Prediction, classes: Sequence[int]) -> np.ndarray:
    return model.grid_gradient(pred, list(classes))


def _cam(model, pred, classes, progress=None, should_stop=None):
    return weighted_maps(pred.features, model.head.weight[list(classes)])


def _softmax_weights(model, pred, classes, progress=None, should_stop=None):
    return weighted_maps(pred.features, softmax(model.head.weight[list(classes)].astype(np.float64), axis=1))


def _gradcam(model, pred, classes, progress=None, should_stop=None):
    if _pooled(model):
        return weighted_maps(pred.features, _head_gradient(model, pred, classes))
    return weighted_maps(pred.features, gradcam_weights(_grid_gradient(model, pred, classes)))


def _hirescam(model, pred, classes, progress=None, should_stop=None):
    if _pooled(model):  # G/hw at every position: Grad-CAM's map over hw
        return _gradcam(model, pred, classes)
    return weighted_maps(pred.features, _grid_gradient(model, pred, classes))


def _xgradcam(model, pred, classes, progress=None, should_stop=None):
    if _pooled(model):  # sum_ij(G A/hw) / sum_ij A = G/hw: Grad-CAM's map
        return _gradcam(model, pred, classes)
    return weighted_maps(pred.features, xgradcam_weights(_grid_gradient(model, pred, classes), pred.features))


def _layercam(model, pred, classes, progress=None, should_stop=None):
    if _pooled(model):
        return weighted_maps(pred.features, np.maximum(_head_gradient(model, pred, classes), 0))
    return weighted_maps(pred.features, np.maximum(_grid_gradient(model, pred, classes), 0))


def gradcampp_weights(gradient: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """Grad-CAM++ channel weights on a globally pooled head, up to a positive scale.

    pytorch-grad-cam computes, with ``g = G/(hw)`` and ``S_k = sum_ij A_k``,
    ``alpha = g^2 / (2 g^2 + S_k g^3)`` (0 where g = 0) and
    ``w_k = sum_ij max(g, 0) * alpha``; that is ``max(G, 0) / (2 + G * p)`` times hw.
    (pytorch-grad-cam adds eps=1e-6 to the denominator, which for typical head
    gradients of 1e-4..1e-3 per position changes its own result; npcam leaves
    it out.) A zero denominator gives a zero weight.

    Parameters
    ----------
    gradient : float64 ``[k, C]``, ``G`` for each class
    pooled : ``[C]``, ``p``
    """
    denominator = 2.0 + gradient * pooled.astype(np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 0.0, np.maximum(gradient, 0) / safe)


def _gradcampp(model, pred, classes, progress=None, should_stop=None):
    if _pooled(model):
        return weighted_maps(pred.features, gradcampp_weights(_head_gradient(model, pred, classes), pred.pooled))
    gradient = _grid_gradient(model, pred, classes)
    return weighted_maps(pred.features, gradcampp_general_weights(gradient, pred.features))


ABLATION_BATCH = 256
# At most this many bytes of head values (every op's output, for the whole batch) per head pass of a
# multi-pass method on a head that is not pooled: a ViT-S last block holds about 2 M values per image.
HEAD_PASS_BYTES = 128 * 2**20


def head_batch(model: Model, limit: int) -> int:
    """How many head inputs one head pass of a multi-pass method takes: at most ``limit``, and at most
    :data:`HEAD_PASS_BYTES` of values (the head keeps every op's output during a pass)."""
    head = model.head
    if head.kind == "affine":
        per_image = 8 * (head.channels + head.classes)
    else:
        values = math.prod(head.input_shape[1:]) + sum(math.prod(head.shapes[op.output]) for op in head.ops)
        per_image = values * head.dtype.itemsize
    return int(max(1, min(limit, HEAD_PASS_BYTES // max(1, per_image))))


def grid_scores(
    model: Model,
    pred: Prediction,
    grids: Callable[[int, int], np.ndarray],
    count: int,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    limit: int = ABLATION_BATCH,
) -> np.ndarray:
    """The head's scores of ``count`` variants of ``pred``'s layer on its grid: float64 ``[count, K]``.

    ``grids(start, stop)`` makes variants ``start..stop-1`` as float32 ``[n, C, h, w]``; each batch
    becomes head inputs through :meth:`~npcam.model.Model.from_grid` (a token head's prefix tokens and
    the side inputs are this image's), in batches of :func:`head_batch`, with :func:`check` before each.
    """
    batch = head_batch(model, limit)
    scores = np.empty((count, model.head.classes))
    for start in range(0, count, batch):
        check(should_stop)
        stop = min(start + batch, count)
        x = model.from_grid(grids(start, stop), pred.head_input)
        scores[start:stop] = model.head_scores(x, pred.sides)
        if progress:
            progress(stop, count)
    return scores


def ablation_weights(
    model: Model,
    pred: Prediction,
    classes: Sequence[int],
    should_stop: ShouldStop | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Ablation-CAM weights ``(y_c - y_c with channel k zeroed) / y_c``: float64 ``[k, C]``.

    On a pooled head, zeroing the channel map ``A_k`` zeroes ``p_k``, so only
    the head runs again. For an affine head the drop is ``W_ck p_k`` exactly;
    other pooled heads run C forward passes, in batches of ABLATION_BATCH. On
    a head that is not pooled, channel k of ``A`` is zeroed on the grid (a
    token head keeps its CLS token) and the head runs on the C ablated layers,
    batched within :data:`HEAD_PASS_BYTES`. A zero score gives zero weights.
    (pytorch-grad-cam ablates with ``min(A) - 1e7`` instead of 0 when the
    activations can be negative; npcam follows the paper.)
    """
    classes = list(classes)
    scores = pred.logits[classes].astype(np.float64)
    if not _pooled(model):
        features = pred.features

        def ablated(start, stop):
            grids = np.repeat(features[None], stop - start, axis=0)
            grids[np.arange(stop - start), np.arange(start, stop)] = 0.0
            return grids

        ablated_scores = grid_scores(model, pred, ablated, len(features), progress, should_stop)[:, classes]
        drop = scores[:, None] - ablated_scores.T
    elif model.head.kind == "affine":
        drop = model.head.weight[classes].astype(np.float64) * pred.pooled.astype(np.float64)
    else:
        pooled = pred.pooled.astype(np.float64)
        ablated_scores = np.empty((len(pooled), len(classes)))
        for start in range(0, len(pooled), ABLATION_BATCH):
            check(should_stop)
            rows = np.arange(start, min(start + ABLATION_BATCH, len(pooled)))
            ablated = np.repeat(pooled[None], len(rows), axis=0)
            ablated[np.arange(len(rows)), rows] = 0.0
            ablated_scores[rows] = model.head.forward(ablated)[:, classes]
        drop = scores[:, None] - ablated_scores.T
    safe = np.where(scores == 0, 1.0, scores)[:, None]
    return np.where(scores[:, None] == 0, 0.0, drop / safe)


def _ablationcam(model, pred, classes, progress=None, should_stop=None):
    return weighted_maps(pred.features, ablation_weights(model, pred, classes, should_stop, progress))


def reciprocam_maps(
    model: Model,
    pred: Prediction,
    classes: Sequence[int],
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> np.ndarray:
    """Recipro-CAM (ViT-ReciproCAM on tokens): the class's probability with one position of ``A`` kept.

    For each of the hw positions, ``A`` with every other position zeroed runs
    through the head (a token head keeps its CLS token; the side inputs are
    this image's), in batches of :func:`head_batch`. The map at ``(i, j)`` is
    the class's probability (softmax, or its sigmoid on a multi-label model)
    less its minimum over positions, so that the max scaling afterwards is
    openvino_xai's min-max. npcam keeps one position only (openvino_xai's
    default also spreads each kept position over its 3x3 neighbours with a
    Gaussian). Returns float64 ``[k, h, w]``.
    """
    features = pred.features
    channels, h, w = features.shape

    def kept(start, stop):
        positions = np.arange(start, stop)
        grids = np.zeros((stop - start, channels, h * w), dtype=features.dtype)
        grids[np.arange(stop - start), :, positions] = features.reshape(channels, -1)[:, positions].T
        return grids.reshape(-1, channels, h, w)

    scores = grid_scores(model, pred, kept, h * w, progress, should_stop)
    probs = model.probabilities(scores)[:, list(classes)].T  # [k, hw]
    return (probs - probs.min(axis=1, keepdims=True)).reshape(len(classes), h, w)


def _reciprocam(model, pred, classes, progress=None, should_stop=None):
    return reciprocam_maps(model, pred, classes, progress, should_stop)


def eigen_map(features: np.ndarray) -> np.ndarray:
    """Eigen-CAM: the ``[hw, C]`` activations, centred, projected on their first principal component.

    That projection is ``sigma_1 u_1`` of the centred matrix's SVD, found as the
    top eigenvector of its small ``[hw, hw]`` Gram matrix. The sign of a
    principal component is arbitrary; npcam picks the one whose map correlates
    positively with the channel mean of the activations. Returns float64 ``[h, w]``.
    """
    channels, h, w = features.shape
    rows = features.reshape(channels, h * w).T.astype(np.float64)
    centred = rows - rows.mean(axis=0)
    values, vectors = np.linalg.eigh(centred @ centred.T)
    if not values[-1] > 0:
        return np.zeros((h, w))
    projection = vectors[:, -1] * np.sqrt(values[-1])
    mean = rows.mean(axis=1)
    if np.dot(projection - projection.mean(), mean - mean.mean()) < 0:
        projection = -projection
    return projection.reshape(h, w)


def _eigencam(model, pred, classes, progress=None, should_stop=None):
    return np.repeat(eigen_map(pred.features)[None], len(classes), axis=0)


SCORECAM_BATCH = 32


def score_weights(
    model: Model,
    pred: Prediction,
    classes: Sequence[int],
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
):
    """Score-CAM weights as TorchCAM computes them: float64 ``[k, C]``.

    Each channel map is min-max normalized at feature resolution (TorchCAM's
    eps of 1e-8), upsampled bilinearly to the network input, multiplied into
    the input, and scored by the whole network; the weights are the softmax
    over channels of the class's logits. The passes do not depend on the
    class, so every class shares them. Channels with identical masks (all-zero
    channels, or one active cell at the same place) give identical inputs, so
    each distinct mask runs once: the result is the same, with fewer passes.
    """
    x = pred.input  # [1, 3, H, W]
    features = pred.features
    low = features - features.min(axis=(1, 2), keepdims=True)
    low = (low / (low.max(axis=(1, 2), keepdims=True) + np.float32(1e-8))).astype(np.float32)
    unique, inverse = np.unique(low.reshape(len(low), -1), axis=0, return_inverse=True)
    unique = unique.reshape(-1, *low.shape[1:])
    scores = np.empty((len(unique), len(model.labels)), dtype=np.float32)
    for start in range(0, len(unique), SCORECAM_BATCH):
        check(should_stop)
        masks = upsample(unique[start : start + SCORECAM_BATCH], x.shape[2:])  # [b, H, W]
        scores[start : start + len(masks)] = model.scores(masks[:, None] * x)
        if progress:
            progress(min(start + SCORECAM_BATCH, len(unique)), len(unique))
    per_channel = scores[inverse.ravel()][:, list(classes)].T.astype(np.float64)  # [k, C]
    return softmax(per_channel, axis=1)


def _scorecam(model, pred, classes, progress=None, should_stop=None):
    return weighted_maps(pred.features, score_weights(model, pred, classes, progress, should_stop))


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "cam", "the paper's CAM: the FC row's weights (affine heads; the default there)", _cam, affine_only=True
        ),
        Method(
            "gradcam", "Grad-CAM: the head's gradient (equals cam on an affine head; the default otherwise)", _gradcam
        ),
        Method("hirescam", "HiResCAM: sum_C G*A elementwise (equals gradcam on a globally pooled head)", _hirescam),
        Method("xgradcam", "XGrad-CAM: sum(G*A)/sum(A) (equals gradcam on a globally pooled head)", _xgradcam),
        Method("layercam", "Layer-CAM: the gradient's positive part times A", _layercam),
        Method("gradcampp", "Grad-CAM++ (also gradcam++): with G^2 and G^3, as pytorch-grad-cam", _gradcampp),
        Method(
            "ablationcam", "Ablation-CAM: the score's drop when each channel is zeroed", _ablationcam, head_passes=True
        ),
        Method("eigencam", "Eigen-CAM: first principal component of the features (class-agnostic)", _eigencam),
        Method(
            "scorecam",
            "Score-CAM: one network pass per distinct channel mask, as TorchCAM (slow)",
            _scorecam,
            extra_passes=True,
        ),
        Method(
            "softmax",
            "the seed tutorial's variant: softmax over the FC row (affine heads)",
            _softmax_weights,
            affine_only=True,
        ),
        Method(
            "reciprocam",
            "Recipro-CAM: the class's probability with one position of A kept (h*w head passes)",
            _reciprocam,
            head_passes=True,
        ),
    ]
}
ALIASES = {"gradcam++": "gradcampp"}


def names() -> str:
    """The valid method names for a message: ``"cam, gradcam, ... (or gradcam++)"``."""
    return f"{', '.join(METHODS)} (or {', '.join(ALIASES)})"


def resolve(name: str | None, head_kind: str | None = None, source: object = None) -> Method:
    """The method called ``name`` (case-insensitive, or an alias), checked against a head of ``head_kind``.

    The one place that turns a name into a method: every front-end goes
    through it. One-line errors name the valid methods, or say why this head
    cannot take the method. ``head_kind`` None skips the head check; ``name``
    None is that head's :func:`default_name`. ``source`` (a bundle's path)
    opens the head-check's error: the bundle, not the name, is at fault there.
    """
    if name is None:
        if head_kind is None:
            raise ValueError("resolve(None) needs the head_kind whose default it is")
        name = default_name(head_kind)
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


def default_name(head_kind: str) -> str:
    """``cam`` for an affine head (where CAM is defined), ``gradcam`` for any other."""
    return "cam" if head_kind == "affine" else "gradcam"


def allows(method: Method, head_kind: str) -> bool:
    """Whether a head of ``head_kind`` can take ``method`` (CAM's weights exist only on an affine head)."""
    return not (method.affine_only and head_kind != "affine")


def allowed(head_kind: str) -> list[str]:
    """The names of every method a head of ``head_kind`` can take, in :data:`METHODS` order."""
    return [name for name, m in METHODS.items() if allows(m, head_kind)]


def get(name: str) -> Method:
    """The method called ``name`` (case-insensitive); a one-line error lists the valid names."""
    return resolve(name)
