"""The one attention function of torch_ref, used by the ViT (bidirectional, fused qkv) and the
decoder (causal, grouped-query, padding mask, KV cache).

Shapes: B batch, nh query heads, nkv key/value heads, Tq query length, Tk key length, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with upstream nanoVLM's masking semantics.

    Args:
      q: float[B, nh, Tq, hd]; k, v: float[B, nkv, Tk, hd] with nh % nkv == 0. Key head j
        serves query heads j*g .. j*g+g-1 (g = nh/nkv), i.e. `repeat_interleave`.
      causal: query i (the last Tq of Tk positions) sees keys <= Tk - Tq + i.
      attention_mask: int/bool[B, >= Tk], 1 = real token, 0 = padding. Padded keys get
        finfo.min added on top of the causal mask, as upstream does, so a row whose keys
        are all padding attends uniformly over its causal window instead of giving NaN.
      segment_ids: int[B, >= Tk] or None, for rows packing several samples: 0 padding, 1, 2, ...
        one id per sample. A query sees only the keys of its own sample (-inf on the others):
        block-diagonal causal attention. (Not in upstream, which lets packed samples see each
        other; jaxvlm's `segment_bias` is the same.)
    Returns:
      float[B, nh, Tq, hd]. Scale is 1/sqrt(hd).
    """
    B, nh, Tq, hd = q.shape
    Tk = k.shape[2]
    groups = nh // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, Tk, hd)
        v = v.repeat_interleave(groups, dim=1)
    bias = None
    if attention_mask is not None:
        keep = attention_mask[:, :Tk].to(q.dtype)
        bias = ((1.0 - keep) * torch.finfo(q.dtype).min)[:, None, None, :]  # (B, 1, 1, Tk)
    if segment_ids is not None:
        seg = segment_ids[:, :Tk]
        same = seg[:, Tk - Tq :, None] == seg[:, None, :]  # (B, Tq, Tk): queries are the last Tq keys
        seg_bias = torch.zeros(same.shape, dtype=q.dtype, device=q.device).masked_fill(~same, float("-inf"))[:, None]
        bias = seg_bias if bias is None else bias + seg_bias
    if causal and Tq == Tk and Tq > 1 and segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    if causal and Tq == Tk and Tq > 1:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        bias = bias.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if causal and Tq > 1:  # a chunk appended to a cache: causal window aligned to the end
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        causal_bias = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = causal_bias if bias is None else bias + causal_bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
