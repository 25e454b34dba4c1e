"""Finding an architecture's ImageNet weights: a file, a cache, a package, a download."""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch

from npcam.files import atomic_write

from .archs import Arch
from .errors import ExportError


class WeightsNotFound(ExportError):
    """No source had the weights (offline, no cache, no package)."""


def find_weights(arch: Arch, explicit: Path | None = None) -> Path:
    """The state-dict file to export, trying in order:

    1. ``explicit`` (``--weights FILE``);
    2. the pip package that ships the weights, if the arch has one;
    3. torch hub's cache, ``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch``);
    4. downloading the official file into that cache, checking its sha256 prefix.
    """
    if explicit is not None:
        if not explicit.is_file():
            raise ExportError(f"{explicit}: no such weights file")
        return explicit
    tried = []
    if arch.package:
        module, function = arch.package
        try:
            path = Path(_attr(importlib.import_module(module), function)())
            if path.is_file():
                return path
            tried.append(f"package {module} (its file {path} is missing)")
        except ImportError:
            tried.append(f"package {module} (not installed: pip install '.[export]')")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for url in arch.urls:
        cached = cache / url.rsplit("/", 1)[1]
        if cached.is_file():
            return cached
    if arch.urls:
        tried.append(f"the torch hub cache {cache}")
    for url in arch.urls:
        try:
            return download(url, cache / url.rsplit("/", 1)[1])
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tried.append(f"downloading {url} ({getattr(e, 'reason', e)})")
    raise WeightsNotFound(f"no weights for {arch.name}: tried " + "; ".join(tried) + ". Pass --weights FILE.")


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def download(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` with a progress line, atomically.

    If the file name has torch hub's ``-<sha256 prefix>.`` the content must
    match it, else nothing is kept.
    """
    match = re.search(r"-([a-f0-9]{6,})\.", dest.name)

    def fetch(out) -> None:  # raising leaves nothing at dest (atomic_write removes its temporary file)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                _progress(dest.name, done, total)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise ExportError(f"{url}: sha256 {digest.hexdigest()[:12]}… does not match {match.group(1)}")

    atomic_write(dest, fetch)
    return dest


def _progress(name: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    if total:
        filled = 30 * done // total
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r{name} [{bar}] {done / 2**20:6.1f}/{total / 2**20:.1f} MiB")
    else:
        sys.stderr.write(f"\r{name} {done / 2**20:6.1f} MiB")
    sys.stderr.flush()


ACCEPTED = (
    "--weights takes a state dict (torch.save(model.state_dict(), FILE)), "
    "or a checkpoint holding one under 'state_dict' or 'model'"
)
_IMAGES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"BM": "a BMP image",
           b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image"}  # fmt: skip


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, never unpickling arbitrary objects.

    Anything else is refused in one line (ExportError) that says what the file looked like; torch's own
    text is never passed on (it suggests ``weights_only=False``, which would run the file's code).
    """
    try:
        with open(path, "rb") as f:
            start = f.read(64)
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror or e})") from None
    what = _not_a_checkpoint(start)
    if what is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad files; its messages give unsafe advice
            what = _why_not_loaded(e, start)
    if what is not None:
        raise ExportError(f"{path}: {what}; {ACCEPTED}")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExportError(f"{path}: holds a {type(state).__name__}, not a state dict; {ACCEPTED}")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel/DistributedDataParallel
    return state


def _not_a_checkpoint(start: bytes) -> str | None:
    """What a file that cannot be a torch checkpoint (a zip archive or a pickle) is, from its first bytes."""
    if start[:4] == b"PK\x03\x04" or start[:1] == b"\x80":
        return None
    if not start:
        return "an empty file"
    for magic, name in _IMAGES.items():
        if start.startswith(magic):
            return name
    if start[:4] == b"RIFF" and start[8:12] == b"WEBP":
        return "a WebP image"
    if start.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy), not a torch checkpoint"
    if len(start) > 8 and start[8:9] == b"{":
        return "a safetensors file (or other JSON-headed file), not a torch checkpoint"
    if start[:1] == b"\x08" and (b"pytorch" in start or b"onnx" in start.lower()):
        return "an ONNX model (export that with `npcam-export onnx FILE`)"
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return "not a zip or pickle file, so not a torch checkpoint"


def _why_not_loaded(error: Exception, start: bytes) -> str:
    """npcam's words for why torch could not load a zip or pickle file with ``weights_only=True``."""
    needed = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", str(error))
    if needed:
        return f"a pickled object other than a state dict (it needs {needed.group(1)}; npcam unpickles only tensors)"
    if start[:4] == b"PK\x03\x04":
        return "a zip archive that is not a complete torch checkpoint (cut short, or another kind of zip)"
    if isinstance(error, EOFError):
        return "a pickle cut short"
    return "a pickle that is not a torch checkpoint"
