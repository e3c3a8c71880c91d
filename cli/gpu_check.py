"""`python -m cli.gpu_check`: the one-shot accelerator check (run by `bench/gpu_check.sh`).

On a fresh GPU machine (jax with CUDA, torch, flax, optax and orbax installed; no network) it runs,
each phase in its own process under its own time box, inside a total budget (default 470 s):

  env        versions, devices, the GPU's name (nvidia-smi), cuDNN
  parity     the GPU parity subset at highest precision (pytest: kernels, bf16, components, model)
  train      the bf16 train step at --batch-size x --seq-len (222m, 32 x 1024 by default): jaxvlm,
             torch_ref eager and torch.compile with autocast, and the bf16 GEMM yardstick (MFU)
  train-remat  jaxvlm with remat at twice the batch (torch_ref has no remat)
  decode     greedy decode tok/s at batch 1 and 8, jaxvlm vs torch_ref, bf16
  fp32       the fp32 step (matmul precision "highest": no TF32), jaxvlm vs torch_ref eager

Results go to OUT/gpu_check.json (one object: every phase's status, time and results), rewritten
atomically after each phase, so a phase cut by its box still leaves the others'; each phase's
output is in OUT/<phase>.log. `--smoke` runs the same phases on the CPU with a tiny model (the
test of this script; torch.compile left out there for time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("env", "parity", "train", "train-remat", "decode", "fp32")
BOXES = {"env": 40, "parity": 150, "train": 200, "train-remat": 90, "decode": 80, "fp32": 120}  # seconds
PARITY_TESTS = ["tests/test_kernels.py", "tests/test_bfloat16.py", "tests/test_parity_components.py",
                "tests/test_parity_model.py"]  # fmt: skip


ENV_PROBE = r"""
import json, subprocess, sys
info = {"python": sys.version.split()[0]}
for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "numpy", "transformers"):
    try:
        info[mod] = getattr(__import__(mod, fromlist=["_"]), "__version__", "?")
    except Exception as e:
        info[mod] = f"missing ({type(e).__name__})"
import jax
info["backend"] = jax.default_backend()
info["devices"] = [d.device_kind for d in jax.devices()]
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
try:
    import torch
    info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as e:
    info["torch_cuda"] = f"unavailable ({type(e).__name__})"
print(json.dumps(info))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cli.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json and the phase logs")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all phases together")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--preset", default="nanovlm-222m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: check the script itself")
    return p


def _bench(args, out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxvlm", "bench", "--preset", args.preset, "--seq-len", str(args.seq_len),
            "--steps", str(args.steps), "--repeats", "2", "--json", str(out / f"{name}.json"), "--overwrite",
            *(["--gemm-size", "256"] if args.smoke else []), *extra]  # fmt: skip


def commands(args, out: Path) -> dict[str, list[str]]:
    b = str(args.batch_size)
    parity = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *PARITY_TESTS]
    if args.smoke:
        parity += ["-k", "bf16_matmul or padding_bias"]
    return {
        "env": [sys.executable, "-c", ENV_PROBE],
        "parity": parity,
        "train": _bench(
            args,
            out,
            "train",
            "--dtype",
            "bfloat16",
            "--batch-size",
            b,
            "--parts",
            "matmul",
            "jax-train",
            "torch-train",
            *([] if args.smoke else ["torch-compile"]),
        ),  # fmt: skip
        "train-remat": _bench(
            args,
            out,
            "train-remat",
            "--dtype",
            "bfloat16",
            "--remat",
            "--batch-size",
            str(2 * args.batch_size),
            "--parts",
            "jax-train",
        ),  # fmt: skip
        "decode": _bench(
            args,
            out,
            "decode",
            "--dtype",
            "bfloat16",
            "--decode-batch",
            "1",
            "8",
            "--new-tokens",
            "8" if args.smoke else "64",
            "--parts",
            "jax-decode",
            "torch-decode",
        ),  # fmt: skip
        "fp32": _bench(
            args,
            out,
            "fp32",
            "--batch-size",
            str(max(1, args.batch_size // 4)),
            "--parts",
            "matmul",
            "jax-train",
            "torch-train",
        ),  # fmt: skip
    }


def main(argv=None) -> int:
    from conversion import atomic

    args = build_parser().parse_args(argv)
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.steps = "tiny", 2, 64, 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")  # jax and torch run in turn, never together
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax-cache"))
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "shape": {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len},
        "budget_s": args.budget,
        "phases": {},
    }
    t0 = time.monotonic()
    cmds = commands(args, out)
    for name in args.phases:
        left = args.budget - (time.monotonic() - t0) - 5
        box = min(BOXES[name], left)
        if box < 15:
            report["phases"][name] = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
            atomic.write_text(out / "gpu_check.json", json.dumps(report, indent=2))
            continue
        print(f"gpu_check: {name} (box {box:.0f} s)", file=sys.stderr, flush=True)
        start = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            try:
                proc = subprocess.run(cmds[name], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                      timeout=box)  # fmt: skip
                status, stdout = ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), proc.stdout
            except subprocess.TimeoutExpired as e:
                status, stdout = f"timed out after {box:.0f} s", (e.stdout or b"").decode(errors="replace")
            log.write(stdout)
        entry = {"status": status, "wall_s": round(time.monotonic() - start, 1), "box_s": round(box)}
        if name == "env" and status == "ok":
            entry["result"] = json.loads(stdout.strip().splitlines()[-1])
        elif name == "parity":
            entry["summary"] = (stdout.strip().splitlines() or [""])[-1]
        elif (out / f"{name}.json").is_file():
            entry["result"] = json.loads((out / f"{name}.json").read_text())
        report["phases"][name] = entry
        atomic.write_text(out / "gpu_check.json", json.dumps(report, indent=2))
        print(f"gpu_check: {name}: {status} in {entry['wall_s']} s", file=sys.stderr, flush=True)
    report["total_s"] = round(time.monotonic() - t0, 1)
    atomic.write_text(out / "gpu_check.json", json.dumps(report, indent=2))
    return 0 if all(p["status"] == "ok" for p in report["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
