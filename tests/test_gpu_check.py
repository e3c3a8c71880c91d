"""bench/gpu_check.sh end to end in its CPU smoke mode (a tiny model): every phase runs in its own
time-boxed process and lands in one JSON, so that the one call a GPU machine gets is not spent
finding a bug in the script."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_phase(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_INSTALL": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--smoke", "--budget", "470"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["env", "parity", "train", "train-remat", "decode", "fp32"], phases.keys()
    assert proc.returncode == 0, {k: v["status"] for k, v in phases.items()}
    assert phases["env"]["result"]["backend"] == "cpu"
    assert "passed" in phases["parity"]["summary"]
    train = phases["train"]["result"]
    assert train["dtype"] == "bfloat16" and {"jax-train", "torch-train"} <= set(train["train"])
    assert train["matmul"]["peak_gflops_bfloat16"] > 0
    assert phases["train-remat"]["result"]["remat"] is True
    assert {"1", "8"} <= set(phases["decode"]["result"]["decode"])
    assert phases["fp32"]["result"]["dtype"] == "float32"
    assert all(p["wall_s"] <= p["box_s"] + 5 for p in phases.values())
