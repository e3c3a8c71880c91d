"""Attention's semantics in jaxvlm: the additive mask every attention kernel applies.

The ViT (bidirectional) and the decoder (causal, grouped-query, padding mask, KV cache) call
one attention function, `kernels.attention` (`jaxvlm.kernels`: the implementation chosen for
the backend); both implementations take their mask from `attention_bias` here. Mirrors
`torch_ref/attention.py`.

Shapes: B batch, Tq query length, Tk key length, nh query heads, nkv key/value heads, hd head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# What a padded key gets added to its logit: finite in bfloat16 too
# (finfo(float32).min rounds to -inf in bfloat16, and -inf + -inf rows give NaN), and so large
# that any logit added to it rounds to it: a query whose visible keys are all padding attends
# uniformly over them, and exp(MASK_VALUE - max) is exactly 0 in a row with a real key.
MASK_VALUE = -1e30


def padding_bias(attention_mask: jax.Array, k_len: int, dtype=jnp.float32) -> jax.Array:
    """[B, 1, 1, Tk] in `dtype`: 0 for real keys, MASK_VALUE for padded ones (mask 0)."""
    keep = attention_mask[:, :k_len].astype(bool)
    return jnp.where(keep, 0.0, MASK_VALUE).astype(dtype)[:, None, None, :]


def segment_bias(segment_ids: jax.Array, q_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """[B, 1, Tq, Tk] float32: 0 where query and key belong to the same packed sample, -inf where
    not. `segment_ids` int[B, Tk] numbers the samples of each row (0 = padding, 1, 2, ... the
    samples packed into it); query i is the key at position q_offset + i."""
    q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, q_len, axis=1)
    same = q_seg[:, :, None] == segment_ids[:, None, :]
    return jnp.where(same, 0.0, -jnp.inf)[:, None]


def attention_bias(
    attention_mask: jax.Array | None,
    *,
    causal: bool,
    q_len: int,
    k_len: int,
    q_offset: jax.Array | int = 0,
    segment_ids: jax.Array | None = None,
) -> jax.Array | None:
    """Additive float32 bias [B or 1, 1, Tq, Tk] with upstream's semantics, or None.

    Padded keys (mask 0) get MASK_VALUE *added* (finite, not -inf), and the causal mask is -inf
    on top: a query whose visible keys are all padding then attends uniformly over its causal
    window, exactly as PyTorch's SDPA does for upstream (finfo.min there), instead of producing
    NaN; the bias keeps this meaning when cast to bfloat16.

    Example, Tq = Tk = 3, mask [0, 1, 1] (one left pad), m = MASK_VALUE:
        [[m, -inf, -inf],
         [m,    0, -inf],
         [m,    0,    0]]
    `q_offset` is the position of the first query among the keys (a traced value in decoding):
    query i sees keys j <= q_offset + i.

    `segment_ids` int[B, Tk] (packed rows, see `segment_bias`): a query also sees only the keys
    of its own sample, -inf on the others (block-diagonal causal attention). Every real query
    sees itself, so no row is all -inf; padding (segment 0) sees padding only, as without it.
    """
    bias = None
    if attention_mask is not None:
        bias = padding_bias(attention_mask, k_len)  # (B, 1, 1, Tk)
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + q_offset
        allowed = jnp.arange(k_len)[None, :] <= q_pos  # (Tq, Tk)
        causal_bias = jnp.where(allowed, 0.0, -jnp.inf)[None, None]
        bias = causal_bias if bias is None else bias + causal_bias
    if segment_ids is not None:
        seg = segment_bias(segment_ids[:, :k_len], q_len, q_offset)
        bias = seg if bias is None else bias + seg
    return bias
