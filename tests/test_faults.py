"""Faults during `jaxvlm train`: SIGKILL at random points, SIGTERM, and resuming.

A tiny run (preset tiny, synthetic data, batch 4, a checkpoint every 2 steps, the last 2 kept)
is done once without interruption: the reference. Then one output directory is driven
through 10 SIGKILLs at seeded random moments (during start-up and restore, during steps, during
checkpoint writes), each followed by `--resume`, until the run completes; after every kill the
next process must resume from the latest complete checkpoint on disk, and the finished run
must equal the reference bit for bit (every tensor of model/model.safetensors, every logged
loss). SIGTERM must stop after the current step with a checkpoint of exactly the steps done.

The subprocesses share a persistent JAX compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, record

from conversion import load_safetensors

SMOLLM2 = ROOT.parent / "shared" / "data" / "smollm2"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SMOLLM2 / "tokenizer.json").is_file(),
        reason=f"SmolLM2 tokenizer not found under {SMOLLM2} (../shared is absent)",
    ),
]

STEPS, SAVE_EVERY = 24, 2
ARGS = [
    "-m",
    "jaxvlm",
    "train",
    "--tokenizer",
    str(SMOLLM2),
    "--steps",
    str(STEPS),
    "--batch-size",
    "4",
    "--synthetic-size",
    "64",
    "--save-every",
    str(SAVE_EVERY),
    "--keep",
    "2",
    "--log-every",
    "1",
    "--max-length",
    "128",
    "--seed",
    "1",
    "--lr-language-backbone",
    "1e-3",
    "--lr-vision-backbone",
    "1e-3",
]
PROGRESS = re.compile(r"^\[[#.]+\] (\d+)/\d+ loss")
RESUMED = re.compile(r"^resumed from .*/checkpoints/(\d+) \(step (\d+)\)$")
N_KILLS = 10


class Training:
    """`python -m jaxvlm train ...` in a subprocess whose stdout lines are read as they come."""

    def __init__(self, out: Path, env: dict, *extra: str):
        self.started = time.time()
        self.err_path = out.parent / f"{out.name}.stderr.{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [sys.executable, *ARGS, "--output-dir", str(out), *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.err_path.open("w"),
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def next_progress(self, timeout: float = 120) -> int | None:
        """The step of the next progress line, or None when the process has ended."""
        m = self.next_match(PROGRESS, timeout)
        return int(m.group(1)) if m else None

    def next_match(self, pattern: re.Pattern, timeout: float = 120) -> re.Match | None:
        """The next stdout line matching `pattern`, or None when the process has ended."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._q.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                return None
            self.lines.append(line)
            m = pattern.match(line)
            if m:
                return m

    def finish(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=30)) is not None:
            self.lines.append(line)
        return code

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def steps_seen(self) -> int:
        return max([int(m.group(1)) for m in map(PROGRESS.match, self.lines) if m] or [0])

    def resumed_step(self) -> int | None:
        found = [int(m.group(2)) for m in map(RESUMED.match, self.lines) if m]
        return found[0] if found else None


def complete_steps(out: Path) -> list[int]:
    """Checkpoints orbax has finished (a step directory appears only by the final rename)."""
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def final_tensors(out: Path) -> dict[str, np.ndarray]:
    return load_safetensors(out / "model" / "model.safetensors")[0]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def assert_outputs_whole(out: Path) -> None:
    """Every run output under its final name is complete (the promise of conversion.atomic):
    the JSON files parse, every metrics line is whole, the plot is a valid PNG, and a model/
    directory holds a config, readable weights and the tokenizer."""
    from PIL import Image

    for name in (".jaxvlm-run", "run_config.json", "summary.json"):
        if (out / name).exists():
            assert isinstance(json.loads((out / name).read_text()), dict), name
    if (out / "metrics.jsonl").exists():
        text = (out / "metrics.jsonl").read_text()
        assert text == "" or text.endswith("\n"), "metrics.jsonl ends in a cut line"
        steps = [json.loads(line)["step"] for line in text.splitlines()]
        assert steps == sorted(set(steps)), f"metrics.jsonl steps {steps}"
    if (out / "loss_curve.png").exists():
        with Image.open(out / "loss_curve.png") as im:
            im.verify()
    if (out / "model").exists():
        assert json.loads((out / "model" / "config.json").read_text())
        assert load_safetensors(out / "model" / "model.safetensors")[0]
        assert (out / "model" / "tokenizer.json").is_file()


def stale_temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".tmp-*"))


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = final_tensors(out), final_tensors(ref)
    assert got.keys() == want.keys()
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensor(s) differ from the uninterrupted run, e.g. {differ[:3]}"
    assert losses(out) == losses(ref), "the logged losses differ from the uninterrupted run"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("reference") / "run"
    run = Training(out, env)
    assert run.finish() == 0, run.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert complete_steps(out) == [STEPS - SAVE_EVERY, STEPS]
    return out


def _reach_kill_point(run: Training, wait: int, delay: float) -> bool:
    """Wait for `wait` progress lines then `delay` seconds (wait 0: a moment of start-up or
    restore instead). False when the run ends or nears its last step first: a kill after the
    final checkpoint is test_resume_after_the_final_checkpoint's case."""
    if wait == 0:
        time.sleep(1.0 + 3.0 * delay)
        return True
    for _ in range(wait):
        step = run.next_progress()
        if step is None or step >= STEPS - 3:
            return False
    time.sleep(delay)
    return True


def test_sigkill_at_random_points_then_resume_reaches_the_same_parameters(reference, env, tmp_path):
    rng = np.random.default_rng(2024)
    kills, chains, log = 0, 0, []
    where = {"start-up or restore": 0, "a step": 0, "a checkpoint write": 0}
    while kills < N_KILLS:
        chains += 1
        out = tmp_path / f"chain{chains}"
        latest = None  # the latest complete checkpoint on disk
        while True:
            run = Training(out, env, "--resume")
            wait, delay = int(rng.integers(0, 5)), float(rng.uniform(0.0, 0.4 if rng.random() < 0.7 else 1.5))
            if wait == 0 and (latest or 0) > STEPS - 8:
                wait = 1
            if kills < N_KILLS and _reach_kill_point(run, wait, delay) and run.proc.poll() is None:
                run.proc.send_signal(signal.SIGKILL)
                run.finish()
                kills += 1
                seen, before = run.steps_seen(), latest
                partial = (
                    sorted(
                        p.name
                        for p in (out / "checkpoints").glob("*.orbax-checkpoint-tmp*")
                        if p.stat().st_mtime >= run.started
                    )
                    if seen
                    else []
                )  # written by this process
                where["a checkpoint write" if partial else "a step" if seen else "start-up or restore"] += 1
                if seen or run.resumed_step() is not None:  # else killed before it had said where it resumed
                    assert run.resumed_step() == latest, (
                        f"kill {kills}: resumed at {run.resumed_step()}, latest checkpoint was {latest}"
                    )
                latest = max(complete_steps(out), default=None)
                assert_outputs_whole(out)
                log.append(
                    f"kill {kills}: after {wait} progress line(s) + {delay:.2f} s; resumed at {before}, "
                    f"reached step {seen}, latest complete checkpoint now {latest}"
                    + (f", partial {partial} left" if partial else "")
                )
                if seen:  # a step's checkpoint is written after its progress line, one every SAVE_EVERY steps
                    assert seen - SAVE_EVERY <= (latest or 0) <= seen, log[-1]
                else:
                    assert latest == before, log[-1]
                continue
            code = run.finish()
            assert code == 0, f"a resumed run failed:\n{run.stderr[-2000:]}"
            assert run.resumed_step() == latest, f"resumed at {run.resumed_step()}, latest checkpoint was {latest}"
            log.append(f"chain {chains}: finished from step {latest}")
            break
        assert_same_run(out, reference)
        assert_outputs_whole(out)
        assert not stale_temporaries(out), stale_temporaries(out)
    print("\n".join(log))
    record(
        "SIGKILL trials",
        f"{kills} kills over {chains} chain(s) (during {where}): every resume from the latest "
        "complete checkpoint; final parameters and losses bit-identical to the uninterrupted run",
    )


def _sigterm_after(out: Path, env: dict, lines: int, *extra: str) -> Training:
    run = Training(out, env, *extra)
    for _ in range(lines):
        assert run.next_progress() is not None, run.stderr[-2000:]
    run.proc.send_signal(signal.SIGTERM)
    return run


def test_sigterm_saves_the_steps_done(reference, env, tmp_path):
    """SIGTERM between checkpoints (only the final one is due): the loop ends after the current
    step, saves a checkpoint of exactly the steps done, exports the model and exits 143 (128 +
    SIGTERM, as a shell reports it, so a script can tell); a resume then finishes the run exactly."""
    out = tmp_path / "run"
    run = _sigterm_after(out, env, 5, "--save-every", "1000")
    assert run.finish() == 128 + signal.SIGTERM, run.stderr[-2000:]
    done = run.steps_seen()
    assert 5 <= done < STEPS
    assert f"interrupted: saving a checkpoint at step {done} before exiting" in run.lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == done
    assert complete_steps(out) == [done]
    assert (out / "model" / "model.safetensors").is_file()
    resumed = Training(out, env, "--resume")
    assert resumed.finish() == 0, resumed.stderr[-2000:]
    assert resumed.resumed_step() == done
    assert_same_run(out, reference)


def test_ctrl_c_saves_and_exits_130(env, tmp_path):
    """SIGINT (Ctrl-C) as SIGTERM: the steps done are saved, then exit 130 (128 + SIGINT)."""
    out = tmp_path / "run"
    run = Training(out, env, "--save-every", "1000")
    for _ in range(3):
        assert run.next_progress() is not None, run.stderr[-2000:]
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 128 + signal.SIGINT, run.stderr[-2000:]
    assert complete_steps(out) == [run.steps_seen()]


def test_sigterm_on_a_checkpoint_step(env, tmp_path):
    out = tmp_path / "run"
    run = _sigterm_after(out, env, 3, "--save-every", "1")
    assert run.finish() == 128 + signal.SIGTERM, run.stderr[-2000:]
    assert max(complete_steps(out)) == run.steps_seen()
    assert (out / "model" / "model.safetensors").is_file()


def test_resume_after_the_final_checkpoint(reference, env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "model")  # as if killed while exporting the final model
    run = Training(out, env, "--resume")
    assert run.finish() == 0, run.stderr[-2000:]
    assert_same_run(out, reference)


def test_sigkill_while_exporting_leaves_whole_outputs(env, tmp_path):
    """SIGKILL after the last step, while the final checkpoint, model/, metrics, plot and summary
    are written (a resume of a finished run goes straight there): every output under its final
    name is complete or absent after each kill; the run then finishes, and the temporaries the
    killed processes left are removed."""
    out, TRIALS = tmp_path / "run", 6
    rng = np.random.default_rng(7)
    log = []
    for trial in range(TRIALS):
        run = Training(out, env, "--resume", "--steps", "4", "--save-every", "1000")
        if 4 in complete_steps(out):  # nothing left to train: it restores step 4 and exports
            assert run.next_match(RESUMED) is not None, run.stderr[-2000:]
        else:  # the last step's progress line, then the final checkpoint and the export
            while (step := run.next_progress()) is not None and step < 4:
                pass
        time.sleep(float(rng.uniform(0.0, 0.6)))
        killed = run.proc.poll() is None
        if killed:
            run.proc.send_signal(signal.SIGKILL)
        run.finish()
        assert_outputs_whole(out)
        present = [n for n in ("model", "metrics.jsonl", "loss_curve.png", "summary.json") if (out / n).exists()]
        log.append(f"trial {trial}: {'killed' if killed else 'finished first'}; present: {present}, "
                   f"temporaries: {stale_temporaries(out)}")  # fmt: skip
    run = Training(out, env, "--resume", "--steps", "4", "--save-every", "1000")
    assert run.finish() == 0, run.stderr[-2000:]
    assert_outputs_whole(out)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert not stale_temporaries(out), stale_temporaries(out)
    print("\n".join(log))
    record(
        "SIGKILL while exporting",
        f"{sum('killed' in x for x in log)} of {TRIALS} kills landed; outputs whole after each",
    )
