"""Grad-CAM beyond global pooling: npcam (NumPy head, exact reverse mode) against torch autograd, same layer.

    python scripts/bench_heads.py [--rounds 15] [--size s|b|vgg] [--depth 2]

A ViT-S/16-sized net (384 wide, 6 heads, MLP 1536, 197 tokens at 224 px; ``--size b``: ViT-B/16, 768 wide,
12 heads) with random weights and ``--depth`` blocks (only the last block is the head; the others are trunk),
exported by npcam's torch route at its default layer, the last block's ``norm1``. ``--size vgg``: VGG-16's
classifier (Flatten of 512x7x7, 4096, 4096, 1000: 120 M weights) on a small conv trunk, at its default layer,
the Flatten's input. Two rows per thread setting:

- **head**: from the layer to the map. npcam: ``model.cam(pred, c, method="gradcam")`` (the head's forward
  and backward, the channel weights, the weighted sum, ReLU and scaling). torch: the same head as a torch
  function of the hooked layer (the block's input held constant, as the hook makes it), forward,
  ``torch.autograd.grad`` and the same weighted sum.
- **total**: from the network input to the map. npcam: ``model.classify`` (onnxruntime trunk, NumPy head)
  then the map; torch: the whole net with a forward hook on ``norm1``, ``autograd.grad``, the weighted sum.

Each thread setting runs in a process of its own (1 thread: OMP/BLAS/onnxruntime/torch at 1; default: as
each library chooses), so that NumPy's BLAS picks its thread count up at start. Figures are medians (and
minimums) over the rounds, in milliseconds; the machine is shared, so run it more than once. This is a
benchmark, not a test: nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

SIZES = {"s": (384, 6), "b": (768, 12)}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def vit(size: str = "s", depth: int = 2):
    """A ViT/16 at 224 px, random weights (seeded), ``depth`` pre-norm blocks; timm's layout and names."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    dim, heads = SIZES[size]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            n, length, _ = x.shape
            qkv = self.qkv(x).reshape(n, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            return self.proj(out.transpose(1, 2).reshape(n, length, dim))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim, eps=1e-6), Attention(), nn.LayerNorm(dim, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, 16, stride=16)
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 197, dim))
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, 1000)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    torch.manual_seed(0)
    return ViT().eval()


def vgg():
    """VGG-16's classifier (25088 -> 4096 -> 4096 -> 1000) on a small stride-32 conv trunk, random weights."""
    import torch
    from torch import nn

    class VGGHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 8, stride=8), nn.ReLU(), nn.Conv2d(64, 512, 4, stride=4), nn.ReLU()
            )
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(),
                nn.Dropout(), nn.Linear(4096, 1000),
            )  # fmt: skip

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    torch.manual_seed(0)
    return VGGHead().eval()


def vit_s():
    return vit("s", int(os.environ.get("BENCH_HEADS_DEPTH", "2")))


def vit_b():
    return vit("b", int(os.environ.get("BENCH_HEADS_DEPTH", "2")))


def timed(fn, rounds: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return times[len(times) // 2], times[0]


def _grad_cam(g, a):
    """torch Grad-CAM of one class from the layer's gradient and value, both [C, h, w]."""
    import torch

    cam = torch.relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(0))
    return cam / cam.max()


def _vit_torch(net, xt, c):
    """(head, total) Grad-CAM functions at the last block's norm1, as torch + a hook computes them."""
    import torch

    block = net.blocks[-1]
    seen = {}
    hook = block.norm1.register_forward_hook(lambda m, i, out: seen.update(a=out, x=i[0]))
    with torch.no_grad():
        net(xt)
    hook.remove()
    layer0, resid = seen["a"].detach(), seen["x"].detach()
    grid = lambda t: t[0, 1:].reshape(14, 14, -1).permute(2, 0, 1)  # noqa: E731

    def head():
        a = layer0.clone().requires_grad_(True)
        y = resid + block.attn(a)
        y = y + block.mlp(block.norm2(y))
        score = net.head(net.norm(y)[:, 0])[0, c]
        (g,) = torch.autograd.grad(score, a)
        return _grad_cam(grid(g), grid(a.detach()))

    def total():
        kept = {}
        handle = block.norm1.register_forward_hook(lambda m, i, out: kept.setdefault("a", out))
        try:
            score = net(xt)[0, c]
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(score, kept["a"])
        return _grad_cam(grid(g), grid(kept["a"].detach()))

    return head, total


def _vgg_torch(net, xt, c):
    """(head, total) Grad-CAM functions at the Flatten's input (the output of ``features``)."""
    import torch

    with torch.no_grad():
        layer0 = net.features(xt)

    def head():
        a = layer0.clone().requires_grad_(True)
        score = net.classifier(torch.flatten(a, 1))[0, c]
        (g,) = torch.autograd.grad(score, a)
        return _grad_cam(g[0], a[0].detach())

    def total():
        a = net.features(xt)
        score = net.classifier(torch.flatten(a, 1))[0, c]
        (g,) = torch.autograd.grad(score, a)
        return _grad_cam(g[0], a[0].detach())

    return head, total


def worker(args) -> dict:
    """One thread setting: export once (cached in ``args.out``), then time both ways; returns the figures."""
    import numpy as np
    import torch

    import npcam

    if args.threads:
        torch.set_num_threads(args.threads)
    builder = "vgg" if args.size == "vgg" else f"vit_{args.size}"
    bundle = Path(args.out) / f"{builder}_d{args.depth}"
    if not (bundle / "bundle.json").exists():
        from export.api import run_torch

        run_torch(f"bench_heads:{builder}", out=bundle, input_size=224)
    model = npcam.Model(bundle, threads=args.threads or None)
    net = globals()[builder]()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
    pred = model.classify([np.zeros((224, 224, 3), np.uint8)], [x])[0]
    c = pred.top1
    xt = torch.from_numpy(x)
    torch_head, torch_total = (_vgg_torch if builder == "vgg" else _vit_torch)(net, xt, c)

    def npcam_total():
        p = model.classify([pred.image], [x])[0]
        return model.cam(p, c, method="gradcam")

    agree = float(np.abs(model.cam(pred, c, method="gradcam") - torch_head().detach().numpy()).max())
    return {
        "threads": args.threads or "default",
        "torch_threads": torch.get_num_threads(),
        "precision": model.head.precision,
        "max |npcam - torch| map": agree,
        "head npcam": timed(lambda: model.cam(pred, c, method="gradcam"), args.rounds),
        "head torch": timed(torch_head, args.rounds),
        "total npcam": timed(npcam_total, args.rounds),
        "total torch": timed(torch_total, args.rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", choices=[*sorted(SIZES), "vgg"], default="s")
    parser.add_argument("--depth", type=int, default=2, help="blocks (the last is the head)")
    parser.add_argument("--out", help="where the exported bundle is kept (default: a temporary directory)")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # a worker's own setting (0: default)
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["BENCH_HEADS_DEPTH"] = str(args.depth)
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for threads in (1, 0):
            env = {**os.environ, "BENCH_HEADS_DEPTH": str(args.depth)}
            for var in THREAD_VARS:
                env.pop(var, None)
                if threads:
                    env[var] = str(threads)
            command = [sys.executable, __file__, "--threads", str(threads), "--rounds", str(args.rounds)]
            command += ["--size", args.size, "--depth", str(args.depth), "--out", args.out or tmp]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "the worker failed")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    what = "VGG-16's classifier" if args.size == "vgg" else f"ViT-{args.size.upper()}/16 last block ({args.depth} blocks)"
    print(f"{what} as the head, random weights, Grad-CAM of one")
    print(f"class, ms median (min) over {args.rounds} rounds; CPU: {cpu()}")
    print("| threads | what | npcam | torch | npcam / torch |")
    print("|---|---|---|---|---|")
    for row in rows:
        for what in ("head", "total"):
            (n, n_min), (t, t_min) = row[f"{what} npcam"], row[f"{what} torch"]
            label = f"{row['threads']} (torch {row['torch_threads']})"
            print(f"| {label} | {what} | {n:.1f} ({n_min:.1f}) | {t:.1f} ({t_min:.1f}) | {n / t:.2f} |")
    print(
        f"head precision: {rows[0]['precision']}; max |npcam - torch| of the map: "
        f"{max(r['max |npcam - torch| map'] for r in rows):.1e}"
    )


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
