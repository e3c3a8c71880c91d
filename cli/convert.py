"""`python -m conversion {to-jax,to-torch,check,init,from-hf,from-smolvlm,to-smolvlm,merge}`: move weights between frameworks and prove
they agree.

  to-jax SRC DST    nanoVLM directory (config.json + model.safetensors) -> orbax checkpoint of
                    the NNX state (DST/config.json + DST/state/). Needs no torch.
  to-torch SRC DST  the reverse. Needs no torch either: safetensors are written from numpy.
  check DIR         load DIR (either format) in torch_ref and jaxvlm, run both on the same
                    inputs (random, or --image/--prompt), print max|diff|, mean KL and top-1
                    agreement of the logits; exit 1 above tolerance.
  init DST          write a randomly initialised nanoVLM directory for a preset.
  from-hf --vision DIR --language DIR --out DST
                    a nanoVLM directory from local Hugging Face backbones (SigLIP + SmolLM2 /
                    Llama): architecture from their config.json, VLM settings from the flags
                    (upstream's defaults), new rows and the projector N(0, 0.02) (--seed).
  from-smolvlm SRC DST
                    a transformers SmolVLM / Idefics3 directory -> a checkpoint directory that
                    jaxvlm and torch_ref load (vlm_family "smolvlm"); tensors unchanged.
  to-smolvlm SRC DST
                    the reverse: a directory transformers' AutoModelForImageTextToText loads.
  merge CKPT ADAPTER OUT
                    a nanoVLM checkpoint with a PEFT LoRA adapter folded in (W + alpha/r * B @ A
                    in float32, cast to the checkpoint's dtype); numpy only, the same bytes each time.

Errors print one line naming the problem and exit 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from conversion.atomic import atomic_directory
from conversion.config import PRESETS, VLMConfig
from conversion.hub import resolve
from conversion.pretrained import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, copy_tokenizer

from .runner import exit_with, run


def _fresh_output_dir(dst: Path, *inputs: Path) -> None:
    """The output directory must be new (or empty) and not an input; it is written under a
    temporary name and renamed into place when complete (`atomic_directory`)."""
    for src in inputs:
        if dst.exists() and src.exists() and os.path.samefile(dst, src):
            raise ValueError(f"output directory {dst} is also the input")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"output {dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"output directory {dst} is not empty")
    if dst.exists():
        dst.rmdir()  # empty: replaced whole by the finished output


def cmd_to_jax(args) -> int:
    from jaxvlm.pretrained import load_nanovlm, save_orbax

    src, dst = resolve(args.src, what="SRC"), Path(args.dst)  # a directory or a Hub repo id
    _fresh_output_dir(dst, src)
    model = load_nanovlm(src)
    with atomic_directory(dst) as tmp:
        save_orbax(model, tmp)
        copy_tokenizer(src, tmp)
    print(f"wrote orbax checkpoint {dst} ({_n_params(model.cfg)} tensors from {src / WEIGHTS_FILE})")
    return 0


def cmd_to_torch(args) -> int:
    from jaxvlm.pretrained import load_orbax, save_nanovlm

    src, dst = Path(args.src), Path(args.dst)
    _fresh_output_dir(dst, src)
    model = load_orbax(src)
    with atomic_directory(dst) as tmp:
        save_nanovlm(model, tmp)
        copy_tokenizer(src, tmp)
    print(f"wrote nanoVLM checkpoint {dst} ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return 0


def _n_params(cfg: VLMConfig) -> int:
    from conversion.mapping import mapping

    return len(mapping(cfg))


def cmd_init(args) -> int:
    from flax import nnx

    from jaxvlm.pretrained import save_nanovlm
    from jaxvlm.vision_language_model import VisionLanguageModel

    dst = Path(args.dst)
    _fresh_output_dir(dst)
    cfg = VLMConfig.preset(args.preset)
    model = VisionLanguageModel(cfg, rngs=nnx.Rngs(args.seed))
    with atomic_directory(dst) as tmp:
        save_nanovlm(model, tmp)
    print(f"wrote randomly initialised {args.preset} checkpoint to {dst}")
    return 0


def cmd_check(args) -> int:
    from .check import compare_frameworks

    report = compare_frameworks(
        Path(args.dir),
        image=args.image,
        prompt=args.prompt,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    ok = report["max_abs_diff"] <= args.tol * report["logit_scale"]
    if args.json:
        print(json.dumps({**report, "tolerance": args.tol, "ok": ok}))
    else:
        print(f"inputs        : {report['inputs']}")
        print(f"logit scale   : {report['logit_scale']:.4g} (max |logits|, torch_ref)")
        print(
            f"max |diff|    : {report['max_abs_diff']:.3e} ({report['max_abs_diff'] / report['logit_scale']:.2e} relative; tolerance {args.tol:.0e})"
        )
        print(f"mean KL       : {report['mean_kl']:.3e} nats (torch_ref || jaxvlm)")
        print(f"top-1 agree   : {report['top1_agreement'] * 100:.2f}% of {report['n_positions']} positions")
        print("OK" if ok else "FAIL: the frameworks disagree beyond tolerance")
    return 0 if ok else 1


def _extra_tokens(value: str):
    """--extra-tokens: "default" (66 tokens), "legacy" (the single image token), or a JSON
    object {name: token} given inline or as a file."""
    from conversion.config import DEFAULT_EXTRA_TOKENS, LEGACY_EXTRA_TOKENS

    if value in ("default", "legacy"):
        return DEFAULT_EXTRA_TOKENS if value == "default" else LEGACY_EXTRA_TOKENS
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        tokens = json.loads(text)
    except json.JSONDecodeError:
        tokens = None
    if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
        raise argparse.ArgumentTypeError("expected default, legacy, or a JSON object {name: token} (inline or a file)")
    return tuple(tokens.items())


def cmd_from_hf(args) -> int:
    from conversion.hf import build_from_hf

    settings = {
        "mp_type": args.mp_type,
        "mp_resampler_queries": args.resampler_queries,
        "mp_resampler_layers": args.resampler_layers,
        "mp_pixel_shuffle_factor": args.pixel_shuffle_factor,
        "mp_image_token_length": args.image_token_length,
        "vit_img_size": args.image_size,
        "max_img_size": args.max_img_size,
        "resize_to_max_side_len": args.resize_to_max_side_len,
        "lm_max_length": args.max_length,
    }
    if args.extra_tokens is not None:
        settings["vlm_extra_tokens"] = args.extra_tokens
    cfg = build_from_hf(
        args.vision,
        args.language,
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        **{k: v for k, v in settings.items() if v is not None},
    )
    files = f"{CONFIG_FILE} + {WEIGHTS_FILE}" + (
        f" + {TOKENIZER_FILE}" if (Path(args.out) / TOKENIZER_FILE).is_file() else " (no tokenizer)"
    )
    print(
        f"wrote nanoVLM checkpoint {args.out} ({files}): ViT {cfg.vit_n_blocks} x {cfg.vit_hidden_dim} at {cfg.vit_img_size} px, "
        f"LM {cfg.lm_n_blocks} x {cfg.lm_hidden_dim}, vocabulary {cfg.lm_base_vocab_size} + {cfg.extra_token_amount} extra"
        f"{'' if cfg.lm_tie_weights else ', untied head'}, {cfg.n_image_tokens} tokens per tile, images up to "
        f"{cfg.max_img_size} px ({'split into tiles' if cfg.resize_to_max_side_len else 'one tile'})"
    )
    return 0


def cmd_from_smolvlm(args) -> int:
    from conversion.smolvlm import from_smolvlm

    src, dst = resolve(args.src, what="SRC"), Path(args.dst)  # a directory or a Hub repo id
    _fresh_output_dir(dst, src)
    cfg = from_smolvlm(src, dst)
    tok = "" if (dst / TOKENIZER_FILE).is_file() else " (no tokenizer)"
    print(
        f"wrote SmolVLM checkpoint {dst}{tok}: ViT {cfg.vit_n_blocks} x {cfg.vit_hidden_dim} at {cfg.vit_img_size} px, "
        f"LM {cfg.lm_n_blocks} x {cfg.lm_hidden_dim}, vocabulary {cfg.lm_vocab_size}{'' if cfg.lm_tie_weights else ', untied head'}, "
        f"{cfg.n_image_tokens} tokens per tile, images up to {cfg.max_img_size} px "
        f"({'split into tiles' if cfg.vlm_image_splitting else 'one tile'})"
    )
    return 0


def cmd_to_smolvlm(args) -> int:
    from conversion.smolvlm import to_smolvlm

    src, dst = resolve(args.src, what="SRC"), Path(args.dst)  # a directory or a Hub repo id
    _fresh_output_dir(dst, src)
    cfg = to_smolvlm(src, dst)
    print(f"wrote transformers SmolVLM (Idefics3) directory {dst} ({cfg.lm_n_blocks}-block decoder)")
    return 0


def cmd_merge(args) -> int:
    from conversion.lora import merge, read_adapter
    from conversion.pretrained import read_checkpoint, write_checkpoint

    ckpt, dst = resolve(args.ckpt, what="CKPT"), Path(args.out)  # a directory or a Hub repo id
    _fresh_output_dir(dst, ckpt, Path(args.adapter))
    cfg, tensors = read_checkpoint(ckpt)
    spec, adapter = read_adapter(args.adapter, cfg)
    with atomic_directory(dst) as tmp:
        write_checkpoint(tmp, cfg, merge(spec, cfg, tensors, adapter))
        copy_tokenizer(ckpt, tmp)
    print(
        f"wrote {dst}: {ckpt} with the rank-{spec.rank} adapter {args.adapter} merged ({len(spec.modules(cfg))} layers)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conversion", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("to-jax", help="nanoVLM directory -> orbax checkpoint of the NNX state")
    s.add_argument("src"), s.add_argument("dst")
    s.set_defaults(func=cmd_to_jax)
    s = sub.add_parser("to-torch", help="orbax checkpoint of the NNX state -> nanoVLM directory")
    s.add_argument("src"), s.add_argument("dst")
    s.set_defaults(func=cmd_to_torch)
    s = sub.add_parser("check", help="run a checkpoint in both frameworks and compare the logits")
    s.add_argument("dir", help="nanoVLM directory or orbax checkpoint written by to-jax")
    s.add_argument("--image", action="append", help="image file (repeatable); needs --prompt")
    s.add_argument("--prompt", help="user prompt; the image tokens are inserted as upstream does")
    s.add_argument("--tokenizer", help="tokenizer.json or its directory (default: DIR/tokenizer.json)")
    s.add_argument("--batch-size", type=int, default=3, help="row b carries b %% 3 images")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tol", type=float, default=1e-4, help="max |diff| relative to max |logits|")
    s.add_argument("--json", action="store_true", help="print the report as one JSON line")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("init", help="write a randomly initialised nanoVLM directory")
    s.add_argument("dst")
    s.add_argument("--preset", choices=PRESETS, default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("from-hf", help="build a nanoVLM directory from local Hugging Face backbones (SigLIP + Llama)")
    s.add_argument("--vision", required=True, help="SigLIP / SigLIP2 directory (dual-tower or vision-only)")
    s.add_argument("--language", required=True, help="SmolLM2 / Llama directory (single or sharded safetensors)")
    s.add_argument("--out", required=True, help="output nanoVLM directory (must not exist or be empty)")
    s.add_argument("--seed", type=int, default=0, help="seed of the new embedding rows and the projector")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the written tensors")
    s.add_argument(
        "--pixel-shuffle-factor",
        type=int,
        help="mp_pixel_shuffle_factor (default: 4 where the patch grid allows it, else 2, else 1)",
    )
    s.add_argument("--image-token-length", type=int, help="mp_image_token_length (default: derived)")
    s.add_argument(
        "--mp-type",
        choices=("pixel_shuffle_linear", "mlp", "resampler"),
        help="the projector variant (default: nanoVLM's pixel_shuffle_linear; written only when given)",
    )
    s.add_argument("--resampler-queries", type=int, help="mp_resampler_queries (--mp-type resampler)")
    s.add_argument("--resampler-layers", type=int, help="mp_resampler_layers (--mp-type resampler; default 2)")
    s.add_argument("--extra-tokens", type=_extra_tokens, help="default (66 tokens), legacy (1), or a JSON object")
    s.add_argument("--image-size", type=int, help="vit_img_size; must be the vision tower's image_size")
    s.add_argument(
        "--max-img-size",
        type=int,
        help="max_img_size (default: with splitting the largest multiple of the tile size up to 2048 that the grid tokens cover, else the tile size)",
    )
    s.add_argument("--resize-to-max-side-len", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--max-length", type=int, help="lm_max_length (default 4096)")
    s.set_defaults(func=cmd_from_hf)
    s = sub.add_parser("from-smolvlm", help="transformers SmolVLM / Idefics3 directory -> checkpoint directory")
    s.add_argument("src"), s.add_argument("dst")
    s.set_defaults(func=cmd_from_smolvlm)
    s = sub.add_parser("to-smolvlm", help="SmolVLM-family checkpoint directory -> transformers Idefics3 directory")
    s.add_argument("src"), s.add_argument("dst")
    s.set_defaults(func=cmd_to_smolvlm)
    s = sub.add_parser("merge", help="nanoVLM checkpoint + PEFT LoRA adapter directory -> merged checkpoint")
    s.add_argument("ckpt"), s.add_argument("adapter"), s.add_argument("out")
    s.set_defaults(func=cmd_merge)
    return p


def main(argv=None) -> int:
    return run(build_parser, argv)


def entry() -> None:
    """`python -m conversion`."""
    exit_with(main())
