"""SigLIP-style ViT in Flax NNX; attribute paths identical to `torch_ref/vision_transformer.py`.

Shapes: N_img images, S image side, P patch size, N = (S/P)^2 patches, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.config import VLMConfig

from .attention import attention
from .layers import ModelDtypes, conv_bias_init, linear, matmul
from .sharding import constrain, logical


class ViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: VLMConfig, dtypes: ModelDtypes, *, rngs: nnx.Rngs):
        D, P = cfg.vit_hidden_dim, cfg.vit_patch_size
        # torch's Conv2d default init: U(+-1/sqrt(fan_in)) for kernel and bias.
        self.conv = nnx.Conv(
            3, D, kernel_size=(P, P), strides=(P, P), padding="VALID", use_bias=True,
            kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            bias_init=conv_bias_init(3 * P * P), dtype=dtypes.compute, param_dtype=dtypes.param, rngs=rngs,
            kernel_metadata=logical("patch", "patch", "patch", "embed"), bias_metadata=logical("embed"),
        )
        self.position_embedding = nnx.Param(
            jax.random.uniform(rngs.params(), (1, cfg.vit_n_patches, D), dtypes.param),  # torch.rand
            **logical(None, "length", "embed"),
        )
        self.dtype = dtypes.compute

    def __call__(self, images: jax.Array) -> jax.Array:
        """float[N_img, 3, S, S] -> float[N_img, N, D], patches in row-major order."""
        # The stride-P convolution as one matmul over flattened patches: the same sums, but
        # XLA's CPU convolution backward for the kernel was 300 ms of a 222m train step.
        n, c, s, _ = images.shape
        p = self.conv.kernel_size[0]
        patches = images.astype(self.dtype).reshape(n, c, s // p, p, s // p, p)
        patches = patches.transpose(0, 2, 4, 3, 5, 1).reshape(n, (s // p) ** 2, p * p * c)  # (kh, kw, c): HWIO order
        kernel = self.conv.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
        x = matmul(patches, kernel) + self.conv.bias[...].astype(self.dtype)  # (N_img, N, D)
        return x + self.position_embedding[...].astype(x.dtype)


class ViTMultiHeadAttention(nnx.Module):
    def __init__(self, cfg: VLMConfig, dtypes: ModelDtypes, *, rngs: nnx.Rngs):
        D = cfg.vit_hidden_dim
        self.n_heads = cfg.vit_n_heads
        self.qkv_proj = linear(D, 3 * D, True, dtypes, rngs, axes=("embed", "qkv"))
        self.out_proj = linear(D, D, True, dtypes, rngs, axes=("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        q, k, v = jnp.split(self.qkv_proj(x), 3, axis=-1)  # fused in the order q, k, v
        q, k, v = (constrain(t.reshape(B, T, self.n_heads, C // self.n_heads), "batch", "length", "heads", None)
                   for t in (q, k, v))
        y = attention(q, k, v, causal=False)  # (B, T, nh, hd)
        return self.out_proj(y.reshape(B, T, C))


class ViTMLP(nnx.Module):
    def __init__(self, cfg: VLMConfig, dtypes: ModelDtypes, *, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.vit_hidden_dim, cfg.vit_inter_dim, True, dtypes, rngs, axes=("embed", "mlp"))
        self.fc2 = linear(cfg.vit_inter_dim, cfg.vit_hidden_dim, True, dtypes, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=True)  # torch GELU(approximate="tanh")
        return self.fc2(constrain(h, "batch", "length", "mlp"))


def layer_norm(cfg: VLMConfig, dtypes: ModelDtypes, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Spelled out: torch's eps default differs, and nnx's fast variance is not torch's formula.
    return nnx.LayerNorm(cfg.vit_hidden_dim, epsilon=cfg.vit_ln_eps, use_fast_variance=False,
                         dtype=dtypes.compute, param_dtype=dtypes.param, rngs=rngs,
                         scale_metadata=logical("norm"), bias_metadata=logical("norm"))


class ViTBlock(nnx.Module):
    def __init__(self, cfg: VLMConfig, dtypes: ModelDtypes, *, rngs: nnx.Rngs):
        self.ln1 = layer_norm(cfg, dtypes, rngs)
        self.attn = ViTMultiHeadAttention(cfg, dtypes, rngs=rngs)
        self.ln2 = layer_norm(cfg, dtypes, rngs)
        self.mlp = ViTMLP(cfg, dtypes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


def _call_block(block, x):
    return block(x)


class ViT(nnx.Module):
    def __init__(self, cfg: VLMConfig, dtypes: ModelDtypes = ModelDtypes(), *, rngs: nnx.Rngs, remat: bool = False):
        self.remat = remat  # recompute each block's activations in the backward pass
        self.patch_embedding = ViTPatchEmbeddings(cfg, dtypes, rngs=rngs)
        self.blocks = nnx.List([ViTBlock(cfg, dtypes, rngs=rngs) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = layer_norm(cfg, dtypes, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """float[N_img, 3, S, S] in [0, 1] -> float[N_img, N, D]."""
        x = self.patch_embedding(jnp.asarray(images))
        call = nnx.remat(_call_block) if self.remat else _call_block
        x = constrain(x, "batch", "length", None)
        for block in self.blocks:
            x = constrain(call(block, x), "batch", "length", None)
        return self.layer_norm(x)
