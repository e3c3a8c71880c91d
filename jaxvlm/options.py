"""How a model is built, as opposed to what it is (that is the `VLMConfig`): dtypes, remat and
the kernel implementation. Passed to `VisionLanguageModel(cfg, options=...)`, to every
submodule's constructor and to `from_pretrained`; never set on a model after construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .kernels import CHOICES as KERNEL_CHOICES
from .kernels import Kernels, select

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MATMUL_PRECISIONS = ("highest", "high", "default")
# jax.checkpoint_policies that are policies themselves (not factories taking names)
REMAT_POLICIES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """`param_dtype`: storage dtype of the weights (fp32 master weights for training);
    `compute_dtype`: dtype of the matmuls (linear layers, attention, the patch convolution and
    the head; bf16 on accelerators), which accumulate in float32 and round their result once
    to it. Everything else (the residual stream, embeddings, norms) stays in `param_dtype`, as
    torch's autocast leaves it for upstream; softmax, RoPE and the loss compute in float32.

    `remat`: recompute each ViT and decoder block's activations in the backward pass (less
    memory); `remat_policy`: what a rematerialised block may keep instead, a name from
    `jax.checkpoint_policies` (`REMAT_POLICIES`; None: keep nothing).

    `kernels`: "auto" (by backend), "xla_cpu", "cudnn" or "plain"; see `jaxvlm.kernels`.

    `matmul_precision`: how float32 matmuls run, a `jax.default_matmul_precision` name:
    "highest" (default: true float32 on every backend; without it NVIDIA GPUs run float32
    matmuls as TF32 and TPUs as one bfloat16 pass), "high" (3-pass bf16 / TF32 where that is
    what the backend offers) or "default" (the backend's fastest: TF32 on NVIDIA GPUs). The CPU
    computes float32 exactly whichever is chosen. bfloat16 operands are unaffected."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str | None = None
    kernels: str = "auto"
    matmul_precision: str = "highest"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            dtype = DTYPES.get(value) if isinstance(value, str) else value
            if dtype is None or jnp.dtype(dtype) not in (jnp.dtype(d) for d in DTYPES.values()):
                raise ValueError(f"ModelOptions.{name} {value!r}: choose one of {', '.join(DTYPES)}")
            object.__setattr__(self, name, jnp.dtype(dtype))
        if not isinstance(self.remat, bool):
            raise ValueError(f"ModelOptions.remat must be true or false, got {self.remat!r}")
        if self.remat_policy is not None:
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(f"remat policy {self.remat_policy!r}: choose one of {', '.join(REMAT_POLICIES)}")
            if not self.remat:
                raise ValueError(f"remat policy {self.remat_policy!r} given without remat")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose one of {', '.join(KERNEL_CHOICES)}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul precision {self.matmul_precision!r}: choose one of {', '.join(MATMUL_PRECISIONS)}"
            )

    def precision(self):
        """A context in which every matmul traced runs at `matmul_precision` (the model's
        submodules and the train step enter it; nesting is harmless)."""
        return jax.default_matmul_precision(self.matmul_precision)

    def select_kernels(self) -> Kernels:
        return select(self.kernels)

    def rematerialise(self, fn):
        """`fn(module, *arrays)` under `jax.checkpoint` with the policy when remat is on, else `fn`.

        The module goes in as its split state and comes back out of nothing: a block's call
        writes no state, and `nnx.remat`'s write-back refuses a module whose frozen parameters
        (a frozen group, LoRA's base weights) are constants of an outer trace."""
        if not self.remat:
            return fn
        policy = None if self.remat_policy is None else getattr(jax.checkpoint_policies, self.remat_policy)

        def call(module, *args):
            graphdef, state = nnx.split(module)

            def pure(state, *args):
                return fn(nnx.merge(graphdef, state), *args)

            return jax.checkpoint(pure, policy=policy)(state, *args)

        return call
