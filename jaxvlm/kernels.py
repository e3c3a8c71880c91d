"""The model's compute kernels, chosen by backend: linear (matmul), patch embedding, attention
and token loss.

Every kernel accumulates in float32 whatever its input dtype (bfloat16 operands, float32 sums,
the result rounded once to the input dtype), and softmax and the loss compute in float32.

The model never branches on the backend: each module holds a `Kernels` record (from
`select`, via `ModelOptions.kernels`) and calls `kernels.matmul(...)`, `kernels.attention(...)`.
Three implementations exist, tested equal in forward and every gradient (tests/test_kernels.py,
tests/test_bfloat16.py):

  plain    autodiff of the textbook forms and `jax.nn.dot_product_attention` (XLA's): what TPU
           compilers fuse well, and the reference the others are tested against
  cudnn    plain, but bf16/fp16 self-attention (the ViT's, and the decoder's in training and
           prefill without a cache) through cuDNN's fused attention
           (`implementation="cudnn"`): the [.., Tq, Tk] logits and probabilities are never
           written to memory. fp32 and cached decoding take the plain path.
  xla_cpu  forms with hand-written backwards tuned for XLA:CPU (`jaxvlm.xla_cpu_kernels`)

`select("auto")` takes `xla_cpu` on the CPU backend, `cudnn` on GPUs and `plain` elsewhere.

Shapes: B batch, Tq/Tk query/key length, nh/nkv query/key-value heads, hd head dim, V vocabulary,
N_img images, S image side, P patch size, D vision width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import xla_cpu_kernels
from .attention import MASK_VALUE, attention_bias, padding_bias


def plain_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O], accumulated in float32, the result in x's dtype."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def plain_patch_embed(images: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The stride-P convolution: float[N_img, 3, S, S], kernel [P, P, 3, D] (HWIO), bias [D]
    -> float[N_img, (S/P)^2, D], patches in row-major order."""
    p = kernel.shape[0]
    y = jax.lax.conv_general_dilated(
        images,
        kernel,
        (p, p),
        "VALID",
        dimension_numbers=("NCHW", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    ).astype(images.dtype)
    return y.reshape(y.shape[0], -1, y.shape[-1]) + bias


def plain_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    attention_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention, scale 1/sqrt(hd), softmax in float32.

    Args:
      q: [B, Tq, nh, hd]; k, v: [B, Tk, nkv, hd], nh % nkv == 0. Key head j serves query heads
        j*g .. j*g+g-1 (g = nh/nkv), the same grouping as torch's `repeat_interleave`.
      causal, attention_mask, q_offset, segment_ids: see `jaxvlm.attention.attention_bias`
        (segment_ids int[B, Tk]: packed samples attend only within themselves).
    Returns:
      [B, Tq, nh, hd] in q's dtype.
    """
    bias = attention_bias(
        attention_mask, causal=causal, q_len=q.shape[1], k_len=k.shape[1], q_offset=q_offset, segment_ids=segment_ids
    )
    return jax.nn.dot_product_attention(q, k, v, bias=bias)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    attention_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    segment_ids: jax.Array | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """`plain_attention`'s result through a fused kernel where one applies: bf16/fp16 operands
    and, when causal, self-attention (Tq == Tk, q_offset 0). The causal mask is the kernel's
    own flag; left padding is a bias [B, 1, Tq, Tk] in the operands' dtype (MASK_VALUE on padded
    keys: finite in bf16, so a query that sees only padding attends uniformly over it, as in
    `attention_bias`); packed samples (`segment_ids`) add MASK_VALUE between samples to that
    bias. Anything else (fp32, decoding through a cache) is `plain_attention`.
    `implementation="xla"` runs the same mask forms through XLA (tests on a CPU)."""
    fused = q.dtype in (jnp.bfloat16, jnp.float16) and (
        not causal or (isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1])
    )
    if not fused:
        return plain_attention(
            q, k, v, causal=causal, attention_mask=attention_mask, q_offset=q_offset, segment_ids=segment_ids
        )
    bias = None
    B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    if attention_mask is not None:
        bias = jnp.broadcast_to(padding_bias(attention_mask, Tk, q.dtype), (B, 1, Tq, Tk))
    if segment_ids is not None:  # finite in the kernel's bias, as the padding's
        same = segment_ids[:, :Tq, None] == segment_ids[:, None, :Tk]
        seg = jnp.where(same, 0.0, MASK_VALUE).astype(q.dtype)[:, None]
        bias = seg if bias is None else bias + seg
    return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, implementation=implementation)


def plain_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target]: float32[..., V], int[...] -> float32[...]."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation of each kernel the model asks for (signatures as the plain ones)."""

    name: str
    matmul: Callable
    patch_embed: Callable
    attention: Callable
    token_nll: Callable


PLAIN = Kernels("plain", plain_matmul, plain_patch_embed, plain_attention, plain_token_nll)
CUDNN = Kernels("cudnn", plain_matmul, plain_patch_embed, cudnn_attention, plain_token_nll)
XLA_CPU = Kernels(
    "xla_cpu",
    xla_cpu_kernels.matmul,
    xla_cpu_kernels.patch_embed,
    xla_cpu_kernels.attention,
    xla_cpu_kernels.token_nll,
)
IMPLEMENTATIONS = {k.name: k for k in (PLAIN, CUDNN, XLA_CPU)}
BY_BACKEND = {"cpu": "xla_cpu", "gpu": "cudnn"}  # "auto"; any other backend: plain
CHOICES = ("auto", *IMPLEMENTATIONS)


def select(name: str = "auto") -> Kernels:
    """The kernels called `name`; "auto": by backend (`BY_BACKEND`), `plain` elsewhere."""
    if name == "auto":
        name = BY_BACKEND.get(jax.default_backend(), "plain")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernels {name!r}; choose one of {', '.join(CHOICES)}")
    return IMPLEMENTATIONS[name]
