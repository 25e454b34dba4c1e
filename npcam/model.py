"""A model bundle on disk, loaded and checked, ready to predict and explain.

A bundle is a directory written by ``python -m export``::

    trunk.onnx      image [N,3,H,W] float32 -> features [N,C,h,w] float32
    fc_weight.npy   float32 [K, C]
    fc_bias.npy     float32 [K]
    labels.json     K class names
    bundle.json     format, arch, input size, mean/std, sha256 of each file

Nothing in a bundle is executed as Python: arrays load with
``allow_pickle=False`` and the trunk runs in onnxruntime.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from . import cam as cam_lib
from . import render
from .errors import NpcamError
from .image import MAX_PIXELS, ImageLike, open_image, preprocess
from .upsample import upsample

FORMAT = "npcam-bundle"
FORMAT_VERSION = 1
FILES = ("trunk.onnx", "fc_weight.npy", "fc_bias.npy", "labels.json")
CACHE_DIR = Path("~/.cache/npcam")
# Looked for in this order when no model is named: ResNet-18 is the default,
# EfficientNet-Lite0 is what the offline demo exports when ResNet-18 weights
# cannot be had.
DEFAULT_ARCHS = ("resnet18", "efficientnet_lite0")


def default_model_dir() -> Path:
    """``$NPCAM_MODEL``, else the first existing of ``~/.cache/npcam/{resnet18,efficientnet_lite0}``."""
    if os.environ.get("NPCAM_MODEL"):
        return Path(os.environ["NPCAM_MODEL"]).expanduser()
    candidates = [(CACHE_DIR / arch).expanduser() for arch in DEFAULT_ARCHS]
    return next((c for c in candidates if c.is_dir()), candidates[0])


@dataclass(frozen=True)
class Prediction:
    """One image through the network.

    Attributes
    ----------
    image : uint8 ``[H, W, 3]``, the upright RGB image as read
    features : float32 ``[C, h, w]``, the trunk's last conv features
    logits : float32 ``[K]``
    probs : float32 ``[K]``, softmax of ``logits``
    labels : the K class names
    """

    image: np.ndarray
    features: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    labels: Sequence[str]

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` most probable classes as ``(index, label, probability)``."""
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(int(i), self.labels[i], float(self.probs[i])) for i in order]

    @property
    def top1(self) -> int:
        return int(np.argmax(self.logits))


class Model:
    """A loaded bundle: the onnxruntime trunk, the FC layer and the labels.

    Parameters
    ----------
    path : bundle directory
    threads : onnxruntime intra-op threads (None: one per core)
    verify : check the sha256 of every file against ``bundle.json``
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, verify: bool = True):
        self.path = Path(path).expanduser()
        meta = _read_meta(self.path)
        blobs = {name: _read_file(self.path / name) for name in FILES}
        if verify:
            _check_hashes(self.path, meta, blobs)
        self.meta = meta
        self.arch: str = meta["arch"]
        self.input_size: int = int(meta["input_size"])
        self.mean = tuple(float(v) for v in meta["mean"])
        self.std = tuple(float(v) for v in meta["std"])
        # Parsed from the bytes that were hashed, not read again: what was checked is what runs.
        self.fc_weight = _load_array(self.path / "fc_weight.npy", blobs["fc_weight.npy"], ndim=2)
        self.fc_bias = _load_array(self.path / "fc_bias.npy", blobs["fc_bias.npy"], ndim=1)
        classes, channels = self.fc_weight.shape
        if self.fc_bias.shape != (classes,):
            raise NpcamError(
                f"{self.path / 'fc_bias.npy'}: shape {list(self.fc_bias.shape)}, "
                f"expected [{classes}] to match fc_weight.npy"
            )
        self.labels = _load_labels(self.path / "labels.json", blobs["labels.json"], classes)
        self.session = _open_session(self.path / "trunk.onnx", blobs["trunk.onnx"], channels, threads)

    def __repr__(self) -> str:
        classes, channels = self.fc_weight.shape
        return f"Model({str(self.path)!r}, arch={self.arch!r}, channels={channels}, classes={classes})"

    # image -> features -> logits

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Run the trunk: float32 ``[N, 3, H, W]`` to float32 ``[N, C, h, w]``."""
        (features,) = self.session.run(["features"], {"image": batch})
        if features.shape[1] != self.fc_weight.shape[1]:
            raise NpcamError(
                f"{self.path / 'trunk.onnx'}: gives {features.shape[1]} channels, "
                f"fc_weight.npy expects {self.fc_weight.shape[1]}"
            )
        return features

    def predict(
        self,
        image: ImageLike,
        keep_aspect: bool = False,
        max_pixels: int = MAX_PIXELS,
        size: int | None = None,
    ) -> Prediction:
        """Read, preprocess and classify one image (one trunk call).

        ``size`` overrides the bundle's input size (the trunk is fully convolutional).
        """
        pil = open_image(image, max_pixels)
        return self.predict_batch([np.asarray(pil)], [self.preprocess(pil, keep_aspect, size)])[0]

    def predict_many(
        self, images: Sequence[np.ndarray], keep_aspect: bool = False, size: int | None = None
    ) -> list[Prediction]:
        """Classify RGB uint8 ``[H, W, 3]`` images, one trunk call per group of equal input shape."""
        return self.predict_batch(images, [self.preprocess(rgb, keep_aspect, size) for rgb in images])

    def preprocess(
        self, image: np.ndarray | Image.Image, keep_aspect: bool = False, size: int | None = None
    ) -> np.ndarray:
        """:func:`npcam.image.preprocess` with this model's input size and statistics: ``[1, 3, h, w]``."""
        return preprocess(image, size or self.input_size, self.mean, self.std, keep_aspect)

    def predict_batch(self, images: Sequence[np.ndarray], inputs: Sequence[np.ndarray]) -> list[Prediction]:
        """Classify images whose network inputs (from :meth:`preprocess`) are already made.

        Inputs of equal shape share one trunk call.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.shape, []).append(i)
        preds: list[Prediction | None] = [None] * len(images)
        for members in groups.values():
            features = self.features(np.concatenate([inputs[i] for i in members]))
            logits = cam_lib.logits(features, self.fc_weight, self.fc_bias)
            for i, f, z in zip(members, features, logits):
                preds[i] = Prediction(images[i], f, z, cam_lib.softmax(z), self.labels)
        return preds

    # features -> CAM -> overlay

    def class_index(self, spec: int | str) -> int:
        """A class given as an index or a label (any of its comma-separated names)."""
        classes = len(self.labels)
        if isinstance(spec, (int, np.integer)) or str(spec).strip().isdigit():
            index = int(spec)
            if not 0 <= index < classes:
                raise NpcamError(f"class {index} is out of range: this model has classes 0..{classes - 1}")
            return index
        wanted = str(spec).strip().lower()
        matches = [
            i
            for i, label in enumerate(self.labels)
            if wanted == label.lower() or wanted in (n.strip().lower() for n in label.split(","))
        ]
        if not matches:
            raise NpcamError(f"no class is named {spec!r}")
        if len(matches) > 1:
            names = "; ".join(f"{i} = {self.labels[i]}" for i in matches)
            raise NpcamError(f"class {spec!r} is ambiguous ({names}): give the index")
        return matches[0]

    def cam(
        self,
        prediction: Prediction | ImageLike,
        classes: int | str | Sequence[int | str] | None = None,
        size: tuple[int, int] | None = None,
        weighting: str = "fc",
    ) -> np.ndarray:
        """Class activation map(s), in [0, 1].

        Parameters
        ----------
        prediction : a :class:`Prediction`, or an image to predict first
        classes : one class (index or label), a list of them, or None for the top-1
        size : ``(H, W)`` to upsample to, e.g. ``prediction.image.shape[:2]``;
            None keeps the feature resolution ``(h, w)``
        weighting : "fc" (the paper) or "softmax" (the seed tutorial), see
            :func:`npcam.cam.class_activation_maps`

        Returns
        -------
        float32 ``[h, w]`` (or ``[H, W]``) for one class, ``[k, ...]`` for a list.
        """
        if not isinstance(prediction, Prediction):
            prediction = self.predict(prediction)
        single = classes is None or isinstance(classes, (int, str, np.integer))
        wanted = [prediction.top1] if classes is None else [classes] if single else list(classes)
        indices = [self.class_index(c) for c in wanted]
        maps = cam_lib.class_activation_maps(prediction.features, self.fc_weight, indices, weighting)
        if size is not None:
            maps = upsample(maps, size)
        return maps[0] if single else maps

    def overlay(
        self,
        prediction: Prediction | ImageLike,
        class_: int | str | None = None,
        alpha: float = 0.5,
        weighting: str = "fc",
    ) -> np.ndarray:
        """The jet-coloured CAM of one class over the image: uint8 ``[H, W, 3]``."""
        if not isinstance(prediction, Prediction):
            prediction = self.predict(prediction)
        full = self.cam(prediction, class_, size=prediction.image.shape[:2], weighting=weighting)
        return render.overlay(prediction.image, full, alpha)


def load(path: str | os.PathLike | None = None, threads: int | None = None, verify: bool = True) -> Model:
    """Load a model bundle (default: :func:`default_model_dir`)."""
    return Model(default_model_dir() if path is None else path, threads=threads, verify=verify)


# Reading and checking the bundle's files


def _read_meta(path: Path) -> dict:
    meta_file = path / "bundle.json"
    if not path.is_dir():
        raise NpcamError(
            f"{path}: no model bundle here; create one with `python -m export resnet18 --out {path}` (see the README)"
        )
    try:
        meta = json.loads(_read_file(meta_file))
    except (ValueError, UnicodeDecodeError) as e:
        raise NpcamError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NpcamError(f"{meta_file}: not an npcam bundle description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise NpcamError(
            f"{meta_file}: bundle format version {meta.get('format_version')!r}, this npcam reads "
            f"{FORMAT_VERSION}; export the model again"
        )
    missing = [k for k in ("arch", "input_size", "mean", "std", "files") if k not in meta]
    if missing:
        raise NpcamError(f"{meta_file}: missing keys {missing}")
    if not (isinstance(meta["input_size"], int) and meta["input_size"] > 0):
        raise NpcamError(f"{meta_file}: input_size must be a positive integer")
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            raise NpcamError(f"{meta_file}: {key} must be 3 numbers")
    if not all(v > 0 for v in meta["std"]):
        raise NpcamError(f"{meta_file}: std must be positive")
    return meta


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NpcamError(f"{path}: missing from the bundle") from None
    except OSError as e:
        raise NpcamError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_hashes(path: Path, meta: dict, blobs: dict[str, bytes]) -> None:
    files = meta["files"]
    for name, data in blobs.items():
        expected = files.get(name) if isinstance(files, dict) else None
        if expected is None:
            raise NpcamError(f"{path / 'bundle.json'}: no sha256 for {name}")
        if hashlib.sha256(data).hexdigest() != expected:
            raise NpcamError(f"{path / name}: sha256 does not match bundle.json (corrupt or modified file)")


def _load_array(path: Path, data: bytes, ndim: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        # allow_pickle=False turns an object array into a ValueError: never unpickle.
        raise NpcamError(f"{path}: not a plain .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise NpcamError(f"{path}: not a complete .npy file ({e})") from None
    if not isinstance(array, np.ndarray):
        raise NpcamError(f"{path}: not a single .npy array")
    if array.dtype != np.float32:
        raise NpcamError(f"{path}: dtype {array.dtype}, expected float32")
    if array.ndim != ndim or 0 in array.shape:
        raise NpcamError(f"{path}: shape {list(array.shape)}, expected {ndim} non-empty dimensions")
    if not np.isfinite(array).all():
        raise NpcamError(f"{path}: contains NaN or infinite values")
    return np.ascontiguousarray(array)


def _load_labels(path: Path, data: bytes, classes: int) -> tuple[str, ...]:
    try:
        labels = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise NpcamError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise NpcamError(f"{path}: must be a JSON list of strings")
    if len(labels) != classes:
        raise NpcamError(f"{path}: {len(labels)} labels, but fc_weight.npy has {classes} classes")
    return tuple(labels)


def _open_session(path: Path, model: bytes, channels: int, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # Spinning threads steal the core that decoding and encoding need between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad models
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NpcamError(f"{path}: not a usable ONNX model ({first_line})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != ["image"] or len(inputs[0].shape) != 4:
        raise NpcamError(f"{path}: expected one input 'image' [N,3,H,W]")
    if "features" not in [o.name for o in outputs]:
        raise NpcamError(f"{path}: has no output 'features'")
    shape = next(o.shape for o in outputs if o.name == "features")
    if len(shape) != 4:
        raise NpcamError(f"{path}: output 'features' must be [N,C,h,w], not {shape}")
    if isinstance(shape[1], int) and shape[1] != channels:
        raise NpcamError(f"{path}: gives {shape[1]} channels, fc_weight.npy expects {channels}")
    return session
