"""`jaxvlm train --data cauldron:'shards/*.parquet' --packing`: streamed parquet shards of real
COCO JPEGs, packed rows, 2 loader worker processes - killed (SIGKILL) after a checkpoint and
resumed, it reaches bit-identical losses and parameters to an uninterrupted run; the same on 2
processes (tests/test_sharding.py's launcher)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_sharding import jaxvlm_train, start_train
from test_stream_loader import COCO_ROOT, SMOLLM2, coco_rows

from conversion import read_checkpoint
from jaxvlm.data.streaming import write_cauldron_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO_ROOT / "captions.json").is_file(),
        reason="real tokenizer / COCO data not found (../shared is absent)",
    ),
]
PROGRESS = re.compile(r"^\[[#.]+\] (\d+)/\d+ loss")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_cauldron_shards(coco_rows(2), d, rows_per_shard=[30, 41, 31], row_group_size=[7, 12])
    return d


def args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", f"cauldron:{shards}/*.parquet", "--packing", "--tokenizer", str(SMOLLM2),
        "--steps", "8", "--batch-size", "2", "--grad-accum", "2", "--max-length", "160", "--pack-buffer", "24",
        "--loader-workers", "2", "--save-every", "4", "--log-every", "1", "--seed", "5", "--lr-mp", "2e-3",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


def results(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _, weights = read_checkpoint(out / "model")
    return [r["step"] for r in rows], [r["loss"] for r in rows], [r["tokens"] for r in rows], weights


def assert_identical(a: Path, b: Path) -> None:
    steps_a, loss_a, tok_a, w_a = results(a)
    steps_b, loss_b, tok_b, w_b = results(b)
    assert steps_a == steps_b == list(range(1, 9))
    assert tok_a == tok_b, "the resumed run saw other batches"
    assert loss_a == loss_b, f"losses differ: {loss_a} vs {loss_b}"
    assert loss_a[-1] < loss_a[0], "the loss should fall"
    assert all(np.array_equal(w_a[k], w_b[k]) for k in w_a), "final parameters differ"


def test_killed_and_resumed_streamed_packed_run_is_bit_identical(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "jaxvlm", "train", *args(shards, full)], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=600)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "jaxvlm", "train", *args(shards, cut)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        for line in proc.stdout:  # step 6 is printed once step 5 ran, after the checkpoint of step 4
            m = PROGRESS.match(line)
            if m and int(m.group(1)) >= 6:
                break
        proc.send_signal(signal.SIGKILL)  # no clean-up, no checkpoint at exit
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (cut / "checkpoints" / "4").is_dir() and not (cut / "model").exists()
    done = subprocess.run([sys.executable, "-m", "jaxvlm", "train", *args(shards, cut), "--resume"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "(step 4)" in done.stdout
    assert_identical(full, cut)


def test_two_processes_killed_and_resumed_streamed_packed_run_is_bit_identical(shards, tmp_path):
    """Each process reads its own share of the units and packs it (2 loader workers each); both
    are SIGKILLed after the step-4 checkpoint, which keeps every process's position."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    jaxvlm_train(args(shards, full), processes=2)
    procs = start_train(args(shards, cut), processes=2)
    try:
        for line in procs[0].stdout:
            m = PROGRESS.match(line)
            if m and int(m.group(1)) >= 6:
                break
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    assert (cut / "checkpoints" / "4").is_dir() and not (cut / "model").exists()
    jaxvlm_train(args(shards, cut, "--resume"), processes=2)
    assert_identical(full, cut)


def test_unreadable_image_mid_run_saves_a_checkpoint_then_resumes_with_skip(tmp_path):
    """--on-error raise stops at a photo that will not decode, but keeps the steps done as a
    checkpoint; --resume --on-error skip goes on past it (counted in metrics.jsonl)."""
    import io

    from PIL import Image

    from jaxvlm.data import SampleError
    from jaxvlm.train_loop import RunConfig, train

    rows = coco_rows()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 90, 200)).save(buf, "JPEG")
    rows[29]["images"] = [buf.getvalue()[:200]]  # the header reads (the loader plans with it), the pixels do not
    write_cauldron_shards(rows, tmp_path / "shards", rows_per_shard=17, row_group_size=5)
    run = RunConfig(data=f"cauldron:{tmp_path / 'shards'}", packing=True, tokenizer=str(SMOLLM2), steps=30,
                    batch_size=2, max_length=160, pack_buffer=12, save_every=1000, log_every=1,
                    output_dir=str(tmp_path / "run"), seed=1)  # fmt: skip
    with pytest.raises(SampleError, match=r"shard-00001\.parquet:12"):
        train(run)
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(saved) == 1 and 0 < saved[0] < 30, saved
    summary = train(RunConfig(**{**run.__dict__, "resume": True, "on_error": "skip"}))
    assert summary["steps"] == 30 and summary["skipped_samples"]["unreadable"] >= 1
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_unreadable"] >= 1
