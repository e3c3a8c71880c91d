"""A float64 numpy oracle of nanoVLM, written from the reference spec
(`docs/nanovlm-reference.md`, section 1) and not from `torch_ref`: each function follows one
sentence of the spec as literally as numpy allows, favouring obvious loops over clever reshapes.

Weights come as a dict {checkpoint/state-dict key: float64 array in torch layout}
([out, in] for Linear, [out, in, kh, kw] for Conv2d). With tied weights the file stores the
shared table once, as `decoder.head.weight`; `token_embedding` falls back to it.

Shapes: B batch, T sequence, N patches, D vision width, H language width, V vocabulary,
P patch size, s shuffle factor, L image tokens per image, hd head dim.
"""

from __future__ import annotations

import math

import numpy as np

# The padding bias: torch.finfo(float32).min *added* to masked keys (not -inf).
F32_MIN = float(np.finfo(np.float32).min)


def linear(x, w, b=None):
    """torch Linear: y = x W^T + b, W [out, in]."""
    y = x @ w.T
    return y if b is None else y + b


# ---- vision encoder -----------------------------------------------------------------------------
def patch_embedding(images, conv_w, conv_b, pos):
    """Conv2d(3, D, kernel P, stride P, valid, bias) as explicit patch extraction, flattened in
    row-major patch order, plus the [1, N, D] position embedding.
    images [n, 3, S, S] -> [n, N, D]."""
    n, c, S, _ = images.shape
    D, _, P, _ = conv_w.shape
    g = S // P
    out = np.zeros((n, g * g, D))
    for r in range(g):
        for col in range(g):
            patch = images[:, :, r * P : (r + 1) * P, col * P : (col + 1) * P]  # [n, 3, P, P]
            out[:, r * g + col] = np.einsum("nchw,dchw->nd", patch, conv_w) + conv_b
    return out + pos


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(s):
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    return e / e.sum(-1, keepdims=True)


def scaled_dot_product(q, k, v, bias=None):
    """q [B, h, Tq, hd], k/v [B, h, Tk, hd]; softmax(q k^T / sqrt(hd) + bias) v."""
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    return softmax(s) @ v


def split_heads(x, n_heads):
    B, T, C = x.shape
    return x.reshape(B, T, n_heads, C // n_heads).transpose(0, 2, 1, 3)  # [B, h, T, hd]


def merge_heads(y):
    B, h, T, hd = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, h * hd)


def vit_attention(x, sd, p, n_heads):
    """Fused qkv (split q, k, v in that order), bidirectional, out_proj; all with bias."""
    D = x.shape[-1]
    qkv = linear(x, sd[f"{p}.qkv_proj.weight"], sd[f"{p}.qkv_proj.bias"])
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    y = scaled_dot_product(split_heads(q, n_heads), split_heads(k, n_heads), split_heads(v, n_heads))
    return linear(merge_heads(y), sd[f"{p}.out_proj.weight"], sd[f"{p}.out_proj.bias"])


def vit_block(x, sd, p, cfg):
    eps = cfg.vit_ln_eps
    x = x + vit_attention(
        layer_norm(x, sd[f"{p}.ln1.weight"], sd[f"{p}.ln1.bias"], eps), sd, f"{p}.attn", cfg.vit_n_heads
    )
    h = layer_norm(x, sd[f"{p}.ln2.weight"], sd[f"{p}.ln2.bias"], eps)
    h = linear(
        gelu_tanh(linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
        sd[f"{p}.mlp.fc2.weight"],
        sd[f"{p}.mlp.fc2.bias"],
    )
    return x + h


def vit(images, sd, cfg, p="vision_encoder"):
    """images [n, 3, S, S] in [0, 1] (no normalisation) -> [n, N, D]."""
    x = patch_embedding(
        images,
        sd[f"{p}.patch_embedding.conv.weight"],
        sd[f"{p}.patch_embedding.conv.bias"],
        sd[f"{p}.patch_embedding.position_embedding"],
    )
    for i in range(cfg.vit_n_blocks):
        x = vit_block(x, sd, f"{p}.blocks.{i}", cfg)
    return layer_norm(x, sd[f"{p}.layer_norm.weight"], sd[f"{p}.layer_norm.bias"], cfg.vit_ln_eps)


# ---- modality projector -------------------------------------------------------------------------
def pixel_shuffle(x, s):
    """[B, N, D] -> [B, N/s^2, s*s*D]. The spec's view/reshape/permute(0, 1, 3, 2, 4, 5)/reshape,
    written as the index map it implies: output token (i, j) of the (h/s) x (w/s) grid holds, in
    order di = 0..s-1, dj = 0..s-1, the patch (i*s + di, j*s + dj) of the h x w grid."""
    B, N, D = x.shape
    side = int(round(math.sqrt(N)))
    assert side * side == N and side % s == 0
    g = side // s
    out = np.zeros((B, g * g, s * s * D), dtype=x.dtype)
    for i in range(g):
        for j in range(g):
            for di in range(s):
                for dj in range(s):
                    out[:, i * g + j, (di * s + dj) * D : (di * s + dj + 1) * D] = x[
                        :, (i * s + di) * side + (j * s + dj)
                    ]
    return out


def projector(x, sd, cfg, p="MP"):
    """[n, N, D] -> [n, L, H] by `cfg.mp_type` (None: nanoVLM's pixel shuffle + linear)."""
    kind = cfg.mp_type or "pixel_shuffle_linear"
    if kind == "mlp":
        return mlp_projector(x, sd, cfg, p)
    if kind == "resampler":
        return perceiver_resampler(x, sd, cfg, p)
    return linear(pixel_shuffle(x, cfg.mp_pixel_shuffle_factor), sd[f"{p}.proj.weight"])


def gelu_erf(x):
    """The exact GELU, x * Phi(x), Phi the standard normal CDF."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def mlp_projector(x, sd, cfg, p="MP"):
    """LLaVA-1.5's projector after the pixel shuffle: Linear, exact GELU, Linear (with biases)."""
    h = linear(pixel_shuffle(x, cfg.mp_pixel_shuffle_factor), sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"])
    return linear(gelu_erf(h), sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"])


def perceiver_resampler(x, sd, cfg, p="MP", eps=1e-5):
    """Flamingo's Perceiver resampler, one image and one head at a time: Q learned queries; per
    layer, each query attends (softmax(q k / sqrt(hd))) over the layer-normed features followed by
    the layer-normed queries themselves, then an MLP (Linear 4x, exact GELU, Linear), both
    residual; then a LayerNorm and the projection to the language width. No linear biases."""
    media_all = pixel_shuffle(x, cfg.mp_pixel_shuffle_factor)  # [n, M, C]
    n, M, C = media_all.shape
    nh = cfg.vit_n_heads
    hd = C // nh
    out = []
    for i in range(n):
        lat = sd[f"{p}.latents"].copy()  # [Q, C]
        for layer in range(cfg.mp_resampler_layers):
            b = f"{p}.blocks.{layer}"
            m = layer_norm(media_all[i], sd[f"{b}.ln_media.weight"], sd[f"{b}.ln_media.bias"], eps)
            q_in = layer_norm(lat, sd[f"{b}.ln_latents.weight"], sd[f"{b}.ln_latents.bias"], eps)
            kv = np.concatenate([m, q_in], axis=0)  # [M + Q, C]
            q = linear(q_in, sd[f"{b}.attn.q_proj.weight"])
            k = linear(kv, sd[f"{b}.attn.k_proj.weight"])
            v = linear(kv, sd[f"{b}.attn.v_proj.weight"])
            heads = []
            for h in range(nh):
                sl = slice(h * hd, (h + 1) * hd)
                heads.append(softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd)) @ v[:, sl])
            lat = lat + linear(np.concatenate(heads, axis=1), sd[f"{b}.attn.out_proj.weight"])
            h_in = layer_norm(lat, sd[f"{b}.ln_mlp.weight"], sd[f"{b}.ln_mlp.bias"], eps)
            lat = lat + linear(gelu_erf(linear(h_in, sd[f"{b}.mlp.fc1.weight"])), sd[f"{b}.mlp.fc2.weight"])
        lat = layer_norm(lat, sd[f"{p}.layer_norm.weight"], sd[f"{p}.layer_norm.bias"], eps)
        out.append(linear(lat, sd[f"{p}.proj.weight"]))
    return np.stack(out)


# ---- language decoder ---------------------------------------------------------------------------
def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_inv_freq(head_dim, base):
    """1 / base^(arange(0, hd, 2) / hd)."""
    return 1.0 / (float(base) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rope_cos_sin(positions, inv_freq, max_position_embeddings, attn_scaling):
    """positions int[B, T] -> cos, sin [B, T, hd]: cat(freqs, freqs) (rotate-half convention),
    times attn_scaling. When the largest position + 1 exceeds max_position_embeddings, inv_freq
    is divided by (max_pos + 1) / max_position_embeddings (upstream's rescale)."""
    max_seq = int(np.max(positions)) + 1
    if max_seq > max_position_embeddings:
        inv_freq = inv_freq / (max_seq / max_position_embeddings)
    freqs = np.asarray(positions, np.float64)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb) * attn_scaling, np.sin(emb) * attn_scaling


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, h, T, hd]; cos/sin [B, T, hd] broadcast over heads."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def decoder_bias(attention_mask, T):
    """[B, 1, T, T]: -inf above the diagonal (causal) plus finfo(float32).min on padded keys."""
    causal = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], 0.0, -np.inf)  # [Tq, Tk]
    bias = causal[None, None]
    if attention_mask is not None:
        pad = (1.0 - np.asarray(attention_mask, np.float64)[:, :T]) * F32_MIN  # [B, Tk]
        bias = bias + pad[:, None, None, :]
    return bias


def gqa_attention(x, sd, p, cfg, cos, sin, attention_mask):
    """q/k/v/out projections without bias, RoPE on q and k, kv head j serving the n_heads/kv
    consecutive query heads j*g .. j*g+g-1 (repeat_interleave), causal, scale 1/sqrt(hd)."""
    T = x.shape[1]
    q = split_heads(linear(x, sd[f"{p}.q_proj.weight"]), cfg.lm_n_heads)
    k = split_heads(linear(x, sd[f"{p}.k_proj.weight"]), cfg.lm_n_kv_heads)
    v = split_heads(linear(x, sd[f"{p}.v_proj.weight"]), cfg.lm_n_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    g = cfg.lm_n_heads // cfg.lm_n_kv_heads
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # repeat_interleave on the head axis
    y = scaled_dot_product(q, k, v, decoder_bias(attention_mask, T))
    return linear(merge_heads(y), sd[f"{p}.out_proj.weight"])


def decoder_mlp(x, sd, p):
    gate = linear(x, sd[f"{p}.gate_proj.weight"])
    silu = gate / (1.0 + np.exp(-gate))
    return linear(silu * linear(x, sd[f"{p}.up_proj.weight"]), sd[f"{p}.down_proj.weight"])


def decoder_block(x, sd, p, cfg, cos, sin, attention_mask):
    eps = cfg.lm_rms_eps
    x = x + gqa_attention(rms_norm(x, sd[f"{p}.norm1.weight"], eps), sd, f"{p}.attn", cfg, cos, sin, attention_mask)
    return x + decoder_mlp(rms_norm(x, sd[f"{p}.norm2.weight"], eps), sd, f"{p}.mlp")


def decoder(x, sd, cfg, attention_mask=None, p="decoder"):
    """Embeddings [B, T, H] at positions 0..T-1 (every row, whatever the padding) -> hidden [B, T, H]."""
    B, T, _ = x.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    cos, sin = rope_cos_sin(
        positions, sd[f"{p}.rotary_embd.inv_freq"], cfg.lm_max_position_embeddings, cfg.lm_attn_scaling
    )
    for i in range(cfg.lm_n_blocks):
        x = decoder_block(x, sd, f"{p}.blocks.{i}", cfg, cos, sin, attention_mask)
    return rms_norm(x, sd[f"{p}.norm.weight"], cfg.lm_rms_eps)


def token_embedding_table(sd, p="decoder"):
    """The embedding table; tied checkpoints store it only as the head."""
    return sd.get(f"{p}.token_embedding.weight", sd[f"{p}.head.weight"])


# ---- the whole model ----------------------------------------------------------------------------
def image_token_id(cfg):
    """Extra tokens follow the base vocabulary in their dict order."""
    return cfg.lm_base_vocab_size + [name for name, _ in cfg.vlm_extra_tokens].index("image_token")


def embed(input_ids, images, sd, cfg):
    """Token embeddings with every image-token position overwritten, in row-major order over the
    batch, by the projected images flattened to [n_img * L, H]."""
    x = token_embedding_table(sd)[np.asarray(input_ids)].copy()
    if images is None:
        assert not (np.asarray(input_ids) == image_token_id(cfg)).any()
        return x
    img = projector(vit(np.asarray(images, np.float64), sd, cfg), sd, cfg)  # [n, L, H]
    flat = img.reshape(-1, img.shape[-1])
    k = 0
    B, T = input_ids.shape
    for b in range(B):
        for t in range(T):
            if input_ids[b, t] == image_token_id(cfg):
                x[b, t] = flat[k]
                k += 1
    assert k == flat.shape[0], f"{k} image-token positions for {flat.shape[0]} image embeddings"
    return x


def vlm_logits(sd, cfg, input_ids, images=None, attention_mask=None):
    """Logits [B, T, V] = head(decoder(embed(...))); the head is `decoder.head.weight` (tied: the
    embedding table itself)."""
    hidden = decoder(embed(input_ids, images, sd, cfg), sd, cfg, attention_mask)
    return linear(hidden, sd["decoder.head.weight"])


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean token cross-entropy over targets != ignore_index (no shift: labels come shifted)."""
    logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    targets = np.asarray(targets).reshape(-1)
    valid = targets != ignore_index
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    nll = logz[valid] - logits[valid, targets[valid]]
    return nll.mean()
