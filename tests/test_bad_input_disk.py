"""A full disk: a failed write of a pretrained directory, a training checkpoint or a
`jaxvlm train` checkpoint leaves the previous files intact and no partial file under a final name.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ENOSPC,
    ROOT,
    fail_weights,
    needs_tokenizer,
    run_cli,
    snapshot,
    tiny_cfg,
)
from test_bad_input_cli import TRAIN, checkpoint_steps

from conversion import read_checkpoint, write_checkpoint


# ---- a full disk ----------------------------------------------------------------------------
def _tensors(cfg, seed):
    rng = np.random.default_rng(seed)
    from conversion import expected_shapes

    return {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}


def _fail_config(monkeypatch):
    """The config's temp file gets half its text, then the disk is full."""
    real = Path.write_text

    def write_text(self, data, *a, **k):
        if self.name.startswith(".config.json.tmp"):
            real(self, data[: len(data) // 2], *a, **k)
            raise ENOSPC
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("fail", [fail_weights, _fail_config], ids=["weights", "config"])
def test_write_checkpoint_disk_full_keeps_the_previous_files(fail, tmp_path, monkeypatch):
    old_cfg, new_cfg = tiny_cfg(), tiny_cfg(lm_tie_weights=False)  # the new checkpoint has another key set
    write_checkpoint(tmp_path, old_cfg, _tensors(old_cfg, 0))
    before = snapshot(tmp_path)
    fail(monkeypatch)
    with pytest.raises(OSError) as info:
        write_checkpoint(tmp_path, new_cfg, _tensors(new_cfg, 1))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(tmp_path) == before, "a failed write changed or left files"
    assert read_checkpoint(tmp_path)[0] == old_cfg


def test_training_checkpoint_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete: a
    full disk mid-write leaves the previous step as the latest, untouched and restorable, and
    the partial directory is never taken for a checkpoint."""
    import jax.numpy as jnp
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    from jaxvlm.train_checkpoints import TrainCheckpoints

    state = {"w": jnp.arange(6.0), "b": jnp.ones((2, 2))}
    ckpts = TrainCheckpoints(tmp_path, keep=3)
    ckpts.save(1, state, {"step": 1})
    before = snapshot(tmp_path / "1")

    async def full_disk(self, x, directory):
        (directory / self._filename).write_text(json.dumps(x)[:3])
        raise ENOSPC

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpts.save(2, {"w": state["w"] + 1, "b": state["b"]}, {"step": 2})
    monkeypatch.undo()
    ckpts.close()
    assert snapshot(tmp_path / "1") == before
    ckpts = TrainCheckpoints(tmp_path, keep=3)
    assert ckpts.latest_step() == 1 and ckpts.manager.all_steps() == [1]
    restored, meta = ckpts.restore(state)
    assert meta == {"step": 1} and np.array_equal(restored["w"], state["w"])
    ckpts.close()
    # the partial step stays on disk under orbax's temporary name (replaced when step 2 is saved
    # again: see test_train_disk_full_during_a_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]


SITECUSTOMIZE = """
import errno, json, os
_at = int(os.environ.get("JAXVLM_TEST_ENOSPC_AT_SAVE", "0"))
if _at:  # test-only: the _at-th orbax JSON write fills the disk half way through
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as _jh
    _real, _count = _jh.JsonCheckpointHandler._save_fn, [0]
    async def _save_fn(self, x, directory):
        _count[0] += 1
        if _count[0] == _at:
            (directory / self._filename).write_text(json.dumps(x)[:5])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / self._filename))
        return await _real(self, x, directory)
    _jh.JsonCheckpointHandler._save_fn = _save_fn
"""


@pytest.mark.slow
@needs_tokenizer
def test_train_disk_full_during_a_checkpoint(tmp_path, jax_cache):
    """`jaxvlm train` with the disk full at the 3rd checkpoint: exit 2 naming the OSError; the
    checkpoints before it are intact and `--resume` finishes the run from step 2.

    stderr is exactly that one line: the CLI silences absl and exits without interpreter
    teardown, where the aborted save's orbax threads would print tracebacks."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "run"
    env = {**jax_cache, "JAXVLM_TEST_ENOSPC_AT_SAVE": "3", "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    code, _, err = run_cli(*TRAIN, "--output-dir", str(out), env=env)
    assert code == 2, err
    errors = [line for line in err if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: [Errno 28] No space left on device")
        and "3.orbax-checkpoint-tmp" in errors[0]
    )
    assert checkpoint_steps(out / "checkpoints") == [1, 2] and not (out / "model").exists()
    code, stdout, err_resume = run_cli(*TRAIN, "--output-dir", str(out), "--resume", env=jax_cache)
    assert code == 0, err_resume
    assert f"resumed from {out / 'checkpoints' / '2'} (step 2)" in stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    assert not list((out / "checkpoints").glob("*tmp*")), "orbax's partial directory was left behind"
    assert len(err) == 1, f"stderr has {len(err)} lines, not one: {err[:3]}"
