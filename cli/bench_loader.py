"""`jaxvlm bench-loader`: samples/s of the training data loader (decode, resize/split, tokenise,
collate) with 0 (a thread of the main process), 1, 2 ... N worker processes, measured side by
side in one run on the same samples; the machine is named in the report.

    jaxvlm bench-loader --data coco:../shared/data/coco-mini --tokenizer ../shared/data/smollm2 --workers 0 1 2

Each setting builds a fresh loader over the same dataset, discards the first batch (worker start-up,
first imports), then times `--batches` batches. Every setting must yield the same batches (checked
on the first timed batch), so the settings are compared on identical work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from conversion import atomic
from conversion.atomic import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxvlm bench-loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="coco:DIR, llava:FILE, cauldron:PATH or synthetic")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    p.add_argument("--preset", default="nanovlm-222m", help="the model whose image size and tokens the samples get")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="timed batches per setting (after one warm-up batch)")
    p.add_argument(
        "--workers", type=int, nargs="+", default=None, help="worker processes to compare (default: 0 1 2 N)"
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1, help="times each setting is timed (median reported)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    return p


def main_args(args) -> int:
    from cli.bench import cpu_model
    from jaxvlm.data import DataLoader, SampleEncoder
    from jaxvlm.tokenizer import load_tokenizer
    from jaxvlm.train_loop import RunConfig, build_dataset, tokenizer_path

    if args.json:
        check_output_file(args.json, overwrite=args.overwrite, flag="--json")
    if args.batch_size < 1 or args.batches < 1 or args.repeats < 1:
        raise ValueError("--batch-size, --batches and --repeats must be >= 1")
    n_cpu = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else sorted({0, 1, 2, n_cpu})
    if any(w < 0 for w in workers):
        raise ValueError("--workers: counts must be >= 0")
    run = RunConfig(data=args.data, preset=args.preset, tokenizer=args.tokenizer, max_length=args.max_length)
    from conversion.config import VLMConfig

    cfg = VLMConfig.preset(args.preset)
    encoder = SampleEncoder.from_config(cfg, load_tokenizer(tokenizer_path(run), extra_tokens=cfg.extra_tokens))
    dataset = build_dataset(run, cfg, encoder)
    need = (args.batches + 1) * args.batch_size
    if len(dataset) < need:
        raise ValueError(f"{args.data}: {len(dataset)} samples, fewer than the {need} the benchmark reads")
    results, reference = [], None
    for w in workers:
        rates = []
        for _ in range(args.repeats):
            loader = DataLoader(dataset, args.batch_size, max_length=args.max_length, seed=0, worker_processes=w,
                                prefetch=0)  # fmt: skip
            try:
                batches = iter(loader)
                next(batches)  # warm-up: worker start-up
                t0 = time.perf_counter()
                first = next(batches)
                for _ in range(args.batches - 1):
                    next(batches)
                rates.append(args.batches * args.batch_size / (time.perf_counter() - t0))
                batches.close()
            finally:
                loader.close()
            if reference is None:
                reference = first
            elif not all(np.array_equal(first[k], reference[k]) for k in reference):
                raise RuntimeError(f"{w} worker process(es) built a different batch than the first setting")
        results.append({"worker_processes": w, "samples_per_s": statistics.median(rates), "all": rates})
    base = results[0]["samples_per_s"]
    report = {
        "machine": {"cpu": cpu_model(), "cpus": n_cpu},
        "data": args.data,
        "preset": args.preset,
        "image_size": cfg.vit_img_size,
        "batch_size": args.batch_size,
        "timed_batches": args.batches,
        "results": [{**r, "vs_first": r["samples_per_s"] / base} for r in results],
    }
    lines = [
        f"loader: {args.data}, {args.preset} ({cfg.vit_img_size} px tiles), batch {args.batch_size}, "
        f"{args.batches} timed batches; {report['machine']['cpu']}, {n_cpu} CPUs",
        "",
        "| worker processes | samples/s | vs first |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {r['worker_processes']} | {r['samples_per_s']:.1f} | {r['vs_first']:.2f}x |" for r in report["results"]
    ]
    print("\n".join(lines))
    if args.json:
        atomic.write_text(args.json, json.dumps(report, indent=2))
    return 0


def add_bench_loader_parser(sub) -> None:
    b = sub.add_parser(
        "bench-loader",
        help="samples/s of the data loader with 0, 1, 2 ... N worker processes",
        parents=[build_parser()],
        add_help=False,
        conflict_handler="resolve",
    )
    b.set_defaults(func=main_args)


if __name__ == "__main__":  # pragma: no cover - `jaxvlm bench-loader` is the entry point
    sys.exit(main_args(build_parser().parse_args()))
