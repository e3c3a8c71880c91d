"""Decode speed of jaxvlm.generate vs torch_ref.generate (eager PyTorch with a KV cache).

Both run the same random-weight checkpoint (written by torch_ref.save_pretrained, read by
jaxvlm.VisionLanguageModel.from_pretrained) on the same prompt (one image per row + text),
greedy, float32, side by side in one process. Decode tokens/s is
    B * (N - 1) / (time(generate N tokens) - time(generate 1 token))
so that the prefill (image encoding included) is excluded identically for both. After a
warm-up (jax compiles there), the contenders take turns within each repeat, so that load
from other processes on a shared machine hits them alike; the table gives the best repeat
and the median. torch_ref runs at torch's default thread count and at 1 thread (on a busy
2-core machine OpenMP barriers with 2 threads stall badly; 1 thread is torch's best there).

    python bench/bench_generate.py                      # nanovlm-222m, batch 1 and 8
    python bench/bench_generate.py --batch 1 --new-tokens 64 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def build_models(preset: str, seed: int):
    import torch

    import jaxvlm
    import torch_ref

    cfg = jaxvlm.VLMConfig.preset(preset)
    torch.manual_seed(seed)
    tmodel = torch_ref.VisionLanguageModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        jmodel = jaxvlm.VisionLanguageModel.from_pretrained(d)
    return cfg, tmodel, jmodel


def make_prompt(cfg, batch: int, text_len: int, seed: int):
    """Row b: [text..., <image> x L, text...], all rows the same length (no padding)."""
    rng = np.random.default_rng(seed)
    L = cfg.n_image_tokens
    ids = rng.integers(3, cfg.lm_base_vocab_size, (batch, text_len + L))
    ids[:, 4 : 4 + L] = cfg.image_token_id
    images = rng.random((batch, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    return ids, np.ones_like(ids), images


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="nanovlm-222m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--text-len", type=int, default=16, help="text tokens besides the image tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, nargs="+", default=None,
                   help="torch intra-op thread counts to measure (default: torch's default and 1)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)

    import jax
    import torch

    from jaxvlm.generate import generate as jax_generate
    from torch_ref.generate import generate as torch_generate

    default_threads = torch.get_num_threads()
    thread_counts = args.torch_threads or sorted({default_threads, 1}, reverse=True)
    cfg, tmodel, jmodel = build_models(args.preset, args.seed)
    load_before = os.getloadavg()[0]
    N = args.new_tokens
    rows = []
    for batch in args.batch:
        ids, mask, images = make_prompt(cfg, batch, args.text_len, args.seed)

        def jax_gen(n):
            return np.asarray(jax.block_until_ready(jax_generate(jmodel, ids, images, mask, max_new_tokens=n, greedy=True)))

        def torch_gen(threads):
            def gen(n):
                torch.set_num_threads(threads)
                return torch_generate(tmodel, ids, images, mask, max_new_tokens=n, greedy=True).numpy()
            return gen

        contenders = {"jaxvlm": jax_gen, **{f"torch_ref ({t} thr)": torch_gen(t) for t in thread_counts}}
        reference = None
        times = {name: {"prefill": [], "total": []} for name in contenders}
        for name, gen in contenders.items():  # warm-up; jax compiles here
            out = gen(N)
            gen(1)
            reference = out if reference is None else reference
            times[name]["tokens_equal"] = bool(np.array_equal(out, reference))
        for _ in range(args.repeats):
            for name, gen in contenders.items():
                times[name]["prefill"].append(seconds(lambda: gen(1)))
                times[name]["total"].append(seconds(lambda: gen(N)))
        torch.set_num_threads(default_threads)

        results = []
        for name, t in times.items():
            decode = [batch * (N - 1) / (tn - t1) for t1, tn in zip(t["prefill"], t["total"])]
            results.append({
                "framework": name, "batch": batch, "prompt_len": ids.shape[1], "new_tokens": N,
                "prefill_s_median": statistics.median(t["prefill"]),
                "decode_tok_s_best": max(decode), "decode_tok_s_median": statistics.median(decode),
                "decode_tok_s_all": decode, "tokens_equal": t["tokens_equal"],
            })
        best_torch = max(r["decode_tok_s_best"] for r in results[1:])
        for r in results:
            r["speedup_vs_best_torch"] = r["decode_tok_s_best"] / best_torch
        rows += results

    load = (load_before, os.getloadavg()[0])
    print(f"\n{args.preset}, fp32, greedy, prompt {rows[0]['prompt_len']} tokens (1 image per row), {N} new tokens, "
          f"{args.repeats} interleaved repeats; jax {jax.__version__}, torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} -> {load[1]:.1f}\n")
    print("| batch | framework | prefill + 1st token (s, median) | decode tok/s (best) | decode tok/s (median) "
          "| best vs best torch_ref | same tokens |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['framework']} | {r['prefill_s_median']:.3f} | {r['decode_tok_s_best']:.1f} | "
              f"{r['decode_tok_s_median']:.1f} | {r['speedup_vs_best_torch']:.2f}x | {r['tokens_equal']} |")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "load_average": load, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
