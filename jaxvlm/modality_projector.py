"""The modality projectors in Flax NNX; mirrors `torch_ref/modality_projector.py` (same class and
attribute names, so `conversion.mapping` lists each weight once for both).

`cfg.mp_type` chooses one (`build_projector`); each starts with the pixel shuffle of factor
s = `mp_pixel_shuffle_factor` (s = 1: none), giving C = s*s*D wide features:

  pixel_shuffle_linear  (None, nanoVLM's)  MP.proj: Linear(C, H, no bias).
  mlp                   (LLaVA-1.5's mlp2x_gelu)  MP.fc1: Linear(C, H) -> exact (erf) GELU ->
                        MP.fc2: Linear(H, H), both with bias.
  resampler             (Flamingo's Perceiver resampler) Q learned queries `MP.latents` [Q, C]
                        go through `mp_resampler_layers` blocks of
                            latents += attn(q = ln_latents(latents), kv = [ln_media(x); ln_latents(latents)])
                            latents += mlp(ln_mlp(latents))        (Linear(C, 4C), exact GELU, Linear(4C, C))
                        (attention with vit_n_heads heads, keys and values from the features and
                        the queries themselves, no biases), then `MP.layer_norm` and
                        MP.proj: Linear(C, H, no bias). L = Q image tokens whatever the image size.

Initialisation (the same distributions in both frameworks): every Linear N(0, 0.02) with zero
biases and LayerNorms 1 / 0 (nanoVLM's `_init_weights`, which transformers' LLaVA projector
also gets); the resampler's queries N(0, 1) (open_flamingo's `torch.randn`).

Shapes: N_img images, N patches (a perfect square), D vision width, s shuffle factor,
C = s*s*D projector input width, M = N / s^2 shuffled features, Q resampler queries,
L image tokens (M, or Q for the resampler), H language width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.config import RESAMPLER_LN_EPS, RESAMPLER_MLP_RATIO, VLMConfig

from .layers import linear
from .options import ModelOptions
from .sharding import logical


def pixel_shuffle(x: jax.Array, s: int) -> jax.Array:
    """float[N_img, N, D] -> float[N_img, N/s^2, s*s*D] (space-to-depth over the patch grid)."""
    B, N, D = x.shape
    side = int(round(N**0.5))
    if side * side != N or side % s:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {s}, got {N} patches")
    x = x.reshape(B, side // s, s, side // s, s, D)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, h/s, w/s, s, s, D): the order upstream uses
    return x.reshape(B, (side // s) ** 2, s * s * D)


class ModalityProjector(nnx.Module):
    """pixel_shuffle_linear: nanoVLM's projector (upstream `models/modality_projector.py`)."""

    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.options = options
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        # [s*s*D, H]: a wide-to-model-width projection, sharded like an MLP's down projection.
        self.proj = linear(cfg.mp_input_dim, cfg.lm_hidden_dim, False, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N_img, N, D] -> float[N_img, L, H]."""
        with self.options.precision():
            return self.proj(pixel_shuffle(x, self.scale_factor))


class MLPProjector(nnx.Module):
    """mlp: LLaVA-1.5's two-layer projector (Linear, GELU, Linear) after the pixel shuffle."""

    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.options = options
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        H = cfg.lm_hidden_dim
        self.fc1 = linear(cfg.mp_input_dim, H, True, options, rngs, axes=("embed", "mlp"))
        self.fc2 = linear(H, H, True, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N_img, N, D] -> float[N_img, L, H]."""
        with self.options.precision():
            h = jax.nn.gelu(self.fc1(pixel_shuffle(x, self.scale_factor)), approximate=False)  # LLaVA: exact GELU
            return self.fc2(h)


def _layer_norm(dim: int, options: ModelOptions, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Spelled out: Flax's eps default (1e-6) and fast variance are not torch's.
    return nnx.LayerNorm(
        dim,
        epsilon=RESAMPLER_LN_EPS,
        use_fast_variance=False,
        dtype=options.param_dtype,
        param_dtype=options.param_dtype,
        rngs=rngs,
        scale_metadata=logical("norm"),
        bias_metadata=logical("norm"),
    )


class ResamplerAttention(nnx.Module):
    """Queries from the latents; keys and values from [features; latents] (Flamingo)."""

    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        C = cfg.mp_input_dim
        self.n_heads = cfg.vit_n_heads
        self.q_proj = linear(C, C, False, options, rngs, axes=("embed", "heads"))
        self.k_proj = linear(C, C, False, options, rngs, axes=("embed", "heads"))
        self.v_proj = linear(C, C, False, options, rngs, axes=("embed", "heads"))
        self.out_proj = linear(C, C, False, options, rngs, axes=("heads", "embed"))
        self.kernels = options.select_kernels()

    def __call__(self, latents: jax.Array, media: jax.Array) -> jax.Array:
        """float[N_img, Q, C] (normed), float[N_img, M, C] (normed) -> float[N_img, Q, C]."""
        B, Q, C = latents.shape
        kv = jnp.concatenate([media, latents.astype(media.dtype)], axis=1)  # (N_img, M + Q, C)
        hd = C // self.n_heads
        q = self.q_proj(latents).reshape(B, Q, self.n_heads, hd)
        k = self.k_proj(kv).reshape(B, kv.shape[1], self.n_heads, hd)
        v = self.v_proj(kv).reshape(B, kv.shape[1], self.n_heads, hd)
        y = self.kernels.attention(q, k, v, causal=False)  # (N_img, Q, nh, hd), scale 1/sqrt(hd)
        return self.out_proj(y.reshape(B, Q, C))


class ResamplerMLP(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        C = cfg.mp_input_dim
        self.fc1 = linear(C, RESAMPLER_MLP_RATIO * C, False, options, rngs, axes=("embed", "mlp"))
        self.fc2 = linear(RESAMPLER_MLP_RATIO * C, C, False, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # torch nn.GELU(): exact


class ResamplerBlock(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        C = cfg.mp_input_dim
        self.ln_media = _layer_norm(C, options, rngs)
        self.ln_latents = _layer_norm(C, options, rngs)
        self.attn = ResamplerAttention(cfg, options, rngs=rngs)
        self.ln_mlp = _layer_norm(C, options, rngs)
        self.mlp = ResamplerMLP(cfg, options, rngs=rngs)

    def __call__(self, latents: jax.Array, media: jax.Array) -> jax.Array:
        latents = latents + self.attn(self.ln_latents(latents), self.ln_media(media))
        return latents + self.mlp(self.ln_mlp(latents))


class PerceiverResampler(nnx.Module):
    """resampler: `mp_resampler_queries` learned queries cross-attending to the (shuffled) patches."""

    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.options = options
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        C = cfg.mp_input_dim
        self.latents = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.mp_resampler_queries, C), options.param_dtype),  # torch.randn
            **logical(None, "embed"),
        )
        self.blocks = nnx.List([ResamplerBlock(cfg, options, rngs=rngs) for _ in range(cfg.mp_resampler_layers)])
        self.layer_norm = _layer_norm(C, options, rngs)
        self.proj = linear(C, cfg.lm_hidden_dim, False, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N_img, N, D] -> float[N_img, Q, H]."""
        with self.options.precision():
            media = pixel_shuffle(x, self.scale_factor)  # (N_img, M, C)
            latents = jnp.broadcast_to(self.latents[...], (media.shape[0], *self.latents.shape))
            for block in self.blocks:
                latents = block(latents, media)
            return self.proj(self.layer_norm(latents))


PROJECTORS = {"pixel_shuffle_linear": ModalityProjector, "mlp": MLPProjector, "resampler": PerceiverResampler}


def build_projector(cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs) -> nnx.Module:
    """The projector `cfg.mp_type` names (None: nanoVLM's pixel_shuffle_linear)."""
    return PROJECTORS[cfg.projector](cfg, options, rngs=rngs)
