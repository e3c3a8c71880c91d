"""Attention probabilities of torch_ref's decoder and ViT, and ViT attention rollout: the
twin of `jaxvlm/attention_maps.py` (same names; the image-side mapping and the PNG live there).

The model's blocks run as in `forward`; at each layer the probabilities
softmax(q k^T / sqrt(hd) + bias) are recomputed from the q and k the block projects, with the
masks `torch_ref.attention.attention` applies (finfo.min added on padded keys, -inf on future
keys; grouped-query heads by `repeat_interleave`).

Shapes: B batch, T sequence, n_l layers, nh heads, N_img images (tiles), N patches per tile.
"""

from __future__ import annotations

import math

import torch

from .vision_language_model import _as_tensor


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q float[B, nh, T, hd], k float[B, nkv, T, hd] (self-attention), attention_mask int[B, T]
    or None -> float[B, nh, T, T]."""
    B, nh, T, hd = q.shape
    k = k.repeat_interleave(nh // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if attention_mask is not None:
        keep = attention_mask[:, :T].to(q.dtype)
        logits = logits + ((1.0 - keep) * torch.finfo(q.dtype).min)[:, None, None, :]
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def decoder_attention(model, input_ids, attention_mask=None, images=None) -> torch.Tensor:
    """The decoder's attention probabilities float[n_l, B, nh, T, T] (layer, row, head, query,
    key) for `model(input_ids, images, attention_mask)`'s forward."""
    weight = model.decoder.token_embedding.weight
    input_ids = _as_tensor(input_ids, torch.long, weight.device)
    images = _as_tensor(images, weight.dtype, weight.device)
    attention_mask = _as_tensor(attention_mask, torch.long, weight.device)
    decoder = model.decoder
    x = model.embed(input_ids, images)
    B, T, _ = x.shape
    cos, sin = decoder.rotary_embd(torch.arange(T, device=x.device)[None].expand(B, -1))
    weights = []
    for block in decoder.blocks:
        q, k, _ = block.attn.project_qkv(block.norm1(x), cos, sin)
        weights.append(attention_probabilities(q, k, causal=True, attention_mask=attention_mask))
        x, _ = block(x, cos, sin, attention_mask)
    return torch.stack(weights)


@torch.no_grad()
def vit_attention(model, images) -> torch.Tensor:
    """The ViT's attention probabilities float[n_l, N_img, nh, N, N] for images float[N_img, 3, S, S]."""
    vit = model.vision_encoder
    weight = vit.patch_embedding.conv.weight
    images = _as_tensor(images, weight.dtype, weight.device)
    x = vit.patch_embedding(vit.normalise(images))
    weights = []
    for block in vit.blocks:
        q, k, _ = block.attn.project_qkv(block.ln1(x))
        weights.append(attention_probabilities(q, k, causal=False))
        x = block(x)
    return torch.stack(weights)


def attention_rollout(vit_weights: torch.Tensor) -> torch.Tensor:
    """Abnar & Zuidema's rollout float64[N_img, N, N] from float[n_l, N_img, nh, N, N]: per
    layer the head mean A, 0.5 A + 0.5 I with rows renormalised, multiplied first layer to last."""
    w = vit_weights.double().mean(dim=2)
    eye = torch.eye(w.shape[-1], dtype=w.dtype)
    rollout = eye.expand(w.shape[1:]).clone()
    for layer in w:
        a = 0.5 * layer + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout
