"""The `jaxvlm` command line: train, eval, synthetic, generate, bench.

Errors caused by the user's input (missing files, bad checkpoints, bad flags) print one line
naming the problem and exit 2; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from cli.runner import exit_with, run
from conversion.atomic import atomic_file, check_output_file
from conversion.hub import resolve
from conversion.pretrained import read_config
from jaxvlm.host_memory import reexec_with_huge_pages


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from jaxvlm.train_loop import RunConfig

    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "model":
            p.add_argument(
                "--model",
                action="append",
                metavar="FIELD=VALUE",
                default=None,
                help="override a VLMConfig field of the preset (repeatable), e.g. --model vit_img_size=64",
            )
        elif f.name == "seq_buckets":
            p.add_argument(
                flag,
                type=lambda s: tuple(int(x) for x in s.split(",")),
                default=None,
                help="comma-separated sequence lengths, e.g. 64,128,256",
            )
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            p.add_argument(flag, type=base, default=None, help=f"(default: {f.default})")


def _field_value(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--model {item!r}: expected FIELD=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def cmd_train(args) -> int:
    from jaxvlm.train_loop import RunConfig, train

    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None
    }
    if "model" in overrides:
        overrides["model"] = dict(_field_value(item) for item in overrides["model"])
    run = RunConfig.from_file(args.config, **overrides) if args.config else RunConfig(**overrides)
    summary = train(run)
    print(json.dumps(summary, indent=2))
    if summary["signal"] is not None:  # saved, then stopped by SIGINT / SIGTERM: 130 / 143, as the shell does
        return 128 + summary["signal"]
    return 0


def cmd_eval(args) -> int:
    if args.task == "rescore":
        return _print_benchmark_report(args, _rescore(args))
    if args.model is None:
        raise ValueError("jaxvlm eval needs --model DIR")
    if args.predictions is not None and args.task == "default":
        raise ValueError("--predictions goes with --task mmstar|mc|vqa|rescore")
    from jaxvlm.runtime import configure

    configure()  # the persistent compilation cache, before anything compiles
    if args.task != "default":
        return _cmd_benchmark(args)
    from jaxvlm.data import SampleEncoder
    from jaxvlm.evaluation import exact_match, mean_loss
    from jaxvlm.pretrained import load_nanovlm
    from jaxvlm.tokenizer import load_for_config
    from jaxvlm.train_loop import RunConfig, build_dataset, build_loader

    model_dir = resolve(args.model, what="--model")  # a directory or a Hub repo id
    model = load_nanovlm(model_dir)
    tok_path = Path(args.tokenizer) if args.tokenizer else model_dir
    tokenizer = load_for_config(model.cfg, tok_path)
    encoder = SampleEncoder.from_config(model.cfg, tokenizer)
    run = RunConfig(
        data=args.data,
        synthetic_size=args.synthetic_size,
        seed=args.seed,
        batch_size=args.batch_size,
        image_size=args.image_size,
    )
    dataset = build_dataset(run, model.cfg, encoder, split=args.split)
    if args.limit:
        args.limit = min(args.limit, len(dataset))
    loss = mean_loss(
        model,
        build_loader(run, dataset, shuffle=False),
        max_batches=None if not args.limit else -(-args.limit // args.batch_size),
    )
    result = exact_match(
        model,
        tokenizer,
        dataset,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        show=args.show,
    )
    report = {
        "split": args.split,
        "n": result["n"],
        "loss": loss,
        "exact_match": result["exact_match"],
        "examples": result["examples"],
    }
    if args.json:
        print(json.dumps(report))
    else:
        for ex in result["examples"]:
            print(f"  {'ok ' if ex['ok'] else 'BAD'} expected {ex['expected']!r:>12} got {ex['got']!r}")
        print(f"{args.split}: loss {loss:.4f} | exact match {result['exact_match'] * 100:.1f}% of {result['n']}")
    return 0


def _rescore(args) -> dict:
    from jaxvlm.benchmarks import rescore

    if args.predictions is None:
        raise ValueError("--task rescore needs --predictions FILE")
    return rescore(args.predictions)


def _cmd_benchmark(args) -> int:
    """`jaxvlm eval --task mmstar|mc|vqa --data FILE_OR_DIR` (jaxvlm.benchmarks)."""
    from jaxvlm.benchmarks import load_benchmark, run_benchmark, write_predictions
    from jaxvlm.data import SampleEncoder
    from jaxvlm.pretrained import load_nanovlm
    from jaxvlm.tokenizer import load_for_config

    if args.data == "synthetic":
        raise ValueError(f"--task {args.task} needs --data FILE_OR_DIR (.parquet, a directory of them, or .jsonl)")
    out = None
    if args.predictions is not None:
        out = check_output_file(args.predictions, inputs=(args.data,), overwrite=args.overwrite, flag="--predictions")
    items = load_benchmark(args.task, args.data, limit=args.limit)
    model_dir = resolve(args.model, what="--model")  # a directory or a Hub repo id
    model = load_nanovlm(model_dir)
    tokenizer = load_for_config(model.cfg, Path(args.tokenizer) if args.tokenizer else model_dir)
    encoder = SampleEncoder.from_config(model.cfg, tokenizer)
    report, rows = run_benchmark(model, tokenizer, encoder, args.task, items, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, source=args.data)  # fmt: skip
    if out is not None:
        write_predictions(out, rows)
    return _print_benchmark_report(args, report)


def _print_benchmark_report(args, report: dict) -> int:
    if args.json:
        print(json.dumps(report))
        return 0
    how = " (mean over l2 categories, as lmms-eval)" if report["task"] == "mmstar" else ""
    print(f"{report['task']}: overall {report['overall'] * 100:.2f}%{how} of {report['n']}")
    for what in ("per_category", "per_l2_category"):
        for name, score in report[what].items():
            print(f"  {what[4:]} {name}: {score * 100:.2f}%")
    return 0


def cmd_synthetic(args) -> int:
    """Render one synthetic sample to a PNG and print its question and answer (for demos)."""
    from jaxvlm.data import SampleEncoder, SyntheticShapesDataset
    from jaxvlm.image_processing import processor_for
    from jaxvlm.tokenizer import load_for_config

    out = check_output_file(args.out, overwrite=args.overwrite)
    model_dir = resolve(args.model, what="--model")  # a directory or a Hub repo id
    cfg = read_config(model_dir)
    tokenizer = load_for_config(cfg, model_dir)
    encoder = SampleEncoder(tokenizer, processor_for(cfg), cfg.n_image_tokens)
    ds = SyntheticShapesDataset(encoder, split=args.split, size=args.index + 1, seed=args.seed)
    with atomic_file(out, "wb") as f:
        ds.image(args.index).save(f, format="PNG")
    print(json.dumps({"image": args.out, "question": ds.question(args.index), "answer": ds.answer(args.index)}))
    return 0


def cmd_pretrain_vision(args) -> int:
    """Contrastive pretraining of the ViT on image-caption pairs (jaxvlm.contrastive)."""
    from jaxvlm.contrastive import PretrainConfig, pretrain_vision

    settings = {k: getattr(args, k) for k in PRETRAIN_FLAGS if getattr(args, k) is not None}
    if args.model:
        settings["model"] = dict(_field_value(item) for item in args.model)
    if args.overwrite:
        settings["overwrite"] = True
    if args.augment is not None:
        settings["augment"] = args.augment
    summary = pretrain_vision(PretrainConfig(**settings))
    print(json.dumps(summary, indent=2))
    return 0


# `jaxvlm pretrain-vision` flags: PretrainConfig's fields (--model is repeatable FIELD=VALUE).
PRETRAIN_FLAGS = {
    "data": (str, "image-caption pairs: coco:DIR (captions.json + images/)"),
    "loss": (str, "siglip (sigmoid, per device chunk on a mesh) or infonce (CLIP)"),
    "output_dir": (str, "the run directory"),
    "init_from": (str, "a nanoVLM checkpoint directory (or Hub repo id) to start from"),
    "preset": (str, "model shape without --init-from (default tiny)"),
    "tokenizer": (str, "tokenizer.json or its directory (default: --init-from's)"),
    "steps": (int, "optimizer steps (default 200)"),
    "batch_size": (int, "pairs per step, distinct images, >= 2 (default 16)"),
    "lr": (float, "peak learning rate, warmup then cosine (default 1e-3)"),
    "weight_decay": (float, "AdamW weight decay on matrices (default 0.1)"),
    "holdout": (int, "images held out for recall@1/5 and zero-shot accuracy (default 10)"),
    "holdout_captions": (int, "also hold out the last N captions of each training image (default 1)"),
    "seed": (int, "(default 0)"),
    "embed_dim": (int, "shared embedding width E (default: the language width)"),
    "max_text_len": (int, "caption tokens, EOS included (default 32)"),
    "eval_every": (int, "also evaluate the held-out split every N steps"),
    "log_every": (int, "(default 10)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxvlm", description="nanoVLM in JAX: train, evaluate, generate.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VLM (from scratch, a nanoVLM checkpoint, or --resume)")
    t.add_argument("--config", help="JSON file of run settings; flags override it")
    _add_run_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="loss and exact-match accuracy of greedy answers, or a benchmark (--task)")
    e.add_argument("--model", help="nanoVLM checkpoint directory or Hub repo id (with tokenizer.json)")
    e.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the model directory's)")
    e.add_argument(
        "--task",
        default="default",
        choices=("default", "mmstar", "mc", "vqa", "rescore"),
        help="default: loss and exact match on --data; mmstar|mc|vqa: a benchmark file (jaxvlm.benchmarks); "
        "rescore: the report of a --predictions file",
    )
    e.add_argument("--predictions", help="mmstar|mc|vqa: write every answer, scored, to this JSONL; rescore: read it")
    e.add_argument("--overwrite", action="store_true", help="let --predictions replace an existing file")
    e.add_argument("--data", default="synthetic", help="a --data spec; mmstar|mc|vqa: .parquet, a directory, .jsonl")
    e.add_argument("--split", default="heldout", help="synthetic: train or heldout")
    e.add_argument("--synthetic-size", type=int, default=20000, help="as in training: sets the held-out size too")
    e.add_argument("--image-size", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    e.add_argument("--show", type=int, default=5, help="print N example answers")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("synthetic", help="render one synthetic sample (PNG) and print its question and answer")
    s.add_argument("--model", required=True, help="checkpoint directory or Hub repo id (its config: picture size)")
    s.add_argument("--split", default="heldout")
    s.add_argument("--index", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="PNG path")
    s.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    s.set_defaults(func=cmd_synthetic)

    pv = sub.add_parser("pretrain-vision", help="contrastive pretraining of the ViT on image-caption pairs")
    for name, (kind, text) in PRETRAIN_FLAGS.items():
        pv.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    pv.add_argument("--model", action="append", metavar="FIELD=VALUE", help="override a VLMConfig field")
    pv.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="random flips and shifts of the training images (default off)")  # fmt: skip
    pv.add_argument("--overwrite", action="store_true", help="start a run directory over")
    pv.set_defaults(func=cmd_pretrain_vision)

    from .bench import add_bench_parser
    from .bench_loader import add_bench_loader_parser
    from .generate import add_generate_parser

    add_generate_parser(sub)
    add_bench_parser(sub)
    add_bench_loader_parser(sub)
    return p


def main(argv=None) -> int:
    return run(build_parser, argv)


# Commands that run many jitted steps or stream the weights per token (bench sets each part's
# environment itself).
LONG_RUNNING = ("train", "eval", "generate", "pretrain-vision")


def entry() -> None:
    """The `jaxvlm` executable and `python -m jaxvlm`: a process of its own, so a long-running
    command may restart itself with huge-page scratch buffers (jaxvlm.host_memory) first."""
    if sys.argv[1:2] and sys.argv[1] in LONG_RUNNING:
        reexec_with_huge_pages()
    exit_with(main())


if __name__ == "__main__":
    entry()
