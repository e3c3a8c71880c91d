"""jaxvlm.host_memory: XLA:CPU's per-execution scratch buffer faulted in 2 MiB pages instead of
4 KiB ones once glibc's hugetlb tunable is set, and not faulted in again once freed memory stays
in the heap; the CLI's re-execution that sets both.
Measured in child processes: glibc reads tunables only at process start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxvlm import host_memory

ROOT = Path(__file__).resolve().parents[1]
needs_thp = pytest.mark.skipif(
    not host_memory.huge_pages_possible(),
    reason="needs glibc >= 2.35 and transparent huge pages in madvise/always mode",
)

SCRATCH_CHILD = r"""
import json, resource
import jax, jax.numpy as jnp

@jax.jit
def f(x):  # intermediates that XLA keeps in the execution's scratch buffer
    ys = [x]
    for _ in range(6):
        ys.append(jnp.sin(ys[-1] @ x))
    return sum(y[::7, ::7].sum() for y in ys)

x = jnp.ones((2048, 2048), jnp.float32) / 2048
f(x).block_until_ready()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "scratch": f.lower(x).compile().memory_analysis().temp_size_in_bytes}))
"""


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "JAXVLM_HUGE_PAGES"}
    env.pop("GLIBC_TUNABLES", None)
    return env


def _run(code: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@needs_thp
def test_scratch_buffer_faults_in_huge_pages():
    default = json.loads(_run(SCRATCH_CHILD, _clean_env()))
    huge = json.loads(_run(SCRATCH_CHILD, host_memory.with_huge_pages(_clean_env())))
    pages = default["scratch"] // os.sysconf("SC_PAGE_SIZE")
    assert pages >= 4096, default  # a scratch buffer worth measuring (32 MB here)
    # glibc's default: every call maps the scratch buffer afresh and faults each 4 KiB page in.
    assert min(default["faults"]) >= 0.5 * pages, default
    # Huge pages: 512x fewer faults for the same buffer (allow 10x for what is not huge-page backed).
    assert max(huge["faults"]) <= 0.1 * pages, (huge, pages)
    # Both, as the CLI runs: the freed scratch stays mapped, so later calls barely fault at all.
    tuned = json.loads(_run(SCRATCH_CHILD, host_memory.tuned_environment(_clean_env())))
    assert max(tuned["faults"]) <= 0.01 * pages, (tuned, pages)


@needs_thp
def test_reexec_sets_the_tunable_once_and_keeps_others():
    code = (
        "import os; from jaxvlm.host_memory import reexec_with_huge_pages; reexec_with_huge_pages(); "
        "print(os.environ['GLIBC_TUNABLES'], os.environ.get('MALLOC_MMAP_MAX_'), os.environ.get('MALLOC_ARENA_MAX'))"
    )
    env = {**_clean_env(), "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "MALLOC_ARENA_MAX": "2"}
    # The tunable added to the user's, the heap kept, the user's own MALLOC_ARENA_MAX kept.
    assert _run(code, env).split() == ["glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1", "0", "2"]
    # Opted out: the process is not replaced and the environment is untouched.
    assert _run(code, {**env, "JAXVLM_HUGE_PAGES": "0"}).split() == ["glibc.malloc.tcache_count=0", "None", "2"]


def test_with_huge_pages_replaces_an_existing_hugetlb_setting():
    env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
    assert host_memory.huge_pages_enabled(env) and not host_memory.huge_pages_enabled({})


def test_tuned_environment_adds_the_heap_settings_the_user_did_not_set():
    env = host_memory.tuned_environment({"MALLOC_TRIM_THRESHOLD_": "1000", "X": "1"})
    assert host_memory.huge_pages_enabled(env) and env["X"] == "1"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "1000"  # the user's
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_ARENA_MAX"] == "1"
    assert not host_memory.heap_retained(env)  # not the setting the bench names "heap retained"
    assert host_memory.heap_retained(host_memory.tuned_environment({}))


def test_bench_part_environments(monkeypatch):
    from cli.bench import part_environment

    monkeypatch.setenv("GLIBC_TUNABLES", host_memory.TUNABLE)  # as in a re-executed parent
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    for part in ("jax-train", "torch-train", "torch-compile", "matmul"):
        default = part_environment(part, "default")
        assert "GLIBC_TUNABLES" not in default and not any(k.startswith("MALLOC_") for k in default), part
        assert default["JAXVLM_HUGE_PAGES"] == "0"
    assert part_environment("torch-train", "tuned").items() >= host_memory.HEAP_RETAINING_ENV.items()
    assert not host_memory.huge_pages_enabled(part_environment("torch-decode", "tuned"))
    jax_env = part_environment("jax-train", "tuned")
    assert host_memory.huge_pages_enabled(jax_env) == host_memory.huge_pages_possible()
    assert host_memory.heap_retained(jax_env) == host_memory.huge_pages_possible()
    assert (
        jax_env["MALLOC_ARENA_MAX"] != "4" if host_memory.huge_pages_possible() else "MALLOC_ARENA_MAX" not in jax_env
    )
