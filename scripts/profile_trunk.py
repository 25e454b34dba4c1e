"""Where a trunk's time goes: onnxruntime's profiler, summed per op type.

    python scripts/profile_trunk.py TRUNK [TRUNK ...] [--runs 30] [--size 224] [--threads 1]

Each TRUNK is a bundle directory or an ONNX file with an input ``image`` [N,3,H,W]. Runs each on the same random
input, the trunks taking turns, then prints per op type (as onnxruntime ran them, after its fusions: an int8
trunk's QuantizeLinear/Conv/DequantizeLinear groups run as QLinearConv) the mean ms per run, its share,
and the node count.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.cpuinfo import this_cpu  # noqa: E402


def session(path: Path, threads: int, prefix: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as npcam runs it
    model = path / "trunk.onnx" if path.is_dir() else path
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def per_op(profile: Path, runs: int) -> dict[str, tuple[float, int]]:
    """``{op type: (ms per run, nodes)}`` from a profile of ``runs`` runs (after the warm-up, which is dropped)."""
    events = json.loads(profile.read_text())
    times: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    warm_up_end = run_starts[1] if len(run_starts) > 1 else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm_up_end:
            op = e["args"]["op_name"]
            times[op] += e["dur"] / 1000 / runs
            nodes[op].add(e["name"])
    return {op: (times[op], len(nodes[op])) for op in times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trunks", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [session(t, args.threads, f"{tmp}/{i}") for i, t in enumerate(args.trunks)]
        for s in sessions:
            s.run(None, {"image": x})  # warm-up
        for _ in range(args.runs):
            for s in sessions:
                s.run(None, {"image": x})
        results = [per_op(Path(s.end_profiling()), args.runs) for s in sessions]
    print(f"# {args.runs} runs, {args.size} px, {args.threads} thread(s), onnxruntime {ort.__version__}, {this_cpu()}")
    for trunk, ops in zip(args.trunks, results):
        total = sum(ms for ms, _ in ops.values())
        print(f"\n{trunk}: {total:.2f} ms per run in kernels")
        print("| op | ms | share | nodes |\n|---|---|---|---|")
        for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0]):
            print(f"| {op} | {ms:.2f} | {ms / total:.0%} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
