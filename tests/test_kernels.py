"""The two kernel implementations (`jaxvlm.kernels`): `xla_cpu` (hand-written backwards tuned for
XLA:CPU) and `plain` (autodiff, `jax.nn.dot_product_attention`: every other backend) compute the
same function. Checked on CPU, fp32, per kernel and for a whole randomised model, forward and
every gradient.

Tolerances: fp32 rounding of the same sums taken in another order (the tuned attention scales
q before the logits matmul and skips all-masked blocks; the tuned loss keeps exp from the
forward): forward 1e-6 and gradients 1e-5, relative to the reference's largest entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, copy_torch_to_nnx, make_batch, random_torch_vlm, record, tiny_cfg
from flax import nnx

from jaxvlm import kernels
from jaxvlm.options import ModelOptions
from jaxvlm.train import label_positions, loss_fn
from jaxvlm.vision_language_model import VisionLanguageModel

PLAIN, TUNED = kernels.PLAIN, kernels.XLA_CPU


def _both(fn_of_kernels, args, argnums):
    """(value, grads) of sum(f(args) * fixed random cotangent) for both implementations."""
    out = {}
    for k in (PLAIN, TUNED):
        f = fn_of_kernels(k)
        y = f(*args)
        cot = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
        grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=argnums)(*args)
        out[k.name] = (y, grads)
    return out


def _compare(name, out, fwd_tol=1e-6, grad_tol=1e-5):
    assert_close(f"{name} forward", out["xla_cpu"][0], out["plain"][0], fwd_tol)
    for i, (g_tuned, g_plain) in enumerate(zip(out["xla_cpu"][1], out["plain"][1])):
        assert_close(f"{name} grad {i}", g_tuned, g_plain, grad_tol)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_matmul(seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x, w = jax.random.normal(kx, (3, 17, 24)), jax.random.normal(kw, (24, 40)) / 5
    _compare("matmul", _both(lambda k: k.matmul, (x, w), (0, 1)))


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_patch_embed(seed):
    ki, kk, kb = jax.random.split(jax.random.key(seed), 3)
    images = jax.random.uniform(ki, (3, 3, 32, 32))
    kernel, bias = jax.random.normal(kk, (8, 8, 3, 48)) / 14, jax.random.normal(kb, (48,))
    _compare("patch_embed", _both(lambda k: k.patch_embed, (images, kernel, bias), (0, 1, 2)))


# (heads, kv heads, head dim, length, causal): the ViT's plain multi-head attention; the decoder's
# grouped-query causal attention, short and long (the tuned kernel splits 256 queries into 4
# chunks); a head dim whose 1/sqrt is not a power of two (q scaled first is then not exact).
ATTENTION_CASES = [
    (4, 4, 16, 20, False),
    (4, 2, 16, 24, True),
    pytest.param(6, 2, 16, 256, True, marks=pytest.mark.slow),
    (3, 1, 24, 130, True),
]


@pytest.mark.parametrize("nh, nkv, hd, T, causal", ATTENTION_CASES)
def test_attention(nh, nkv, hd, T, causal):
    kq, kk, kv = jax.random.split(jax.random.key(T), 3)
    B = 3
    q, k, v = (jax.random.normal(key, (B, T, h, hd)) for key, h in ((kq, nh), (kk, nkv), (kv, nkv)))
    # left padding: none, some, and a row padded everywhere (upstream: uniform attention, no NaN)
    mask = np.ones((B, T), np.int32)
    mask[1, : T // 3] = 0
    mask[2, :] = 0
    mask = jnp.asarray(mask)
    out = _both(
        lambda kern: lambda q, k, v: kern.attention(q, k, v, causal=causal, attention_mask=mask), (q, k, v), (0, 1, 2)
    )
    _compare(f"attention nh={nh} nkv={nkv} hd={hd} T={T} causal={causal}", out)


def test_attention_through_a_cache_at_a_traced_offset():
    """Decoding: 1 query at a traced cache index against Tc cached keys, padding masked."""
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    B, Tc, nh, nkv, hd = 2, 40, 6, 2, 16
    q = jax.random.normal(kq, (B, 1, nh, hd))
    k, v = jax.random.normal(kk, (B, Tc, nkv, hd)), jax.random.normal(kv, (B, Tc, nkv, hd))
    mask = jnp.asarray(np.r_[np.zeros(5), np.ones(Tc - 5)][None].repeat(B, 0).astype(np.int32))
    out = {}
    for kern in (PLAIN, TUNED):
        f = jax.jit(lambda q, k, v, i, kern=kern: kern.attention(q, k, v, causal=True, attention_mask=mask, q_offset=i))
        out[kern.name] = f(q, k, v, jnp.int32(21))
    assert_close("attention, one query at traced offset 21", out["xla_cpu"], out["plain"], 1e-6)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_token_nll(seed):
    kl, kt = jax.random.split(jax.random.key(seed))
    logits = 4 * jax.random.normal(kl, (2, 9, 300))
    targets = jax.random.randint(kt, (2, 9), 0, 300)
    out = {}
    for kern in (PLAIN, TUNED):
        y = kern.token_nll(logits, targets)
        g = jax.grad(lambda x, kern=kern: jnp.sum(kern.token_nll(x, targets) * jnp.arange(1.0, 19.0).reshape(2, 9)))(
            logits
        )
        out[kern.name] = (y, (g,))
    _compare("token_nll", out)


def test_select_by_backend():
    expected = {"cpu": TUNED, "gpu": kernels.CUDNN}.get(jax.default_backend(), PLAIN)
    assert kernels.select() is expected
    assert kernels.select("plain") is PLAIN and kernels.select("xla_cpu") is TUNED
    assert kernels.select("cudnn") is kernels.CUDNN
    with pytest.raises(ValueError, match="unknown kernels 'flash'"):
        kernels.select("flash")
    with pytest.raises(ValueError, match="unknown kernels"):
        ModelOptions(kernels="fast")


@pytest.mark.slow
@pytest.mark.parametrize("seed", (0, 1, 2))
def test_whole_model_loss_and_every_gradient(seed):
    """A randomised tiny VLM on a left-padded batch with several images per row, T long enough
    for the tuned attention's query chunks: loss and the gradient of every parameter agree."""
    cfg = tiny_cfg()
    torch_model = random_torch_vlm(cfg, seed)
    ids, images, mask = make_batch(cfg, [(0, 2), (37, 1), (90, 3)], 160, seed)
    labels = np.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    labels = np.concatenate([labels, np.full((3, 1), -100)], 1).astype(np.int32)
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "images": jnp.asarray(images),
        "attention_mask": jnp.asarray(mask, jnp.int32),
        "labels": jnp.asarray(labels),
        "label_positions": jnp.asarray(label_positions(labels)),
    }
    out = {}
    for kern in ("plain", "xla_cpu"):
        model = VisionLanguageModel(cfg, options=ModelOptions(kernels=kern), rngs=nnx.Rngs(0))
        copy_torch_to_nnx(torch_model, model, cfg=cfg)
        assert model.decoder.kernels.name == kern and model.vision_encoder.patch_embedding.kernels.name == kern
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)))(params)
        logits = jax.jit(
            lambda p: nnx.merge(graphdef, p, rest)(batch["input_ids"], batch["images"], batch["attention_mask"])
        )(params)
        out[kern] = (float(loss), logits, {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)})
    assert_close("kernels: logits", out["xla_cpu"][1], out["plain"][1], 1e-6)
    assert_close("kernels: loss", np.float64(out["xla_cpu"][0]), np.float64(out["plain"][0]), 1e-6)
    worst = max(assert_close(f"kernels: grad {k}", out["xla_cpu"][2][k], g, 1e-5) for k, g in out["plain"][2].items())
    record(
        "xla_cpu vs plain kernels, whole model",
        f"worst gradient {worst:.1e} relative over {len(out['plain'][2])} tensors",
    )
