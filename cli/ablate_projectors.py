"""The projector ablation: the synthetic demo trained with each projector variant for the same
steps, then one markdown table of held-out exact match, image tokens per image, parameters and
step time, with the CPU named.

    python -m cli.ablate_projectors --tokenizer ../shared/data/smollm2 --output-dir runs/ablation

Each variant is a run config in `configs/ablation/` (the demo's tiny model and recipe with one
`mp_type`); `--steps`, `--batch-size` and `--synthetic-size` override all of them alike. Each
run is `jaxvlm train` in this process (its directory `OUTPUT_DIR/<variant>/`, started over),
then its exported `model/` answers the held-out split's first `--eval-limit` questions greedily
(`jaxvlm eval`'s exact match). Step time is the median over the logged steps after the first
two (which compile). Parameters count every trained tensor (the RoPE buffer left out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "ablation"
VARIANTS = ("pixel_shuffle_linear", "mlp", "resampler")


def run_variant(config: Path, out: Path, args) -> dict:
    """Train one config, evaluate its exported model; the row of the table."""
    from jaxvlm.data import SampleEncoder
    from jaxvlm.evaluation import exact_match
    from jaxvlm.pretrained import load_nanovlm
    from jaxvlm.tokenizer import load_for_config
    from jaxvlm.train_loop import RunConfig, build_dataset, train

    overrides = {"output_dir": str(out), "tokenizer": args.tokenizer, "overwrite": True, "log_every": 1}
    for name in ("steps", "batch_size", "synthetic_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    run = RunConfig.from_file(config, **overrides)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the run's progress; stdout carries only the table
        summary = train(run)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 2] or [
        r["step_time_s"] for r in rows if "step_time_s" in r
    ]
    model = load_nanovlm(out / "model")
    cfg = model.cfg
    tokenizer = load_for_config(cfg, out / "model")
    encoder = SampleEncoder.from_config(cfg, tokenizer)
    heldout = build_dataset(run, cfg, encoder, split="heldout")
    em = exact_match(model, tokenizer, heldout, batch_size=64, limit=min(args.eval_limit, len(heldout)))
    from conversion.mapping import mapping

    sizes = {e.torch_key: _numel(e.torch_shape) for e in mapping(cfg) if e.torch_key != "decoder.rotary_embd.inv_freq"}
    return {
        "variant": config.stem,
        "mp_type": cfg.projector,
        "image_tokens": cfg.n_image_tokens,
        "params": sum(sizes.values()),
        "projector_params": sum(n for k, n in sizes.items() if k.startswith("MP.")),
        "step_time_s": statistics.median(timed),
        "final_loss": summary["final_loss"],
        "exact_match": em["exact_match"],
        "n_eval": em["n"],
        "steps": run.steps,
        "batch_size": run.batch_size,
        "wall_s": wall,
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def table(results: list[dict], cpu: str) -> str:
    r0 = results[0]
    lines = [
        f"CPU: {cpu} ({os.cpu_count()} cores); {r0['steps']} steps x batch {r0['batch_size']} each, "
        f"held-out exact match on {r0['n_eval']} questions",
        "",
        "| projector (`mp_type`) | image tokens / image | parameters | projector parameters | step time (median) "
        "| final train loss | held-out exact match |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r['mp_type']}` | {r['image_tokens']} | {r['params']:,} | {r['projector_params']:,} "
            f"| {r['step_time_s'] * 1e3:.0f} ms | {r['final_loss']:.3f} | {r['exact_match'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def cmd(args) -> int:
    from cli.bench import cpu_model

    configs = [Path(args.configs) / f"{v}.json" for v in args.variants]
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise ValueError(f"no ablation config {', '.join(missing)}")
    if not Path(args.tokenizer).exists():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file or directory")
    out = Path(args.output_dir)
    results = []
    for config in configs:
        print(f"== {config.stem}", file=sys.stderr, flush=True)
        results.append(run_variant(config, out / config.stem, args))
    text = table(results, cpu_model())
    print(text)
    if args.json:
        from conversion import atomic

        atomic.write_text(args.json, json.dumps({"cpu": cpu_model(), "results": results}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cli.ablate_projectors", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory (SmolLM2's)")
    p.add_argument("--output-dir", default="runs/ablation", help="one run directory per variant under it")
    p.add_argument("--configs", default=str(CONFIGS), help="directory of <variant>.json run configs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, help="override every config's steps")
    p.add_argument("--batch-size", type=int, help="override every config's batch size")
    p.add_argument("--synthetic-size", type=int, help="override every config's synthetic_size")
    p.add_argument("--eval-limit", type=int, default=500, help="held-out questions answered per variant")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd)
    return p


def main(argv=None) -> int:
    from cli.runner import run

    return run(build_parser, argv)


if __name__ == "__main__":
    from cli.runner import exit_with

    exit_with(main())
