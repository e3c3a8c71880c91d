"""`python -m jaxvlm bench` end to end on the tiny preset: every contender runs, they do the
same work (same first losses, same greedy tokens), and the JSON has the documented keys.
No timing assertions here (machines are noisy): the numbers are checked for being numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_runs_and_contenders_do_the_same_work(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "jaxvlm",
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--steps",
        "1",
        "--parts",
        "matmul",
        "jax-train",
        "jax-train-plain",
        "torch-train",
        "jax-decode",
        "torch-decode",
        "--decode-batch",
        "1",
        "2",
        "--new-tokens",
        "12",
        "--repeats",
        "1",
        "--gemm-size",
        "512",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| jax-train |" in proc.stdout and "greedy decode" in proc.stdout  # the markdown table
    rep = json.loads(out.read_text())

    m = rep["matmul"]
    assert m["n"] == 512  # --gemm-size
    for key in ("peak_gflops", "gflops_jax", "gflops_torch", "gflops_numpy", "bandwidth_gb_s", "read_bandwidth_gb_s"):
        assert m[key] > 0, key
    assert m["peak_gflops"] == max(m["gflops_jax"], m["gflops_torch"], m["gflops_numpy"])

    train = rep["train"]
    assert set(train) == {"jax-train", "jax-train-plain", "torch-train"}
    for t in train.values():
        for key in (
            "step_s",
            "tokens_per_s",
            "compile_s",
            "mfu_vs_measured_matmul",
            "mfu_vs_own_framework_matmul",
            "peak_rss_mb",
        ):
            assert t[key] >= 0 and math.isfinite(t[key]), key
    assert train["torch-train"]["jaxvlm_speedup"] > 0
    assert train["jax-train-plain"]["jaxvlm_speedup"] > 0
    assert rep["machine"]["cpu"] and rep["machine"]["cpu"] in proc.stdout  # every table names its CPU
    # Identical weights and batch: the first three optimizer steps give the same losses.
    for name in ("torch-train", "jax-train-plain"):
        for j, t in zip(train["jax-train"]["first_losses"], train[name]["first_losses"]):
            assert abs(j - t) <= 1e-5 * abs(t), (name, train["jax-train"]["first_losses"], train[name]["first_losses"])

    assert set(rep["decode"]) == {"1", "2"}
    for batch, d in rep["decode"].items():
        assert d["same_tokens"] is True, batch
        assert {"jax-decode", "torch-decode", "jaxvlm_speedup"} <= set(d)
    assert rep["decode_bound_tok_s_batch1"] > 0
    assert rep["decode"]["1"]["jax-decode"]["fraction_of_bandwidth_bound"] is not None
    # Each part ran under the malloc setting `--host-memory tuned` gives its framework.
    from jaxvlm import host_memory

    hm = rep["host_memory"]
    assert set(hm) == {"matmul", "jax-train", "jax-train-plain", "torch-train", "jax-decode", "torch-decode"}
    assert hm["torch-train"] == hm["torch-decode"] == "heap retained", hm
    if host_memory.huge_pages_possible():
        assert all(hm[p].startswith("huge pages") for p in ("jax-train", "jax-train-plain", "jax-decode")), hm
    assert "host memory (glibc malloc): " in proc.stdout


def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr (sub-jaxprs included)."""
    import numpy as np

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            a = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * int(np.prod(out)) * int(np.prod([a[d] for d in lc]))
        for sub in eqn.params.values():
            for j in sub if isinstance(sub, (list, tuple)) else [sub]:
                if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    total += _dot_flops(j.jaxpr)
                elif hasattr(j, "eqns"):
                    total += _dot_flops(j)
    return total


@pytest.mark.parametrize("mp", ["pixel_shuffle_linear", "mlp", "resampler"])
def test_projector_flops_are_the_traced_programs(mp):
    """The bench's MFU counts each projector's matmul + attention FLOPs as the traced projector does them."""
    import jax
    import jax.numpy as jnp
    from conftest import tiny_cfg
    from flax import nnx

    from cli.bench import projector_flops
    from jaxvlm.modality_projector import build_projector
    from jaxvlm.options import ModelOptions

    extra = (
        {"mp_resampler_queries": 5, "mp_image_token_length": 5, "mp_resampler_layers": 2} if mp == "resampler" else {}
    )
    cfg = tiny_cfg(mp_type=mp, **extra)
    proj = build_projector(cfg, ModelOptions(kernels="plain"), rngs=nnx.Rngs(0))
    x = jnp.zeros((1, cfg.vit_n_patches, cfg.vit_hidden_dim))
    traced = _dot_flops(jax.make_jaxpr(lambda x: proj(x))(x).jaxpr)
    assert traced > 0 and projector_flops(cfg) == traced, (projector_flops(cfg), traced)


def test_a_part_past_its_time_limit_is_stopped_with_its_children(tmp_path):
    """--part-timeout: the part's whole process group is killed and the part reported as not finished."""
    import os
    import time

    from cli.bench import run_part_process

    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)"
    )
    t0 = time.monotonic()
    assert run_part_process([sys.executable, "-c", script], dict(os.environ), timeout=3.0) is None
    assert time.monotonic() - t0 < 60
    child = int(pid_file.read_text())

    def alive(pid):  # a zombie (killed, not yet reaped by whoever adopted it) is not alive
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the part's child {child} survived the timeout")
    done = run_part_process([sys.executable, "-c", "print('{}')"], dict(os.environ), timeout=60.0)
    assert done.returncode == 0 and done.stdout.strip() == "{}"
