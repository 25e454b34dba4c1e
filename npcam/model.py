"""A loaded model bundle, ready to predict and explain.

The bundle's format is owned by :mod:`npcam.bundle`; this module runs it: the
trunk in onnxruntime, the head in NumPy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import overload

import numpy as np
import onnxruntime as ort
from PIL import Image

from . import bundle as bundle_format
from . import methods as methods_lib
from . import targets
from .cam import normalize, pool, probabilities
from .cancel import OnProgress, ShouldStop
from .cpu import warn_if_not_portable
from .detect import DEFAULT_THRESHOLDS, Candidates, Detection, Thresholds, select
from .errors import NpcamError
from .image import (
    MAX_PIXELS,
    ImageLike,
    Placement,
    Size,
    as_size,
    format_size,
    letterbox_placement,
    open_image,
    preprocess,
    stretch_placement,
)
from .probe import MethodOptions, Probe
from .targets import Target
from .upsample import upsample

default_model_dir = bundle_format.default_model_dir

# Inputs per trunk call in Model.classify. A larger batch is no faster and its activations take memory that
# onnxruntime's arena keeps: EfficientNet-Lite0 on 348 photos in one call peaked at 6.7 GB and took 1.4x as long
# as calls of 8 (0.66 GB); calls of 4, 8 and 16 took the same time (docs/performance.md).
TRUNK_BATCH = 8


@dataclass(frozen=True)
class Prediction:
    """One image through the network.

    Attributes
    ----------
    image : uint8 ``[H, W, 3]``, the upright RGB image as read
    input : float32 ``[1, 3, h_in, w_in]``, the network input made from it
    features : float32 ``[C, h, w]``, the explained layer on its grid (what maps are made of): the trunk's last
        conv features, or a transformer's patch tokens laid on their grid (:meth:`Model.to_grid`)
    logits : float32 ``[K]``, the head's class scores
    probs : float32 ``[K]``, softmax of ``logits`` (each class's sigmoid for a multi-label model)
    labels : the K class names
    photo_size : ``(H, W)`` of the photo when ``image`` was decoded at a reduced
        scale (:func:`npcam.image.read_photo`); None when ``image`` is full size
    head_input : float32 ``[1, *input_shape[1:]]``, what the head scored: the pooled vector ``[1, C]`` of a
        pooled head (the default, made from ``features``), the map ``[1, C, h, w]`` or the tokens ``[1, L, C]``
    sides : ``{name: [1, ...]}``, the head's side inputs (tensors from before the layer, such as a
        transformer's residual stream); ``{}`` when it has none
    layers : a model explained at several layers (a detector's maps, one per stride): each float32 ``[C_s, h_s,
        w_s]``, ``features`` the first; ``head_input`` is then ``{name: [1, C_s, h_s, w_s]}``. None: ``(features,)``
    detections : a detector's detections (:class:`npcam.detect.Detection`), best first; None for a classifier,
        whose ``logits`` are its class scores (a detector's are its raw output, flat, and ``probs`` is empty)
    candidates : a detector's decoded candidates (:class:`npcam.detect.Candidates`), which the detections are
        some of
    placement : where the photo lies in the network input (:class:`npcam.image.Placement`): a detector's boxes
        and maps are brought back to the photo through it
    head_trace : a detector's head values for this image (:meth:`npcam.head.GraphHead.trace`), kept when its
        trunk call held it alone (one image predicted, or a list's last call of one), so that its gradient does
        not run the head's forward again (a YOLOv8n head at 640 px: the head's forward costs twice the trunk's)
    """

    image: np.ndarray
    input: np.ndarray
    features: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    labels: Sequence[str]
    photo_size: tuple[int, int] | None = None
    head_input: np.ndarray | dict[str, np.ndarray] | None = None
    sides: dict[str, np.ndarray] = field(default_factory=dict)
    layers: tuple[np.ndarray, ...] | None = None
    detections: list[Detection] | None = None
    candidates: Candidates | None = None
    placement: Placement | None = None
    head_trace: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.head_input is None:
            object.__setattr__(self, "head_input", pool(self.features[None]))

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``: the photo's own upright size, in which maps, boxes and records are given."""
        return self.photo_size or self.image.shape[:2]

    @property
    def grids(self) -> tuple[np.ndarray, ...]:
        """Every explained layer on its grid, float32 ``[C_s, h_s, w_s]`` each (one for a classifier)."""
        return self.layers if self.layers is not None else (self.features,)

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` most probable classes as ``(index, label, probability)``."""
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(int(i), self.labels[i], float(self.probs[i])) for i in order]

    @property
    def top1(self) -> int:
        return int(np.argmax(self.logits))

    @cached_property
    def pooled(self) -> np.ndarray:
        """float32 ``[C]``: the globally average-pooled features (what a pooled head scored)."""
        return pool(self.features[None])[0]


class Model:
    """A loaded bundle run: the onnxruntime trunk, then the NumPy head.

    Facts about the model (input size, statistics, labels, metadata, path)
    are the bundle's: ``model.bundle.input_size`` etc. (:class:`npcam.bundle.Bundle`).

    Parameters
    ----------
    path : bundle directory
    threads : onnxruntime intra-op threads (None: one per core)
    verify : check the sha256 of every file against ``bundle.json``
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, verify: bool = True):
        self.bundle = bundle_format.read(path, verify)
        warn_if_not_portable(self.bundle)
        self.session = _open_session(self.bundle.path / "trunk.onnx", self.bundle.trunk, self.head, threads)
        batch = self.session.get_inputs()[0].shape[0]
        self._batch_limit = batch if isinstance(batch, int) else None

    @property
    def head(self):
        """The bundle's head (:mod:`npcam.head`), which :meth:`scores` and the methods' probes run."""
        return self.bundle.head

    @property
    def labels(self) -> Sequence[str]:
        """The bundle's K class names."""
        return self.bundle.labels

    def __repr__(self) -> str:
        # a detector's head outputs its raw values (e.g. 15232 for BlazeFace), not one score a class
        classes = len(self.labels) if self.bundle.task == "detect" else self.head.classes
        return (
            f"Model({str(self.bundle.path)!r}, arch={self.bundle.arch!r}, head={self.head.kind!r}, "
            f"channels={self.head.channels}, classes={classes})"
        )

    # image -> layer -> scores

    @property
    def layer_names(self) -> list[str]:
        """The trunk's outputs that are explained layers: ``["features"]``, or a detector's maps (the head's inputs)."""
        return list(self.head.inputs) if len(self.head.inputs) > 1 else ["features"]

    def trunk(self, batch: np.ndarray) -> tuple[np.ndarray | dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run the trunk: float32 ``[N, 3, H, W]`` to the layer (float32 ``[N, C, h, w]``, or ``[N, L, C]`` for
        tokens; ``{name: [N, C_s, h_s, w_s]}`` for a model of several layers) and the head's side inputs
        ``{name: [N, ...]}``, as the trunk outputs them."""
        if self._batch_limit is not None and len(batch) != self._batch_limit:
            parts = [self.trunk(batch[i : i + 1]) for i in range(len(batch))]
            sides = {name: np.concatenate([p[1][name] for p in parts]) for name in parts[0][1]}
            if isinstance(parts[0][0], dict):
                return {name: np.concatenate([p[0][name] for p in parts]) for name in parts[0][0]}, sides
            return np.concatenate([p[0] for p in parts]), sides
        trunk = self.bundle.path / "trunk.onnx"
        names, layer_names = list(self.head.sides), self.layer_names
        try:
            outputs = self.session.run([*layer_names, *names], {"image": batch})
        except Exception as e:  # onnxruntime's own types (a failed allocation, a shape it cannot take)
            raise NpcamError(f"{trunk}: onnxruntime cannot run it on this input ({_first_line(e)})") from None
        layers, sides = outputs[: len(layer_names)], outputs[len(layer_names) :]
        for name, layer in zip(layer_names, layers):
            expected = _layer_shape(self.head, name)
            if layer.ndim != len(expected) or any(e not in (None, d) for e, d in zip(expected[1:], layer.shape[1:])):
                shown = ", ".join(str(d) if d else "hw"[i % 2] for i, d in enumerate(expected[1:], 1))
                raise NpcamError(f"{trunk}: gives {name} of shape {list(layer.shape)}, the head expects [N, {shown}]")
        layer = layers[0] if len(layers) == 1 else dict(zip(layer_names, layers))
        return layer, dict(zip(names, sides))

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Run the trunk: float32 ``[N, 3, H, W]`` to the layer on its grid, float32 ``[N, C, h, w]``."""
        return self.to_grid(self.trunk(batch)[0])

    def to_grid(self, layer: np.ndarray) -> np.ndarray:
        """The layer (or a gradient of its shape) on its grid: ``[N, C, h, w]``, in the input's dtype.

        Spatial and pooled layers are already; tokens ``[N, L, C]`` lose their ``prefix`` tokens (CLS,
        distillation) and their patch tokens are laid row-major on the ``(gh, gw)`` grid, channels first.
        """
        if self.head.layout != "tokens":
            return layer  # spatial or pooled (a model of several layers is spatial: a dict of maps)
        (gh, gw), prefix = self.head.grid, self.head.prefix
        patches = layer[:, prefix:]
        return np.ascontiguousarray(patches.reshape(len(layer), gh, gw, patches.shape[2]).transpose(0, 3, 1, 2))

    def from_grid(self, grid: np.ndarray, like: np.ndarray) -> np.ndarray:
        """Head inputs made from maps ``grid`` ``[N, C, h, w]``: the inverse of :meth:`to_grid`.

        Tokens: ``grid``'s positions become the patch tokens, the prefix tokens are ``like``'s (one image's
        head input ``[1, L, C]``, e.g. :attr:`Prediction.head_input`). Spatial: ``grid`` itself. Pooled: its
        average ``[N, C]``, the pooled vector (so that ``head_scores(from_grid(g, like), sides)`` scores maps
        ``g`` with any head).
        """
        layout = self.head.layout
        if layout == "pooled":
            return pool(grid)
        if layout == "spatial":
            return grid
        n, channels = grid.shape[:2]
        patches = grid.reshape(n, channels, -1).transpose(0, 2, 1)
        prefix = np.broadcast_to(like[:1, : self.head.prefix], (n, self.head.prefix, channels))
        return np.concatenate([prefix.astype(patches.dtype, copy=False), patches], axis=1)

    def head_scores(self, x, sides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The head: float ``[N, *input_shape[1:]]`` head inputs (``{name: ...}`` for several layers) to float32
        ``[N, K]`` outputs: a classifier's class scores, a detector's raw output, flat.

        ``sides`` are the side inputs ``{name: [N or 1, ...]}`` (a batch of 1 is shared by all N).
        """
        return self.head.forward(x, sides or {}).astype(np.float32, copy=False)

    def _head_input(self, layer):
        """What the head scores, from the trunk's layer: its average for a pooled head, else the layer."""
        return pool(layer) if self.head.layout == "pooled" else layer

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """The whole network: float32 ``[N, 3, H, W]`` inputs to float32 ``[N, K]`` outputs (:meth:`head_scores`)."""
        layer, sides = self.trunk(batch)
        return self.head_scores(self._head_input(layer), sides)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Class scores ``[..., K]`` to probabilities: softmax, or sigmoids for a multi-label bundle."""
        return probabilities(scores, self.bundle.multi_label)

    def preprocess(
        self, image: np.ndarray | ImageLike, keep_aspect: bool = False, size: int | Size | None = None
    ) -> np.ndarray:
        """:func:`npcam.image.preprocess` with this model's input size and statistics: ``[1, 3, h, w]``.

        ``size`` is ``(H, W)``, or ``S`` for ``S x S`` (default: the bundle's).
        """
        size = self.check_input_options(keep_aspect, size)
        pil = image if isinstance(image, Image.Image) and image.mode == "RGB" else open_image(image)
        return self._input(pil, keep_aspect, size)

    def _input(self, pil: Image.Image, keep_aspect: bool, size: Size | None) -> np.ndarray:
        b = self.bundle
        return preprocess(pil, size or b.input_size, b.mean, b.std, keep_aspect, pad=b.letterbox)

    def placement(self, photo: tuple[int, int], input_size: tuple[int, int]) -> Placement:
        """Where a photo of ``(H, W)`` lies in an input of ``input_size``: letterboxed or stretched, as the bundle
        feeds its model (:func:`npcam.image.letterbox_placement`)."""
        place = letterbox_placement if self.bundle.letterbox is not None else stretch_placement
        return place(photo[0], photo[1], input_size)

    def check_input_options(self, keep_aspect: bool = False, size: int | Size | None = None) -> Size | None:
        """Refuse ``size``/``keep_aspect`` that this trunk cannot take, in one line; returns ``size`` as ``(H, W)``.

        Each side must give at least two feature cells (twice the stride), or
        be no smaller than the model's own side (a model made for 48 px at a
        stride of 32 takes 48).
        """
        size = as_size(size)
        native = self.bundle.input_size
        if self.bundle.letterbox is not None and keep_aspect:
            raise NpcamError(f"{self.bundle.path}: this model letterboxes its input, so it always keeps the aspect")
        if self.bundle.fixed_size and (keep_aspect or (size and size != native)):
            option = "keep_aspect" if keep_aspect else f"size={format_size(size)}"
            raise NpcamError(
                f"{self.bundle.path}: this model's trunk takes only {format_size(native)} inputs (height x "
                f"width); {option} cannot be used with it"
            )
        stride = self.bundle.stride
        for side, value, own in zip(("height", "width"), size or (), native):
            smallest = min(2 * stride, own)
            if value < smallest:
                raise NpcamError(
                    f"input size {format_size(size)} is too small for this model: its {side} must be at least "
                    f"{smallest} (2 feature cells at a stride of {stride}"
                    + (")" if smallest == 2 * stride else ", or the model's own)")
                )
        return size

    @overload
    def predict(
        self, images: ImageLike, *, keep_aspect: bool = ..., size: int | Size | None = ..., max_pixels: int = ...
    ) -> Prediction: ...

    @overload
    def predict(
        self,
        images: list[ImageLike] | tuple[ImageLike, ...],
        *,
        keep_aspect: bool = ...,
        size: int | Size | None = ...,
        max_pixels: int = ...,
    ) -> list[Prediction]: ...

    def predict(self, images, *, keep_aspect=False, size=None, max_pixels=MAX_PIXELS, thresholds=DEFAULT_THRESHOLDS):
        """Read, preprocess and classify one image, or a list (or tuple) of them.

        An image is a path, bytes, a file object, a PIL image or a uint8 array
        (see :func:`npcam.image.open_image`); a list gives a list of
        predictions, inputs of equal shape sharing one trunk call. ``size``
        ``(H, W)``, or ``S`` for ``S x S``, overrides the bundle's input size
        (the trunk is fully convolutional, unless the bundle says it takes one
        size only). ``keep_aspect``: see :func:`npcam.image.input_size`.
        ``max_pixels``: larger images are refused before decoding. ``thresholds``: which of a detector's
        candidates are kept (:class:`npcam.detect.Thresholds`; the YOLO tools' defaults).
        """
        many = isinstance(images, (list, tuple))
        size = self.check_input_options(keep_aspect, size)
        pils = [open_image(image, max_pixels) for image in (images if many else [images])]
        inputs = [self._input(pil, keep_aspect, size) for pil in pils]
        predictions = self.classify([np.asarray(pil) for pil in pils], inputs, thresholds=thresholds)
        return predictions if many else predictions[0]

    def classify(
        self,
        images: Sequence[np.ndarray],
        inputs: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int] | None] | None = None,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
    ) -> list[Prediction]:
        """Classify (or detect in) RGB uint8 images whose network inputs (from :meth:`preprocess`) are already made.

        For callers that read and preprocess themselves (:func:`npcam.explain`
        decodes JPEGs at reduced scale); :meth:`predict` does both for you.
        Inputs of equal shape share trunk calls, :data:`TRUNK_BATCH` at a time. ``sizes`` gives each
        photo's own ``(H, W)`` where its image was decoded smaller
        (:attr:`Prediction.photo_size`). ``thresholds``: see :meth:`predict`.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.shape, []).append(i)
        batches = [ids[s : s + TRUNK_BATCH] for ids in groups.values() for s in range(0, len(ids), TRUNK_BATCH)]
        preds: list[Prediction | None] = [None] * len(images)
        for members in batches:
            batch = np.concatenate([inputs[i] for i in members])
            layer, sides = self.trunk(batch)
            x = self._head_input(layer)
            trace = None
            if self.bundle.task == "detect" and len(members) == 1:  # its values, for the gradient's backward pass
                trace = self.head.trace(x, sides)
                logits = trace[self.head.output].reshape(1, -1).astype(np.float32)
            else:
                logits = self.head_scores(x, sides)
            grid = self.to_grid(layer)
            for j, i in enumerate(members):
                size = sizes[i] if sizes is not None and sizes[i] != images[i].shape[:2] else None
                own = {name: side[j : j + 1] for name, side in sides.items()}
                if isinstance(grid, dict):
                    layers = tuple(g[j] for g in grid.values())
                    head_input = {name: v[j : j + 1] for name, v in x.items()}
                    first = layers[0]
                else:
                    layers, head_input, first = None, x[j : j + 1], grid[j]
                if self.bundle.task == "detect":
                    photo = size or images[i].shape[:2]
                    placement = self.placement(photo, batch.shape[2:])
                    candidates = self.bundle.decoder.decode(logits[j][None])[0]
                    detections = self._detections(candidates, placement, photo, thresholds)
                    probs = np.zeros(0, dtype=np.float32)
                else:
                    placement = candidates = detections = None
                    probs = self.probabilities(logits[j])
                preds[i] = Prediction(
                    images[i], batch[j : j + 1], first, logits[j], probs, self.labels, size, head_input, own,
                    layers, detections, candidates, placement, trace,
                )  # fmt: skip
        return preds

    def _detections(
        self, candidates: Candidates, placement: Placement, photo: tuple[int, int], thresholds: Thresholds
    ) -> list[Detection]:
        """The candidates NMS keeps, their boxes in the photo's pixels; a box that clipping to the photo leaves
        empty (it lay in the letterbox's pad) is dropped."""
        kept = select(candidates, thresholds.conf, thresholds.iou, thresholds.max_det)
        if not kept:
            return []
        boxes = placement.to_photo(candidates.boxes[[a for a, _, _ in kept]], photo)
        return [
            Detection(tuple(float(v) for v in box), c, self.labels[c], score, a)
            for (a, c, score), box in zip(kept, boxes)
            if box[2] > box[0] and box[3] > box[1]
        ]

    # features -> target -> weights -> maps

    @property
    def default_method(self) -> str:
        """The method used when none is named: ``cam`` on an affine head, ``gradcam`` on any other, ``hirescam`` for
        a detector (:func:`npcam.methods.default_name`)."""
        return methods_lib.default_name(self.head.kind, self.bundle.task)

    def method(self, name: str | None) -> methods_lib.Method:
        """The method called ``name`` (None: :attr:`default_method`), refused in one line if this head cannot take it."""
        return methods_lib.resolve(name, self.head.kind, self.bundle.path, self.bundle.task)

    def target(self, what, prediction: Prediction | None = None) -> Target:
        """What to explain as a :class:`~npcam.targets.Target`: a target as it is; for a classifier, a class (an index
        or a label, :func:`npcam.labels.class_index`) or a list of them (:class:`~npcam.targets.ClassScores`);
        for a detector, a detection of ``prediction`` (its index in ``prediction.detections``) or a list of them
        (:class:`~npcam.targets.DetectionScores`). The bundle's task decides (:data:`npcam.targets.REQUESTS`)."""
        return targets.make(self, prediction, what)

    def probes(
        self,
        prediction: Prediction,
        what,
        progress: OnProgress | None = None,
        should_stop: ShouldStop | None = None,
        options: MethodOptions | None = None,
    ) -> list[Probe]:
        """What a method sees of ``prediction`` explaining ``what`` (:meth:`target`) at each explained layer (one
        for a classifier, one per stride for a detector): the layer ``A``, the targets' gradient with respect to
        it, and their scores under perturbations (:class:`npcam.probe.Probe`); ``options`` are the methods' (a
        :class:`npcam.probe.MethodOptions`; None: its defaults)."""
        target, shared = self.target(what, prediction), {}
        return [
            Probe(self, prediction, target, progress, should_stop, layer, shared, options)
            for layer in range(len(prediction.grids))
        ]

    def probe(
        self,
        prediction: Prediction,
        what,
        progress: OnProgress | None = None,
        should_stop: ShouldStop | None = None,
    ) -> Probe:
        """:meth:`probes`' first layer: the one layer of a classifier."""
        return self.probes(prediction, what, progress, should_stop)[0]

    def cam(
        self,
        prediction: Prediction | ImageLike,
        classes: int | str | Sequence[int | str] | Target | None = None,
        size: tuple[int, int] | None = None,
        method: str | None = None,
        progress: OnProgress | None = None,
        should_stop: ShouldStop | None = None,
        detection: int | Sequence[int] | None = None,
        options: MethodOptions | None = None,
    ) -> np.ndarray:
        """Class activation map(s), in [0, 1].

        Parameters
        ----------
        prediction : a :class:`Prediction`, or an image to predict first
        classes : what to explain: one class (index or label, :func:`npcam.labels.class_index`), a list of
            them, a :class:`~npcam.targets.Target`, or None for the top-1
        size : ``(H, W)`` to upsample to, e.g. ``prediction.image.shape[:2]``;
            None keeps the feature resolution ``(h, w)`` (a detector's: the network input's, cropped to the photo)
        method : a name from :data:`npcam.methods.METHODS` (default: ``cam``,
            or ``gradcam`` for a head that is not affine)
        progress : called as ``progress(done, total)`` by methods with extra passes
        should_stop : checked between the batches of multi-pass methods; when it
            returns true, :class:`npcam.cancel.Cancelled` is raised
        detection : a detector's detection to explain, an index in ``prediction.detections`` (0, the best, by
            default), or a list of them
        options : the methods' options (:class:`npcam.probe.MethodOptions`: D-RISE's masks); None: the defaults

        Returns
        -------
        float32 ``[h, w]`` (or ``[H, W]``) for one class or detection, ``[k, ...]`` for a list or a target.
        """
        if not isinstance(prediction, Prediction):
            prediction = self.predict(prediction)
        detector = self.bundle.task == "detect"
        if detector:
            what = classes if classes is not None else 0 if detection is None else detection
        else:
            what = prediction.top1 if classes is None else classes
        single = isinstance(what, (int, str, np.integer))
        probes = self.probes(prediction, what, progress, should_stop, options)
        chosen = self.method(method)
        if not detector:
            maps = methods_lib.maps(chosen, probes, size)
        else:  # at the network input, then the photo's part of it (a letterbox's pad cut away), scaled to its max
            maps = methods_lib.maps(chosen, probes, tuple(prediction.input.shape[2:]))
            place = prediction.placement
            maps = normalize(maps[:, place.top : place.top + place.size[0], place.left : place.left + place.size[1]])
            if size is not None:
                maps = upsample(maps, size)
        return maps[0] if single else maps


def load(path: str | os.PathLike | None = None, threads: int | None = None, verify: bool = True) -> Model:
    """Load a model bundle (default: :func:`default_model_dir`)."""
    return Model(default_model_dir() if path is None else path, threads=threads, verify=verify)


def _layer_shape(head, name: str = "features") -> tuple[int | None, ...]:
    """The trunk's output ``name`` as the head needs it, None where any size goes (the batch, a pooled map's h, w).
    ``features`` is the one layer of a classifier; a model of several layers names each after the head's input."""
    if head.layout == "pooled":
        return (None, head.channels, None, None)
    shape = head.inputs[name] if len(head.inputs) > 1 else head.input_shape
    return (None, *shape[1:])


def _open_session(path: Path, model: bytes, head, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a refused model's error is the one line raised below
    if threads:
        options.intra_op_num_threads = threads
    # Spinning threads steal the core that decoding and encoding need between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Only the ONNX protobuf that npcam.bundle checked (self-contained), never onnxruntime's other format.
    options.add_session_config_entry("session.load_model_format", "ONNX")
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad models
        raise NpcamError(f"{path}: not a usable ONNX model ({_first_line(e)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != ["image"] or len(inputs[0].shape) != 4:
        raise NpcamError(f"{path}: expected one input 'image' [N,3,H,W]")
    names = [o.name for o in outputs]
    layers = list(head.inputs) if len(head.inputs) > 1 else ["features"]
    for name in [*layers, *head.sides]:
        if name not in names:
            raise NpcamError(f"{path}: has no output {name!r}" + ("" if name in layers else " (a side input)"))
    for name in layers:
        shape = next(o.shape for o in outputs if o.name == name)
        expected = _layer_shape(head, name)
        if len(shape) != len(expected):
            wanted = "[N,L,C]" if head.layout == "tokens" else "[N,C,h,w]"
            raise NpcamError(f"{path}: output {name!r} must be {wanted}, not {shape}")
        channel_axis = 2 if head.layout == "tokens" else 1
        channels = expected[channel_axis]
        if isinstance(shape[channel_axis], int) and shape[channel_axis] != channels:
            raise NpcamError(f"{path}: {name!r} gives {shape[channel_axis]} channels, the head expects {channels}")
    return session


def _first_line(error: Exception, limit: int = 400) -> str:
    """An onnxruntime error's first line, at most ``limit`` characters: the rest is its C++ context."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "…"
