"""jaxvlm.runtime: the persistent compilation cache a run uses by default (one directory per
machine), `--compilation-cache off`, and `--deterministic` (accepted on a CPU; refused with a
clear message once the backend has started)."""

from __future__ import annotations

import pytest
from conftest import SMOLLM2, needs_tokenizer, run_cli

from jaxvlm import runtime


def _train_args(out):
    return ("-m", "jaxvlm", "train", "--tokenizer", str(SMOLLM2), "--output-dir", str(out), "--steps", "2",
            "--batch-size", "2", "--synthetic-size", "16", "--max-length", "128", "--save-every", "100")  # fmt: skip


@pytest.mark.slow
@needs_tokenizer
def test_train_fills_and_reuses_the_default_compilation_cache(tmp_path):
    # every compilation cached (JAX's default skips those under 1 s, which depends on the load)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_COMPILATION_CACHE_DIR": "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}  # fmt: skip
    code, _, err = run_cli(*_train_args(tmp_path / "a"), env=env)
    assert code == 0, err[-5:]
    machines = list((tmp_path / "xdg" / "jaxvlm" / "xla").iterdir())
    assert [m.name for m in machines] == [runtime.machine_tag()]
    entries = sorted(p.name for p in machines[0].iterdir())
    assert any(e.startswith("jit__step") for e in entries), entries  # the train step among them
    code, _, err = run_cli(*_train_args(tmp_path / "b"), "--deterministic", env=env)
    assert code == 0, err[-5:]
    new = sorted(p.name for p in machines[0].iterdir())
    # the deterministic flag changes XLA's options, so its programs are cached beside the first run's
    assert set(entries) <= set(new)
    code, _, err = run_cli(*_train_args(tmp_path / "c"), env=env)
    assert code == 0, err[-5:]
    assert sorted(p.name for p in machines[0].iterdir()) == new, "the same run compiled again"
    env_off = {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg-off")}
    code, _, err = run_cli(*_train_args(tmp_path / "d"), "--compilation-cache", "off", env=env_off)
    assert code == 0, err[-5:]
    # no jaxvlm cache (matplotlib keeps its own font cache under XDG_CACHE_HOME: not ours to judge)
    assert not (tmp_path / "xdg-off" / "jaxvlm").exists()


def test_deterministic_after_the_backend_started_is_a_clear_error(monkeypatch):
    import jax.numpy as jnp

    jnp.ones(1).block_until_ready()  # the backend is up
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(ValueError, match="JAX has already started its backend"):
        runtime.configure("off", deterministic=True)


def test_machine_tag_is_stable_and_names_the_architecture():
    import platform

    assert runtime.machine_tag() == runtime.machine_tag()
    assert runtime.machine_tag().startswith(platform.machine() + "-")
