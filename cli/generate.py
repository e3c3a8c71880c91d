"""`jaxvlm generate`: answer a prompt about images with a checkpoint (a directory or a Hub repo id), or a JSONL batch.

  jaxvlm generate --model DIR --image a.jpg [--image b.jpg] --prompt "What is this?"
  jaxvlm generate --model DIR --batch prompts.jsonl --out answers.jsonl

Batch rows are {"prompt": str, "images": [paths relative to the JSONL file]} (or "image": path);
each output row adds "answer". The tokenizer is the model directory's tokenizer.json unless
--tokenizer says otherwise; images go through the same processor as training.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from conversion.atomic import atomic_file, check_output_file
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
    g.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
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


def _answer(model, tokenizer, prompts: list[dict], args, stream=None) -> list[str]:
    from jaxvlm.evaluation import left_pad
    from jaxvlm.generate import generate

    ids, mask, images = left_pad(prompts, tokenizer.pad_token_id)
    out = generate(
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
    return [
        tokenizer.decode([t for t in row if t != tokenizer.eos_token_id], skip_special_tokens=True)
        for row in out.tolist()
    ]


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
    rows = _batch_rows(Path(args.batch)) if args.batch is not None else None
    model, tokenizer, encoder = _load(args)
    if args.prompt is not None:
        prompt = encoder.encode_prompt(args.image, args.prompt)
        _answer(model, tokenizer, [prompt], args, stream=TextStream(tokenizer))
        print(flush=True)
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
