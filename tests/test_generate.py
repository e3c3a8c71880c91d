"""Generation: jaxvlm.generate against torch_ref.generate (the eager, KV-cached reference).

Weights are random (every tensor, norms and biases included) and scaled so that the random
decoder is not degenerate: q/k at twice the 1/sqrt(fan_in) scale (sharp attention) and a small
token embedding (so a row does not just repeat its last token). Each parity test asserts that
the generated rows are varied and that the smallest top-1/top-2 logit margin over all steps is
well above the measured logit error, so that identical argmaxes are not luck.
Weights go torch_ref.save_pretrained -> jaxvlm.VisionLanguageModel.from_pretrained.
(conftest's `randomize_torch_` draws the embedding N(0, 1): a greedy random decoder then
repeats one token forever, hence the scaling here.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import record
from flax import nnx

import jaxvlm
import torch_ref
from jaxvlm.generate import TRACE_COUNTS, bucket_length
from jaxvlm.generate import generate as jax_generate
from jaxvlm.generate import replace_after_eos as jax_replace_after_eos
from jaxvlm.sampling import select_next_token
from jaxvlm.sampling import top_k_top_p_filtering as jax_filter
from torch_ref.generate import replace_after_eos as torch_replace_after_eos
from torch_ref.generate import top_k_top_p_filtering as torch_filter

jax.config.update("jax_default_matmul_precision", "highest")

# Tolerances on fp32 logits (|logit| < 10). The differences are float rounding, amplified by
# the random model: tiny measures <= 1.4e-5; the full-depth 222m decoder (30 blocks of sharp
# random attention) measures up to ~5e-4 on a heavily padded row, where torch_ref's own cached
# decode differs from its own uncached forward by as much (~3e-4; test_greedy_222m checks that
# jaxvlm's cache adds no more error than torch's).
TOL_TINY = 1e-4
TOL_222M = 2e-3
QK_SCALE = 2.0  # q/k weights at 2/sqrt(fan_in): sharp attention, varied greedy sequences


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The 2 cores are shared: OpenMP barriers with 2 threads stall badly under contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                if "token_embedding" in name:
                    std = 0.05
                elif "position_embedding" in name:
                    std = 1.0
                else:
                    std = p[0].numel() ** -0.5 * (QK_SCALE if ("q_proj" in name or "k_proj" in name) else 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def build_pair(cfg, seed, directory):
    tmodel = torch_ref.VisionLanguageModel(cfg).eval()
    randomize(tmodel, seed)
    tmodel.save_pretrained(directory)
    return cfg, tmodel, jaxvlm.VisionLanguageModel.from_pretrained(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_pair(jaxvlm.VLMConfig.tiny(), 0, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def m222(tmp_path_factory):
    return build_pair(jaxvlm.VLMConfig.nanovlm_222m(), 1, tmp_path_factory.mktemp("m222"))


def make_batch(cfg, lengths, images_per_row, seed):
    """Left-padded int64[B, max(lengths)] prompts, row b real for its last lengths[b] columns,
    with images_per_row[b] image-token blocks; returns (ids, mask, images or None)."""
    rng = np.random.default_rng(seed)
    B, T, L = len(lengths), max(lengths), cfg.n_image_tokens
    ids = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), np.int64)
    for b, (n, k) in enumerate(zip(lengths, images_per_row)):
        assert n >= 2 + k * L
        ids[b, T - n :] = rng.integers(3, cfg.lm_base_vocab_size, n)
        mask[b, T - n :] = 1
        start = T - n + 1
        ids[b, start : start + k * L] = cfg.image_token_id
    n_images = sum(images_per_row)
    images = rng.random((n_images, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32) if n_images else None
    return ids, mask, images


def run_both(pair, ids, mask, images, **kw):
    _, tmodel, jmodel = pair
    tt, tl = tmodel.generate(ids, images, mask, return_logits=True, **kw)
    jt, jl = jax_generate(jmodel, ids, images, mask, return_logits=True, **kw)
    return tt.numpy(), tl.numpy(), np.asarray(jt), np.asarray(jl)


def assert_greedy_parity(name, pair, ids, mask, images, n_new, tol=TOL_TINY):
    tt, tl, jt, jl = run_both(pair, ids, mask, images, max_new_tokens=n_new, greedy=True)
    assert jt.shape == (ids.shape[0], n_new) and jt.dtype == np.int32
    err = float(np.abs(tl - jl).max())
    top2 = np.sort(tl, axis=-1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).min())
    distinct = [len(set(row)) for row in tt]
    record(
        f"generate {name} greedy jaxvlm vs torch_ref",
        f"{n_new} tokens x {ids.shape[0]} rows identical; step logits max|diff| {err:.2e} (tol {tol:.0e}, "
        f"max|logit| {np.abs(tl).max():.1f}); min top-2 margin {margin:.2e}; distinct tokens per row {distinct}",
    )
    mismatch = np.argwhere(tt != jt)
    assert mismatch.size == 0, (
        f"first token mismatch at (row, step) {tuple(mismatch[0])}: torch {tt[tuple(mismatch[0])]} jax {jt[tuple(mismatch[0])]}"
    )
    assert err <= tol, f"step logits max|diff| {err:.2e} > {tol:.0e}"
    # No step was within float noise of a tie, so equal tokens are not luck.
    assert margin > 2 * err, (
        f"argmax margin {margin:.2e} too close to the logit error {err:.2e}: comparison not meaningful"
    )
    assert min(distinct) >= 4, f"degenerate random model, distinct tokens per row {distinct}"
    return jt, jl, tl


def full_sequence(ids, mask, tokens):
    """Prompt + all generated tokens but the last, and its mask (ones for generated tokens)."""
    B, n = tokens.shape
    mask = np.ones_like(ids) if mask is None else mask
    return np.concatenate([ids, tokens[:, :-1]], axis=1), np.concatenate(
        [mask, np.ones((B, n - 1), mask.dtype)], axis=1
    )


def assert_cached_equals_uncached(name, jmodel, ids, mask, images, tokens, step_logits, tol=TOL_TINY):
    """Logits of each decode step vs one uncached `jaxvlm.forward` over prompt + generated tokens."""
    full, full_mask = full_sequence(ids, mask, tokens)
    ref = np.asarray(jaxvlm.forward(jmodel, full, images, full_mask))[:, ids.shape[1] - 1 :]
    err = float(np.abs(ref - step_logits).max())
    record(
        f"generate {name} jaxvlm cached vs uncached",
        f"{tokens.shape[1]} steps, logits max|diff| {err:.2e} (tol {tol:.0e})",
    )
    assert err <= tol, f"cached decode vs full recomputation: max|diff| {err:.2e} > {tol:.0e}"
    return err


# ---- greedy parity with torch_ref ---------------------------------------------------------------
def test_greedy_tiny_images_left_padding(tiny):
    cfg = tiny[0]
    ids, mask, images = make_batch(cfg, [23, 9, 40], [1, 0, 2], seed=0)
    jt, jl, _ = assert_greedy_parity("tiny images+padding", tiny, ids, mask, images, n_new=40)
    assert_cached_equals_uncached("tiny images+padding", tiny[2], ids, mask, images, jt, jl)


def test_greedy_tiny_text_only(tiny):
    ids, mask, images = make_batch(tiny[0], [5, 17, 12, 30], [0, 0, 0, 0], seed=1)
    assert images is None
    jt, jl, _ = assert_greedy_parity("tiny text+padding", tiny, ids, mask, None, n_new=33)
    assert_cached_equals_uncached("tiny text+padding", tiny[2], ids, mask, None, jt, jl)
    # no attention mask at all (no padding)
    ids = ids[:, -5:]
    assert_greedy_parity("tiny text, no mask", tiny, ids, None, None, n_new=32)


def test_greedy_rope_rescale_past_max_position_embeddings(tmp_path):
    # Upstream divides inv_freq by max_pos / lm_max_position_embeddings past the limit, in the
    # prefill (from the prompt's last position) and at every decode step (from that step's).
    cfg = jaxvlm.VLMConfig.tiny(lm_max_position_embeddings=24)
    pair = build_pair(cfg, 2, tmp_path)
    ids, mask, images = make_batch(cfg, [30, 12], [1, 0], seed=2)
    assert_greedy_parity("tiny RoPE rescale", pair, ids, mask, images, n_new=32)


@pytest.mark.slow
def test_greedy_222m(m222):
    cfg, tmodel, jmodel = m222
    L = cfg.n_image_tokens
    ids, mask, images = make_batch(cfg, [L + 12, L + 30, 20], [1, 1, 0], seed=3)
    jt, jl, tl = assert_greedy_parity("222m images+padding", m222, ids, mask, images, n_new=36, tol=TOL_222M)
    err = assert_cached_equals_uncached("222m images+padding", jmodel, ids, mask, images, jt, jl, tol=TOL_222M)
    # The noise floor of this model: torch_ref's own cached decode vs its own uncached forward.
    full, full_mask = full_sequence(ids, mask, jt)
    with torch.no_grad():
        ref = tmodel(full, images, full_mask)[0].numpy()[:, ids.shape[1] - 1 :]
    floor = float(np.abs(ref - tl).max())
    record("generate 222m torch_ref cached vs uncached (noise floor)", f"logits max|diff| {floor:.2e}")
    assert err <= 2 * floor + 1e-5, f"jaxvlm's cache error {err:.2e} exceeds twice torch_ref's own {floor:.2e}"


@pytest.mark.slow
def test_greedy_222m_text_only(m222):
    ids, mask, _ = make_batch(m222[0], [14, 6], [0, 0], seed=4)
    assert_greedy_parity("222m text+padding", m222, ids, mask, None, n_new=32, tol=TOL_222M)


# ---- sampling ---------------------------------------------------------------------------------
def _undecided_by_float32(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """bool[B, V]: tokens whose top-p membership float32 rounding can flip.

    A token is kept when the probability mass sorted before it is below top_p. Both frameworks
    sum those probabilities in float32, in different orders; over n terms the sum is uncertain
    by up to n * eps32 (the worst-case bound). Tokens whose float64 mass before them lies within
    that of top_p are the ones neither framework decides robustly; every other token must be
    kept or dropped by both."""
    B, V = logits.shape
    k = V if top_k in (0, V) or top_k > V else top_k
    out = np.zeros((B, V), bool)
    if top_p >= 1.0:
        return out
    for b in range(B):
        order = np.argsort(-logits[b].astype(np.float64), kind="stable")[:k]
        x = logits[b, order].astype(np.float64)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs  # mass sorted before each token
        out[b, order[np.abs(before - top_p) <= k * np.finfo(np.float32).eps]] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_top_p_kept_set_matches_torch(seed):
    rng = np.random.default_rng(seed)
    for V, scale in [(1000, 1.0), (1000, 4.0), (49153, 2.0)]:
        logits = (rng.normal(size=(4, V)) * scale).astype(np.float32)
        for k in [0, 1, 7, 50, V]:
            for p in [1.0, 0.95, 0.6, 0.2, 1e-4]:
                if V > 1000 and k == 0 and p < 1.0:
                    continue  # a full 49k sort per row: slow on XLA:CPU, covered at V=1000
                t = torch_filter(torch.from_numpy(logits), top_k=k, top_p=p).numpy()
                j = np.asarray(jax_filter(jnp.asarray(logits), k, p))
                kept_t, kept_j = np.isfinite(t), np.isfinite(j)
                undecidable = _undecided_by_float32(logits, k, p)
                differ = kept_t != kept_j
                assert not np.any(differ & ~undecidable), (
                    f"V={V} k={k} p={p}: kept {kept_t.sum(-1)} (torch) vs {kept_j.sum(-1)} (jax), "
                    f"{int((differ & ~undecidable).sum())} of the differences decidable in float32"
                )
                if differ.any():
                    record(
                        f"top-p boundary V={V} k={k} p={p}",
                        f"{int(differ.sum())} token(s) within float32 rounding of p differ",
                    )
                both = kept_t & kept_j
                assert np.array_equal(t[both], j[both])
    # a traced top_p gives the same as a Python float
    logits = jnp.asarray(rng.normal(size=(3, 500)).astype(np.float32))
    traced = jax.jit(lambda l, p: jax_filter(l, 20, p))(logits, 0.5)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(jax_filter(logits, 20, 0.5)))


def test_sampling_distribution_filters_then_temperature():
    # Upstream: filter the raw logits, THEN softmax(filtered / temperature). Compare the
    # empirical jax frequencies with torch_ref's probabilities.
    logits = np.array([[2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -1.0, -3.0]], np.float32)
    k, p, temperature = 6, 0.9, 0.7
    probs = torch.softmax(torch_filter(torch.from_numpy(logits), top_k=k, top_p=p) / temperature, -1).numpy()[0]
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(
        jax.vmap(
            lambda key: select_next_token(
                jnp.asarray(logits), key, greedy=False, temperature=temperature, top_k=k, top_p=p
            )[0]
        )
    )
    freq = np.bincount(np.asarray(draw(keys)), minlength=logits.shape[1]) / n
    assert np.all(freq[probs == 0] == 0), f"drew a filtered token: {freq}"
    assert np.abs(freq - probs).max() < 0.015, f"frequencies {freq.round(3)} vs probabilities {probs.round(3)}"


def test_sampling_reproducible_and_top_k_1_is_greedy(tiny):
    cfg, tmodel, jmodel = tiny
    ids, mask, images = make_batch(cfg, [20, 11], [1, 0], seed=5)
    kw = dict(max_new_tokens=24, temperature=1.5, top_k=0, top_p=0.95)
    a = np.asarray(jax_generate(jmodel, ids, images, mask, seed=7, **kw))
    b = np.asarray(jax_generate(jmodel, ids, images, mask, seed=7, **kw))
    c = np.asarray(jax_generate(jmodel, ids, images, mask, seed=8, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "different seeds gave identical samples"
    greedy = tmodel.generate(ids, images, mask, max_new_tokens=24, greedy=True).numpy()
    for framework_generate in (tmodel.generate, lambda *a, **k: jax_generate(jmodel, *a, **k)):
        top1 = np.asarray(framework_generate(ids, images, mask, max_new_tokens=24, top_k=1, temperature=0.3, seed=3))
        np.testing.assert_array_equal(top1, greedy)


# ---- compiles -----------------------------------------------------------------------------------
def test_one_compile_per_bucket():
    # A config of its own, so that no other test has compiled these functions for it.
    cfg = jaxvlm.VLMConfig.tiny(lm_max_length=999, lm_n_blocks=1, vit_n_blocks=1)
    model = jaxvlm.VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    before = dict(TRACE_COUNTS)

    def new_traces():
        return {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode")}

    for T, n_new in [(3, 4), (7, 16), (18, 9), (32, 1), (25, 12)]:  # one prompt bucket (32), one Nb (16)
        ids = rng.integers(3, 1000, (2, T))
        mask = np.ones_like(ids)
        mask[0, : T // 2] = 0
        out = jax_generate(
            model, ids, None, mask, max_new_tokens=n_new, greedy=True, eos_token_id=int(rng.integers(3, 9))
        )
        assert out.shape == (2, n_new)
    assert new_traces() == {"prefill": 1, "decode": 1}, new_traces()
    for seed, temperature, top_p in [(0, 0.5, 0.9), (1, 1.0, 0.5)]:  # traced sampling parameters
        jax_generate(
            model, ids, None, mask, max_new_tokens=5, temperature=temperature, top_p=top_p, top_k=10, seed=seed
        )
    assert new_traces() == {"prefill": 1, "decode": 2}, new_traces()
    jax_generate(model, rng.integers(3, 1000, (2, 33)), None, None, max_new_tokens=5, greedy=True)  # next bucket
    assert new_traces() == {"prefill": 2, "decode": 3}, new_traces()


def test_bucket_length():
    assert [bucket_length(n, 32) for n in (1, 32, 33, 200, 256, 257, 600)] == [32, 32, 64, 256, 256, 512, 768]
    assert [bucket_length(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


# ---- EOS --------------------------------------------------------------------------------------
def test_replace_after_eos():
    tokens = np.array([[5, 2, 7, 2, 9], [1, 1, 1, 1, 1], [2, 3, 4, 5, 6], [4, 4, 4, 4, 2]])
    expected = np.array([[5, 2, 2, 2, 2], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2], [4, 4, 4, 4, 2]])
    np.testing.assert_array_equal(np.asarray(jax_replace_after_eos(jnp.asarray(tokens), 2)), expected)
    np.testing.assert_array_equal(torch_replace_after_eos(torch.from_numpy(tokens), 2).numpy(), expected)


def test_eos_end_to_end(tiny):
    cfg, tmodel, jmodel = tiny
    ids, mask, images = make_batch(cfg, [20, 11, 15], [1, 0, 0], seed=6)
    free = np.asarray(jax_generate(jmodel, ids, images, mask, max_new_tokens=24, greedy=True))
    eos = int(free[0, 5])
    expected = np.asarray(jax_replace_after_eos(jnp.asarray(free), eos))
    assert (expected == eos).sum() > (free == eos).sum(), "the EOS choice does not exercise the replacement"
    tt, _, jt, _ = run_both(tiny, ids, mask, images, max_new_tokens=24, greedy=True, eos_token_id=eos)
    np.testing.assert_array_equal(jt, expected)
    np.testing.assert_array_equal(tt, expected)
    # every row done -> the loop stops: no logits after the last row's first EOS
    first = int(np.argmax(free[0] == eos))
    _, jl = jax_generate(
        jmodel, ids[:1], images, mask[:1], max_new_tokens=24, greedy=True, eos_token_id=eos, return_logits=True
    )
    jl = np.asarray(jl)
    assert np.all(jl[0, : first + 1] != 0) and np.all(jl[0, first + 1 :] == 0), "decoding did not stop at EOS"


def test_stream_callback_sees_every_token_in_order(tiny):
    """`stream=` gets each chosen token from inside the on-device loop, in order, and the same
    tokens as the returned array (up to the stop at EOS); sampling mode, seeded."""
    cfg, _, jmodel = tiny
    ids, mask, images = make_batch(cfg, [20, 11], [1, 0], seed=7)
    seen = []
    out = np.asarray(
        jax_generate(
            jmodel,
            ids,
            images,
            mask,
            max_new_tokens=12,
            top_k=20,
            top_p=0.9,
            temperature=1.0,
            seed=3,
            stream=lambda step, tok: seen.append((step, tok.copy())),
        )
    )
    assert [s for s, _ in seen] == list(range(12))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), out)
    again = np.asarray(
        jax_generate(jmodel, ids, images, mask, max_new_tokens=12, top_k=20, top_p=0.9, temperature=1.0, seed=3)
    )
    np.testing.assert_array_equal(again, out)  # streaming does not change the draws


# ---- bad input --------------------------------------------------------------------------------
def test_bad_inputs(tiny):
    cfg, tmodel, jmodel = tiny
    ids, mask, images = make_batch(cfg, [12], [1], seed=7)
    generators = {"torch_ref": tmodel.generate, "jaxvlm": lambda *a, **k: jax_generate(jmodel, *a, **k)}
    for name, gen in generators.items():
        long_ids = np.full((1, cfg.lm_max_length - 10), 5)
        with pytest.raises(ValueError, match="lm_max_length"):
            gen(long_ids, None, None, max_new_tokens=11)
        with pytest.raises(ValueError, match="image tokens"):
            gen(ids, np.concatenate([images, images]), mask, max_new_tokens=2)
        with pytest.raises(ValueError, match="image tokens"):
            gen(ids, None, mask, max_new_tokens=2)
        with pytest.raises(ValueError, match="temperature"):
            gen(ids, images, mask, max_new_tokens=2, temperature=0.0)
        with pytest.raises(ValueError, match="max_new_tokens"):
            gen(ids, images, mask, max_new_tokens=-1)
        assert tuple(np.asarray(gen(ids, images, mask, max_new_tokens=0)).shape) == (1, 0), name
    with pytest.raises(ValueError, match="attention_mask"):
        jax_generate(jmodel, ids, images, mask[:, 1:], max_new_tokens=2)
