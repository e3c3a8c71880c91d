"""Small shared pieces: initialisers matching upstream's and the linear layer."""

from __future__ import annotations

import contextlib
import contextvars

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
    """nnx.Linear (the same parameters and forward) through the backend's `kernels.matmul`.

    With a LoRA adapter (`lora_A` [in, r], `lora_B` [r, out]; put on by `jaxvlm.lora.add_adapters`)
    it adds PEFT's `scaling * B(A(dropout(x)))` after the bias, its two matmuls through the same
    kernel and in the same compute dtype as the base product."""

    # No adapter unless `jaxvlm.lora.add_adapters` sets these on the instance.
    lora_A: Linear | None = None
    lora_B: Linear | None = None
    lora_scaling: float = 1.0
    lora_dropout: float = 0.0
    lora_index: int = 0  # this adapter's stream of the step's dropout key

    def __init__(self, *args, kernels, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = kernels

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = self.kernels.matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_A is not None:
            h = lora_dropout(x, self.lora_dropout, self.lora_index)
            h = self.kernels.matmul(h, self.lora_A.kernel[...].astype(self.dtype))
            y = y + self.kernels.matmul(h, self.lora_B.kernel[...].astype(self.dtype)) * self.lora_scaling
        return y


# The dropout key of the train step being traced (`dropout_key`); None: no dropout (evaluation,
# generation). A context rather than model state: the mask is a function of (step, micro-batch,
# adapter), so a resumed run draws the same masks, and nothing random lives in the checkpoint.
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """Within it, LoRA adapters with dropout > 0 drop their inputs with masks drawn from `key`."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def lora_dropout(x: jax.Array, rate: float, index: int) -> jax.Array:
    """Inverted dropout (torch's nn.Dropout: kept values scaled by 1/(1-rate)) under `dropout_key`."""
    key = _DROPOUT_KEY.get()
    if rate == 0 or key is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
