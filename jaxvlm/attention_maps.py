"""What the model looks at: attention probabilities, image-token maps and ViT attention rollout.

Nothing here runs in training or generation: the functions run the model's own blocks again
and, at each layer, recompute the probabilities softmax(q k^T / sqrt(hd) + bias) from the q and
k that block projects, with the bias the model uses (`jaxvlm.attention.attention_bias`: causal,
left padding; grouped-query heads expanded as the kernels group them). Mirrors
`torch_ref/attention_maps.py` (same names).

Shapes: B batch, T sequence, n_l layers, nh heads, N_img images (tiles), N = side^2 patches per
tile, s pixel-shuffle factor, g = side / s, L = g^2 image tokens per tile, n_h x n_w the tile grid.

    weights = decoder_attention(model, input_ids, attention_mask, images)  # [n_l, B, nh, T, T]
    heat = image_token_map(weights, input_ids, model.cfg, grid, query=T - 1)  # [n_h*side, n_w*side]
    rollout = attention_rollout(vit_attention(model, images))                  # [N_img, N, N]

Conventions:
- Rows are queries, columns keys; a row of a real token sums to 1 and gives exactly 0 to
  padded keys and to future keys. A padded query's row is what the model computes for it
  (uniform over its causal window of padding: `attention_bias`) and means nothing.
- Image-token maps are attention *mass*: each image token's weight is spread evenly over the
  patches it was made from (pixel shuffle: token (a, b) of a tile = its patch block
  rows a*s..a*s+s-1, columns b*s..b*s+s-1), each tile's patches are placed where the tile lies
  in the image, and a global view's (the whole image shrunk to one tile) over the whole image;
  views add up. The map sums to the attention the query gives the image's tokens.
- ViT rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): per layer
  the head-mean A, then 0.5 A + 0.5 I (the residual), rows renormalised, multiplied from the
  first layer to the last: R = A'_n ... A'_1, R[i, j] = how much patch j flows into output i.
  SigLIP has no CLS token to read a row from, so `rollout_relevance` takes the mean of R's rows
  (the flow into the mean-pooled output): one distribution over the tile's patches.
- The Perceiver resampler (`mp_type` "resampler") makes its image tokens from learned queries,
  not from patch blocks: image-token maps refuse it (ViT rollout still works).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.atomic import atomic_file
from conversion.config import VLMConfig

from .attention import attention_bias
from .vision_language_model import check_image_tokens


# ---- attention probabilities --------------------------------------------------------------------
def attention_probabilities(q: jax.Array, k: jax.Array, bias: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(hd) + bias) in float32: q [B, Tq, nh, hd], k [B, Tk, nkv, hd]
    (key head j serves query heads j*g .. j*g+g-1, g = nh/nkv), bias [B or 1, 1, Tq, Tk] or
    None -> float32[B, nh, Tq, Tk]."""
    groups = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, groups, axis=2)  # (B, Tk, nh, hd), torch's repeat_interleave
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return jax.nn.softmax(logits, axis=-1)


@nnx.jit
def _decoder_attention(model, input_ids, images, attention_mask):
    decoder = model.decoder
    x = model.embed(input_ids, images)  # (B, T, H)
    T = x.shape[1]
    cos, sin = decoder.rotary_embd(jnp.arange(T)[None])  # upstream's positions 0..T-1
    bias = attention_bias(attention_mask, causal=True, q_len=T, k_len=T)
    weights = []
    with decoder.options.precision():
        for block in decoder.blocks:
            q, k, _ = block.attn.project_qkv(block.norm1(x), cos, sin)
            weights.append(attention_probabilities(q, k, bias))
            x = block(x, cos, sin, attention_mask)
    return jnp.stack(weights)


def decoder_attention(model, input_ids, attention_mask=None, images=None) -> jax.Array:
    """The decoder's attention probabilities float32[n_l, B, nh, T, T] (layer, row, head, query, key).

    Args:
      model: a `jaxvlm.VisionLanguageModel`.
      input_ids: int[B, T], left-padded; attention_mask: int[B, T] (1 real, 0 padding) or None.
      images: float[N_img, 3, S, S] in [0, 1] or None; their count must match the image tokens.
    The same computation as `model(input_ids, images, attention_mask)` up to each block's
    softmax (jitted, one compile per shape)."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be int[B, T], got shape {tuple(input_ids.shape)}")
    images = None if images is None or np.shape(images)[0] == 0 else jnp.asarray(images, jnp.float32)
    check_image_tokens(input_ids, 0 if images is None else images.shape[0], model.cfg)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return _decoder_attention(model, input_ids, images, mask)


@nnx.jit
def _vit_attention(model, images):
    vit = model.vision_encoder
    weights = []
    with vit.options.precision():
        x = vit.patch_embedding(vit.normalise(images))
        for block in vit.blocks:
            q, k, _ = block.attn.project_qkv(block.ln1(x))
            weights.append(attention_probabilities(q, k, None))  # bidirectional, no padding
            x = block(x)
    return jnp.stack(weights)


def vit_attention(model, images) -> jax.Array:
    """The ViT's attention probabilities float32[n_l, N_img, nh, N, N] for images
    float[N_img, 3, S, S] in [0, 1] (normalised inside, as the model does)."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be float[N_img, 3, S, S], got shape {tuple(images.shape)}")
    return _vit_attention(model, images)


def attention_rollout(vit_weights) -> np.ndarray:
    """Abnar & Zuidema's rollout, float64[N_img, N, N] from float[n_l, N_img, nh, N, N] (see the
    module docstring): rows sum to 1."""
    w = np.asarray(vit_weights, np.float64).mean(axis=2)  # (n_l, N_img, N, N), heads averaged
    eye = np.eye(w.shape[-1])
    rollout = np.broadcast_to(eye, w.shape[1:]).copy()
    for layer in w:
        a = 0.5 * layer + 0.5 * eye
        a = a / a.sum(-1, keepdims=True)
        rollout = a @ rollout  # later layers on the left
    return rollout


def rollout_relevance(rollout) -> np.ndarray:
    """float[N_img, N, N] -> float64[N_img, side, side]: the mean of the rollout's rows (SigLIP
    has no CLS token), each tile's a distribution over its patches in row-major order."""
    r = np.asarray(rollout, np.float64).mean(axis=1)
    side = int(round(math.sqrt(r.shape[-1])))
    return r.reshape(r.shape[0], side, side)


# ---- from token weights to the image ------------------------------------------------------------
def select_weights(weights, *, batch_index: int = 0, query: int, layer: int | str = "mean", head: int | str = "mean"):
    """One query's weights over the keys, float64[T], from float[n_l, B, nh, T, T]: one layer or
    the mean over layers ("mean"), one head or the mean over heads ("mean")."""
    w = np.asarray(weights)
    n_layers, B, n_heads, T, _ = w.shape
    if not -T <= query < T:
        raise ValueError(f"query position {query} is outside the sequence of {T} tokens")
    if layer != "mean" and not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise ValueError(f"layer {layer!r}: the decoder has layers 0..{n_layers - 1} (or 'mean')")
    if head != "mean" and not (isinstance(head, int) and 0 <= head < n_heads):
        raise ValueError(f"head {head!r}: the decoder has heads 0..{n_heads - 1} (or 'mean')")
    w = w[:, batch_index, :, query].astype(np.float64)  # (n_l, nh, T)
    w = w.mean(axis=0) if layer == "mean" else w[layer]
    return w.mean(axis=0) if head == "mean" else w[head]


def image_token_weights(key_weights, input_ids, cfg: VLMConfig) -> np.ndarray:
    """A row's weights over the keys float[T] -> float64[n_tiles, g, g]: the weight of each
    image token, in the order the tiles' tokens appear (the k-th run of L image tokens is tile k),
    on each tile's token grid (token t at (t // g, t % g): pixel shuffle's row-major order)."""
    if getattr(cfg, "mp_type", None) == "resampler":
        raise ValueError(
            "mp_type 'resampler': the image tokens come from learned queries, not patch blocks, "
            "so they have no place on the image (the ViT rollout does)"
        )
    key_weights, input_ids = np.asarray(key_weights, np.float64), np.asarray(input_ids)
    if key_weights.shape != input_ids.shape or key_weights.ndim != 1:
        raise ValueError(f"key weights {key_weights.shape} and input_ids {input_ids.shape} must be one row of T")
    L = cfg.n_image_tokens
    g = int(round(math.sqrt(L)))
    w = key_weights[input_ids == cfg.image_token_id]
    if w.size % L:
        raise ValueError(f"{w.size} image tokens is not a whole number of tiles of {L}")
    return w.reshape(-1, g, g)


def tile_layout(cfg: VLMConfig, grid: tuple[int, int], n_tiles: int) -> list[tuple[int, int, int, int]]:
    """Where each of one image's tiles lies, in the tile grid's units: (row, col, rows, cols) per
    tile in token order. A split nanoVLM image is [global view, tiles row-major] (the global
    view dropped when the tokenizer has no global-image token), a split SmolVLM image [tiles
    row-major, global view] (`jaxvlm.image_processing`, `jaxvlm.smolvlm_processing`); an
    unsplit image is one tile covering everything."""
    n_h, n_w = grid
    whole = (0, 0, n_h, n_w)
    tiles = [(r, c, 1, 1) for r in range(n_h) for c in range(n_w)]
    if n_h * n_w == 1 and n_tiles == 1:
        return [whole]
    if n_tiles == n_h * n_w:
        return tiles
    if n_tiles != n_h * n_w + 1:
        raise ValueError(f"{n_tiles} tiles do not fit a {n_h}x{n_w} grid (with or without a global view)")
    return tiles + [whole] if cfg.vlm_family == "smolvlm" else [whole] + tiles


def compose(tile_maps, layout: Sequence[tuple[int, int, int, int]], side: int) -> np.ndarray:
    """Per-tile mass maps float[n_tiles, g, g] (g divides `side`, the tile's patch side) ->
    float64[n_h * side, n_w * side] over the image's patches: each cell's mass spread evenly
    over the patches (and, for a view covering several tiles, the tiles) it covers; views add
    up, so the map's sum is the maps' sum."""
    tile_maps = np.asarray(tile_maps, np.float64)
    if len(layout) != tile_maps.shape[0]:
        raise ValueError(f"{tile_maps.shape[0]} tile maps for a layout of {len(layout)} tiles")
    n_h = max(r + rows for r, _, rows, _ in layout)
    n_w = max(c + cols for _, c, _, cols in layout)
    g = tile_maps.shape[1]
    if side % g:
        raise ValueError(f"a {g}x{g} map does not divide a tile of {side}x{side} patches")
    f = side // g
    heat = np.zeros((n_h * side, n_w * side))
    for (r, c, rows, cols), m in zip(layout, tile_maps):
        heat[r * side : (r + rows) * side, c * side : (c + cols) * side] += np.kron(
            m, np.ones((f * rows, f * cols))
        ) / (f * rows * f * cols)
    return heat


def image_token_map(
    weights,
    input_ids,
    cfg: VLMConfig,
    grid: tuple[int, int] = (1, 1),
    *,
    query: int,
    batch_index: int = 0,
    layer: int | str = "mean",
    head: int | str = "mean",
) -> np.ndarray:
    """The attention of query position `query` of row `batch_index` over that row's image
    tokens, mapped onto the image's patches: float64[n_h * side, n_w * side] (attention mass per
    patch, see the module docstring). `weights` float[n_l, B, nh, T, T] (`decoder_attention`);
    the row must hold exactly one image, split into `grid` (its processor's (n_h, n_w))."""
    ids = np.asarray(input_ids)[batch_index]
    w = select_weights(weights, batch_index=batch_index, query=query, layer=layer, head=head)
    tiles = image_token_weights(w, ids, cfg)
    if tiles.shape[0] == 0:
        raise ValueError(f"row {batch_index} has no image tokens")
    return compose(tiles, tile_layout(cfg, grid, tiles.shape[0]), cfg.vit_img_size // cfg.vit_patch_size)


def rollout_map(rollout, cfg: VLMConfig, grid: tuple[int, int] = (1, 1)) -> np.ndarray:
    """One image's ViT rollout (float[n_tiles, N, N], its tiles in processor order) on the image:
    float64[n_h * side, n_w * side]. Each tile's relevance is a distribution over its own patches;
    the tiles' mosaic and the global view are each scaled to sum to 1 and averaged, so the fine
    tiles and the coarse whole image count equally (unsplit: the one tile's relevance)."""
    relevance = rollout_relevance(rollout)
    layout = tile_layout(cfg, grid, relevance.shape[0])
    side = relevance.shape[-1]
    fine = [i for i, t in enumerate(layout) if t[2:] == (1, 1)]
    coarse = [i for i, t in enumerate(layout) if t[2:] != (1, 1)]
    if not fine or not coarse:  # one tile, or tiles without a global view
        return compose(relevance, layout, side)
    heat = 0.0
    for view in (fine, coarse):
        part = compose(relevance[view], [layout[i] for i in view], side)
        heat = heat + part / part.sum() / 2
    return heat


# ---- the picture --------------------------------------------------------------------------------
def overlay(image, heat, *, alpha: float = 0.55, colormap: str = "inferno"):
    """The RGB PIL `image` with `heat` (float[h, w], any scale >= 0, covering the whole image)
    as a colour map over it, at the image's size: heat / max(heat), resized bilinearly."""
    from matplotlib import colormaps
    from PIL import Image

    heat = np.asarray(heat, np.float64)
    peak = heat.max()
    norm = (heat / peak if peak > 0 else heat).astype(np.float32)
    norm = np.asarray(Image.fromarray(norm, mode="F").resize(image.size, Image.Resampling.BILINEAR))
    colour = colormaps[colormap](np.clip(norm, 0.0, 1.0))[..., :3] * 255.0
    base = np.asarray(image.convert("RGB"), np.float64)
    out = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def save_png(picture, path: str | Path) -> None:
    """Write a PIL image as PNG, atomically (`conversion.atomic`)."""
    with atomic_file(path, "wb") as f:
        picture.save(f, format="PNG")
