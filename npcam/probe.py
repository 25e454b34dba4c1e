"""One image's explained layer and k targets: everything a method may ask of the network.

A method (:mod:`npcam.methods`) is a function of a :class:`Probe`. The probe holds the layer ``A`` on its grid
and answers the three questions the methods ask:

- the targets' gradient with respect to ``A`` (:meth:`Probe.gradient`; on a globally pooled head, with respect
  to the pooled vector, :meth:`Probe.pooled_gradient`), by the head's exact vector-Jacobian product;
- the targets' scores when ``A`` is changed (:meth:`Probe.score_layers`), which runs only the head;
- the targets' scores (or probabilities) when the network's input is changed (:meth:`Probe.score_inputs`), which
  runs it all.

Multi-pass work goes in batches, reporting progress and checking ``should_stop`` between them
(:mod:`npcam.cancel`). The few methods that take options (D-RISE's masks) read them from
:attr:`Probe.options`, a :class:`MethodOptions`; the others ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .cancel import OnProgress, ShouldStop, check
from .errors import NpcamError

if TYPE_CHECKING:
    from .model import Model, Prediction
    from .targets import Target

# At most this many layer variants per head pass of a multi-pass method (Ablation-CAM, Recipro-CAM).
LAYER_BATCH = 256
# At most this many bytes of head values (every op's output, for the whole batch) per head pass of a
# multi-pass method on a head that is not pooled: a ViT-S last block holds about 2 M values per image.
HEAD_PASS_BYTES = 128 * 2**20
# Network inputs per trunk call of Score-CAM, and at most so many of D-RISE (Probe.input_batch).
INPUT_BATCH = 32
# At most this many bytes of network inputs per trunk call of D-RISE: a 640x640 input is 4.9 MB.
INPUT_BYTES = 64 * 2**20
# The limits of MethodOptions (each mask is one whole-network pass).
MAX_MASKS = 100_000
MAX_MASK_CELLS = 256


@dataclass(frozen=True)
class MethodOptions:
    """Options of the methods that take any, one value for all of them (docs/methods.md says which method reads
    which; a method that takes none ignores them). Front-ends set them through :class:`npcam.explain.Options`,
    whose fields have the same names.

    Attributes
    ----------
    masks : D-RISE's (and RISE's) number of random masks, N: one network pass each
    mask_cells : each mask's grid, ``mask_cells x mask_cells`` cells (s) over the photo's part of the input
    seed : the masks' random seed: the same seed gives the same masks, so the same map
    """

    masks: int = 1000
    mask_cells: int = 16
    seed: int = 0

    def checked(self) -> MethodOptions:
        """These options, or a one-line error naming the field (``masks``, ``mask_cells``, ``seed``)."""
        for name, low, high in (("masks", 1, MAX_MASKS), ("mask_cells", 1, MAX_MASK_CELLS), ("seed", 0, 2**63 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise NpcamError(f"{name} must be a whole number between {low} and {high}, not {value!r}")
        return self


class Probe:
    """One image's explained layer and k targets (see the module's docstring).

    Attributes
    ----------
    features : float32 ``[C, h, w]``, ``A``: the explained layer on its grid (one of a detector's maps: ``layer``)
    input : float32 ``[1, 3, H, W]``, the network input
    pooled : whether the head starts at ``A``'s spatial mean ``p`` (the closed forms of docs/methods.md hold)
    affine : whether the head is ``W p + b`` after global pooling (where CAM is defined)
    target : the :class:`~npcam.targets.Target` explained, of ``k`` scores
    """

    def __init__(
        self,
        model: Model,
        prediction: Prediction,
        target: Target,
        on_progress: OnProgress | None = None,
        should_stop: ShouldStop | None = None,
        layer: int = 0,
        shared: dict | None = None,
        options: MethodOptions | None = None,
    ):
        self._model, self._prediction = model, prediction
        self.target = target
        self.layer = layer
        # The head's backward pass gives every layer's gradient at once: the probes of one image's layers share it.
        self._shared = {} if shared is None else shared
        self.features = prediction.grids[layer]
        self.input = prediction.input
        self.pooled = model.head.layout == "pooled"
        self.affine = model.head.kind == "affine"
        self.on_progress, self.should_stop = on_progress, should_stop
        self.options = options or MethodOptions()

    @property
    def k(self) -> int:
        return len(self.target.names)

    @cached_property
    def scores(self) -> np.ndarray:
        """The k targets' scores for this image, float64 ``[k]``."""
        return self.target.scores(self._prediction.logits[None])[0]

    @cached_property
    def pooled_vector(self) -> np.ndarray:
        """float32 ``[C]``, ``p``: ``A``'s spatial mean (what a pooled head scores)."""
        return self._prediction.pooled

    def pooled_gradient(self) -> np.ndarray:
        """``G = d target / d p`` on a globally pooled head: float64 ``[k, C]`` (the FC rows' combination for an
        affine head, whose closed forms the methods use)."""
        if not self.pooled:
            raise ValueError("pooled_gradient: the head does not start at a globally pooled vector")
        return self._pooled_gradient

    @cached_property
    def _pooled_gradient(self) -> np.ndarray:
        pred = self._prediction
        seed = self.target.seed(pred.logits[None])
        return self._model.head.vjp(pred.pooled[None], seed, pred.sides)

    @cached_property
    def _gradient(self) -> np.ndarray:
        head, pred = self._model.head, self._prediction
        if self.pooled:  # the pooled vector's gradient spread evenly: G / (h w) at every position
            channels, h, w = self.features.shape
            spread = (self._pooled_gradient / (h * w))[:, :, None, None]
            return np.broadcast_to(spread, (self.k, channels, h, w)).copy()
        if len(head.inputs) > 1:  # one backward pass for every layer, shared by their probes
            if "gradients" not in self._shared:
                seed = self.target.seed(pred.logits[None])
                self._shared["gradients"] = head.vjp_inputs(pred.head_input, seed, pred.sides, pred.head_trace)
            name, shape = list(head.inputs.items())[self.layer]
            return self._shared["gradients"][name].reshape(self.k, *shape[1:])
        g = head.vjp(pred.head_input, self.target.seed(pred.logits[None]), pred.sides)
        return self._model.to_grid(g.reshape(self.k, *head.input_shape[1:]))

    def gradient(self) -> np.ndarray:
        """``d target / d A`` on the grid: float64 ``[k, C, h, w]`` (computed once).

        Exact reverse mode through the head, its side inputs constant (as a forward hook on the layer makes them
        in autograd). Tokens: the prefix tokens' gradient is dropped (as pytorch-grad-cam's reshape_transform
        does).
        """
        return self._gradient

    def check(self) -> None:
        """Raise :class:`~npcam.cancel.Cancelled` if the caller asked to stop."""
        check(self.should_stop)

    def progress(self, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(done, total)

    def head_batch(self, limit: int = LAYER_BATCH) -> int:
        """How many layer variants one head pass takes: at most ``limit``, and at most :data:`HEAD_PASS_BYTES`
        of values (a graph head keeps every op's output during a pass)."""
        per_image = self._model.head.bytes_per_input
        return int(max(1, min(limit, HEAD_PASS_BYTES // max(1, per_image))))

    def score_layers(
        self, variants: Callable[[int, int], np.ndarray], count: int, probabilities: bool = False
    ) -> np.ndarray:
        """The targets' scores of ``count`` variants of ``A``: float64 ``[count, k]`` (probabilities with
        ``probabilities``).

        ``variants(start, stop)`` makes variants ``start..stop-1`` as float32 ``[n, C, h, w]``; only the head
        runs, in batches of :meth:`head_batch`, on head inputs made of them (a pooled head takes their spatial
        mean; a token head's prefix tokens and the side inputs are this image's).
        """
        model, pred = self._model, self._prediction
        batch = self.head_batch()
        score = self.target.probabilities if probabilities else self.target.scores
        out = np.empty((count, self.k))
        for start in range(0, count, batch):
            self.check()
            stop = min(start + batch, count)
            x = self._head_inputs(variants(start, stop))
            out[start:stop] = score(model.head_scores(x, pred.sides))
            self.progress(stop, count)
        return out

    def _head_inputs(self, grids: np.ndarray):
        """Head inputs of ``grids`` ``[n, C, h, w]`` in place of this layer, the others this image's."""
        model, pred = self._model, self._prediction
        if not isinstance(pred.head_input, dict):
            return model.from_grid(grids, pred.head_input)
        name = list(model.head.inputs)[self.layer]
        n = len(grids)
        return {
            other: grids if other == name else np.broadcast_to(value, (n, *value.shape[1:]))
            for other, value in pred.head_input.items()
        }

    def score_pooled(self, vectors: np.ndarray) -> np.ndarray:
        """The targets' scores of pooled vectors ``[n, C]`` (a pooled head's variants): float64 ``[n, k]``."""
        pred = self._prediction
        return self.target.scores(self._model.head_scores(vectors, pred.sides))

    def score_inputs(self, inputs: np.ndarray, probabilities: bool = False) -> np.ndarray:
        """The targets' scores of network inputs float32 ``[n, 3, H, W]`` (the whole network runs): float64
        ``[n, k]``; their probabilities with ``probabilities`` (a detection's: D-RISE's similarity)."""
        outputs = self._model.scores(inputs)
        return self.target.probabilities(outputs) if probabilities else self.target.scores(outputs)

    def input_batch(self, limit: int = INPUT_BATCH) -> int:
        """How many network inputs one pass of the whole network takes: at most ``limit``, at most
        :data:`INPUT_BYTES` of inputs, and at most :meth:`head_batch` (the head's values for the batch)."""
        return int(max(1, min(limit, INPUT_BYTES // max(1, self.input.nbytes), self.head_batch(limit))))

    @property
    def region(self) -> tuple[int, int, int, int]:
        """``(top, left, height, width)``: where the photo lies in the network input, a letterbox's pad around it
        (the whole input for a model that stretches the photo to it)."""
        placement = self._prediction.placement
        if placement is None:
            return (0, 0, *self.input.shape[2:])
        return (placement.top, placement.left, *placement.size)
