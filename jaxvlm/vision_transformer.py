"""SigLIP-style ViT in Flax NNX; attribute paths identical to `torch_ref/vision_transformer.py`.

Shapes: N_img images, S image side, P patch size, N = (S/P)^2 patches, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.config import VLMConfig

from .layers import conv_bias_init, linear
from .options import ModelOptions
from .sharding import constrain, logical


class PatchConv(nnx.Module):
    """The stride-P patch convolution's parameters: kernel [P, P, 3, D] (HWIO) and bias [D],
    drawn as torch's Conv2d default init, U(+-1/sqrt(fan_in)) for both (kernel first)."""

    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        D, P = cfg.vit_hidden_dim, cfg.vit_patch_size
        kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (P, P, 3, D), options.param_dtype),
            **logical("patch", "patch", "patch", "embed"),
        )
        self.bias = nnx.Param(conv_bias_init(3 * P * P)(rngs.params(), (D,), options.param_dtype), **logical("embed"))


class ViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.conv = PatchConv(cfg, options, rngs=rngs)
        self.position_embedding = nnx.Param(
            jax.random.uniform(
                rngs.params(), (1, cfg.vit_n_patches, cfg.vit_hidden_dim), options.param_dtype
            ),  # torch.rand
            **logical(None, "length", "embed"),
        )
        self.dtype = options.compute_dtype
        self.kernels = options.select_kernels()

    def __call__(self, images: jax.Array) -> jax.Array:
        """float[N_img, 3, S, S] -> float[N_img, N, D], patches in row-major order."""
        x = self.kernels.patch_embed(
            images.astype(self.dtype), self.conv.kernel[...].astype(self.dtype), self.conv.bias[...].astype(self.dtype)
        )  # (N_img, N, D)
        return x + self.position_embedding[...]  # promoted to the parameter dtype: the residual stream's


class ViTMultiHeadAttention(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        D = cfg.vit_hidden_dim
        self.n_heads = cfg.vit_n_heads
        self.qkv_proj = linear(D, 3 * D, True, options, rngs, axes=("embed", "qkv"))
        self.out_proj = linear(D, D, True, options, rngs, axes=("heads", "embed"))
        self.kernels = options.select_kernels()

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q, k, v, each [B, T, nh, hd]."""
        B, T, C = x.shape
        q, k, v = jnp.split(self.qkv_proj(x), 3, axis=-1)  # fused in the order q, k, v
        return tuple(
            constrain(t.reshape(B, T, self.n_heads, C // self.n_heads), "batch", "length", "heads", None)
            for t in (q, k, v)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        q, k, v = self.project_qkv(x)
        y = self.kernels.attention(q, k, v, causal=False)  # (B, T, nh, hd)
        return self.out_proj(y.reshape(B, T, C))


class ViTMLP(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.vit_hidden_dim, cfg.vit_inter_dim, True, options, rngs, axes=("embed", "mlp"))
        self.fc2 = linear(cfg.vit_inter_dim, cfg.vit_hidden_dim, True, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=True)  # torch GELU(approximate="tanh")
        return self.fc2(constrain(h, "batch", "length", "mlp"))


def layer_norm(cfg: VLMConfig, options: ModelOptions, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Spelled out: torch's eps default differs, and nnx's fast variance is not torch's formula.
    return nnx.LayerNorm(
        cfg.vit_hidden_dim,
        epsilon=cfg.vit_ln_eps,
        use_fast_variance=False,
        dtype=options.param_dtype,  # a norm computes and returns the residual stream's dtype
        param_dtype=options.param_dtype,
        rngs=rngs,
        scale_metadata=logical("norm"),
        bias_metadata=logical("norm"),
    )


class ViTBlock(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.ln1 = layer_norm(cfg, options, rngs)
        self.attn = ViTMultiHeadAttention(cfg, options, rngs=rngs)
        self.ln2 = layer_norm(cfg, options, rngs)
        self.mlp = ViTMLP(cfg, options, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


def _call_block(block, x):
    return block(x)


class ViT(nnx.Module):
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.options = options  # remat: recompute each block in the backward pass
        self.patch_embedding = ViTPatchEmbeddings(cfg, options, rngs=rngs)
        self.blocks = nnx.List([ViTBlock(cfg, options, rngs=rngs) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = layer_norm(cfg, options, rngs)
        self.image_mean, self.image_std = cfg.vlm_image_mean, cfg.vlm_image_std  # static tuples or None

    def normalise(self, images: jax.Array) -> jax.Array:
        """The config's per-channel (x - mean) / std in float32 (identity when it names none)."""
        if self.image_mean is None:
            return images
        mean, std = (jnp.asarray(v, jnp.float32).reshape(1, 3, 1, 1) for v in (self.image_mean, self.image_std))
        return (images.astype(jnp.float32) - mean) / std

    def __call__(self, images: jax.Array) -> jax.Array:
        """float[N_img, 3, S, S] in [0, 1] -> float[N_img, N, D] (normalised first, see `normalise`)."""
        with self.options.precision():
            x = self.patch_embedding(self.normalise(jnp.asarray(images)))
            x = constrain(x, "batch", "length", None)
            call = self.options.rematerialise(_call_block)
            for block in self.blocks:
                x = constrain(call(block, x), "batch", "length", None)
            return self.layer_norm(x)
