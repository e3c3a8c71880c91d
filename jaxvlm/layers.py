"""Small shared pieces: dtype policy and initialisers matching upstream's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .sharding import logical

# Upstream's _init_weights: Linear and Embedding weights N(0, 0.02), biases zero, norms one.
normal_002 = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ModelDtypes:
    """`param`: storage dtype of the weights (fp32 master weights for training); `compute`:
    dtype of activations and matmuls (bf16 on accelerators). Norms, softmax and RoPE always
    compute in float32."""

    param: jnp.dtype = jnp.float32
    compute: jnp.dtype = jnp.float32


def conv_bias_init(fan_in: int):
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(d_in: int, d_out: int, bias: bool, dtypes: ModelDtypes, rngs: nnx.Rngs, *,
           axes: tuple[str | None, str | None]) -> nnx.Linear:
    """nn.Linear as upstream builds it; `axes`: the logical names of kernel [d_in, d_out] (the
    bias [d_out] takes the second), see `jaxvlm.sharding.RULES`."""
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=normal_002, dtype=dtypes.compute,
                      param_dtype=dtypes.param, rngs=rngs, kernel_metadata=logical(*axes),
                      bias_metadata=logical(axes[1]))
