"""Kernels tuned for XLA:CPU: the implementations `jaxvlm.kernels` picks on the CPU backend.

Each computes exactly what its plain twin in `jaxvlm.kernels` computes (tests/test_kernels.py
checks the forward and every gradient on CPU); each exists because XLA:CPU compiled the plain
form slowly on the machines measured in docs/performance.md. Other backends use the plain
forms (autodiff, `jax.nn.dot_product_attention`), which their compilers handle well.

Shapes: B batch, Tq/Tk query/key length, nh/nkv query/key-value heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import attention_bias

MIN_QUERY_CHUNK = 64  # causal self-attention is computed in query chunks of at least this many
MAX_QUERY_CHUNKS = 4


# ---- linear: x @ w with the kernel gradient asked for as g^T x ----------------------------------
@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O]; backward dx = g @ w^T, dw = (g^T x)^T.

    Why: asked for as g^T x, XLA:CPU's dot wants x transposed (one small copy shared by every
    linear that reads x) instead of a transposed copy of each output gradient g, which it fused
    with g's whole elementwise producer chain and ran at a fraction of memory speed.
    Every product accumulates in float32; results are rounded once to the operands' dtype."""
    return _mm(x, w)


def _mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _matmul_fwd(x, w):
    return _mm(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw_t = jax.lax.dot_general(g2, x2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [O, I]
    return _mm(g, w.T).astype(x.dtype), dw_t.T.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---- patch embedding: the stride-P convolution as one matmul over flattened patches ------------
def patch_embed(images: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """float[N_img, 3, S, S], kernel [P, P, 3, D] (HWIO), bias [D] -> float[N_img, (S/P)^2, D].

    Why: XLA:CPU's convolution backward for the kernel was slow; the same sums as a matmul are not."""
    n, c, s, _ = images.shape
    p = kernel.shape[0]
    patches = images.reshape(n, c, s // p, p, s // p, p)
    patches = patches.transpose(0, 2, 4, 3, 5, 1).reshape(n, (s // p) ** 2, p * p * c)  # (kh, kw, c): HWIO order
    return matmul(patches, kernel.reshape(p * p * c, -1)) + bias


# ---- attention: causal queries in chunks, q scaled first, grouped heads as their own axis -------
def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    attention_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """`jaxvlm.kernels.plain_attention`'s result (see there for the arguments).

    Why: causal self-attention over a long sequence runs in query chunks, each against the keys
    up to its own end, skipping the all-masked blocks of the logits (exp(-inf) = 0 there: the
    same result, ~25-40% less attention work); q is scaled before the logits matmul (a pass
    over q, not over the [.., Tq, Tk] logits; exact for hd = 64); grouped-query heads keep
    their group as an axis, so keys are never repeated."""
    B, Tq, nh, hd = q.shape
    nkv = k.shape[2]
    n_chunks = min(MAX_QUERY_CHUNKS, Tq // MIN_QUERY_CHUNK)
    if causal and isinstance(q_offset, int) and q_offset == 0 and Tq == k.shape[1] and n_chunks > 1:
        bounds = [round(i * Tq / n_chunks) for i in range(n_chunks + 1)]
        outs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mask = None if attention_mask is None else attention_mask[:, :hi]
            seg = None if segment_ids is None else segment_ids[:, :hi]
            outs.append(
                attention(
                    q[:, lo:hi], k[:, :hi], v[:, :hi], causal=True, attention_mask=mask, q_offset=lo, segment_ids=seg
                )
            )
        return jnp.concatenate(outs, axis=1)
    bias = attention_bias(
        attention_mask, causal=causal, q_len=Tq, k_len=k.shape[1], q_offset=q_offset, segment_ids=segment_ids
    )
    out_dtype = q.dtype
    if q.dtype != jnp.float32:
        # XLA:CPU's batched dots do not all take bf16 operands with an f32 result ("Unsupported
        # element type for DotThunk: BF16 x BF16 = F32", seen in cached decoding): attention runs
        # in f32 here, on the bf16 values (the products exact, the sums f32, as the fused form).
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    if nh == nkv:  # plain multi-head attention (the ViT)
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(out_dtype).astype(v.dtype)  # rounded as the fused form
        y = jnp.einsum("bhts,bshd->bthd", probs, v, preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    # Query heads j*g .. j*g+g-1 read key head j; logits [B, nkv, g, Tq, Tk], bias broadcast over heads.
    qg = q.reshape(B, Tq, nkv, nh // nkv, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias[:, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(out_dtype).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return y.astype(out_dtype).reshape(B, Tq, nh, hd)


# ---- token loss: -log softmax(logits)[target] with a one-pass backward --------------------------
@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32[..., V], int[...] -> float32[...]; backward d logits = (softmax - one_hot) * g.

    Why: one pass over [.., V] (exp kept from the forward) plus a scatter of -g at the targets,
    instead of autodiff's zero buffer, one-hot and several [.., V] passes."""
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    m = jnp.max(logits, axis=-1)
    e = jnp.exp(logits - m[..., None])  # kept for the backward: exp is computed once
    total = jnp.sum(e, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return m + jnp.log(total) - picked, (e, total, targets)


def _token_nll_bwd(res, g):
    e, total, targets = res
    d_logits = e * (g / total)[..., None]  # softmax * g
    # minus g at each target: (row, column) indices, since a flat row * V + column overflows
    # int32 past 2^31 / V rows
    V = e.shape[-1]
    rows = jnp.arange(targets.size)
    d_logits = d_logits.reshape(-1, V).at[rows, targets.reshape(-1)].add(-g.reshape(-1), unique_indices=True)
    return d_logits.reshape(e.shape), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
