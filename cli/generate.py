"""`jaxvlm generate`: answer a prompt about images with a checkpoint (a directory or a Hub repo id), or a JSONL batch.

  jaxvlm generate --model DIR --image a.jpg [--image b.jpg] --prompt "What is this?"
  jaxvlm generate --model DIR --batch prompts.jsonl --out answers.jsonl
  jaxvlm generate --model DIR --image a.jpg --prompt "..." --attention-map map.png \
      [--attention-token K] [--attention-layer L|mean] [--attention-head H|mean] [--vit-rollout rollout.png]

Batch rows are {"prompt": str, "images": [paths relative to the JSONL file]} (or "image": path);
each output row adds "answer". The tokenizer is the model directory's tokenizer.json unless
--tokenizer says otherwise; images go through the same processor as training.

--attention-map writes the image with a heat map of where the decoder looked when it produced
generated token K (0: the first), per layer or averaged over layers and heads; --vit-rollout the
ViT's attention rollout (`jaxvlm.attention_maps`). Both PNGs are written whole, never over an
existing file without --overwrite, and only for one --prompt with one --image.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from conversion.atomic import atomic_file, check_output_file, same_file
from conversion.hub import resolve
from conversion.validation import read_utf8


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="answer a prompt about images (or a JSONL batch of them)")
    g.add_argument("--model", required=True, help="nanoVLM checkpoint directory or Hugging Face Hub repo id")
    g.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the model directory's)")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--prompt", help="the user's question")
    g.add_argument("--batch", help="JSONL file of {prompt, images} rows")
    g.add_argument("--out", help="where --batch writes its answers (JSONL, written whole at the end; default: stdout)")
    g.add_argument("--overwrite", action="store_true", help="let --out / the attention PNGs replace an existing file")
    g.add_argument("--attention-map", metavar="OUT.png", help="write the decoder's attention over the image (overlay)")
    g.add_argument("--attention-token", type=int, default=None, metavar="K",
                   help="the generated token whose attention is shown (0-based; default 0, the first)")  # fmt: skip
    g.add_argument("--attention-layer", default=None, metavar="L|mean",
                   help="decoder layer 0..n-1, or mean over layers (default)")  # fmt: skip
    g.add_argument("--attention-head", default=None, metavar="H|mean",
                   help="query head 0..nh-1 of the decoder, or mean over heads (default)")  # fmt: skip
    g.add_argument(
        "--vit-rollout", metavar="OUT.png", help="write the ViT's attention rollout over the image (overlay)"
    )
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--temperature", type=float, default=0.5)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)


def _load(args):
    from jaxvlm.data import SampleEncoder
    from jaxvlm.pretrained import load_nanovlm
    from jaxvlm.tokenizer import load_for_config

    model = load_nanovlm(args.model)
    tokenizer = load_for_config(model.cfg, Path(args.tokenizer or args.model))
    return model, tokenizer, SampleEncoder.from_config(model.cfg, tokenizer)


class TextStream:
    """Prints a single row's answer to stdout token by token (decoding the whole prefix each
    time, so multi-byte characters split across tokens come out whole), up to its EOS."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown, self.done = tokenizer, [], "", False

    def __call__(self, step: int, tokens) -> None:
        tok = int(tokens[0])
        if self.done or tok == self.tokenizer.eos_token_id:
            self.done = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text


def _tokens(model, tokenizer, prompts: list[dict], args, stream=None):
    """The generated ids int32[B, max_new_tokens] of left-padded prompts."""
    from jaxvlm.evaluation import left_pad
    from jaxvlm.generate import generate

    ids, mask, images = left_pad(prompts, tokenizer.pad_token_id)
    return generate(
        model,
        ids,
        images,
        mask,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        seed=args.seed,
        stream=stream,
    )


def _answer(model, tokenizer, prompts: list[dict], args, stream=None) -> list[str]:
    out = _tokens(model, tokenizer, prompts, args, stream)
    return [
        tokenizer.decode([t for t in row if t != tokenizer.eos_token_id], skip_special_tokens=True)
        for row in out.tolist()
    ]


def _check_attention_args(args) -> list:
    """Check the attention-map flags before anything is loaded; the output paths to write."""
    outputs = [p for p in (args.attention_map, args.vit_rollout) if p is not None]
    if args.attention_map is None:
        for flag, value in (("--attention-token", args.attention_token), ("--attention-layer", args.attention_layer),
                            ("--attention-head", args.attention_head)):  # fmt: skip
            if value is not None:
                raise ValueError(f"{flag} goes with --attention-map OUT.png")
    if not outputs:
        return []
    if args.prompt is None:
        raise ValueError("--attention-map / --vit-rollout go with one --prompt and one --image, not --batch")
    if len(args.image) != 1:
        raise ValueError(f"--attention-map / --vit-rollout map one image; {len(args.image)} --image were given")
    args.attention_token = 0 if args.attention_token is None else args.attention_token
    if not 0 <= args.attention_token < args.max_new_tokens:
        raise ValueError(
            f"--attention-token {args.attention_token}: choose a generated token, 0..{args.max_new_tokens - 1} "
            f"(--max-new-tokens {args.max_new_tokens})"
        )
    for flag, attr, what in (
        ("--attention-layer", "attention_layer", "layer"),
        ("--attention-head", "attention_head", "head"),
    ):
        value = getattr(args, attr) or "mean"
        if value != "mean":
            if not value.isdigit():
                raise ValueError(f"{flag} {value!r}: give a {what} number 0..n-1 or 'mean'")
            value = int(value)
        setattr(args, attr, value)
    if len(outputs) == 2 and same_file(*outputs):
        raise ValueError(f"--attention-map and --vit-rollout are the same file {outputs[0]}: choose two names")
    for flag, path in (("--attention-map", args.attention_map), ("--vit-rollout", args.vit_rollout)):
        if path is not None:
            check_output_file(path, inputs=(*args.image, args.model), overwrite=args.overwrite, flag=flag)
    return outputs


def _write_attention(model, tokenizer, encoder, prompt: dict, tokens, args) -> None:
    """The PNGs of --attention-map and --vit-rollout for one prompt and its generated tokens."""
    import numpy as np

    from jaxvlm import attention_maps as am

    cfg = model.cfg
    tokens = np.asarray(tokens)[0]
    eos = np.flatnonzero(tokens == tokenizer.eos_token_id)
    n_generated = int(eos[0]) + 1 if eos.size else tokens.shape[0]
    picture = encoder.image_processor.load_image(args.image[0])
    grid = prompt["grids"][0]
    if args.attention_map is not None:
        k = args.attention_token
        if k >= n_generated:
            raise ValueError(
                f"--attention-token {k}: only {n_generated} token(s) were generated (0..{n_generated - 1}); "
                "nothing written"
            )
        ids = np.concatenate([prompt["input_ids"], tokens[:k]])[None]  # the query at T-1+k chose token k
        weights = am.decoder_attention(model, ids, None, prompt["images"])
        heat = am.image_token_map(
            weights, ids, cfg, grid, query=ids.shape[1] - 1, layer=args.attention_layer, head=args.attention_head
        )
        am.save_png(am.overlay(picture, heat), args.attention_map)
        shown = tokenizer.decode([int(tokens[k])], skip_special_tokens=False)
        print(
            f"attention map of generated token {k} ({shown!r}), layer {args.attention_layer}, "
            f"head {args.attention_head}: "
            f"{heat.sum() * 100:.1f}% of its attention on the image's tokens -> {args.attention_map}",
            file=sys.stderr,
        )
    if args.vit_rollout is not None:
        rollout = am.attention_rollout(am.vit_attention(model, prompt["images"]))
        am.save_png(am.overlay(picture, am.rollout_map(rollout, cfg, grid)), args.vit_rollout)
        print(f"ViT attention rollout -> {args.vit_rollout}", file=sys.stderr)


def _batch_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_utf8(path, what="--batch").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: a row needs a string 'prompt'")
        images = row.get("images", [row["image"]] if "image" in row else [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{path}:{n}: 'images' must be a list of image paths, got {json.dumps(images)}")
        rows.append(
            {"prompt": row["prompt"], "images": [str(path.parent / p) for p in images], "source": f"{path}:{n}"}
        )
    if not rows:
        raise ValueError(f"{path} has no prompts")
    return rows


def _check_model_for_attention(cfg, args) -> None:
    """The attention flags that need the model's config, checked before generating."""
    if args.attention_map is None:
        return
    if args.attention_layer != "mean" and args.attention_layer >= cfg.lm_n_blocks:
        raise ValueError(
            f"--attention-layer {args.attention_layer}: the decoder has layers 0..{cfg.lm_n_blocks - 1} (or 'mean')"
        )
    if args.attention_head != "mean" and args.attention_head >= cfg.lm_n_heads:
        raise ValueError(
            f"--attention-head {args.attention_head}: the decoder has query heads 0..{cfg.lm_n_heads - 1} (or 'mean')"
        )
    if getattr(cfg, "mp_type", None) == "resampler":
        raise ValueError(
            "--attention-map: this model's resampler projector makes image tokens from learned queries, "
            "which have no place on the image (--vit-rollout works)"
        )


def cmd_generate(args) -> int:
    from jaxvlm.runtime import configure

    configure()  # the persistent compilation cache, before anything compiles
    if (args.prompt is None) == (args.batch is None):
        raise ValueError("give either --prompt (with --image files) or --batch FILE")
    args.model = str(resolve(args.model, what="--model"))  # a directory or a Hub repo id
    if args.out is not None:
        if args.batch is None:
            raise ValueError("--out goes with --batch")
        check_output_file(args.out, inputs=(args.batch, args.model), overwrite=args.overwrite)
    attention_outputs = _check_attention_args(args)
    rows = _batch_rows(Path(args.batch)) if args.batch is not None else None
    model, tokenizer, encoder = _load(args)
    if args.prompt is not None:
        prompt = encoder.encode_prompt(args.image, args.prompt)
        if attention_outputs:
            _check_model_for_attention(model.cfg, args)
        tokens = _tokens(model, tokenizer, [prompt], args, stream=TextStream(tokenizer))
        print(flush=True)
        if attention_outputs:
            _write_attention(model, tokenizer, encoder, prompt, tokens, args)
        return 0
    with atomic_file(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as out:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            prompts = []
            for row in chunk:
                try:
                    prompts.append(encoder.encode_prompt(row["images"], row["prompt"]))
                except (ValueError, OSError) as e:
                    raise ValueError(f"{row['source']}: {e}") from None
            for row, answer in zip(chunk, _answer(model, tokenizer, prompts, args)):
                out.write(json.dumps({"prompt": row["prompt"], "images": row["images"], "answer": answer}) + "\n")
            out.flush()
    return 0
