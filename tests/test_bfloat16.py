"""bfloat16 compute done right (jaxvlm.options.ModelOptions, jaxvlm.kernels), on the CPU:

- every matmul accumulates in float32 and rounds its result once: the forward and both
  gradients of `kernels.matmul` on bf16 operands equal a float64 product of the same operands
  rounded to bf16 (within one bf16 rounding, 2^-8 relative), for both kernel sets;
- the padding mask keeps its meaning in bf16: the bias is finite when cast to bf16, a query
  whose keys are all padding attends uniformly over them (no NaN), in every kernel set and with
  the bias in bf16 (as a fused kernel takes it);
- the residual stream, norms, softmax and loss stay float32 (as under torch's autocast), and a
  bf16 jaxvlm is as close to its own float32 logits as torch_ref under
  `torch.autocast(dtype=bfloat16)` is to torch_ref's (measured side by side, the ratio bounded);
- float32 matmuls run at the precision the options name ("highest" by default), in the forward
  and in the train step's backward.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_batch, random_torch_vlm, record, tiny_cfg, to_np
from flax import nnx

import jaxvlm
from conversion.recipe import OptimConfig
from jaxvlm import kernels
from jaxvlm.attention import MASK_VALUE, attention_bias
from jaxvlm.options import ModelOptions

BF16_ULP = 2.0**-8  # one bf16 rounding, relative
KERNEL_SETS = [kernels.PLAIN, kernels.XLA_CPU]


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def _f64(x):
    return np.asarray(x.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("k", KERNEL_SETS, ids=lambda k: k.name)
def test_bf16_matmul_and_its_gradients_accumulate_in_float32(k):
    """K = 4096 terms: a bf16 accumulator would be off by ~sqrt(K) roundings; an f32 one by at
    most the final rounding to bf16 (plus f32 summation error, ~1e-6)."""
    rng = np.random.default_rng(0)
    x, w, g = _bf16(rng, (3, 16, 4096)), _bf16(rng, (4096, 64)), _bf16(rng, (3, 16, 64))
    y, vjp = jax.vjp(k.matmul, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    want = {
        "y": _f64(x) @ _f64(w),
        "dx": _f64(g) @ _f64(w).T,
        "dw": np.einsum("bto,bti->io", _f64(g), _f64(x)),
    }
    for name, got in {"y": y, "dx": dx, "dw": dw}.items():
        ref = want[name]
        rel = np.abs(_f64(got) - ref) / np.maximum(np.abs(ref), 1e-3 * np.abs(ref).max())
        record(f"bf16 matmul {k.name} {name}", f"max error {rel.max():.2e} relative (tol {BF16_ULP:.1e}: one rounding)")
        assert rel.max() <= BF16_ULP * 1.01, f"{k.name} {name}: {rel.max():.2e} relative, more than one bf16 rounding"


def test_padding_bias_is_finite_in_bf16():
    mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]])
    bias = attention_bias(mask, causal=False, q_len=4, k_len=4)
    assert bias.dtype == jnp.float32
    as_bf16 = bias.astype(jnp.bfloat16)
    assert bool(jnp.isfinite(as_bf16).all()), "the padding bias overflows to -inf in bf16"
    assert float(as_bf16.min()) < -1e29 and MASK_VALUE > float(jnp.finfo(jnp.bfloat16).min) / 2


def _attention_with_bf16_bias(q, k, v, *, causal, attention_mask=None, q_offset=0):
    """`jax.nn.dot_product_attention` with the bias in the operands' dtype, as a fused
    attention kernel (cuDNN) takes it."""
    bias = attention_bias(attention_mask, causal=causal, q_len=q.shape[1], k_len=k.shape[1], q_offset=q_offset)
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype))


@pytest.mark.parametrize(
    "attend",
    [kernels.PLAIN.attention, kernels.XLA_CPU.attention, _attention_with_bf16_bias],
    ids=["plain", "xla_cpu", "bias in bf16"],
)
def test_fully_padded_queries_attend_uniformly_in_bf16(attend):
    """Row 0 has 5 left pads: its first 5 queries see only padding (upstream: uniform over the
    causal window); row 1 has none. Every output finite; the padded queries' outputs are the
    mean of v over their window; a real query gives padding exactly zero weight."""
    rng = np.random.default_rng(1)
    B, T, nh, nkv, hd = 2, 128, 4, 2, 16
    q, k, v = _bf16(rng, (B, T, nh, hd)), _bf16(rng, (B, T, nkv, hd)), _bf16(rng, (B, T, nkv, hd))
    k = k.at[:, :, :].multiply(8)  # large logits: a -inf or overflow would show
    if attend is not kernels.PLAIN.attention and attend is not kernels.XLA_CPU.attention:
        k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
    mask = np.ones((B, T), np.int32)
    mask[0, :5] = 0
    y = np.asarray(attend(q, k, v, causal=True, attention_mask=jnp.asarray(mask)).astype(jnp.float32))
    assert np.isfinite(y).all(), f"{np.count_nonzero(~np.isfinite(y))} non-finite outputs"
    vf = _f64(v)
    vq = np.repeat(vf, nh // vf.shape[2], axis=2)  # [B, T, nh, hd]
    for i in range(5):
        want = vq[0, : i + 1].mean(axis=0)
        np.testing.assert_allclose(y[0, i], want, atol=4 * BF16_ULP * np.abs(vq).max())
    # a real query of row 0 vs the same query against its real keys only (padding weight 0)
    real = np.asarray(
        attend(q[:1, 5:], k[:1, 5:], v[:1, 5:], causal=True, attention_mask=jnp.ones((1, T - 5), jnp.int32)).astype(
            jnp.float32
        )
    )
    np.testing.assert_allclose(y[0, 5:], real[0], atol=2 * BF16_ULP * np.abs(vq).max())


def _jax_logits(cfg, tmodel, dtype, ids, images, mask):
    from conftest import checkpoint_arrays

    from jaxvlm.pretrained import model_from_torch_tensors

    jmodel = model_from_torch_tensors(cfg, checkpoint_arrays(tmodel), options=ModelOptions(compute_dtype=dtype))
    return np.asarray(jaxvlm.forward(jmodel, ids, images, mask).astype(jnp.float32), np.float64)


def test_bf16_model_is_as_close_to_float32_as_torch_autocast():
    """The mixed batch of the parity tests (3, 1, 0 images, left padding, an almost-empty row),
    random weights: jaxvlm bf16 vs jaxvlm fp32 and torch_ref autocast-bf16 vs torch_ref fp32,
    relative to max|logits|. At real positions both run bf16 matmuls with fp32 accumulation and
    keep the rest in fp32, so the errors are of one size (jaxvlm's at most 2x torch's). At
    padded positions (queries that see only padding) jaxvlm keeps the fp32 semantics (uniform
    attention) within the same noise; torch's bf16 SDPA does not (its error there is reported)."""
    cfg = tiny_cfg()
    tmodel = random_torch_vlm(cfg, 11)
    T = 80
    ids, images, mask = make_batch(cfg, [(0, 3), (17, 1), (5, 0), (T - 1, 0)], T, 11)
    args = [torch.as_tensor(x) for x in (ids, images, mask)]
    with torch.no_grad():
        t32 = to_np(tmodel(*args)[0]).astype(np.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t16 = tmodel(*args)[0]
        t16 = to_np(t16.float()).astype(np.float64)
    j32 = _jax_logits(cfg, tmodel, jnp.float32, ids, images, mask)
    j16 = _jax_logits(cfg, tmodel, jnp.bfloat16, ids, images, mask)
    assert np.isfinite(j16).all() and np.isfinite(t16).all()
    scale = np.abs(t32).max()
    real, pad = mask == 1, mask == 0

    def err(a, b, where):
        return float(np.abs(a - b)[where].max() / scale)

    e = {
        "jaxvlm real": err(j16, j32, real),
        "torch real": err(t16, t32, real),
        "jaxvlm bf16 vs torch bf16 real": err(j16, t16, real),
        "jaxvlm padded": err(j16, j32, pad),
        "torch padded": err(t16, t32, pad),
    }
    record(
        "bf16 vs fp32 logits (mixed batch)",
        ", ".join(f"{k} {v:.2e}" for k, v in e.items())
        + f" (relative to max|logits| {scale:.3g}; tol: jaxvlm <= 2x torch's at real positions, padded <= 2x real)",
    )
    assert e["jaxvlm real"] <= 2 * e["torch real"] and e["jaxvlm real"] <= 5e-2, e
    assert e["jaxvlm bf16 vs torch bf16 real"] <= 3 * e["torch real"], e
    assert e["jaxvlm padded"] <= 2 * e["jaxvlm real"], e


def test_bf16_keeps_the_residual_stream_in_the_parameter_dtype():
    """As torch's autocast leaves upstream: matmul outputs bf16, the residual stream (token and
    patch embeddings, every block's sum, the norms) float32, the logits bf16, the KV cache bf16."""
    cfg = tiny_cfg()
    model = jaxvlm.VisionLanguageModel(cfg, options=ModelOptions(compute_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    ids, images, mask = make_batch(cfg, [(0, 1), (3, 0)], 32, 0)
    block = model.decoder.blocks[0]
    x = jnp.zeros((2, 32, cfg.lm_hidden_dim), jnp.float32)
    cos, sin = model.decoder.rotary_embd(jnp.arange(32)[None])
    assert block.attn(block.norm1(x), cos, sin).dtype == jnp.bfloat16
    assert block(x, cos, sin).dtype == jnp.float32
    assert model.vision_encoder(images).dtype == jnp.float32
    assert model.hidden_states(ids, images, mask).dtype == jnp.float32
    assert model(ids, images, mask).dtype == jnp.bfloat16
    assert model.decoder.init_cache(2, 8, model.options.compute_dtype)[0][0].dtype == jnp.bfloat16


def test_bf16_train_step_keeps_float32_masters_and_is_finite():
    """A bf16 train step on a batch with a fully padded-query row: finite loss and gradient
    norm, float32 parameters and Adam moments, the loss within bf16 noise of the fp32 step's."""
    from jaxvlm.train import Trainer

    cfg = tiny_cfg()
    tmodel = random_torch_vlm(cfg, 5)
    ids, images, mask = make_batch(cfg, [(0, 2), (30, 1), (60, 0)], 64, 5)
    labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    labels[:, -1] = -100
    labels[ids == cfg.image_token_id] = -100
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None], "images": images[None]}
    from conftest import checkpoint_arrays

    from jaxvlm.pretrained import model_from_torch_tensors

    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = model_from_torch_tensors(cfg, checkpoint_arrays(tmodel), options=ModelOptions(compute_dtype=dtype))
        trainer = Trainer(model, OptimConfig(max_training_steps=10))
        state = trainer.init_state(model)
        state, m = trainer.step(state, trainer.place_batch(batch))
        losses[jnp.dtype(dtype).name] = float(m["loss"])
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
        assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
        assert trainer.params_finite(state)
    record("bf16 vs fp32 train-step loss", f"{losses}")
    assert abs(losses["bfloat16"] - losses["float32"]) <= 2e-2 * abs(losses["float32"])


def _precisions(fn, *args) -> set[str]:
    """The precision of every dot_general in the jaxpr of fn(*args), nested calls included."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.add(str(eqn.params["precision"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("name", ["plain", "xla_cpu"])
@pytest.mark.parametrize("precision", ["highest", "default"])
def test_float32_matmuls_run_at_the_named_precision(precision, name):
    """Every dot of the forward and of the train step's backward carries the precision
    `ModelOptions.matmul_precision` names ("highest" unless asked: no silent TF32 on GPUs)."""
    from jaxvlm.train import Trainer

    cfg = tiny_cfg()
    options = ModelOptions(matmul_precision=precision, kernels=name)
    model = jaxvlm.VisionLanguageModel(cfg, options=options, rngs=nnx.Rngs(0))
    ids, images, mask = make_batch(cfg, [(0, 1), (3, 0)], 32, 0)
    graphdef, state = nnx.split(model)
    other = "default" if precision == "highest" else "highest"
    with jax.default_matmul_precision(other):  # the process-wide setting (conftest: highest) must not decide
        forward = _precisions(lambda s: nnx.merge(graphdef, s)(ids, images, mask), state)
    want = "Precision.HIGHEST" if precision == "highest" else "Precision.DEFAULT"
    assert forward and all(want in p for p in forward), forward
    labels = np.where(mask == 1, ids, -100)
    trainer = Trainer(model, OptimConfig(max_training_steps=10))
    train_state = trainer.init_state(model)
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None], "images": images[None]}
    with jax.default_matmul_precision(other):
        step = _precisions(trainer._step, train_state, trainer.place_batch(batch))
    assert step and all(want in p for p in step), step


def test_matmul_precision_is_validated():
    with pytest.raises(ValueError, match="matmul precision 'tf32': choose one of highest, high, default"):
        ModelOptions(matmul_precision="tf32")
    from jaxvlm.train_loop import RunConfig

    with pytest.raises(ValueError, match="matmul_precision 'fast': choose one of highest, high, default"):
        RunConfig(matmul_precision="fast")
    assert RunConfig().model_options().matmul_precision == "highest"


@pytest.mark.parametrize(
    "nh, nkv, T, causal, pads",
    [(4, 4, 64, False, None), (4, 2, 96, True, (0, 40, 95)), (4, 1, 64, True, (7, 0, 63))],
    ids=["vit", "decoder gqa", "decoder mqa"],
)
def test_cudnn_kernels_mask_forms_equal_plain(nh, nkv, T, causal, pads):
    """The cuDNN kernels' mask forms (causal flag + bf16 padding bias [B, 1, Tq, Tk]) run through
    XLA on the CPU (`implementation="xla"`; the fused kernel itself needs a GPU): forward and
    q/k/v gradients equal the plain kernels' at bf16 tolerance, fully padded queries included."""
    rng = np.random.default_rng(3)
    B, hd = 3, 32
    q, k, v = _bf16(rng, (B, T, nh, hd)), _bf16(rng, (B, T, nkv, hd)), _bf16(rng, (B, T, nkv, hd))
    mask = None
    if pads is not None:
        m = np.ones((B, T), np.int32)
        for b, n in enumerate(pads):
            m[b, :n] = 0
        mask = jnp.asarray(m)
    w = _bf16(rng, (B, T, nh, hd))

    def loss(attend):
        def f(q, k, v):
            y = attend(q, k, v, causal=causal, attention_mask=mask)
            return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)), y

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    def fused_on_xla(q, k, v, **kw):
        return kernels.cudnn_attention(q, k, v, implementation="xla", **kw)

    (_, y_ref), g_ref = loss(kernels.plain_attention)
    (_, y), g = loss(fused_on_xla)
    assert np.isfinite(_f64(y)).all()
    np.testing.assert_allclose(_f64(y), _f64(y_ref), atol=2 * BF16_ULP * np.abs(_f64(y_ref)).max())
    for name, a, b in zip("qkv", g, g_ref):
        scale = np.abs(_f64(b)).max()
        err = np.abs(_f64(a) - _f64(b)).max() / scale
        record(f"cudnn mask forms vs plain, d{name} ({nh}/{nkv} heads)", f"{err:.2e} relative (tol {4 * BF16_ULP:.1e})")
        assert err <= 4 * BF16_ULP, (name, err)


def test_cudnn_kernels_fall_back_to_plain_for_fp32_and_cached_decoding():
    rng = np.random.default_rng(4)
    q32 = jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32)
    mask = jnp.ones((1, 8), jnp.int32)
    y = kernels.cudnn_attention(q32, q32, q32, causal=True, attention_mask=mask)  # would fail on a CPU if fused
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(kernels.plain_attention(q32, q32, q32, causal=True, attention_mask=mask))
    )
    q, kv = _bf16(rng, (1, 1, 2, 16)), _bf16(rng, (1, 8, 2, 16))
    y = kernels.cudnn_attention(q, kv, kv, causal=True, attention_mask=mask, q_offset=jnp.int32(5))
    want = kernels.plain_attention(q, kv, kv, causal=True, attention_mask=mask, q_offset=jnp.int32(5))
    np.testing.assert_array_equal(_f64(y), _f64(want))


@pytest.mark.parametrize("name", ["plain", "xla_cpu"])
def test_bf16_generate_runs_at_batch_1_and_8(name):
    """Cached decoding in bf16 (prefill, then one token at a time through the KV cache): XLA:CPU
    once refused a batched bf16 x bf16 -> f32 dot there. Tokens in range, the cache in bf16."""
    from jaxvlm.generate import generate

    cfg = tiny_cfg()
    model = model_from_torch(cfg, random_torch_vlm(cfg, 2), ModelOptions(compute_dtype=jnp.bfloat16, kernels=name))
    for batch in (1, 8):
        rows = [(i % 3, 1) for i in range(batch)]
        ids, images, mask = make_batch(cfg, rows, 24, batch)
        tokens = np.asarray(generate(model, ids, images, mask, max_new_tokens=6, greedy=True))
        assert tokens.shape == (batch, 6) and ((tokens >= 0) & (tokens < cfg.lm_vocab_size)).all()


def model_from_torch(cfg, tmodel, options):
    from conftest import checkpoint_arrays

    from jaxvlm.pretrained import model_from_torch_tensors

    return model_from_torch_tensors(cfg, checkpoint_arrays(tmodel), options=options)
