"""`jaxvlm eval`: loss and exact-match accuracy of greedy answers on a dataset split, and the
batched greedy decoding that the benchmarks (`jaxvlm.benchmarks`) share."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from conversion.recipe import IGNORE_INDEX


def normalise(text: str) -> str:
    """Exact match ignores case, surrounding whitespace and trailing punctuation."""
    return re.sub(r"[\s.!?,;:]+$", "", text.strip().lower())


def qa_pairs(dataset) -> list[tuple[dict, str]]:
    """(generation prompt, expected answer) for every sample: the first user turn and the first
    assistant answer. Synthetic datasets provide them directly."""
    if hasattr(dataset, "prompt") and hasattr(dataset, "answer"):
        return [(dataset.prompt(i), dataset.answer(i)) for i in range(len(dataset))]
    pairs = []
    for rec in dataset.records:
        user = next(m["content"] for m in rec.messages if m["role"] == "user")
        answer = next(m["content"] for m in rec.messages if m["role"] == "assistant")
        pairs.append((dataset.encoder.encode_prompt(rec.images, user), answer))
    return pairs


def left_pad(prompts: list[dict], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    T = max(len(p["input_ids"]) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        n = len(p["input_ids"])
        ids[b, T - n :], mask[b, T - n :] = p["input_ids"], 1
    tiles = [p["images"] for p in prompts if p["images"].shape[0]]
    return ids, mask, np.concatenate(tiles) if tiles else None


def greedy_answers(
    model, tokenizer, prompts: list[dict], *, batch_size: int = 32, max_new_tokens: int = 16
) -> list[str]:
    """The decoded greedy answer to each prompt (`SampleEncoder.encode_prompt` dicts), generated
    batch_size prompts at a time, left-padded; EOS and special tokens dropped."""
    from .generate import generate

    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask, images = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
        out = np.asarray(
            generate(
                model,
                ids,
                images,
                mask,
                max_new_tokens=max_new_tokens,
                greedy=True,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        for row in out:
            texts.append(
                tokenizer.decode([t for t in row.tolist() if t != tokenizer.eos_token_id], skip_special_tokens=True)
            )
    return texts


def exact_match(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    limit: int | None = None,
    show: int = 0,
) -> dict[str, Any]:
    """Greedy answers for the dataset's prompts; the share equal to the expected answers."""
    pairs = qa_pairs(dataset)[:limit]
    t0 = time.perf_counter()
    texts = greedy_answers(
        model, tokenizer, [p for p, _ in pairs], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    correct, examples = 0, []
    for text, (_, expected) in zip(texts, pairs):
        ok = normalise(text) == normalise(expected)
        correct += ok
        if len(examples) < show:
            examples.append({"expected": expected, "got": text, "ok": bool(ok)})
    return {
        "exact_match": correct / len(pairs),
        "n": len(pairs),
        "examples": examples,
        "time_s": time.perf_counter() - t0,
    }


def mean_loss(model, loader, *, max_batches: int | None = None) -> float:
    """Token-weighted mean cross-entropy over the loader's batches (one epoch, or max_batches)."""
    import jax

    from .vision_language_model import forward

    @jax.jit
    def sums(logits, labels):
        valid = labels != IGNORE_INDEX
        logp = jax.nn.log_softmax(logits.astype("float32"), axis=-1)
        nll = -jax.numpy.take_along_axis(logp, jax.numpy.where(valid, labels, 0)[..., None], -1)[..., 0]
        return jax.numpy.sum(jax.numpy.where(valid, nll, 0.0)), jax.numpy.sum(valid)

    total, count = 0.0, 0
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        logits = forward(model, batch["input_ids"], batch["images"], batch["attention_mask"])
        s, n = sums(logits, batch["labels"])
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)
