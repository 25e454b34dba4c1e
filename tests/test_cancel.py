"""Stopping multi-pass methods between batches: ``should_stop`` in the library, Ctrl-C in the CLI.

The server's time limit uses the same check; tests/test_serve.py covers it.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import PHOTOS, REPO, default_sigint

import npcam
from npcam import methods
from npcam.cancel import Cancelled
from npcam.methods import ablation
from npcam.probe import INPUT_BATCH


def counting_stop(after: int):
    """A ``should_stop`` that says stop on its ``after + 1``-th call; ``calls`` counts them."""
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > after

    return should_stop, calls


def test_scorecam_stops_at_the_batch_boundary_it_is_told_to(tiny_model):
    """When Score-CAM stops, not what it computes: on the tiny bundle, whose passes cost little."""
    model = tiny_model
    pred = model.predict(PHOTOS[0], size=128)  # 4x4 feature cells: several batches of distinct masks
    totals, never = [], counting_stop(after=10**9)[0]
    model.cam(pred, method="scorecam", progress=lambda done, total: totals.append(total), should_stop=never)
    assert len(totals) >= 3  # the test bundle needs several batches for this test to say anything
    passes = []
    should_stop, calls = counting_stop(after=2)
    with pytest.raises(Cancelled):
        model.cam(pred, method="scorecam", progress=lambda done, total: passes.append(done), should_stop=should_stop)
    # Two batches ran, the third was refused: the check comes before each batch, none after the stop.
    assert passes == [INPUT_BATCH, 2 * INPUT_BATCH] and len(calls) == 3


def test_ablation_on_a_graph_head_stops_between_batches_and_is_unchanged_by_batching(graph_bundle, monkeypatch):
    monkeypatch.setattr(ablation, "LAYER_BATCH", 48)  # 128 channels: batches of 48, 48 and 32

    graph = npcam.load(graph_bundle)
    pred = graph.predict(PHOTOS[0])
    assert graph.head.kind == "graph" and methods.METHODS["ablationcam"].multi_pass(graph.head.kind)
    assert not methods.METHODS["ablationcam"].multi_pass("affine") and methods.METHODS["scorecam"].multi_pass("affine")
    should_stop, calls = counting_stop(after=1)
    with pytest.raises(Cancelled):
        ablation.ablation_weights(graph.probe(pred, [pred.top1], should_stop=should_stop))
    assert len(calls) == 2
    # Batching the ablated rows changes nothing: the same as all rows in one head call (the old way).
    pooled = pred.pooled.astype(np.float64)
    ablated = np.repeat(pooled[None], len(pooled), axis=0)
    np.fill_diagonal(ablated, 0.0)
    y = float(pred.logits[pred.top1])
    want = (y - graph.head.forward(ablated)[:, pred.top1].astype(np.float64)) / y
    # Row i of a batched head call does not depend on the other rows, up to float32 rounding of the scores.
    np.testing.assert_allclose(
        ablation.ablation_weights(graph.probe(pred, [pred.top1]))[0], want, rtol=1e-5, atol=1e-6 * np.abs(want).max()
    )


def _run_cli(bundle, image, output, interrupt: bool, cwd):
    """Run ``python -m npcam IMAGE --method scorecam`` with stderr on a terminal, so that it shows its passes.

    Returns ``(exit code, stderr text, seconds to the first progress line, seconds from then, or from
    the SIGINT sent then, to the exit, whether the SIGINT was sent before the last pass)``.
    """
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "npcam", str(image), "-m", str(bundle), "--method", "scorecam", "--size", "160",
               "-o", str(output)]  # fmt: skip
    start = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=cwd, preexec_fn=default_sigint
    )
    os.close(slave)
    text, started, sent = b"", None, False
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            process.kill()
            raise AssertionError(f"no output from the CLI in 300 s: {text!r}")
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal: it exited
            break
        if not chunk:
            break
        text += chunk
        if started is None and b"scorecam passes" in text:
            started = time.monotonic()
            # A loaded machine can hand the test its first progress line late, when the passes are done: the
            # signal would then not fall between batches, which is what is being tested.
            done, total = map(int, re.findall(rb"\[(\d+)/(\d+)\]", text)[-1])
            if interrupt and done < total:
                process.send_signal(signal.SIGINT)
                sent = True
    code = process.wait(timeout=300)
    end = time.monotonic()
    os.close(master)
    assert started is not None, f"the CLI showed no Score-CAM progress: {text!r}"
    return code, text.decode(errors="replace"), started - start, end - started, sent


def test_ctrl_c_stops_a_single_image_scorecam_between_batches(bundle, tmp_path):
    image = PHOTOS[1]
    full_output = tmp_path / "full" / "out.jpg"
    code, err, _, rest_of_full_run, _ = _run_cli(bundle, image, full_output, interrupt=False, cwd=tmp_path)
    assert code == 0 and full_output.is_file(), err
    output = tmp_path / "stopped" / "out.jpg"
    output.parent.mkdir()
    for _attempt in range(3):  # until the signal lands between batches (see _run_cli)
        code, err, _, after_sigint, sent = _run_cli(bundle, image, output, interrupt=True, cwd=tmp_path)
        if sent:
            break
        output.unlink(missing_ok=True)
    assert sent, "the first progress line came after the last pass three times: the machine is too loaded"
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert list(output.parent.iterdir()) == []  # no overlay, no temporary file
    # The run stopped at the next batch instead of computing the rest of the map: after the first
    # progress line the full run still had all batches but one to go (over 10 on the test bundle), the
    # interrupted one at most one batch. Half the full run's remainder is a generous bound.
    assert after_sigint < rest_of_full_run / 2, (after_sigint, rest_of_full_run)


def test_drise_stops_at_the_batch_boundary_it_is_told_to(tmp_path):
    import tiny_detector as td
    from conftest import synthetic_image

    from npcam.probe import MethodOptions

    detector = npcam.load(td.bundle(tmp_path / "detector"))
    pred = detector.predict(synthetic_image(120, 160))
    options = MethodOptions(masks=5 * INPUT_BATCH, mask_cells=4)  # five batches of INPUT_BATCH masks
    passes = []
    should_stop, calls = counting_stop(after=2)
    with pytest.raises(Cancelled):
        detector.cam(pred, method="drise", options=options, progress=lambda done, total: passes.append((done, total)),
                     should_stop=should_stop)  # fmt: skip
    # Two batches ran, the third was refused: the check comes before each batch, none after the stop.
    assert passes == [(INPUT_BATCH, 5 * INPUT_BATCH), (2 * INPUT_BATCH, 5 * INPUT_BATCH)] and len(calls) == 3
