"""A loaded model bundle, ready to predict and explain.

The bundle's format is owned by :mod:`npcam.bundle`; this module runs it: the
trunk in onnxruntime, the head in NumPy.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import overload

import numpy as np
import onnxruntime as ort
from PIL import Image

from . import bundle as bundle_format
from . import methods as methods_lib
from .cam import normalize, pool, probabilities
from .errors import NpcamError
from .image import MAX_PIXELS, ImageLike, Size, as_size, format_size, open_image, preprocess
from .labels import class_index
from .upsample import upsample

default_model_dir = bundle_format.default_model_dir


@dataclass(frozen=True)
class Prediction:
    """One image through the network.

    Attributes
    ----------
    image : uint8 ``[H, W, 3]``, the upright RGB image as read
    input : float32 ``[1, 3, h_in, w_in]``, the network input made from it
    features : float32 ``[C, h, w]``, the trunk's last conv features
    logits : float32 ``[K]``, the head's class scores
    probs : float32 ``[K]``, softmax of ``logits`` (each class's sigmoid for a multi-label model)
    labels : the K class names
    photo_size : ``(H, W)`` of the photo when ``image`` was decoded at a reduced
        scale (:func:`npcam.image.read_photo`); None when ``image`` is full size
    """

    image: np.ndarray
    input: np.ndarray
    features: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    labels: Sequence[str]
    photo_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``: the photo's own upright size, in which maps, boxes and records are given."""
        return self.photo_size or self.image.shape[:2]

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` most probable classes as ``(index, label, probability)``."""
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(int(i), self.labels[i], float(self.probs[i])) for i in order]

    @property
    def top1(self) -> int:
        return int(np.argmax(self.logits))

    @cached_property
    def pooled(self) -> np.ndarray:
        """float32 ``[C]``: the globally average-pooled features the head scored."""
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
        _warn_if_not_portable(self.bundle)
        self.session = _open_session(self.bundle.path / "trunk.onnx", self.bundle.trunk, self.head.channels, threads)
        batch = self.session.get_inputs()[0].shape[0]
        self._batch_limit = batch if isinstance(batch, int) else None

    @property
    def head(self):
        """The bundle's head (:mod:`npcam.head`), which :meth:`scores` and the methods run."""
        return self.bundle.head

    @property
    def labels(self) -> Sequence[str]:
        """The bundle's K class names."""
        return self.bundle.labels

    def __repr__(self) -> str:
        return (
            f"Model({str(self.bundle.path)!r}, arch={self.bundle.arch!r}, head={self.head.kind!r}, "
            f"channels={self.head.channels}, classes={self.head.classes})"
        )

    # image -> features -> scores

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Run the trunk: float32 ``[N, 3, H, W]`` to float32 ``[N, C, h, w]``."""
        if self._batch_limit is not None and len(batch) != self._batch_limit:
            return np.concatenate([self.features(batch[i : i + 1]) for i in range(len(batch))])
        trunk = self.bundle.path / "trunk.onnx"
        try:
            (features,) = self.session.run(["features"], {"image": batch})
        except Exception as e:  # onnxruntime's own types (a failed allocation, a shape it cannot take)
            raise NpcamError(f"{trunk}: onnxruntime cannot run it on this input ({_first_line(e)})") from None
        if features.ndim != 4 or features.shape[1] != self.head.channels:
            raise NpcamError(
                f"{trunk}: gives features of shape {list(features.shape)}, "
                f"the head expects [N, {self.head.channels}, h, w]"
            )
        return features

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """The whole network: float32 ``[N, 3, H, W]`` inputs to float32 ``[N, K]`` class scores."""
        return self.head.forward(pool(self.features(batch)))

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
        return preprocess(pil, size or b.input_size, b.mean, b.std, keep_aspect)

    def check_input_options(self, keep_aspect: bool = False, size: int | Size | None = None) -> Size | None:
        """Refuse ``size``/``keep_aspect`` that this trunk cannot take, in one line; returns ``size`` as ``(H, W)``.

        Each side must give at least two feature cells (twice the stride), or
        be no smaller than the model's own side (a model made for 48 px at a
        stride of 32 takes 48).
        """
        size = as_size(size)
        native = self.bundle.input_size
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

    def predict(self, images, *, keep_aspect=False, size=None, max_pixels=MAX_PIXELS):
        """Read, preprocess and classify one image, or a list (or tuple) of them.

        An image is a path, bytes, a file object, a PIL image or a uint8 array
        (see :func:`npcam.image.open_image`); a list gives a list of
        predictions, inputs of equal shape sharing one trunk call. ``size``
        ``(H, W)``, or ``S`` for ``S x S``, overrides the bundle's input size
        (the trunk is fully convolutional, unless the bundle says it takes one
        size only). ``keep_aspect``: see :func:`npcam.image.input_size`.
        ``max_pixels``: larger images are refused before decoding.
        """
        many = isinstance(images, (list, tuple))
        size = self.check_input_options(keep_aspect, size)
        pils = [open_image(image, max_pixels) for image in (images if many else [images])]
        inputs = [self._input(pil, keep_aspect, size) for pil in pils]
        predictions = self.classify([np.asarray(pil) for pil in pils], inputs)
        return predictions if many else predictions[0]

    def classify(
        self,
        images: Sequence[np.ndarray],
        inputs: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[Prediction]:
        """Classify RGB uint8 images whose network inputs (from :meth:`preprocess`) are already made.

        For callers that read and preprocess themselves (:func:`npcam.explain`
        decodes JPEGs at reduced scale); :meth:`predict` does both for you.
        Inputs of equal shape share one trunk call. ``sizes`` gives each
        photo's own ``(H, W)`` where its image was decoded smaller
        (:attr:`Prediction.photo_size`).
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.shape, []).append(i)
        preds: list[Prediction | None] = [None] * len(images)
        for members in groups.values():
            batch = np.concatenate([inputs[i] for i in members])
            features = self.features(batch)
            logits = self.head.forward(pool(features))
            for j, i in enumerate(members):
                size = sizes[i] if sizes is not None and sizes[i] != images[i].shape[:2] else None
                probs = self.probabilities(logits[j])
                preds[i] = Prediction(images[i], batch[j : j + 1], features[j], logits[j], probs, self.labels, size)
        return preds

    # features -> maps

    def cam(
        self,
        prediction: Prediction | ImageLike,
        classes: int | str | Sequence[int | str] | None = None,
        size: tuple[int, int] | None = None,
        method: str | None = None,
        progress: methods_lib.Progress | None = None,
        should_stop: methods_lib.ShouldStop | None = None,
    ) -> np.ndarray:
        """Class activation map(s), in [0, 1].

        Parameters
        ----------
        prediction : a :class:`Prediction`, or an image to predict first
        classes : one class (index or label, :func:`npcam.labels.class_index`),
            a list of them, or None for the top-1
        size : ``(H, W)`` to upsample to, e.g. ``prediction.image.shape[:2]``;
            None keeps the feature resolution ``(h, w)``
        method : a name from :data:`npcam.methods.METHODS` (default: ``cam``,
            or ``gradcam`` for a head that is not affine)
        progress : called as ``progress(done, total)`` by methods with extra passes
        should_stop : checked between the batches of multi-pass methods; when it
            returns true, :class:`npcam.methods.Cancelled` is raised

        Returns
        -------
        float32 ``[h, w]`` (or ``[H, W]``) for one class, ``[k, ...]`` for a list.
        """
        if not isinstance(prediction, Prediction):
            prediction = self.predict(prediction)
        single = classes is None or isinstance(classes, (int, str, np.integer))
        wanted = [prediction.top1] if classes is None else [classes] if single else list(classes)
        indices = [class_index(self.labels, c) for c in wanted]
        chosen = methods_lib.resolve(method, self.head.kind, self.bundle.path)
        maps = normalize(chosen.maps(self, prediction, indices, progress, should_stop))
        if size is not None:
            maps = upsample(maps, size)
        return maps[0] if single else maps


def load(path: str | os.PathLike | None = None, threads: int | None = None, verify: bool = True) -> Model:
    """Load a model bundle (default: :func:`default_model_dir`)."""
    return Model(default_model_dir() if path is None else path, threads=threads, verify=verify)


def cpu_family(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The kind of CPU whose onnxruntime int8 kernels compute alike: ``"x86_64 vnni"``, ``"x86_64"`` (no
    VNNI: ``vpmaddubsw``, which saturates with 8-bit weights) or the architecture (e.g. ``"aarch64"``).

    ``cpuinfo`` is a ``/proc/cpuinfo`` text (default: this machine's), ``machine`` ``platform.machine()``.
    """
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64", "i686"):
        return machine
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return f"{machine} vnni" if {"avx512_vnni", "avx_vnni"} & set(flags) else machine


_warned: set[str] = set()


def _warn_if_not_portable(bundle: bundle_format.Bundle) -> None:
    """One line on stderr, once per process, when an int8 trunk whose answers depend on the CPU's int8
    kernels is loaded on a kind of CPU where they were not measured to be the same."""
    same_on = bundle.int8_same_on
    if same_on is None or "int8" in _warned:
        return
    here = cpu_family()
    if here not in same_on:
        _warned.add("int8")
        print(
            f"npcam: warning: {bundle.path}: its int8 trunk ({bundle.meta['int8'].get('settings')}) computes as "
            f"measured on {', '.join(same_on)}, not necessarily on this CPU ({here}): its answers may differ from "
            "those measured (docs/export.md, int8)",
            file=sys.stderr,
        )


def _open_session(path: Path, model: bytes, channels: int, threads: int | None) -> ort.InferenceSession:
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
    if "features" not in [o.name for o in outputs]:
        raise NpcamError(f"{path}: has no output 'features'")
    shape = next(o.shape for o in outputs if o.name == "features")
    if len(shape) != 4:
        raise NpcamError(f"{path}: output 'features' must be [N,C,h,w], not {shape}")
    if isinstance(shape[1], int) and shape[1] != channels:
        raise NpcamError(f"{path}: gives {shape[1]} channels, the head expects {channels}")
    return session


def _first_line(error: Exception, limit: int = 400) -> str:
    """An onnxruntime error's first line, at most ``limit`` characters: the rest is its C++ context."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "…"
