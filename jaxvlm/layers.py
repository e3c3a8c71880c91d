"""Small shared pieces: initialisers matching upstream's and the linear layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .options import ModelOptions
from .sharding import logical

# Upstream's _init_weights: Linear and Embedding weights N(0, 0.02), biases zero, norms one.
normal_002 = nnx.initializers.normal(stddev=0.02)


def conv_bias_init(fan_in: int):
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(
    d_in: int,
    d_out: int,
    bias: bool,
    options: ModelOptions,
    rngs: nnx.Rngs,
    *,
    axes: tuple[str | None, str | None],
) -> Linear:
    """nn.Linear as upstream builds it; `axes`: the logical names of kernel [d_in, d_out] (the
    bias [d_out] takes the second), see `jaxvlm.sharding.RULES`."""
    return Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=normal_002,
        dtype=options.compute_dtype,
        param_dtype=options.param_dtype,
        rngs=rngs,
        kernel_metadata=logical(*axes),
        bias_metadata=logical(axes[1]),
        kernels=options.select_kernels(),
    )


class Linear(nnx.Linear):
    """nnx.Linear (the same parameters and forward) through the backend's `kernels.matmul`."""

    def __init__(self, *args, kernels, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = kernels

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.kernels.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
