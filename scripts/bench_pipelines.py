"""The pipelines scripts/bench.py compares: npcam's, and the torch ones it is measured against.

Each pipeline is a function ``(path, out)`` that writes the top-1 CAM overlay
of the image at ``path`` to ``out`` as a JPEG; npcam's returns its stage times.
The torch side has one reference, :func:`torch_reference`: the architecture
built, its weights loaded and the input normalized as its users would, shared
by the plain torch pipeline, TorchCAM's CAM and ScoreCAM, and the one-image
cold-start script (``python scripts/bench_pipelines.py ARCH WEIGHTS IMAGE REPO OUT``).

npcam, torch, TorchCAM, OpenCV and export/ are imported inside the functions
that use them, so that a process measuring one side never loads the other's.
A process that runs npcam imports it before NumPy (bench.py and
bench_harness.py do): npcam then sets NumPy's BLAS threads (see npcam/__init__.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

STAGES = ["decode", "preprocess", "trunk", "head+CAM", "upsample", "colormap+blend", "encode"]


def npcam_pipeline(bundle: str) -> Callable[[Path, Path], dict[str, float]]:
    """npcam's CLI path, one step at a time, each step timed (seconds per entry of :data:`STAGES`)."""
    import npcam
    from npcam.files import save_image

    model = npcam.load(bundle)

    def pipeline(path: Path, out: Path) -> dict[str, float]:
        t = [time.perf_counter()]
        pil = npcam.image.open_image(path)  # as Model.predict does
        rgb = np.asarray(pil)
        t.append(time.perf_counter())
        x = model.preprocess(pil)
        t.append(time.perf_counter())
        features = model.features(x)
        t.append(time.perf_counter())
        logits = npcam.logits(features, model.head.weight, model.head.bias)[0]
        npcam.softmax(logits)
        cam = npcam.class_activation_maps(features[0], model.head.weight, [int(np.argmax(logits))])[0]
        t.append(time.perf_counter())
        full = npcam.upsample(cam, rgb.shape[:2])
        t.append(time.perf_counter())
        picture = npcam.overlay(rgb, full, 0.5)
        t.append(time.perf_counter())
        save_image(out, picture)
        t.append(time.perf_counter())
        return dict(zip(STAGES, np.diff(t)))

    return pipeline


def npcam_scorecam(bundle: str) -> Callable[[Path], None]:
    """Score-CAM of the top-1 class, from file to map, in npcam."""
    import npcam

    model = npcam.load(bundle)

    def run(path: Path) -> None:
        pred = model.predict(path)
        model.cam(pred, pred.top1, method="scorecam")

    return run


class TorchReference(NamedTuple):
    """One architecture in torch, as its users run it: ``net`` in eval mode, its final ``fc`` and the input tensor."""

    net: object  # torch.nn.Module, with ``net.trunk`` giving the feature map
    fc: object  # torch.nn.Linear
    input_size: int
    tensor: Callable[[Image.Image], object]  # RGB PIL image -> normalized float32 [1, 3, S, S]

    def classifier(self):
        """The network as trunk, GAP, flatten, fc: TorchCAM hooks a module's output, so the trunk must be one."""
        import torch

        from export.from_torch import Trunk

        return torch.nn.Sequential(Trunk(self.net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), self.fc).eval()


def torch_reference(arch_name: str, weights: str | Path) -> TorchReference:
    """Build ``arch_name`` (an export/archs.py name), load ``weights`` (a state dict file), and its normalization."""
    import torch

    from export.archs import ARCHS
    from export.weights import load_state_dict

    arch = ARCHS[arch_name]
    net = arch.build()
    net.load_state_dict(load_state_dict(Path(weights)), strict=True)
    net.eval()
    mean, std = torch.tensor(arch.mean).view(3, 1, 1), torch.tensor(arch.std).view(3, 1, 1)

    def tensor(img: Image.Image):
        resized = img.resize((arch.input_size, arch.input_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
        return ((x - mean) / std)[None]

    return TorchReference(net, getattr(net, arch.fc_name), arch.input_size, tensor)


def torch_pipeline(ref: TorchReference) -> Callable[[Path, Path], None]:
    """The job done plainly in torch: forward, CAM, ``F.interpolate``, OpenCV's colormap and blend."""
    import cv2
    import torch
    import torch.nn.functional as F

    def pipeline(path: Path, out: Path) -> None:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            features = ref.net.trunk(ref.tensor(img))
            logits = ref.fc(features.mean(dim=(2, 3)))
            cam = torch.relu(torch.einsum("k,khw->hw", ref.fc.weight[logits.argmax()], features[0]))
            cam = cam / cam.max().clamp(min=1e-12)
            cam = F.interpolate(cam[None, None], size=(img.height, img.width), mode="bilinear", align_corners=False)
        heat = cv2.applyColorMap((cam[0, 0] * 255).round().byte().numpy(), cv2.COLORMAP_JET)
        bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out), cv2.addWeighted(heat, 0.5, bgr, 0.5, 0), [cv2.IMWRITE_JPEG_QUALITY, 90])

    return pipeline


def torchcam_pipeline(ref: TorchReference) -> Callable[[Path, Path], None]:
    """The job done through TorchCAM: its CAM extractor and its overlay."""
    import torch
    from torchcam.methods import CAM
    from torchcam.utils import overlay_mask

    classifier = ref.classifier()
    extractor = CAM(classifier, target_layer=classifier[0], fc_layer=classifier[3])

    def pipeline(path: Path, out: Path) -> None:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            scores = classifier(ref.tensor(img))
            cam = extractor(int(scores.argmax()), scores)[0][0]
        overlay_mask(img, Image.fromarray(cam.numpy(), mode="F"), alpha=0.5).save(out, quality=90)

    return pipeline


def torchcam_scorecam(ref: TorchReference) -> Callable[[Path], None]:
    """Score-CAM of the top-1 class, from file to map, with TorchCAM's ScoreCAM."""
    import torch
    from torchcam.methods import ScoreCAM

    classifier = ref.classifier()
    extractor = ScoreCAM(classifier, target_layer=classifier[0], batch_size=32)

    def run(path: Path) -> None:
        with torch.no_grad():
            scores = classifier(ref.tensor(Image.open(path).convert("RGB")))
            extractor(int(scores.argmax()), scores)

    return run


if __name__ == "__main__":
    # The torch side of the cold start: one process, one image, nothing of npcam loaded.
    arch_name, weights, image, repo, out = sys.argv[1:6]
    sys.path.insert(0, repo)  # export/ from the checkout
    torch_pipeline(torch_reference(arch_name, weights))(Path(image), Path(out))
