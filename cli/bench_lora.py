"""`python -m cli.bench_lora`: LoRA vs full fine-tuning, one jaxvlm train step each, on one shape.

Each mode runs in a process of its own (peak RSS is per process): the model built at random (the
numbers do not depend on the values), upstream's recipe for the full fine-tune (all three groups
trained), LoRA of `--lora-rank` on the default targets (the decoder's attention and MLP) for the
other. Reports peak RSS, the optimizer state's bytes, the trained parameters and the median step
time after two warm-up steps, and the machine's CPU (figures hold for the machine they were
measured on).

    python -m cli.bench_lora [--preset nanovlm-222m] [--batch-size 4] [--seq-len 256] [--lora-rank 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .bench import cpu_model, make_batch, peak_rss_mb, timed


def measure(args) -> dict:
    import jax
    from flax import nnx

    from conversion.config import VLMConfig
    from conversion.lora import LoraSpec
    from conversion.recipe import OptimConfig
    from jaxvlm.lora import add_adapters
    from jaxvlm.train import Trainer, label_positions
    from jaxvlm.vision_language_model import VisionLanguageModel

    cfg = VLMConfig.preset(args.preset)
    model = VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    spec = LoraSpec(rank=args.lora_rank) if args.mode == "lora" else None
    if spec is not None:
        add_adapters(model, spec)
    trainer = Trainer(model, OptimConfig(lora=spec, max_training_steps=1000))
    state = trainer.init_state(model)
    del model
    b = make_batch(cfg, args.batch_size, args.seq_len, 1, 0)
    group = {k: v[None] for k, v in b.items()}
    group["label_positions"] = label_positions(b["labels"])[None]
    batch = trainer.place_batch(group)
    holder = {"state": state}
    del state

    def step():
        holder["state"], m = trainer.step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    times = timed(step, args.steps, warmup=2)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    return {
        "mode": args.mode if spec is None else f"lora r={spec.rank}",
        "trained_params": sum(x.size for x in jax.tree.leaves(holder["state"].params)),
        "opt_state_mb": nbytes(holder["state"].opt_state) / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "step_s_median": times["step_s_median"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cli.bench_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nanovlm-222m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    p.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)  # one part, in its own process
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)))
        return 0
    rows = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, "-m", "cli.bench_lora", *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, 1 image, fp32, on {cpu_model()}")
    print("| mode | trained params | optimizer state | peak RSS | step time |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trained_params'] / 1e6:.2f} M | {r['opt_state_mb']:.0f} MiB | "
              f"{r['peak_rss_mb'] / 1024:.2f} GiB | {r['step_s_median']:.2f} s |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
