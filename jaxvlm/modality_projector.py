"""Pixel-shuffle projector in Flax NNX; mirrors `torch_ref/modality_projector.py`.

Shapes: N_img images, N patches (a perfect square), D vision width, s shuffle factor,
L = N / s^2 image tokens, H language width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.config import VLMConfig

from .layers import linear
from .options import ModelOptions


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
    def __init__(self, cfg: VLMConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.options = options
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        # [s*s*D, H]: a wide-to-model-width projection, sharded like an MLP's down projection.
        self.proj = linear(cfg.mp_input_dim, cfg.lm_hidden_dim, False, options, rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N_img, N, D] -> float[N_img, L, H]."""
        with self.options.precision():
            return self.proj(pixel_shuffle(x, self.scale_factor))
