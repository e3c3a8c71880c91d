"""Next-token selection on device: greedy, top-k / top-p filtering, temperature, sampling.

Upstream nanoVLM's order and semantics (`models/utils.py: top_k_top_p_filtering` and
`generate`): filter the logits (top-k first, then top-p on the filtered logits), THEN divide
by the temperature, softmax and draw. Greedy is the argmax of the unfiltered logits.
Shapes: B batch, V vocabulary, k = top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_top_p_filtering(
    logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0, filter_value: float = -jnp.inf
) -> jax.Array:
    """float[B, V] -> float[B, V] with the removed entries set to `filter_value`.

    top_k (a static int, 0 = off): remove every logit strictly below the k-th largest
      (ties with it stay), as `logits < torch.topk(logits, k)[0][..., -1]` does.
    top_p (a Python float >= 1 = off; a traced value is always applied): on the top-k-filtered
      logits, sorted descending, remove the entries whose cumulative softmax probability is
      > top_p, always keeping the first. This is upstream nanoVLM's rule, which also removes
      the token that crosses top_p (Hugging Face's version shifts the mask right by one).

    The cumulative probabilities are non-decreasing, so the kept entries are a prefix of the
    sorted order: the result keeps every logit >= the value at the end of that prefix. That
    equals upstream's kept set whenever no other logit ties with that value (with ties
    upstream's choice depends on its unstable sort). With top_k > 0 only the k largest are
    sorted (`lax.top_k`); with top_k = 0 the whole row is sorted, which XLA:CPU does slowly, so
    prefer a top_k with top_p.
    """
    V = logits.shape[-1]
    top_k = min(int(top_k), V)
    apply_top_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
    sorted_logits = None
    if top_k > 0:
        sorted_logits = jax.lax.top_k(logits, top_k)[0]  # (B, k), descending
        logits = jnp.where(logits < sorted_logits[..., -1:], filter_value, logits)
    if apply_top_p:
        if sorted_logits is None:
            sorted_logits = -jnp.sort(-logits, axis=-1)  # (B, V), descending
        # softmax over the whole filtered row (entries tied with the k-th value included),
        # evaluated at the sorted values: exp(x - max) / sum(exp(row - max)), as torch does.
        top = sorted_logits[..., :1]
        denom = jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)
        cumulative = jnp.cumsum(jnp.exp(sorted_logits - top) / denom, axis=-1)
        n_keep = jnp.maximum(jnp.sum(cumulative <= top_p, axis=-1, keepdims=True), 1)  # (B, 1)
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, filter_value, logits)
    return logits


def select_next_token(
    logits: jax.Array,
    key: jax.Array | None,
    *,
    greedy: bool,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """float[B, V] -> int32[B]: argmax when `greedy` (first index on ties, like torch.argmax),
    else a draw from softmax(top_k_top_p_filtering(logits) / temperature) with `key`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = top_k_top_p_filtering(logits.astype(jnp.float32), top_k, top_p)
    return jax.random.categorical(key, filtered / temperature, axis=-1).astype(jnp.int32)
