"""Finding an architecture's ImageNet weights: a file, a cache, a package, a download."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

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
    dest.parent.mkdir(parents=True, exist_ok=True)
    match = re.search(r"-([a-f0-9]{6,})\.", dest.name)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
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
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, never unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files
        raise ExportError(f"{path}: not a readable torch state dict ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExportError(f"{path}: holds a {type(state).__name__}, not a state dict")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel/DistributedDataParallel
    return state
