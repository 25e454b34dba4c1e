"""The per-image pipeline: read -> predict -> maps -> render -> write, with one plain options object.

The CLI, the scripts, the exporter's calibration, ``npcam.dataset`` and
``npcam serve`` all go through here::

    options = Options(top=3, bbox=True).checked(model)
    explanation = explain(model, "photo.jpg", options)
    picture = draw(explanation, 0, options)             # uint8 [H, W, 3]
    record = describe(explanation, options)             # the JSON record (npcam.record)

For a detector (``model.bundle.task == "detect"``) the same calls explain detections instead of classes: the
top one, ``Options(detection=i)``, or the top ``top``; ``draw`` adds every detection's box and label.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from . import record as records
from . import render as rendering
from .boxes import DEFAULT_THRESHOLD, Box, cam_box
from .cancel import OnProgress, ShouldStop
from .detect import CONF, IOU, MAX_DET, MAX_NMS, Thresholds
from .errors import NpcamError
from .files import Job, save_array, save_image
from .image import (
    FINE,
    MAX_PIXELS,
    REDUCING_GAP,
    ImageLike,
    as_size,
    fine_size,
    fitted,
    format_size,
    read_photo,
    recycle,
    rgbx_base,
)
from .labels import class_index
from .model import Model, Prediction
from .probe import MethodOptions
from .upsample import upsample

# The limits of Options, the same in every front-end (the CLI, serve, dataset take them from here).
MAX_TOP = 1000  # classes explained per image: each is one map and one overlay
ALPHA = (0.0, 1.0)  # overlay opacity: the photo alone .. the heat map alone
MAX_DETECTIONS = MAX_NMS  # max_det: no more candidates than this go into the suppression anyway
# The fields only a detector reads (a classifier refuses other values than these defaults).
DETECTOR_DEFAULTS = {"detection": None, "conf": CONF, "iou": IOU, "max_det": MAX_DET}


@dataclass(frozen=True)
class Options:
    """How to explain: the CLI's options, as a value.

    Attributes
    ----------
    classes : explain these classes (indices or labels); empty: the top ``top``
    top : how many of the most probable classes to explain (a detector's: of its best detections)
    method : a name from :data:`npcam.methods.METHODS`; None: the model's default
    alpha : heat-map opacity in [0, 1]
    bbox : find each map's box (and draw it)
    threshold : the box threshold, ``"mean"`` or a fraction of the max
    keep_aspect, size : the network input (see :func:`npcam.image.input_size`); ``size`` is
        ``(H, W)``, ``S`` for ``S x S``, or ``"fine"`` for :func:`npcam.image.fine_size` of the bundle's;
        None: the bundle's
    max_pixels : refuse larger images before decoding them
    max_side : keep overlays at most this many pixels on their long side (None: the photo's size);
        records, boxes and ``.npy`` maps stay in the photo's own pixels
    save_cam : write each full-resolution map as ``.npy`` beside its overlay
    lowres : put each map at feature resolution into the record
    detection : a detector's detection to explain, its index among the image's detections (0: the best);
        None: the top ``top``
    conf, iou, max_det : which of a detector's candidates are kept (:class:`npcam.detect.Thresholds`; the YOLO
        tools' defaults)
    boxes : draw a detector's boxes and labels on its overlays
    masks, mask_cells, seed : the options of the methods that take any (D-RISE's masks), as
        :class:`npcam.probe.MethodOptions` (:attr:`method_options`); other methods ignore them
    """

    classes: tuple[int | str, ...] = ()
    top: int = 1
    method: str | None = None
    alpha: float = 0.5
    bbox: bool = False
    threshold: float | str = DEFAULT_THRESHOLD
    keep_aspect: bool = False
    size: int | tuple[int, int] | str | None = None
    max_pixels: int = MAX_PIXELS
    max_side: int | None = None
    save_cam: bool = False
    lowres: bool = False
    detection: int | None = None
    conf: float = CONF
    iou: float = IOU
    max_det: int = MAX_DET
    boxes: bool = True
    masks: int = MethodOptions.masks
    mask_cells: int = MethodOptions.mask_cells
    seed: int = MethodOptions.seed

    @property
    def method_options(self) -> MethodOptions:
        """The fields that methods read (:attr:`npcam.probe.Probe.options`)."""
        return MethodOptions(masks=self.masks, mask_cells=self.mask_cells, seed=self.seed)

    def checked(self, model: Model) -> Options:
        """These options made concrete for ``model`` (class indices, method name); one-line errors otherwise.

        The one place options are validated; messages name the fields as here
        (``alpha``, ``size=HxW``, ``keep_aspect``), for front-ends to put into
        their own words (:func:`npcam.arguments.flag_words`).
        """
        low, high = ALPHA
        if not low <= self.alpha <= high:  # also refuses NaN
            raise NpcamError(f"alpha must be between {low} and {high}, not {self.alpha}")
        if not 1 <= self.top <= MAX_TOP:
            raise NpcamError(f"top must be between 1 and {MAX_TOP}, not {self.top}")
        if self.max_pixels < 1:
            raise NpcamError(f"max_pixels must be at least 1, not {self.max_pixels}")
        if self.max_side is not None and self.max_side < 1:
            raise NpcamError(f"max_side must be at least 1, not {self.max_side}")
        size, native = self.size, model.bundle.input_size
        if size == FINE:  # the bundle's size scaled (npcam.image.fine_size), then checked as any size
            if model.bundle.task == "detect":
                # Measured for a classifier's class maps only; a detector's input size changes what it detects.
                raise NpcamError(f"{model.bundle.path}: size=fine is for a classifier's maps, not a detector's")
            if model.bundle.fixed_size:
                raise NpcamError(
                    f"{model.bundle.path}: this model's trunk takes only {format_size(native)} inputs (height x "
                    "width); size=fine cannot be used with it"
                )
            size = fine_size(native, model.bundle.stride)
        size = model.check_input_options(self.keep_aspect, size)
        self._check_detection_fields(model.bundle.task == "detect")
        self.method_options.checked()
        return replace(
            self,
            size=size,
            classes=tuple(class_index(model.labels, c) for c in self.classes),
            method=model.method(self.method).name,
        )

    def _check_detection_fields(self, detector: bool) -> None:
        if not detector:
            given = [
                f"{k}={getattr(self, k)}" for k, default in DETECTOR_DEFAULTS.items() if getattr(self, k) != default
            ]
            if given:
                raise NpcamError(f"{', '.join(given)}: this model is a classifier; only a detector has detections")
            return
        if self.classes:
            raise NpcamError("this model is a detector: it explains detections (detection=K, top=K), not classes")
        if self.detection is not None and (self.detection < 0 or self.top != 1):
            raise NpcamError(
                f"detection must be at least 0, not {self.detection}"
                if self.detection < 0
                else "detection and top cannot both be given: one detection, or the top K"
            )
        for name in ("conf", "iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise NpcamError(f"{name} must be between 0 and 1, not {value}")
        if not 1 <= self.max_det <= MAX_DETECTIONS:
            raise NpcamError(f"max_det must be between 1 and {MAX_DETECTIONS}, not {self.max_det}")

    @property
    def thresholds(self) -> Thresholds:
        """Which of a detector's candidates are kept (``conf``, ``iou``, ``max_det``)."""
        return Thresholds(self.conf, self.iou, self.max_det)


@dataclass
class Explanation:
    """One image explained: its prediction and one map per explained class (or detection).

    ``maps`` is float32 ``[k, h, w]`` in [0, 1] at feature resolution (a
    detector's: the network input's, cropped to the photo's part);
    :meth:`full` upsamples one to the image's size (once). ``layer`` names the
    explained layer (:attr:`npcam.bundle.Bundle.layer`). ``detections``: for a
    detector, which of ``prediction.detections`` the maps explain (indices;
    empty when there is none, and ``maps`` is then ``[0, h, w]``); ``classes``
    are then their classes. None for a classifier.
    """

    name: str
    prediction: Prediction
    method: str
    classes: list[int]
    maps: np.ndarray
    layer: str | None = None
    detections: list[int] | None = None
    _full: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _boxes: dict[tuple[int, float | str], Box | None] = field(default_factory=dict, repr=False)

    def full(self, i: int) -> np.ndarray:
        """Map ``i`` at the photo's own size (:attr:`Prediction.size`): float32 ``[H, W]`` (computed once)."""
        if i not in self._full:
            self._full[i] = upsample(self.maps[i], self.prediction.size)
        return self._full[i]

    def box(self, i: int, threshold: float | str = DEFAULT_THRESHOLD) -> Box | None:
        """Map ``i``'s box at the image's size (computed once per threshold)."""
        if (i, threshold) not in self._boxes:
            self._boxes[(i, threshold)] = cam_box(self.full(i), threshold)
        return self._boxes[(i, threshold)]

    def _repr_png_(self) -> bytes:
        """How a notebook shows it: the overlays, captioned with the method and the classes (npcam.notebook)."""
        from .notebook import explanation_png

        return explanation_png(self)

    def _repr_html_(self) -> str:
        """How a notebook shows it: the overlays, the method and the top classes (npcam.notebook)."""
        from .notebook import explanation_html

        return explanation_html(self)


def explain(
    model: Model,
    image: ImageLike,
    options: Options = Options(),
    name: str | None = None,
    progress: OnProgress | None = None,
    pixels: bool = True,
    should_stop: ShouldStop | None = None,
) -> Explanation:
    """Read, predict and compute the maps of one image; ``options`` must come from :meth:`Options.checked`.

    ``name`` is how records and errors call the image (default: its path).
    ``pixels=False`` is for runs that need no overlay (records, ``.npy``
    maps): a JPEG is then decoded at the smallest DCT scale that keeps
    :data:`~npcam.image.REDUCING_GAP` times the network input, and sizes,
    maps and boxes are still in the photo's own pixels (docs/performance.md).
    With pixels, ``options.max_side`` keeps ``prediction.image``, and so the
    overlays, at most that many pixels on its long side (:func:`~npcam.image.fitted`
    of the photo's own size); a JPEG is then decoded at the smallest DCT scale
    that keeps its long side at least ``max_side`` and both sides at the
    network's need, and resized once to that size. Without pixels it changes nothing.
    ``should_stop`` is checked between the batches of multi-pass methods
    (:class:`npcam.cancel.Cancelled` when it returns true).
    """
    label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    network = int(np.ceil(REDUCING_GAP * max(as_size(options.size) or model.bundle.input_size)))
    # Without pixels, the network's need alone sets the decode scale: max_side is about overlays. With pixels and
    # no max_side, the overlay is the photo's size: a full decode.
    max_side = options.max_side if pixels else None
    min_size = network if max_side or not pixels else None
    pil, rgb, size = read_photo(image, options.max_pixels, label, min_size, max_side)
    x = model.preprocess(pil, options.keep_aspect, options.size)  # the one resampling to the network's input
    fit = fitted(*size, max_side)  # from the photo's own size: the same overlay size whatever the decode scale
    if max_side and (pil.height, pil.width) != fit:
        small = pil.resize(fit[::-1], Image.BILINEAR, reducing_gap=REDUCING_GAP)
        if not isinstance(image, np.ndarray):  # npcam's own decode (an array passed in is the caller's)
            recycle(rgb)  # the decode's buffer, no longer read: the fitted copy below goes into it
        del pil
        rgb = read_photo(small)[1]
    prediction = model.classify([rgb], [x], [size], thresholds=options.thresholds)[0]
    method = options.method or model.default_method
    if prediction.detections is not None:
        chosen = _chosen_detections(prediction, options, label)
        if chosen:
            maps = model.cam(prediction, detection=chosen, method=options.method, progress=progress,
                             should_stop=should_stop, options=options.method_options)  # fmt: skip
        else:  # nothing detected: nothing to explain, and the overlay is the photo
            maps = np.zeros((0, *prediction.placement.size), np.float32)
        classes = [prediction.detections[i].class_index for i in chosen]
        return Explanation(label, prediction, method, classes, maps, model.bundle.layer, chosen)
    classes = list(options.classes) or [c for c, _, _ in prediction.top(options.top)]
    maps = model.cam(
        prediction, classes, method=options.method, progress=progress, should_stop=should_stop,
        options=options.method_options,
    )  # fmt: skip
    return Explanation(label, prediction, method, classes, maps, model.bundle.layer)


def _chosen_detections(prediction: Prediction, options: Options, label: str) -> list[int]:
    """The detections to explain: ``options.detection`` (an error naming the image if it has no such one), or the
    best ``options.top`` of those there are (none when there are none)."""
    found = len(prediction.detections)
    if options.detection is None:
        return list(range(min(options.top, found)))
    if options.detection >= found:
        has = "none" if not found else f"{found} (0 to {found - 1})"
        raise NpcamError(f"{label}: no detection {options.detection}: this image has {has}")
    return [options.detection]


def draw(explanation: Explanation, i: int, options: Options, into_photo: bool = False) -> np.ndarray:
    """Map ``i`` jet-coloured over the image, with its box if ``options.bbox``: uint8 ``[H, W, 3]``.

    Drawn at the size of ``prediction.image``. When the image came from
    :func:`~npcam.image.read_photo`, the result is a view of an RGBX buffer
    that :func:`npcam.files.encode_image` encodes without a copy. A detector's
    overlay also has every detection's box and label (``options.boxes``), map
    ``i``'s detection emphasized; with no detection it is the photo as it is.
    ``into_photo`` draws into that buffer itself, so ``prediction.image`` becomes
    the overlay: for callers done with the photo (saves a full-size buffer).
    """
    image = explanation.prediction.image
    rgbx = rgbx_base(image)
    source = image if rgbx is None else rgbx
    if explanation.detections is not None and not explanation.detections:
        return source.copy()[:, :, :3]  # nothing detected: no map, no box
    out = rgbx if into_photo else None
    picture = rendering.overlay_map(source, explanation.maps[i], options.alpha, out=out)
    (height, width), (h, w) = explanation.prediction.size, image.shape[:2]
    box = explanation.box(i, options.threshold) if options.bbox else None
    if box:
        if (h, w) != (height, width):  # the box is in the photo's pixels, the picture smaller
            x0, y0, x1, y1 = box
            box = (x0 * w // width, y0 * h // height, x1 * w // width, y1 * h // height)
        rendering.draw_box_into(picture, box)
    if explanation.detections is not None and options.boxes:
        found = explanation.prediction.detections
        boxes = np.array([d.box for d in found], dtype=np.float64).reshape(-1, 4) * ([w / width, h / height] * 2)
        texts = [f"{d.label} {d.score:.2f}" for d in found]
        rendering.draw_detections_into(picture, boxes, [d.class_index for d in found], texts, explanation.detections[i])
    return picture[:, :, :3]


def describe(
    explanation: Explanation,
    options: Options,
    outputs: Sequence[Path | None] | None = None,
    cams: Sequence[Path] | None = None,
) -> dict:
    """The explanation's record (:mod:`npcam.record`), naming the files written for it, if any."""
    prediction, detections = explanation.prediction, explanation.detections
    maps = []
    for i, c in enumerate(explanation.classes):
        extra: dict = {}
        if outputs is not None:
            extra["output"] = str(outputs[i]) if outputs[i] is not None else None
        if options.bbox:
            box = explanation.box(i, options.threshold)
            extra["bbox"] = list(box) if box else None
        if cams is not None:
            extra["cam"] = str(cams[i])
        if options.lowres:
            extra["lowres"] = records.lowres(explanation.maps[i] if detections is None else _coarse(explanation, i))
        if detections is None:
            maps.append(records.map_entry(prediction, c, **extra))
        else:
            maps.append(records.detection_map_entry(prediction, detections[i], **extra))
    # A detector's photo with nothing detected still has its overlay (the photo): the record names it.
    nothing = outputs[0] if outputs and not maps and outputs[0] is not None else None
    return records.make(explanation.name, prediction, explanation.method, maps, explanation.layer,
                        None if nothing is None else str(nothing))  # fmt: skip


def _coarse(explanation: Explanation, i: int) -> np.ndarray:
    """A detector's map ``i`` (at the network input) on its finest layer's grid, over the photo's part: what
    ``lowres`` stores (the map was upsampled from those grids, so little is lost, and rows stay small)."""
    prediction = explanation.prediction
    stride = prediction.input.shape[2] / max(grid.shape[1] for grid in prediction.grids)
    h, w = explanation.maps[i].shape
    return upsample(explanation.maps[i], (max(1, round(h / stride)), max(1, round(w / stride))))


def write(
    explanation: Explanation,
    job: Job,
    options: Options,
    protected: Iterable[Path] = (),
    overlays: bool = True,
    spend_photo: bool = False,
) -> dict:
    """Write the overlay (and ``.npy`` map with ``save_cam``) of each explained class or detection; returns the
    record.

    ``protected`` paths (the run's inputs) are never written over: such a job
    fails before writing anything. ``overlays=False`` writes only the ``.npy``
    maps, if any, and the record names no overlay. ``spend_photo`` draws the
    last overlay into the photo's own buffer (:func:`draw`'s ``into_photo``).
    """
    if explanation.detections is None:
        outputs = [job.output_for(c) for c in explanation.classes]
    else:  # a detector's photo with nothing detected gets one overlay, the photo without boxes
        outputs = [job.output_for_detection(i) for i in explanation.detections] or [job.output]
    for output in outputs:
        if output.resolve() in protected:
            raise NpcamError(f"{output}: is one of the input images; not writing over it (choose another -o)")
    cams = [output.with_suffix(".npy") for output in outputs[: len(explanation.maps)]] if options.save_cam else None
    for i, output in enumerate(outputs):
        if overlays:
            save_image(output, draw(explanation, i, options, into_photo=spend_photo and i == len(outputs) - 1))
        if cams and i < len(cams):
            save_array(cams[i], explanation.full(i))
    return describe(explanation, options, outputs if overlays else None, cams)


def explain_file(
    model: Model,
    options: Options,
    protected: frozenset[Path],
    job: Job,
    progress: OnProgress | None = None,
    overlays: bool = True,
    should_stop: ShouldStop | None = None,
) -> dict:
    """One job from file to written overlays (or only its record, without ``overlays``); returns its record."""
    explanation = explain(
        model, job.image, options, str(job.image), progress, pixels=overlays, should_stop=should_stop
    )
    record = write(explanation, job, options, protected, overlays, spend_photo=True)
    recycle(explanation.prediction.image)  # nothing else holds it: this thread's next photo decodes into it
    return record


Result = tuple[Job, "dict | str"]


def explain_files(
    model: Model,
    jobs: Sequence[Job],
    options: Options,
    workers: int | None = None,
    progress: OnProgress | None = None,
    overlays: bool = True,
) -> Iterator[Result]:
    """Explain and write every job; yields each with its record or its one-line error, in input order.

    Several images are in flight at once, one per worker thread, each going
    through the whole pipeline: onnxruntime, Pillow's codecs and NumPy's large
    operations release the GIL, so the workers overlap decoding, the trunk and
    encoding. When the consumer stops (an interrupt, a closed pipe), work not
    started is dropped, multi-pass methods (Score-CAM) stop at their next batch
    without writing, and files being written are finished, so that only
    complete files remain. No job writes over another job's input.
    ``progress`` goes to methods with extra passes (Score-CAM); ``overlays=False``
    writes no overlays (see :func:`explain`'s ``pixels``); ``options.max_side`` caps their size.
    """
    workers = workers or (1 if len(jobs) == 1 else max(1, os.cpu_count() or 1))
    protected = frozenset(job.image.resolve() for job in jobs)
    pool = ThreadPoolExecutor(max_workers=workers)
    stop = threading.Event()
    try:
        task = partial(
            explain_file,
            model,
            options,
            protected,
            progress=progress,
            overlays=overlays,
            should_stop=stop.is_set,
        )
        for job, future in _ahead(pool, jobs, task, depth=2 * workers):
            yield job, _result(job, future)
    except BaseException:  # includes GeneratorExit: the consumer stopped early
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _ahead(pool: ThreadPoolExecutor, jobs: Sequence[Job], fn: Callable, depth: int) -> Iterator[tuple[Job, Future]]:
    """``(job, pool.submit(fn, job))`` in order, keeping ``depth`` jobs submitted ahead."""
    queue: deque[tuple[Job, Future]] = deque()
    for job in jobs:
        queue.append((job, pool.submit(fn, job)))
        if len(queue) > depth:
            yield queue.popleft()
    yield from queue


def _result(job: Job, task: Future) -> dict | str:
    """A task's record, or its failure as a one-line message naming the file."""
    try:
        return task.result()
    except NpcamError as e:
        return str(e)
    except (MemoryError, OSError) as e:
        return f"{job.image}: {type(e).__name__}: {e}"
