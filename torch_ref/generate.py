"""Autoregressive generation in eager PyTorch with a KV cache (upstream `VisionLanguageModel.generate`).

The reference that `jaxvlm.generate` is tested against: same signature, same semantics.
Shapes: B batch, T prompt length, N max_new_tokens, V vocabulary, N_img images, S image side.

Semantics (upstream's, on purpose):
- prefill the whole (left-padded) prompt at positions 0..T-1 for every row, whatever its
  padding; then one token at a time at positions T, T+1, ..., the attention mask extended
  with ones for each generated token; the cache is upstream's growing concatenation;
- greedy = argmax (first index on ties); otherwise `top_k_top_p_filtering` on the logits,
  THEN divide by the temperature, softmax and draw (`torch.multinomial`);
- everything after a row's first `eos_token_id` is set to `eos_token_id`. Unlike upstream,
  decoding stops as soon as every row has emitted it (the result is the same).
"""

from __future__ import annotations

import torch

from conversion.generation import check_generation_args


def top_k_top_p_filtering(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, filter_value: float = -float("inf")
) -> torch.Tensor:
    """float[B, V] -> float[B, V] with removed entries set to `filter_value` (upstream's rule).

    top-k (k > 0): remove every logit strictly below the k-th largest (ties with it stay).
    top-p (p < 1), on the top-k-filtered logits: sort descending, remove the entries whose
    cumulative softmax probability is > p, but always keep the first. Note that this is
    upstream nanoVLM's rule, which also removes the token that crosses p (HF's shifts by one).
    """
    top_k = min(top_k, logits.size(-1))
    if top_k > 0:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative > top_p
        sorted_remove[..., 0] = False
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def replace_after_eos(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """int[B, N]: every token after a row's first EOS becomes EOS (upstream's post-processing)."""
    if eos_token_id is None or tokens.numel() == 0:
        return tokens
    is_eos = (tokens == eos_token_id).long()
    after_first = (is_eos.cumsum(dim=1) - is_eos) > 0  # an EOS strictly before this column
    return tokens.masked_fill(after_first, eos_token_id)


@torch.no_grad()
def generate(
    model,
    input_ids,
    images,
    attention_mask=None,
    *,
    max_new_tokens: int = 5,
    greedy: bool = False,
    temperature: float = 0.5,
    top_k: int = 50,
    top_p: float = 0.9,
    eos_token_id: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
):
    """New tokens int64[B, N] (and, with return_logits, float32[B, N, V]: the logits each token was
    chosen from, before filtering).

    Args:
      model: a `torch_ref.VisionLanguageModel`.
      input_ids: int[B, T], left-padded. images: float[N_img, 3, S, S] in [0, 1], or None; their
        count must match the prompt's image tokens (ValueError otherwise).
      attention_mask: int[B, T], 1 real / 0 padding, or None (no padding).
      max_new_tokens: N. T + N must not exceed `cfg.lm_max_length`.
      greedy, temperature, top_k, top_p: see the module docstring (upstream's defaults).
      eos_token_id: rows stop at it and are filled with it afterwards; None = never stop.
      seed: seeds the `torch.Generator` that draws the samples.
    """
    from .vision_language_model import _as_tensor

    device = model.decoder.token_embedding.weight.device
    dtype = model.decoder.token_embedding.weight.dtype
    input_ids = _as_tensor(input_ids, torch.long, device)
    images = _as_tensor(images, dtype, device)
    attention_mask = _as_tensor(attention_mask, torch.long, device)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be int[B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    check_generation_args(
        model.cfg, T, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p
    )
    gen = torch.Generator(device=device).manual_seed(seed)

    embd = model.embed(input_ids, images)  # images encoded once (and the image-token count checked)
    hidden, cache = model.decoder(embd, attention_mask=attention_mask)
    logits = model.decoder.head(hidden[:, -1]).float()  # (B, V)

    tokens, all_logits = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if step > 0:
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            x = model.decoder.token_embedding(tokens[-1])
            hidden, cache = model.decoder(x, attention_mask=attention_mask, kv_cache=cache, start_pos=T + step - 1)
            logits = model.decoder.head(hidden[:, -1]).float()
        if greedy:
            tok = logits.argmax(dim=-1, keepdim=True)
        else:
            filtered = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
            probs = torch.softmax(filtered / temperature, dim=-1)
            tok = torch.multinomial(probs, num_samples=1, generator=gen)
        tokens.append(tok)
        all_logits.append(logits)
        if eos_token_id is not None:
            done |= tok[:, 0] == eos_token_id
            if bool(done.all()):
                break
    fill = 0 if eos_token_id is None else eos_token_id
    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
    if tokens:
        out[:, : len(tokens)] = torch.cat(tokens, dim=1)
    out = replace_after_eos(out, eos_token_id)
    if not return_logits:
        return out
    out_logits = torch.zeros(B, max_new_tokens, logits.shape[-1] if tokens else model.cfg.lm_vocab_size, device=device)
    if all_logits:
        out_logits[:, : len(all_logits)] = torch.stack(all_logits, dim=1)
    return out, out_logits
