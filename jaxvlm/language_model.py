"""Llama/SmolLM2-style decoder in Flax NNX; attribute paths identical to `torch_ref/language_model.py`.

Shapes: B batch, T sequence, H width, nh query heads, nkv kv heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.config import VLMConfig
from conversion.rope import rope_inv_freq

from .layers import linear, normal_002
from .options import ModelOptions
from .sharding import constrain, logical


class Buffer(nnx.Variable):
    """A non-trained array that is part of the checkpoint (torch's persistent buffer)."""


class RMSNorm(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((cfg.lm_hidden_dim,), options.param_dtype), **logical("norm"))
        self.eps = cfg.lm_rms_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class RotaryEmbedding(nnx.Module):
    """cos/sin for rotate-half RoPE. Past `lm_max_position_embeddings` the frequencies are divided
    by max_pos / lm_max_position_embeddings (upstream's rescale), selected with `jnp.where` so
    the same compiled code serves every position."""

    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions()):
        # Stored in the parameter dtype, as torch's `model.to(dtype)` converts buffers too; the
        # cos/sin are always computed in float32.
        self.inv_freq = Buffer(
            jnp.asarray(rope_inv_freq(cfg.lm_head_dim, cfg.lm_re_base), options.param_dtype), **logical(None)
        )
        self.original_max_seq_len = cfg.lm_max_position_embeddings
        self.attention_scaling = cfg.lm_attn_scaling

    def __call__(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """int[B, T] or int[T] -> (cos, sin), float32[..., T, hd]."""
        inv_freq = self.inv_freq[...].astype(jnp.float32)
        max_seq = jnp.max(positions) + 1
        scale = max_seq.astype(jnp.float32) / self.original_max_seq_len
        inv_freq = jnp.where(max_seq > self.original_max_seq_len, inv_freq / scale, inv_freq)
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb) * self.attention_scaling, jnp.sin(emb) * self.attention_scaling


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_embd(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, hd]; cos/sin float32[B or 1, T, hd]. Computed in float32."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


class LanguageModelGroupedQueryAttention(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        H = cfg.lm_hidden_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.lm_n_heads, cfg.lm_n_kv_heads, cfg.lm_head_dim
        self.q_proj = linear(H, H, False, options, rngs, axes=("embed", "heads"))
        self.k_proj = linear(H, self.n_kv_heads * self.head_dim, False, options, rngs, axes=("embed", "kv_heads"))
        self.v_proj = linear(H, self.n_kv_heads * self.head_dim, False, options, rngs, axes=("embed", "kv_heads"))
        self.out_proj = linear(H, H, False, options, rngs, axes=("heads", "embed"))
        self.kernels = options.select_kernels()

    def project_qkv(self, x, cos, sin):
        """x [B, T, H] -> q [B, T, nh, hd], k, v [B, T, nkv, hd], RoPE applied to q and k."""
        B, T, _ = x.shape
        q = constrain(self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim), "batch", "length", "heads", None)
        k = constrain(self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim), "batch", "length", "kv_heads", None)
        v = constrain(self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim), "batch", "length", "kv_heads", None)
        return apply_rotary_pos_embd(q, cos, sin), apply_rotary_pos_embd(k, cos, sin), v

    def __call__(self, x, cos, sin, attention_mask=None, segment_ids=None):
        """x float[B, T, H] -> float[B, T, H]; causal self-attention over the T positions (within
        each packed sample when `segment_ids` int[B, T] is given: `jaxvlm.attention.segment_bias`)."""
        B, T, H = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        y = self.kernels.attention(q, k, v, causal=True, attention_mask=attention_mask, segment_ids=segment_ids)
        return self.out_proj(y.reshape(B, T, H))

    def extend(self, x, cos, sin, cache, index, attention_mask=None):
        """Attention through a fixed-size KV cache (prefill and decoding).

        x float[B, Tq, H] occupies cache slots index .. index+Tq-1 (`index` may be traced);
        cache is (k, v), each [B, nkv, Tc, hd]: slots contiguous per head, the layout the
        attention matmuls read without a per-step transposed copy of the cache. The new
        keys/values are written with `dynamic_update_slice`; the queries attend over all Tc
        slots, slots after their own hidden by the causal mask (q_offset=index) and padding
        by attention_mask int[B, Tc]. Returns (float[B, Tq, H], updated cache).
        """
        B, T, H = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        k_cache, v_cache = cache
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.swapaxes(1, 2).astype(k_cache.dtype), (0, 0, index, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), (0, 0, index, 0))
        y = self.kernels.attention(
            q,
            k_cache.swapaxes(1, 2),
            v_cache.swapaxes(1, 2),
            causal=True,
            attention_mask=attention_mask,
            q_offset=index,
        )
        return self.out_proj(y.reshape(B, T, H)), (k_cache, v_cache)


class LanguageModelMLP(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        H, I = cfg.lm_hidden_dim, cfg.lm_inter_dim
        self.gate_proj = linear(H, I, False, options, rngs, axes=("embed", "mlp"))
        self.up_proj = linear(H, I, False, options, rngs, axes=("embed", "mlp"))
        self.down_proj = linear(I, H, False, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), "batch", "length", "mlp")
        return self.down_proj(h)


class LanguageModelBlock(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.mlp = LanguageModelMLP(cfg, options, rngs=rngs)
        self.attn = LanguageModelGroupedQueryAttention(cfg, options, rngs=rngs)
        self.norm1 = RMSNorm(cfg, options)
        self.norm2 = RMSNorm(cfg, options)

    def __call__(self, x, cos, sin, attention_mask=None, segment_ids=None):
        x = x + self.attn(self.norm1(x), cos, sin, attention_mask, segment_ids)
        x = x + self.mlp(self.norm2(x))
        return x

    def extend(self, x, cos, sin, cache, index, attention_mask=None):
        """`__call__` through a KV cache: see `LanguageModelGroupedQueryAttention.extend`."""
        y, cache = self.attn.extend(self.norm1(x), cos, sin, cache, index, attention_mask)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, cache


def _call_block(block, x, *args):
    return block(x, *args)


class LanguageModel(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.options = options  # remat: recompute each block in the backward pass
        self.kernels = options.select_kernels()
        self.token_embedding = nnx.Embed(
            cfg.lm_vocab_size,
            cfg.lm_hidden_dim,
            embedding_init=normal_002,
            dtype=options.compute_dtype,
            param_dtype=options.param_dtype,
            rngs=rngs,
            embedding_metadata=logical("vocab", "embed"),
        )
        self.rotary_embd = RotaryEmbedding(cfg, options)
        self.blocks = nnx.List([LanguageModelBlock(cfg, options, rngs=rngs) for _ in range(cfg.lm_n_blocks)])
        self.norm = RMSNorm(cfg, options)
        self.tie_weights = cfg.lm_tie_weights
        if not cfg.lm_tie_weights:
            self.head = linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, False, options, rngs, axes=("embed", "vocab"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, T, H] -> float[B, T, V] (the compute dtype); tied: hidden @ token_embedding^T."""
        with self.options.precision():
            if self.tie_weights:  # token_embedding.attend, through the backend's matmul
                table = self.token_embedding.embedding[...].astype(self.token_embedding.dtype or hidden.dtype)
                logits = self.kernels.matmul(hidden.astype(table.dtype), table.T)
            else:
                logits = self.head(hidden)
        return constrain(logits, "batch", "length", "vocab")

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Embeddings float[B, T, H] -> hidden states float[B, T, H].

        RoPE positions: `position_ids` int[B, T], default 0..T-1 in every row (upstream's, padding
        included). Packed rows (several samples per row) give `segment_ids` int[B, T] (0 padding,
        1, 2, ... per sample: attention stays within a sample) and positions restarting at 0 for
        each sample: each sample's hidden states are then those it has alone."""
        positions = jnp.arange(x.shape[1])[None] if position_ids is None else position_ids
        cos, sin = self.rotary_embd(positions)
        call = self.options.rematerialise(_call_block)
        with self.options.precision():
            for block in self.blocks:
                x = constrain(call(block, x, cos, sin, attention_mask, segment_ids), "batch", "length", None)
        return self.norm(x)

    # ---- cached decoding (used by jaxvlm.generate) ----------------------------------------------
    def init_cache(self, batch_size: int, length: int, dtype=jnp.float32) -> tuple:
        """An empty KV cache: per block (k, v), each zeros[B, nkv, Tc, hd] with Tc = length."""
        shape = (batch_size, self.blocks[0].attn.n_kv_heads, length, self.blocks[0].attn.head_dim)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks)

    def extend(self, x, positions, cache, index, attention_mask=None):
        """Embeddings float[B, Tq, H] at RoPE `positions` int[B or 1, Tq], written to cache slots
        index .. index+Tq-1 -> (hidden float[B, Tq, H], updated cache).

        Positions and slots are separate so that a prompt left-padded to a bucket keeps
        upstream's positions (0..T-1 for the original columns); `attention_mask` int[B, Tc]
        covers every cache slot (0 for padding, 1 for real and future tokens). The RoPE rescale
        past lm_max_position_embeddings is computed from `positions`, exactly as in `__call__`.
        """
        cos, sin = self.rotary_embd(positions)
        new_cache = []
        with self.options.precision():
            for block, block_cache in zip(self.blocks, cache):
                x, block_cache = block.extend(x, cos, sin, block_cache, index, attention_mask)
                new_cache.append(block_cache)
        return self.norm(x), tuple(new_cache)
