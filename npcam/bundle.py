"""The model bundle: its format, read and written here and nowhere else.

A bundle is a directory: ``trunk.onnx`` (image -> features, run by
onnxruntime), the head (``fc_weight.npy`` + ``fc_bias.npy`` for an affine
head, ``head.json`` + ``head.npz`` for a graph head, see :mod:`npcam.head`),
``labels.json`` and ``bundle.json``. Every file and every ``bundle.json`` key
is documented in docs/formats.md, so that a bundle can be written by hand;
:func:`read` names the missing or wrong key when one is not right.

Nothing in a bundle is executed as Python: arrays load with
``allow_pickle=False``, the trunk runs in onnxruntime and the head's ops come
from a fixed list.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NpcamError
from .files import atomic_write
from .head import AffineHead, GraphHead, Op
from .image import as_size
from .onnx_checks import check_constant_shapes, check_self_contained

FORMAT = "npcam-bundle"
# What the original model outputs; "sigmoid" (multi-label) also makes npcam's probabilities per-class sigmoids.
OUTPUTS = ("logits", "probabilities", "log_probabilities", "sigmoid")
# 3: input_size is [height, width] (it was one int, the side of a square, in 1 and 2).
# 4: graph heads may start at a spatial map or tokens (head.json's layout, grid, prefix, sides, precision) and
#    bundle.json names the explained layer; a version 3 bundle is a version 4 one without these keys.
# 5: detectors: bundle.json's task, detect (the decode) and layers, head.json's inputs (one map per stride, the
#    trunk's outputs of those names), decode.npz; a version 4 bundle is a version 5 classifier.
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
TASKS = ("classify", "detect")
HEAD_FILES = {"affine": ("fc_weight.npy", "fc_bias.npy"), "graph": ("head.json", "head.npz")}
CACHE_DIR = Path("~/.cache/npcam")
# Looked for in this order when no model is named: ResNet-18 is the default,
# EfficientNet-Lite0 is what the offline demo exports when ResNet-18 weights
# cannot be had.
DEFAULT_ARCHS = ("resnet18", "efficientnet_lite0")
DEFAULT_STRIDE = 32
# head.npz holds the head's constants: its arrays, decompressed, may take at most this many bytes in all
# (a 21,843-class head on 2,048 channels is 179 MB in float32). A zip member can expand a thousandfold.
MAX_HEAD_BYTES = 2**30


def default_model_dir() -> Path:
    """``$NPCAM_MODEL``, else the first existing of ``~/.cache/npcam/{resnet18,efficientnet_lite0}``."""
    if os.environ.get("NPCAM_MODEL"):
        return Path(os.environ["NPCAM_MODEL"]).expanduser()
    candidates = [(CACHE_DIR / arch).expanduser() for arch in DEFAULT_ARCHS]
    return next((c for c in candidates if c.is_dir()), candidates[0])


@dataclass(frozen=True)
class Bundle:
    """A bundle's contents, checked: what :class:`npcam.Model` runs."""

    path: Path
    meta: dict
    trunk: bytes
    head: AffineHead | GraphHead
    labels: tuple[str, ...]
    _decoder: object = None

    @property
    def arch(self) -> str:
        """The architecture's name, e.g. ``resnet18``."""
        return self.meta["arch"]

    @property
    def input_size(self) -> tuple[int, int]:
        """The network input ``(height, width)`` the model was made for."""
        return tuple(self.meta["input_size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.meta["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.meta["std"])

    @property
    def fixed_size(self) -> bool:
        return bool(self.meta.get("fixed_size", False))

    @property
    def stride(self) -> int:
        return int(self.meta.get("stride", DEFAULT_STRIDE))

    @property
    def layer(self) -> str:
        """The explained layer's name: an ONNX tensor name, or a torch module path (``blocks.3.norm1``); bundles
        from before format 4 say ``"features"`` (the trunk's output)."""
        return str(self.meta.get("layer", "features"))

    @property
    def layout(self) -> str:
        """What the head starts at: ``"pooled"``, ``"spatial"`` (``[N,C,h,w]``) or ``"tokens"`` (``[N,L,C]``).

        Not ``meta["layout"]``, which is the original model's input layout (NCHW or NHWC)."""
        return self.head.layout

    @property
    def int8_same_on(self) -> tuple[str, ...] | None:
        """The CPU families (:func:`npcam.cpu.cpu_family`) on which an int8 trunk that is not portable
        computes what was measured (``int8.same_on``, else the family it was measured on); None for a
        portable or float trunk, or one that does not say."""
        q = self.meta.get("int8")
        if not isinstance(q, dict) or q.get("portable", True) or not isinstance(q.get("cpu_family"), str):
            return None
        same = q.get("same_on")
        return tuple(same) if isinstance(same, list) and same else (q["cpu_family"],)

    @property
    def task(self) -> str:
        """``"classify"`` or ``"detect"``."""
        return self.meta.get("task", "classify")

    @property
    def decoder(self):
        """A detector's :class:`~npcam.detect.Decoder` (None for a classifier)."""
        return self._decoder

    @property
    def letterbox(self) -> tuple[int, int, int] | None:
        """The letterbox's pad colour (R, G, B levels) when the input is letterboxed, as the YOLO tools feed it;
        None when the photo is stretched to the input."""
        pad = self.meta.get("letterbox")
        return None if pad is None else tuple(int(v) for v in pad)

    @property
    def multi_label(self) -> bool:
        """The model scores each class on its own (a final sigmoid), not one class out of K."""
        return self.meta.get("output") == "sigmoid"


def digest(meta: dict) -> str:
    """One sha256 for a whole bundle: of its files' digests, as ``bundle.json`` lists them."""
    return hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()


def files_for(meta: dict) -> tuple[str, ...]:
    """The files a bundle holds besides bundle.json, from its metadata (its kind of head; a decode's arrays)."""
    decode = ("decode.npz",) if meta.get("detect", {}).get("arrays") else ()
    return ("trunk.onnx", *HEAD_FILES[meta["head"]], "labels.json", *decode)


# Reading


def read(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and check a bundle directory; every problem is one :class:`NpcamError` line naming the file.

    ``verify`` checks each file's sha256 against ``bundle.json``.
    """
    path = Path(path).expanduser()
    meta = _read_meta(path)
    names = files_for(meta)
    blobs = {name: _read_file(path / name) for name in names}
    if verify:
        _check_hashes(path, meta, blobs)
    check_self_contained(path / "trunk.onnx", blobs["trunk.onnx"])
    check_constant_shapes(path / "trunk.onnx", blobs["trunk.onnx"])
    # Parsed from the bytes that were hashed, not read again: what was checked is what runs.
    if meta["head"] == "affine":
        weight = _load_array(path / "fc_weight.npy", blobs["fc_weight.npy"], ndim=2)
        bias = _load_array(path / "fc_bias.npy", blobs["fc_bias.npy"], ndim=1)
        if bias.shape != weight.shape[:1]:
            raise NpcamError(
                f"{path / 'fc_bias.npy'}: shape {list(bias.shape)}, expected [{weight.shape[0]}] to match fc_weight.npy"
            )
        head: AffineHead | GraphHead = AffineHead(weight, bias)
    else:
        head = _load_graph_head(path, blobs["head.json"], blobs["head.npz"])
    decoder = None
    if meta.get("task", "classify") == "detect":
        decoder = _load_decoder(path, meta, blobs.get("decode.npz"), head)
    classes = head.classes if decoder is None else decoder.classes
    labels = _load_labels(path / "labels.json", blobs["labels.json"], classes)
    return Bundle(path, meta, blobs["trunk.onnx"], head, labels, decoder)


def _load_decoder(path: Path, meta: dict, arrays_bytes: bytes | None, head: AffineHead | GraphHead):
    """A detector's decode (:class:`npcam.detect.Decoder`), checked against its head's output."""
    from .detect import Decoder

    arrays = {}
    if arrays_bytes is not None:
        _check_npz_sizes(path / "decode.npz", arrays_bytes)
        try:
            with np.load(io.BytesIO(arrays_bytes), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError) as e:
            raise NpcamError(f"{path / 'decode.npz'}: not a plain .npz of arrays ({e})") from None
    decoder = Decoder(meta["detect"], arrays, tuple(meta["input_size"]), path / "bundle.json")
    if decoder.size != head.classes:
        raise NpcamError(
            f"{path / 'bundle.json'}: 'detect.outputs' hold {decoder.size:,} values, the head gives {head.classes:,}"
        )
    return decoder


def _read_meta(path: Path) -> dict:
    meta_file = path / "bundle.json"
    if path.is_file() or (not path.exists() and path.suffix == ".onnx"):
        raise NpcamError(
            f"{path}: a model bundle is a directory; to explain this model, convert it first with "
            f"`npcam-export onnx {path} --out DIR` (see the README, 'Your own model')"
        )
    if not path.is_dir():
        raise NpcamError(
            f"{path}: no model bundle here; create one with `npcam-export auto` or "
            f"`npcam-export resnet18 --out {path}` (see the README)"
        )
    try:
        meta = json.loads(_read_file(meta_file))
    except (ValueError, UnicodeDecodeError) as e:
        raise NpcamError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NpcamError(f"{meta_file}: not an npcam bundle description (key 'format' is not {FORMAT!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise NpcamError(
            f"{meta_file}: bundle format version {version!r}"
            + (f" needs an npcam that reads version {version}" if newer else " is not one npcam knows")
            + f"; this npcam reads versions {READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}: "
            + ("upgrade npcam, or export the model again with this one" if newer else "export the model again")
        )
    if meta["format_version"] == 1:
        meta = {**meta, "head": "affine"}
    missing = [k for k in ("arch", "input_size", "mean", "std", "files", "head") if k not in meta]
    if missing:
        raise NpcamError(f"{meta_file}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if meta["head"] not in HEAD_FILES:
        raise NpcamError(f"{meta_file}: key 'head' must be one of {', '.join(HEAD_FILES)}, not {meta['head']!r}")
    if meta["format_version"] < 3:  # one side: a square input
        if not _positive_int(meta["input_size"]):
            raise NpcamError(f"{meta_file}: key 'input_size' must be a positive integer, not {meta['input_size']!r}")
        meta = {**meta, "input_size": [meta["input_size"]] * 2}
    size = meta["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(map(_positive_int, size))):
        raise NpcamError(f"{meta_file}: key 'input_size' must be [height, width] in positive integers, not {size!r}")
    if not _positive_int(meta.get("stride", DEFAULT_STRIDE)):
        raise NpcamError(f"{meta_file}: key 'stride' must be a positive integer, not {meta['stride']!r}")
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            raise NpcamError(f"{meta_file}: key {key!r} must be a list of 3 numbers (R, G, B)")
    if not all(v > 0 for v in meta["std"]):
        raise NpcamError(f"{meta_file}: key 'std' must be positive")
    if meta.get("output", "logits") not in OUTPUTS:
        raise NpcamError(f"{meta_file}: key 'output' must be one of {', '.join(OUTPUTS)}, not {meta['output']!r}")
    if not isinstance(meta.get("fixed_size", False), bool):
        raise NpcamError(f"{meta_file}: key 'fixed_size' must be true or false")
    if not isinstance(meta["files"], dict):
        raise NpcamError(f"{meta_file}: key 'files' must map file names to sha256 digests")
    if not isinstance(meta.get("layer", ""), str):
        raise NpcamError(f"{meta_file}: key 'layer' must be a string (the explained layer's name)")
    if meta.get("task", "classify") not in TASKS:
        raise NpcamError(f"{meta_file}: key 'task' must be one of {', '.join(TASKS)}, not {meta['task']!r}")
    if meta.get("task") == "detect" and not isinstance(meta.get("detect"), dict):
        raise NpcamError(f"{meta_file}: a detector's bundle needs the key 'detect' (its decode)")
    pad = meta.get("letterbox")
    if pad is not None and not (
        isinstance(pad, list) and len(pad) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in pad)
    ):
        raise NpcamError(f"{meta_file}: key 'letterbox' must be the pad's [R, G, B] levels (0 to 255)")
    return meta


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NpcamError(f"{path}: missing from the bundle") from None
    except OSError as e:
        raise NpcamError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_hashes(path: Path, meta: dict, blobs: dict[str, bytes]) -> None:
    for name, data in blobs.items():
        expected = meta["files"].get(name)
        if expected is None:
            raise NpcamError(f"{path / 'bundle.json'}: key 'files' has no sha256 for {name}")
        if hashlib.sha256(data).hexdigest() != expected:
            raise NpcamError(f"{path / name}: sha256 does not match bundle.json (corrupt or modified file)")


def _load_array(path: Path, data: bytes, ndim: int) -> np.ndarray:
    _check_npy_size(path, io.BytesIO(data), len(data))
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


def _load_graph_head(path: Path, spec_bytes: bytes, arrays_bytes: bytes) -> GraphHead:
    spec_file, arrays_file = path / "head.json", path / "head.npz"
    try:
        spec = json.loads(spec_bytes)
        ops = [Op(o["op"], tuple(o["inputs"]), o["output"], dict(o.get("attrs", {}))) for o in spec["ops"]]
        input_shape = [int(d) for d in spec["input_shape"]]
        names = (spec["input"], spec["output"])
        # Format 5: several inputs (a detector's maps, one per stride); the first is "input".
        inputs = {str(k): [int(d) for d in v] for k, v in dict(spec.get("inputs", {})).items()} or None
        # Format 4; absent: a pooled head of format 3.
        sides = {str(k): [int(d) for d in v] for k, v in dict(spec.get("sides", {})).items()}
        layer = {
            "layout": spec.get("layout", "pooled"),
            "grid": spec.get("grid"),
            "prefix": spec.get("prefix", 0),
            "precision": spec.get("precision", "float64"),
        }
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise NpcamError(f"{spec_file}: not a head description ({type(e).__name__}: {e})") from None
    for name in sides:
        if name in ("image", "features", names[0], *(inputs or {})):
            raise NpcamError(f"{spec_file}: side input {name!r} has the name of the head's input or a trunk tensor")
    _check_npz_sizes(arrays_file, arrays_bytes)
    try:
        with np.load(io.BytesIO(arrays_bytes), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError) as e:
        raise NpcamError(f"{arrays_file}: not a plain .npz of arrays ({e})") from None
    known = set(arrays) | {names[0]} | set(inputs or {}) | set(sides) | {op.output for op in ops}
    for op in ops:
        unknown = [n for n in op.inputs if n not in known]
        if unknown:
            raise NpcamError(f"{spec_file}: op {op.op} reads {unknown[0]!r}, which is neither computed nor in head.npz")
    if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
        raise NpcamError(f"{arrays_file}: contains NaN or infinite values")
    try:
        return GraphHead(ops, arrays, input_shape, *names, sides=sides, inputs=inputs, **layer)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise NpcamError(f"{spec_file}: the head cannot run ({e})") from None


def _check_npy_size(path: Path, f, size: int) -> None:
    """Refuse a .npy whose header claims more data than ``size`` bytes hold, before NumPy allocates it.

    ``f`` is positioned at the start of the .npy. Malformed headers are left for ``np.load`` to name.
    """
    try:
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            return
        shape, _, dtype = reader[version](f)
        start = f.tell()
    except (ValueError, OSError, EOFError, TypeError, SyntaxError):
        return
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > size - start:
        raise NpcamError(
            f"{path}: its header claims {claimed:,} bytes of data, the file holds {max(size - start, 0):,}"
        )


def _check_npz_sizes(path: Path, data: bytes) -> None:
    """Refuse a head.npz that would decompress beyond :data:`MAX_HEAD_BYTES`, or claim more than it holds."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # np.load names it
    with archive:
        members = archive.infolist()
        total = sum(info.file_size for info in members)
        if total > MAX_HEAD_BYTES:
            raise NpcamError(
                f"{path}: its arrays take {total:,} bytes decompressed, over the limit of {MAX_HEAD_BYTES:,}"
            )
        for info in members:
            try:
                with archive.open(info) as member:
                    _check_npy_size(path, member, info.file_size)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
                raise NpcamError(f"{path}: not a plain .npz of arrays ({e})") from None


def _load_labels(path: Path, data: bytes, classes: int) -> tuple[str, ...]:
    try:
        labels = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise NpcamError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise NpcamError(f"{path}: must be a JSON list of strings")
    if len(labels) != classes:
        raise NpcamError(f"{path}: {len(labels)} labels, but the head has {classes} classes")
    return tuple(labels)


# Writing


def write(
    directory: Path,
    trunk: bytes,
    head: AffineHead | GraphHead,
    labels: Sequence[str],
    meta: dict,
    decode_arrays: dict[str, np.ndarray] | None = None,
) -> dict:
    """Write a bundle's files into ``directory`` (existing, empty), then ``bundle.json``; returns the metadata.

    ``meta`` must hold ``arch``, ``input_size`` (``(height, width)``, or one
    side for a square), ``mean`` and ``std``, and may hold ``layer`` (the explained layer's name); the format
    keys, the head kind, the channel and class counts and the hashes are added here. ``channels`` is the
    layer's C (the pooled vector's length for a pooled head). A detector's ``meta`` holds ``task`` ("detect")
    and ``detect`` (its decode, :mod:`npcam.detect`), whose arrays (``anchors``) are ``decode_arrays``.
    """
    detector = meta.get("task") == "detect"
    classes = int(meta["detect"]["classes"]) if detector else head.classes
    if len(labels) != classes:
        raise NpcamError(f"{len(labels)} labels for a {'detector' if detector else 'head'} with {classes} classes")
    (directory / "trunk.onnx").write_bytes(trunk)
    if isinstance(head, AffineHead):
        np.save(directory / "fc_weight.npy", head.weight.astype(np.float32), allow_pickle=False)
        np.save(directory / "fc_bias.npy", head.bias.astype(np.float32), allow_pickle=False)
    else:
        spec = {
            "input": head.input,
            "input_shape": list(head.input_shape),
            "output": head.output,
            "ops": [{"op": o.op, "inputs": list(o.inputs), "output": o.output, "attrs": o.attrs} for o in head.ops],
            "layout": head.layout,
            "precision": head.precision,
        }
        if head.layout == "tokens":
            spec.update(grid=list(head.grid), prefix=head.prefix)
        if head.sides:
            spec["sides"] = {name: list(shape) for name, shape in head.sides.items()}
        if len(head.inputs) > 1:
            spec["inputs"] = {name: list(shape) for name, shape in head.inputs.items()}
        (directory / "head.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
        np.savez(directory / "head.npz", **head.arrays)
    (directory / "labels.json").write_text(json.dumps(list(labels), indent=0, ensure_ascii=False) + "\n", "utf-8")
    if decode_arrays:
        np.savez(directory / "decode.npz", **decode_arrays)
        meta = {**meta, "detect": {**meta["detect"], "arrays": sorted(decode_arrays)}}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "input_size": list(as_size(meta["input_size"])),
        "head": head.kind,
        "channels": head.channels,
        "classes": classes,
    }
    return seal(directory, meta)


def seal(directory: Path, meta: dict) -> dict:
    """Hash the bundle's files and (re)write ``bundle.json``; call after changing a file."""
    meta = {**meta, "files": {name: sha256_file(directory / name) for name in files_for(meta)}}
    text = (json.dumps(meta, indent=2) + "\n").encode("utf-8")
    atomic_write(directory / "bundle.json", lambda f: f.write(text))
    return meta


def replace_trunk(directory: Path, trunk: bytes, meta: dict) -> dict:
    """Swap the trunk of the bundle in ``directory`` for ``trunk`` (serialized ONNX) and reseal it with ``meta``.

    Each file is replaced whole (a reader sees the old trunk or the new one, never part of one); between the
    two replacements the hashes disagree, so a reader refuses rather than runs a mismatched pair. To change a
    bundle others may read, do it inside :func:`staged`. Returns the sealed metadata.
    """
    atomic_write(directory / "trunk.onnx", lambda f: f.write(trunk))
    return seal(directory, meta)


def is_bundle(directory: Path) -> bool:
    """Whether ``directory`` holds a bundle (a ``bundle.json``; not checked: see :func:`read`)."""
    return (directory / "bundle.json").is_file()


def peek_meta(directory: Path) -> dict | None:
    """``bundle.json``'s content, unchecked, or None when there is none or it is not a readable JSON object.

    For the exporter's "is this my bundle?" question; use :func:`read` to load a bundle.
    """
    try:
        meta = json.loads((directory / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` to build a bundle in; on success it replaces ``out``.

    On any failure (including Ctrl-C) the directory is removed and ``out`` is
    left as it was, so an export either completes or changes nothing. An
    existing ``out`` that is not a bundle is never replaced.
    """
    out = out.expanduser().absolute()
    if out.exists() and not is_bundle(out):
        raise NpcamError(f"{out}: exists and is not an npcam bundle; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an old bundle only once the new one is complete."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "bundle")
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old / "bundle", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()
