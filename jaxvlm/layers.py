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
    return Linear(d_in, d_out, use_bias=bias, kernel_init=normal_002, dtype=dtypes.compute,
                  param_dtype=dtypes.param, rngs=rngs, kernel_metadata=logical(*axes),
                  bias_metadata=logical(axes[1]))


class Linear(nnx.Linear):
    """nnx.Linear (the same parameters and forward) with the backward of `matmul`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O], with a hand-written backward: dx = g @ w^T and dw = (g^T x)^T.

    The same products autodiff forms, but the kernel gradient is asked for as g^T x: XLA's CPU
    dot then wants the activation x in a transposed layout (one small copy, shared by every
    linear that reads x) instead of a transposed copy of each output gradient g, which it
    fused with g's whole elementwise producer chain (SiLU backward, residual sums, LayerNorm
    backward) and ran at a fraction of memory speed: 0.9 s of a 6.2 s 222m train step.
    """
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw_t = jax.lax.dot_general(g2, x2, (((0,), (0,)), ((), ())))  # [O, I]
    return g @ w.T, dw_t.T.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
