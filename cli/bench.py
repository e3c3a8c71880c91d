"""`python -m jaxvlm bench`: jaxvlm vs torch_ref on identical weights and batches, in one run.

Each contender runs in its own subprocess (so its peak resident memory is its own), one after
the other, on the same checkpoint (random weights written once by torch_ref) and the same
seeded batch:

  matmul        GEMM throughput on the device (best of jax / torch, and numpy on a CPU) in fp32
                and, with --dtype bfloat16, in bf16 (jax: bf16 operands accumulated in fp32, as
                the model's matmuls; torch: bf16 mm), each synchronised; and the memory
                bandwidth: the yardsticks for MFU and decode
  jax-train     the jitted jaxvlm train step (AdamW, clipping, upstream's recipe) in --dtype
                (bf16: bf16 matmuls, fp32 master weights), with the kernels `jaxvlm.kernels`
                picks for this backend (xla_cpu on a CPU)
  jax-train-plain  the same step with the plain kernels (autodiff, jax.nn.dot_product_attention):
                what the backend's tuned kernels buy, measured side by side
  torch-train   torch_ref's eager train step (the same recipe) on the same device (cuda when
                there is one), bf16 as upstream trains: the forward under torch.autocast
  torch-compile torch_ref's step with the model under torch.compile
  jax-decode    jaxvlm.generate, greedy, batch 1 and 8: decode tokens/s
  torch-decode  torch_ref.generate (eager, KV cache), the same prompts

Host memory (`--host-memory`, see jaxvlm.host_memory): `tuned` (default) runs each framework
under the glibc malloc setting that suits it: jaxvlm with huge-page scratch buffers kept in the
heap (what the jaxvlm CLI does), torch_ref with freed memory kept in the heap, without huge pages
(its fastest where measured: see docs/performance.md). `default` runs every part with
glibc's defaults. The report names each part's setting.

Step times are medians over --steps after warm-up, each step synchronised (the loss is read
back); compile time is the first call's time minus a step's. MFU = model FLOPs per step
(analytic: 3x the forward's matmul and attention FLOPs) / step time / measured matmul FLOP/s
in the run's dtype: against the best square GEMM (2048^3 on a CPU, 8192^3 on a GPU; `--gemm-size`) any
framework reached in the matmul part (the headline), and against the contender's own
framework's GEMM (jax's for jaxvlm, torch's for torch_ref). Peak memory: the process's peak
RSS, and on a GPU the device's peak bytes in use.
The decode bound is the decoder's parameter bytes (read once per token; the ViT is not read
while decoding) over the read bandwidth measured in the matmul part (the faster of a 1 GiB
reduction in jax and in torch). The labels cover every text position, so jaxvlm's
labelled-positions head does no less work than torch's full head.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from conversion import atomic
from conversion.atomic import check_output_file
from conversion.recipe import IGNORE_INDEX

PARTS = ("matmul", "jax-train", "jax-train-plain", "torch-train", "torch-compile", "jax-decode", "torch-decode")


# ---- shared inputs ---------------------------------------------------------------------------------
def make_batch(cfg, batch_size: int, seq_len: int, images_per_sample: int, seed: int) -> dict:
    """Row b: [image runs at the start, then text]; labels = next token on every text position."""
    rng = np.random.default_rng(seed)
    L = cfg.n_image_tokens
    if images_per_sample * L >= seq_len:
        raise ValueError(f"--seq-len {seq_len} cannot hold {images_per_sample} images of {L} tokens")
    ids = rng.integers(3, cfg.lm_base_vocab_size, (batch_size, seq_len)).astype(np.int32)
    ids[:, 1 : 1 + images_per_sample * L] = cfg.image_token_id
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = np.where(ids[:, 1:] == cfg.image_token_id, IGNORE_INDEX, ids[:, 1:])
    n_img = batch_size * images_per_sample
    images = rng.random((n_img, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "images": images}


def forward_flops(cfg, batch_size: int, seq_len: int, n_images: int) -> float:
    """Matmul + attention FLOPs of one forward pass (2 per multiply-add)."""
    D, I_v, N = cfg.vit_hidden_dim, cfg.vit_inter_dim, cfg.vit_n_patches
    vit = 2 * N * 3 * cfg.vit_patch_size**2 * D + cfg.vit_n_blocks * (
        2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * I_v + 2 * 2 * N * N * D
    )
    mp = projector_flops(cfg)
    H, I, T = cfg.lm_hidden_dim, cfg.lm_inter_dim, seq_len
    kv = cfg.lm_n_kv_heads * cfg.lm_head_dim
    per_token = (
        cfg.lm_n_blocks * (2 * H * H * 2 + 2 * H * kv * 2 + 3 * 2 * H * I + 2 * 2 * T * H) + 2 * H * cfg.lm_vocab_size
    )
    return float(n_images * (vit + mp) + batch_size * T * per_token)


def projector_flops(cfg) -> float:
    """Matmul + attention FLOPs of the projector (`cfg.projector`) for one image."""
    C, H, L = cfg.mp_input_dim, cfg.lm_hidden_dim, cfg.n_image_tokens
    if cfg.projector == "pixel_shuffle_linear":
        return 2 * L * C * H
    if cfg.projector == "mlp":
        return 2 * L * C * H + 2 * L * H * H
    # resampler: per block q (Q rows), k and v (M + Q rows), out (Q), the MLP (Q rows, C -> 4C -> C),
    # and the attention of Q queries over M + Q keys; then the final projection (Q rows)
    from conversion.config import RESAMPLER_MLP_RATIO

    M = cfg.vit_n_patches // cfg.mp_pixel_shuffle_factor**2
    Q, K = L, M + L
    block = 2 * Q * C * C * 2 + 2 * K * C * C * 2 + 2 * 2 * Q * C * RESAMPLER_MLP_RATIO * C + 2 * 2 * Q * K * C
    return cfg.mp_resampler_layers * block + 2 * Q * C * H


def cpu_model() -> str:
    """The CPU's model name (figures hold for the machine they were measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, steps: int, warmup: int = 1) -> dict:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"step_s_median": med, "step_s_all": times, "first_call_s": first, "compile_s": max(first - med, 0.0)}


# ---- the parts (each runs in its own process) --------------------------------------------------------
def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync_torch() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_matmul(args, cfg) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    on_cpu = jax.default_backend() == "cpu"
    n = args.gemm_size or (2048 if on_cpu else 8192)
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    flops = 2 * n**3
    device = torch_device()

    def jax_rate(dtype) -> float:
        ja = jnp.asarray(a, dtype)
        f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32).astype(x.dtype))
        f(ja).block_until_ready()
        return flops / min(_time(lambda: f(ja).block_until_ready()) for _ in range(5)) / 1e9

    def torch_rate(dtype) -> float:
        ta = torch.from_numpy(a).to(device=device, dtype=dtype)
        torch.mm(ta, ta)
        _sync_torch()
        return flops / min(_time(lambda: (torch.mm(ta, ta), _sync_torch())) for _ in range(5)) / 1e9

    out = {"n": n, "gflops_jax": jax_rate(jnp.float32), "gflops_torch": torch_rate(torch.float32)}
    out["peak_gflops_float32"] = max(out["gflops_jax"], out["gflops_torch"])
    if on_cpu:
        out["gflops_numpy"] = flops / min(_time(lambda: a @ a) for _ in range(3)) / 1e9
        out["peak_gflops_float32"] = max(out["peak_gflops_float32"], out["gflops_numpy"])
    if args.dtype == "bfloat16":
        out["gflops_jax_bfloat16"] = jax_rate(jnp.bfloat16)
        out["gflops_torch_bfloat16"] = torch_rate(torch.bfloat16)
        out["peak_gflops_bfloat16"] = max(out["gflops_jax_bfloat16"], out["gflops_torch_bfloat16"])
    out["peak_gflops"] = out[f"peak_gflops_{args.dtype}"]  # the MFU yardstick: the run's dtype
    # Random contents: pages of identical bytes (np.ones) can be merged by the host (KSM) and
    # then read from cache, which inflates a bandwidth figure.
    rng = np.random.default_rng(1)
    if on_cpu:
        big = rng.random(64 * 2**20, dtype=np.float32)  # 256 MiB
        dst = np.empty_like(big)
        out["bandwidth_gb_s"] = 2 * big.nbytes / min(_time(lambda: np.copyto(dst, big)) for _ in range(5)) / 1e9
        big = dst = None  # freed before the next large buffer
    # Read-only bandwidth (what streaming weights needs): a 1 GiB sum on the device, both frameworks' best.
    host = rng.random(2**28, dtype=np.float32)
    jbig = jnp.asarray(host)
    jsum = jax.jit(jnp.sum)
    jsum(jbig).block_until_ready()
    t_read_jax = min(_time(lambda: jsum(jbig).block_until_ready()) for _ in range(5))
    jbig = None
    tbig = torch.from_numpy(host).to(device)
    tbig.sum()
    t_read_torch = min(_time(lambda: (tbig.sum(), _sync_torch())) for _ in range(5))
    out["read_bandwidth_gb_s"] = 4 * 2**28 / min(t_read_jax, t_read_torch) / 1e9
    out.setdefault("bandwidth_gb_s", out["read_bandwidth_gb_s"])
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def jax_train_setup(model, cfg, batch_size: int, seq_len: int, images_per_sample: int, seed: int):
    """jaxvlm's trainer (upstream's recipe), its step-0 state and the bench's batch as one
    micro-batch: what the bench times and `cli/profile_step.py` profiles. `model` is consumed."""
    from conversion.recipe import OptimConfig
    from jaxvlm.train import Trainer, label_positions

    trainer = Trainer(model, OptimConfig(max_training_steps=1000))
    state = trainer.init_state(model)
    b = make_batch(cfg, batch_size, seq_len, images_per_sample, seed)
    group = {k: v[None] for k, v in b.items()}
    group["label_positions"] = label_positions(b["labels"])[None]
    return trainer, state, trainer.place_batch(group)


def jax_device_memory() -> dict:
    """The device's name and peak bytes in use (None where the backend does not count them)."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"device": device.device_kind, "peak_device_mb": peak / 2**20 if peak else None}


def torch_device_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "peak_device_mb": None}
    return {"device": torch.cuda.get_device_name(), "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20}


def jax_options(args, kernels: str = "auto"):
    from jaxvlm.options import ModelOptions

    return ModelOptions(compute_dtype=args.dtype, kernels=kernels, remat=args.remat)


def part_jax_train(args, cfg, kernels: str = "auto") -> dict:
    from jaxvlm.pretrained import load_nanovlm

    model = load_nanovlm(args.checkpoint, options=jax_options(args, kernels))
    trainer, state, batch = jax_train_setup(
        model, cfg, args.batch_size, args.seq_len, args.images_per_sample, args.seed
    )
    holder = {"state": state}
    del state
    losses = []

    def step():
        holder["state"], m = trainer.step(holder["state"], batch)
        losses.append(float(m["loss"]))

    out = timed(step, args.steps, warmup=2)
    return {
        **out,
        "losses": losses[:3],
        "compiles": trainer.compiles,
        "kernels": model.decoder.kernels.name,
        **jax_device_memory(),
    }


def part_torch_train(args, cfg, compiled: bool = False) -> dict:
    import torch

    import torch_ref
    from conversion.recipe import OptimConfig
    from torch_ref.train import make_optimizer, train_step

    device = torch_device()
    if device == "cuda" and args.dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False  # as jaxvlm's default "highest": true fp32
        torch.backends.cudnn.allow_tf32 = False
    model = torch_ref.VisionLanguageModel.from_pretrained(args.checkpoint).to(device).train()
    if args.remat:
        raise ValueError("--remat: torch_ref has no activation checkpointing; leave the torch parts out")
    runner = torch.compile(model) if compiled else model
    ocfg = OptimConfig(max_training_steps=1000)
    optimizer = make_optimizer(model, ocfg)
    b = make_batch(cfg, args.batch_size, args.seq_len, args.images_per_sample, args.seed)
    mb = {
        k: (torch.as_tensor(v) if v.dtype == np.float32 else torch.as_tensor(v).long()).to(device) for k, v in b.items()
    }
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    losses, counter = [], {"step": 0}

    def step():  # the loss is read back (.item()): the step is synchronised
        losses.append(train_step(runner, optimizer, [mb], counter["step"], ocfg, autocast_dtype=autocast)["loss"])
        counter["step"] += 1

    out = timed(step, args.steps, warmup=2)
    return {**out, "losses": losses[:3], "threads": torch.get_num_threads(), **torch_device_memory()}


def _prompts(cfg, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    L = cfg.n_image_tokens
    ids = rng.integers(3, cfg.lm_base_vocab_size, (batch, L + 16)).astype(np.int32)
    ids[:, 4 : 4 + L] = cfg.image_token_id
    images = rng.random((batch, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    return ids, np.ones_like(ids), images


def part_decode(args, cfg, framework: str) -> dict:
    if framework == "jax":
        import jax

        from jaxvlm.generate import generate
        from jaxvlm.pretrained import load_nanovlm

        model = load_nanovlm(args.checkpoint, options=jax_options(args))

        def gen(ids, mask, images, n):
            return np.asarray(jax.block_until_ready(generate(model, ids, images, mask, max_new_tokens=n, greedy=True)))
    else:
        import torch

        import torch_ref
        from torch_ref.generate import generate

        device = torch_device()
        model = torch_ref.VisionLanguageModel.from_pretrained(args.checkpoint).to(device).eval()
        autocast = args.dtype == "bfloat16"

        def gen(ids, mask, images, n):  # the tokens come back to the host: synchronised
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                return generate(model, ids, images, mask, max_new_tokens=n, greedy=True).cpu().numpy()

    out, N = {}, args.new_tokens
    for batch in args.decode_batch:
        ids, mask, images = _prompts(cfg, batch, args.seed)
        tokens = gen(ids, mask, images, N)  # warm-up (jax compiles here)
        gen(ids, mask, images, 1)
        rates = []
        for _ in range(args.repeats):
            t1 = _time(lambda: gen(ids, mask, images, 1))
            tn = _time(lambda: gen(ids, mask, images, N))
            rates.append(batch * (N - 1) / (tn - t1) if tn > t1 else float("nan"))  # nan: too fast to resolve
        out.setdefault("batches", {})[str(batch)] = {
            "decode_tok_s_median": statistics.median(rates),
            "decode_tok_s_best": max(rates),
            "tokens": tokens.tolist(),
        }
    return out


def run_part(name: str, args) -> dict:
    from conversion.pretrained import read_config

    cfg = read_config(args.checkpoint)
    fn = {
        "matmul": part_matmul,
        "jax-train": part_jax_train,
        "jax-train-plain": lambda a, c: part_jax_train(a, c, kernels="plain"),
        "torch-train": part_torch_train,
        "torch-compile": lambda a, c: part_torch_train(a, c, compiled=True),
        "jax-decode": lambda a, c: part_decode(a, c, "jax"),
        "torch-decode": lambda a, c: part_decode(a, c, "torch"),
    }[name]
    result = fn(args, cfg)
    result["peak_rss_mb"] = peak_rss_mb()
    result["host_memory"] = host_memory_setting()
    return result


# ---- the driver -------------------------------------------------------------------------------------------
def add_shape_args(p: argparse.ArgumentParser, steps_help: str) -> None:
    """The model and batch flags the bench and `cli/profile_step.py` share."""
    p.add_argument("--preset", default="nanovlm-222m")
    p.add_argument("--config", help="a nanoVLM config.json instead of --preset")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--images-per-sample", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help=steps_help)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of every part")
    p.add_argument("--remat", action="store_true", help="jaxvlm parts: recompute each block in the backward")


def config_of(args):
    from conversion.config import VLMConfig

    return VLMConfig.from_json(args.config) if args.config else VLMConfig.preset(args.preset)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxvlm bench", description=__doc__.split("\n\n")[0])
    add_shape_args(p, "timed train steps (after 2 warm-up steps)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gemm-size",
        type=int,
        default=0,
        metavar="N",
        help="side of the square GEMM yardstick (default 0: 2048 on a CPU, 8192 on a GPU)",
    )
    p.add_argument(
        "--part-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="stop a part that runs longer than S seconds and report it as not finished (default 1800: "
        "torch's bf16 CPU fallback on a CPU without bf16 instructions takes minutes per step)",
    )
    p.add_argument("--json", type=Path, help="write all results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    p.add_argument(
        "--host-memory",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc malloc setting per framework (tuned) or glibc's defaults for all (default)",
    )
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)  # set by the driver for the parts
    p.add_argument("--part", help=argparse.SUPPRESS)
    return p


def add_bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="train-step and decode speed of jaxvlm vs torch_ref, side by side",
        parents=[build_parser()],
        add_help=False,
        conflict_handler="resolve",
    )
    b.set_defaults(func=lambda args: main_args(args))


def main_args(args) -> int:
    if args.part:  # a child: one part, JSON on the last line of stdout
        print(json.dumps(run_part(args.part, args)))
        return 0
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite, flag="--json")
    if not args.part_timeout > 0:
        raise ValueError(f"--part-timeout {args.part_timeout}: give a number of seconds > 0")
    if args.gemm_size < 0:
        raise ValueError(f"--gemm-size {args.gemm_size}: give a side > 0 (or 0: the default)")
    cfg = config_of(args)
    results, timed_out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(cfg, args.seed, tmp)
        for part in args.parts:
            cmd = [
                sys.executable,
                "-m",
                "jaxvlm",
                "bench",
                "--part",
                part,
                "--checkpoint",
                tmp,
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--images-per-sample",
                str(args.images_per_sample),
                "--steps",
                str(args.steps),
                "--new-tokens",
                str(args.new_tokens),
                "--repeats",
                str(args.repeats),
                "--seed",
                str(args.seed),
                "--gemm-size",
                str(args.gemm_size),
                "--dtype",
                args.dtype,
                *(["--remat"] if args.remat else []),
                "--decode-batch",
                *map(str, args.decode_batch),
            ]
            print(f"bench: {part} ...", file=sys.stderr, flush=True)
            proc = run_part_process(cmd, part_environment(part, args.host_memory), args.part_timeout)
            if proc is None:
                print(
                    f"bench: {part} did not finish in {args.part_timeout:.0f} s; stopped", file=sys.stderr, flush=True
                )
                timed_out[part] = args.part_timeout
                continue
            if proc.returncode != 0:
                raise RuntimeError(f"bench part {part} failed:\n{proc.stderr[-3000:]}")
            results[part] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = summarise(cfg, args, results)
    report["timed_out_s"] = timed_out
    print(markdown(report))
    if args.json:
        atomic.write_text(args.json, json.dumps(report, indent=2))
    return 0


def run_part_process(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
    """Run one part in its own process group; None when it ran past `timeout` seconds (then the
    group, torch.compile's workers included, is killed)."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def part_environment(part: str, host_memory: str) -> dict:
    """The child's environment: glibc's defaults, plus the framework's malloc setting if tuned."""
    from jaxvlm import host_memory as hm

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t != hm.TUNABLE]
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    env["JAXVLM_HUGE_PAGES"] = "0"  # the part itself must not re-execute: it runs what it is given
    if host_memory == "tuned":
        if part.startswith("torch"):
            env.update(hm.HEAP_RETAINING_ENV)
        elif hm.huge_pages_possible():
            env = hm.tuned_environment(env)
    return env


def host_memory_setting() -> str:
    """This process's malloc setting, as the report names it."""
    from jaxvlm import host_memory as hm

    if hm.huge_pages_enabled():
        retained = ", heap retained" if hm.heap_retained() else ""
        return f"huge pages (THP {hm.transparent_huge_pages()}){retained}"
    if hm.heap_retained():
        return "heap retained"
    return "glibc defaults"


def _write_checkpoint(cfg, seed: int, directory: str) -> None:
    import torch

    import torch_ref

    torch.manual_seed(seed)
    torch_ref.VisionLanguageModel(cfg).save_pretrained(directory)


def summarise(cfg, args, r: dict) -> dict:
    from conversion.mapping import mapping

    n_params = sum(int(np.prod(e.torch_shape)) for e in mapping(cfg))
    flops = 3 * forward_flops(cfg, args.batch_size, args.seq_len, args.batch_size * args.images_per_sample)
    peak = r.get("matmul", {}).get("peak_gflops")
    devices = sorted({part["device"] for part in r.values() if part.get("device") not in (None, "cpu")})
    out = {
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "accelerator": ", ".join(devices) or None,
        },
        "dtype": args.dtype,
        "remat": args.remat,
        "preset": args.preset if not args.config else args.config,
        "shape": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "images_per_sample": args.images_per_sample,
            "image_size": cfg.vit_img_size,
            "params": n_params,
        },
        "train_step_model_gflops": flops / 1e9,
        "matmul": r.get("matmul"),
        "train": {},
        "decode": {},
    }
    for name in ("jax-train", "jax-train-plain", "torch-train", "torch-compile"):
        if name in r:
            t = r[name]["step_s_median"]
            out["train"][name] = {
                "step_s": t,
                "tokens_per_s": args.batch_size * args.seq_len / t,
                "compile_s": r[name]["compile_s"],
                "peak_rss_mb": r[name]["peak_rss_mb"],
                "peak_device_mb": r[name].get("peak_device_mb"),
                "mfu_vs_measured_matmul": (flops / t / 1e9 / peak) if peak else None,
                "mfu_vs_own_framework_matmul": (flops / t / 1e9 / own)
                if (own := r.get("matmul", {}).get(_own_gemm(name, args.dtype)))
                else None,
                "first_losses": r[name]["losses"],
            }
    if "jax-train" in r:
        j = out["train"]["jax-train"]["step_s"]
        for name in ("jax-train-plain", "torch-train", "torch-compile"):
            if name in out["train"]:
                out["train"][name]["jaxvlm_speedup"] = out["train"][name]["step_s"] / j
    # The read-only bandwidth when measured (a copy's read + write rate otherwise, older runs).
    bw = r.get("matmul", {}).get("read_bandwidth_gb_s") or r.get("matmul", {}).get("bandwidth_gb_s")
    # A decode step reads the decoder's weights (blocks, norms, the tied head) once; not the ViT's.
    n_decoder = sum(int(np.prod(e.torch_shape)) for e in mapping(cfg) if e.torch_key.startswith("decoder."))
    bound = bw * 1e9 / (4 * n_decoder) if bw else None  # tokens/s at batch 1 if weights stream once per token
    for name in ("jax-decode", "torch-decode"):
        for batch, d in r.get(name, {}).get("batches", {}).items():
            out["decode"].setdefault(batch, {})[name] = {
                "tok_s": d["decode_tok_s_median"],
                "tok_s_best": d["decode_tok_s_best"],
                "peak_rss_mb": r[name]["peak_rss_mb"],
                "fraction_of_bandwidth_bound": d["decode_tok_s_median"] / bound if bound and batch == "1" else None,
            }
    if "jax-decode" in r and "torch-decode" in r:
        for batch, d in out["decode"].items():
            d["jaxvlm_speedup"] = d["jax-decode"]["tok_s"] / d["torch-decode"]["tok_s"]
            d["same_tokens"] = (
                r["jax-decode"]["batches"][batch]["tokens"] == r["torch-decode"]["batches"][batch]["tokens"]
            )
    out["decode_bound_tok_s_batch1"] = bound
    out["host_memory"] = {name: part.get("host_memory") for name, part in r.items()}
    return out


def _own_gemm(part: str, dtype: str) -> str:
    key = "gflops_jax" if part.startswith("jax") else "gflops_torch"
    return key if dtype == "float32" else f"{key}_{dtype}"


def markdown(rep: dict) -> str:
    s = rep["shape"]
    lines = [
        f"\n{rep['preset']} ({s['params'] / 1e6:.0f}M params), batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"{s['images_per_sample']} x {s['image_size']} px image(s) per sample, {rep.get('dtype', 'float32')}"
        f"{' with remat' if rep.get('remat') else ''}; "
        + (f"{rep['machine']['accelerator']}; host " if rep["machine"].get("accelerator") else "")
        + f"{rep['machine'].get('cpu', '?')}, {rep['machine']['cpus']} CPUs, "
        f"load average {rep['machine']['load_average'][0]:.1f}"
    ]
    lines.append("host memory (glibc malloc): " + "; ".join(f"{k} {v}" for k, v in rep.get("host_memory", {}).items()))
    if rep["matmul"]:
        m = rep["matmul"]
        numpy = f", numpy {m['gflops_numpy']:.1f}" if "gflops_numpy" in m else ""
        lines.append(
            f"measured fp32 matmul: {m.get('peak_gflops_float32', m['peak_gflops']):.1f} GFLOP/s "
            f"(jax {m['gflops_jax']:.1f}, torch {m['gflops_torch']:.1f}{numpy}); copy bandwidth "
            f"{m['bandwidth_gb_s']:.1f} GB/s; read bandwidth {m.get('read_bandwidth_gb_s', float('nan')):.1f} GB/s"
        )
        if "peak_gflops_bfloat16" in m:
            lines.append(
                f"measured bf16 matmul: {m['peak_gflops_bfloat16']:.1f} GFLOP/s (jax, fp32 accumulation, "
                f"{m['gflops_jax_bfloat16']:.1f}; torch {m['gflops_torch_bfloat16']:.1f}): the MFU yardstick"
            )
    if rep["train"]:
        lines += [
            "",
            f"train step ({rep['train_step_model_gflops']:.0f} model GFLOP):",
            "",
            "| contender | step (s) | tokens/s | compile (s) | MFU (best GEMM) | MFU (own framework's GEMM) | peak RSS (MB) | peak device memory (MB) | jaxvlm speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        pct = lambda x: f"{x * 100:.0f}%" if x else "-"  # noqa: E731
        for name, t in rep["train"].items():
            sp = f"{t['jaxvlm_speedup']:.2f}x" if "jaxvlm_speedup" in t else "-"
            lines.append(
                f"| {name} | {t['step_s']:.2f} | {t['tokens_per_s']:.0f} | {t['compile_s']:.1f} | "
                f"{pct(t['mfu_vs_measured_matmul'])} | {pct(t.get('mfu_vs_own_framework_matmul'))} | {t['peak_rss_mb']:.0f} | "
                f"{f'{dev:.0f}' if (dev := t.get('peak_device_mb')) else '-'} | {sp} |"
            )
    if rep["decode"]:
        lines += [
            "",
            "greedy decode:",
            "",
            "| batch | jaxvlm tok/s | torch_ref tok/s | speed-up | same tokens | jaxvlm vs read-bandwidth bound |",
            "|---:|---:|---:|---:|---|---:|",
        ]
        for batch, d in rep["decode"].items():
            j, t = d.get("jax-decode"), d.get("torch-decode")
            frac = j.get("fraction_of_bandwidth_bound") if j else None
            lines.append(
                f"| {batch} | {j['tok_s'] if j else float('nan'):.1f} | {t['tok_s'] if t else float('nan'):.1f} | "
                f"{d.get('jaxvlm_speedup', float('nan')):.2f}x | {d.get('same_tokens', '-')} | "
                f"{(f'{frac * 100:.0f}%' if frac else '-')} |"
            )
    for part, limit in rep.get("timed_out_s", {}).items():
        lines.append(f"\n{part}: did not finish within {limit:.0f} s (--part-timeout); not measured")
    return "\n".join(lines)
