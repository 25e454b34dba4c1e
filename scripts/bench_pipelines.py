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

Camera-size photos (``scripts/bench_photo.py``) are timed as whole processes over a
directory: ``python -m npcam DIR`` against :func:`practitioner`, the script a
practitioner writes with torch and OpenCV (``python scripts/bench_pipelines.py
directory ARCH WEIGHTS DIR OUT``). Pillow is imported only where it is used, so that
this script's process loads what such a script loads: torch, OpenCV, NumPy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

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
    tensor: Callable[[object], object]  # RGB PIL image -> normalized float32 [1, 3, S, S]

    def classifier(self):
        """The network as trunk, GAP, flatten, fc: TorchCAM hooks a module's output, so the trunk must be one."""
        import torch

        from export.from_torch import Trunk

        return torch.nn.Sequential(Trunk(self.net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), self.fc).eval()


def torch_reference(arch_name: str, weights: str | Path) -> TorchReference:
    """Build ``arch_name`` (an export/archs.py name), load ``weights`` (a state dict file), and its normalization."""
    import torch
    from PIL import Image

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
    from PIL import Image

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
    from PIL import Image
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
    from PIL import Image
    from torchcam.methods import ScoreCAM

    classifier = ref.classifier()
    extractor = ScoreCAM(classifier, target_layer=classifier[0], batch_size=32)

    def run(path: Path) -> None:
        with torch.no_grad():
            scores = classifier(ref.tensor(Image.open(path).convert("RGB")))
            extractor(int(scores.argmax()), scores)

    return run


# Camera-size photos: the same stages on both sides, so that their times line up.
PHOTO_STAGES = ["decode", "network input", "trunk+head", "map", "overlay", "encode+write"]

# The module whose output is the explained layer, and what follows it before pooling, per family:
# torchvision's ResNets end their trunk with layer4; EfficientNet-Lite's with _bn1 then a functional ReLU6.
HOOKS = {"resnet": ("layer4", None), "efficientnet_lite": ("_bn1", "relu6")}

Stamps = list  # [(perf_counter, process_time), ...], one before the first stage and one after each


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _stage_times(stamps: Stamps) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each entry of :data:`PHOTO_STAGES`, from the stamps around them."""
    wall, cpu = np.diff([w for w, _ in stamps]), np.diff([c for _, c in stamps])
    return {"wall": dict(zip(PHOTO_STAGES, map(float, wall))), "cpu": dict(zip(PHOTO_STAGES, map(float, cpu)))}


def practitioner(arch_name: str, weights: str | Path, quality: int = 95) -> Callable[[Path, Path], dict]:
    """The top-1 CAM overlay as a practitioner writes it with torch and OpenCV; returns ``(path, out) -> stages``.

    ``cv2.imread`` (BGR, EXIF orientation applied), ``cv2.resize`` to the input
    (its default bilinear), normalization in torch, the network's forward with a
    hook on the explained layer, ``CAM = relu(W_c . A) / max``, ``cv2.resize`` of
    the map to the photo, ``cv2.applyColorMap`` (JET), ``cv2.addWeighted`` half
    and half, ``cv2.imwrite`` at ``quality`` (OpenCV's default is 95, npcam
    writes 90; both 4:2:0 baseline JPEG with the standard tables). torch and
    OpenCV keep their default threads. The stage times cost two clock reads each.
    """
    import cv2
    import torch

    from export.archs import ARCHS

    arch = ARCHS[arch_name]
    net = arch.build()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    fc = getattr(net, arch.fc_name)
    module, then = next(hook for family, hook in HOOKS.items() if arch_name.startswith(family))
    layer = {}

    def keep(_module, _inputs, output) -> None:
        layer["A"] = torch.nn.functional.relu6(output) if then == "relu6" else output

    getattr(net, module).register_forward_hook(keep)
    mean = torch.tensor(arch.mean).view(3, 1, 1)
    std = torch.tensor(arch.std).view(3, 1, 1)
    side = arch.input_size

    def pipeline(path: Path, out: Path) -> dict:
        stamps = [_stamp()]
        bgr = cv2.imread(str(path))
        stamps.append(_stamp())
        small = cv2.cvtColor(cv2.resize(bgr, (side, side)), cv2.COLOR_BGR2RGB)
        x = ((torch.from_numpy(small).permute(2, 0, 1).float() / 255 - mean) / std)[None]
        stamps.append(_stamp())
        with torch.no_grad():
            logits = net(x)
            stamps.append(_stamp())
            weights_c = fc.weight[int(logits.argmax())]
            cam = torch.relu(torch.einsum("k,khw->hw", weights_c, layer["A"][0]))
            cam = (cam / cam.max().clamp(min=1e-12)).numpy()
        stamps.append(_stamp())
        full = cv2.resize(cam, (bgr.shape[1], bgr.shape[0]))
        heat = cv2.applyColorMap(np.uint8(255 * full), cv2.COLORMAP_JET)
        picture = cv2.addWeighted(heat, 0.5, bgr, 0.5, 0)
        stamps.append(_stamp())
        cv2.imwrite(str(out), picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
        stamps.append(_stamp())
        return _stage_times(stamps)

    return pipeline


def npcam_photo(bundle: str | Path) -> Callable[[Path, Path], dict]:
    """The steps of ``python -m npcam``'s default mode on one photo, timed; returns ``(path, out) -> stages``.

    What ``npcam.explain.explain_file`` does, one step at a time: ``read_photo``
    (RGBX buffer shared with Pillow), the network input, trunk and head, the top-1
    map, ``draw`` (upsample, jet and blend in bands, into the photo's buffer),
    ``save_image`` (JPEG quality 90 from that buffer), which then decodes the next
    photo. One onnxruntime thread and the overlay's bands in this thread: the cost
    of each stage, as one of the CLI's workers pays it.
    """
    import npcam
    from npcam.files import save_image
    from npcam.image import read_photo, recycle, rgbx_base

    model = npcam.load(bundle, threads=1)

    def pipeline(path: Path, out: Path) -> dict:
        stamps = [_stamp()]
        pil, rgb, size = read_photo(path)
        stamps.append(_stamp())
        x = model.preprocess(pil)
        stamps.append(_stamp())
        pred = model.classify([rgb], [x], [size])[0]
        stamps.append(_stamp())
        maps = model.cam(pred, [pred.top1])
        stamps.append(_stamp())
        rgbx = rgbx_base(rgb)
        picture = npcam.render.overlay_map(rgbx, maps[0], 0.5, threads=1, out=rgbx)[:, :, :3]  # as draw() does
        stamps.append(_stamp())
        save_image(out, picture)
        stamps.append(_stamp())
        recycle(rgb)  # as explain_file does: the next photo decodes into this buffer
        return _stage_times(stamps)

    return pipeline


def directory(pipeline: Callable[[Path, Path], dict], images: Path, out: Path) -> list[dict]:
    """Run ``pipeline`` on every JPEG of ``images`` (sorted) into ``out``/<stem>_cam.jpg; their stage times."""
    return [pipeline(path, out / f"{path.stem}_cam.jpg") for path in sorted(images.glob("*.jpg"))]


def main(argv: list[str]) -> int:
    """``directory ARCH WEIGHTS DIR OUT [--quality Q] [--threads N] [--stages]``: the practitioner's script;
    ``npcam-stages BUNDLE DIR OUT``: npcam's steps timed; else ``ARCH WEIGHTS IMAGE REPO OUT``: the cold start."""
    import argparse

    if argv[:1] == ["directory"]:
        p = argparse.ArgumentParser(prog="bench_pipelines.py directory")
        p.add_argument("arch")
        p.add_argument("weights", type=Path)
        p.add_argument("images", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--quality", type=int, default=95, help="cv2.imwrite's JPEG quality (OpenCV's default 95)")
        p.add_argument("--threads", type=int, help="torch's and OpenCV's threads (default: theirs)")
        p.add_argument("--stages", action="store_true", help="print each photo's stage times as JSON lines")
        args = p.parse_args(argv[1:])
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # export/ from the checkout: the models
        if args.threads:
            import cv2
            import torch

            torch.set_num_threads(args.threads)
            cv2.setNumThreads(args.threads)
        times = directory(practitioner(args.arch, args.weights, args.quality), args.images, args.out)
    elif argv[:1] == ["npcam-stages"]:
        bundle, images, out = argv[1:4]
        times = directory(npcam_photo(bundle), Path(images), Path(out))
        args = argparse.Namespace(stages=True)
    else:
        # The torch side of the cold start: one process, one image, nothing of npcam loaded.
        arch_name, weights, image, repo, out = argv[:5]
        sys.path.insert(0, repo)  # export/ from the checkout
        torch_pipeline(torch_reference(arch_name, weights))(Path(image), Path(out))
        return 0
    if args.stages:
        import json

        for stages in times:
            print(json.dumps(stages))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
