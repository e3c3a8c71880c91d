"""Per-component parity, three ways: jaxvlm vs torch_ref (fp32, weights copied through the
mapping table's transforms) and torch_ref vs the float64 numpy oracle written from the spec.

Every weight is random (norms, biases, the ViT position embedding included; see
`conftest.randomize_torch_`); inputs are random; seeds 0, 1, 2.
Tolerances (relative to max|reference|): 1e-5 for every fp32-vs-fp32 and fp32-vs-float64
comparison of a component; pixel shuffle is pure data movement and must be bit-exact.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpy_reference as nr
import pytest
import torch
from conftest import SEEDS, assert_close, copy_torch_to_nnx, randomize_torch_, tiny_cfg, to_np
from flax import nnx

import jaxvlm.language_model as jlm
import jaxvlm.modality_projector as jmp
import jaxvlm.vision_transformer as jvt
import torch_ref.language_model as tlm
import torch_ref.modality_projector as tmp
import torch_ref.vision_transformer as tvt
from jaxvlm.options import ModelOptions

TOL = 1e-5  # relative to max|reference|, fp32


def _sd64(tmod: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """A submodule's state as float64 numpy under its whole-model key prefix (for the oracle)."""
    return {f"{prefix}.{k}": to_np(v).astype(np.float64) for k, v in tmod.state_dict().items()}


def _pair(tcls, jcls, cfg, seed, prefix, *, j_dtypes=True):
    """The same component in both frameworks, random torch weights copied into the NNX one."""
    torch.manual_seed(seed)
    t = randomize_torch_(tcls(cfg), seed)
    j = jcls(cfg, ModelOptions(), rngs=nnx.Rngs(seed)) if j_dtypes else jcls(cfg)
    copy_torch_to_nnx(t, j, cfg=cfg, prefix=prefix)
    return t, j


def _mask(B: int, T: int) -> np.ndarray:
    """Left padding: row 0 none, row 1 a third of the row, the last row all but its last token."""
    mask = np.ones((B, T), np.int64)
    if B > 1:
        mask[1, : T // 3] = 0
    mask[-1, : T - 1] = 0
    return mask


# ---- vision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_patch_embedding(seed):
    cfg = tiny_cfg()
    t, j = _pair(tvt.ViTPatchEmbeddings, jvt.ViTPatchEmbeddings, cfg, seed, "vision_encoder.patch_embedding")
    images = np.random.default_rng(seed).random((3, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    with torch.no_grad():
        out_t = t(torch.from_numpy(images))
    sd = _sd64(t, "vision_encoder.patch_embedding")
    p = "vision_encoder.patch_embedding"
    want = nr.patch_embedding(
        images.astype(np.float64), sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], sd[f"{p}.position_embedding"]
    )
    assert_close(f"patch_embedding[seed={seed}] torch_ref vs oracle", out_t, want, TOL)
    assert_close(f"patch_embedding[seed={seed}] jaxvlm vs torch_ref", j(jnp.asarray(images)), out_t, TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_layer_norm(seed):
    """The ViT LayerNorm on rows with a large common offset (a one-pass E[x^2] - E[x]^2 variance
    loses digits there) and rows of tiny spread (where eps = vit_ln_eps, 1e-6, matters)."""
    cfg = tiny_cfg()
    torch.manual_seed(seed)
    t = randomize_torch_(torch.nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps), seed)
    j = jvt.layer_norm(cfg, ModelOptions(), nnx.Rngs(seed))
    copy_torch_to_nnx(t, j, cfg=cfg, prefix="vision_encoder.layer_norm")
    rng = np.random.default_rng(seed)
    spread = np.array([1.0, 1.0, 1e-3, 3e-4, 10.0])[:, None]
    offset = np.array([0.0, 20.0, 0.0, 0.0, -30.0])[:, None]
    x = (rng.standard_normal((5, cfg.vit_hidden_dim)) * spread + offset).astype(np.float32)
    with torch.no_grad():
        out_t = t(torch.from_numpy(x))
    want = nr.layer_norm(
        x.astype(np.float64), to_np(t.weight).astype(np.float64), to_np(t.bias).astype(np.float64), cfg.vit_ln_eps
    )
    assert_close(f"layer_norm[seed={seed}] torch_ref vs oracle", out_t, want, TOL)
    assert_close(f"layer_norm[seed={seed}] jaxvlm vs torch_ref", j(jnp.asarray(x)), out_t, TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_vit_block(seed):
    cfg = tiny_cfg()
    t, j = _pair(tvt.ViTBlock, jvt.ViTBlock, cfg, seed, "vision_encoder.blocks.0")
    x = np.random.default_rng(seed).standard_normal((2, cfg.vit_n_patches, cfg.vit_hidden_dim)).astype(np.float32)
    with torch.no_grad():
        out_t = t(torch.from_numpy(x))
    want = nr.vit_block(x.astype(np.float64), _sd64(t, "b"), "b", cfg)
    assert_close(f"vit_block[seed={seed}] torch_ref vs oracle", out_t, want, TOL)
    assert_close(f"vit_block[seed={seed}] jaxvlm vs torch_ref", j(jnp.asarray(x)), out_t, TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_vit(seed):
    cfg = tiny_cfg(vit_n_blocks=3)
    t, j = _pair(tvt.ViT, jvt.ViT, cfg, seed, "vision_encoder")
    images = np.random.default_rng(seed).random((3, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    with torch.no_grad():
        out_t = t(torch.from_numpy(images))
    want = nr.vit(images.astype(np.float64), _sd64(t, "vision_encoder"), cfg)
    assert_close(f"vit[seed={seed}] torch_ref vs oracle", out_t, want, TOL)
    assert_close(f"vit[seed={seed}] jaxvlm vs torch_ref", j(jnp.asarray(images)), out_t, TOL)


# ---- projector --------------------------------------------------------------------------------
@pytest.mark.parametrize("side,s,D", [(4, 2, 64), (8, 4, 3), (6, 3, 5), (14, 2, 7)])
def test_pixel_shuffle_exact(side, s, D):
    x = np.random.default_rng(side * s).standard_normal((2, side * side, D)).astype(np.float32)
    want = nr.pixel_shuffle(x, s)  # the spec's index map, in float32 (pure data movement)
    got_t = to_np(tmp.pixel_shuffle(torch.from_numpy(x), s))
    got_j = np.asarray(jmp.pixel_shuffle(jnp.asarray(x), s))
    assert got_t.shape == got_j.shape == (2, (side // s) ** 2, s * s * D)
    n_t, n_j = int((got_t != want).sum()), int((got_j != want).sum())
    print(
        f"pixel_shuffle[side={side},s={s},D={D}]: elements differing torch_ref/jaxvlm vs oracle {n_t}/{n_j} (tol 0, exact)"
    )
    assert np.array_equal(got_t, want), f"pixel_shuffle torch_ref: {n_t} elements differ from the spec (tol: exact)"
    assert np.array_equal(got_j, want), f"pixel_shuffle jaxvlm: {n_j} elements differ from the spec (tol: exact)"
    # The permute order matters: the naive (0, 1, 2, 3, 4, 5) order gives a different layout.
    naive = x.reshape(2, side // s, s, side // s, s, D).reshape(2, (side // s) ** 2, s * s * D)
    assert not np.array_equal(naive, want)


def test_pixel_shuffle_rejects_bad_grid():
    for fn, arr in (
        (tmp.pixel_shuffle, torch.zeros(1, 15, 4)),
        (jmp.pixel_shuffle, jnp.zeros((1, 15, 4))),
        (tmp.pixel_shuffle, torch.zeros(1, 36, 4)),
        (jmp.pixel_shuffle, jnp.zeros((1, 36, 4))),
    ):
        with pytest.raises(ValueError, match="pixel shuffle"):
            fn(arr, 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_projector(seed):
    cfg = tiny_cfg()
    t, j = _pair(tmp.ModalityProjector, jmp.ModalityProjector, cfg, seed, "MP")
    x = np.random.default_rng(seed).standard_normal((3, cfg.vit_n_patches, cfg.vit_hidden_dim)).astype(np.float32)
    with torch.no_grad():
        out_t = t(torch.from_numpy(x))
    assert out_t.shape == (3, cfg.n_image_tokens, cfg.lm_hidden_dim)
    assert_close(
        f"projector[seed={seed}] torch_ref vs oracle",
        out_t,
        nr.projector(x.astype(np.float64), _sd64(t, "MP"), cfg),
        TOL,
    )
    assert_close(f"projector[seed={seed}] jaxvlm vs torch_ref", j(jnp.asarray(x)), out_t, TOL)


# ---- decoder pieces ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_rmsnorm(seed):
    cfg = tiny_cfg()
    t, j = _pair(tlm.RMSNorm, jlm.RMSNorm, cfg, seed, "decoder.norm", j_dtypes=False)
    rng = np.random.default_rng(seed)
    # rows of very different scales, one almost zero (eps matters there)
    x = (
        rng.standard_normal((2, 7, cfg.lm_hidden_dim)) * np.array([1e-3, 0.1, 1, 3, 10, 100, 1e3])[None, :, None]
    ).astype(np.float32)
    with torch.no_grad():
        out_t = t(torch.from_numpy(x))
    want = nr.rms_norm(x.astype(np.float64), to_np(t.weight).astype(np.float64), cfg.lm_rms_eps)
    assert_close(f"rmsnorm[seed={seed}] torch_ref vs oracle", out_t, want, TOL)
    assert_close(f"rmsnorm[seed={seed}] jaxvlm vs torch_ref", j(jnp.asarray(x)), out_t, TOL)


def test_rope_inv_freq_matches_spec():
    for cfg in (tiny_cfg(), tiny_cfg(lm_re_base=10000, lm_hidden_dim=96, lm_n_heads=3, lm_n_kv_heads=3)):
        want = nr.rope_inv_freq(cfg.lm_head_dim, cfg.lm_re_base)
        assert_close(
            f"rope inv_freq[hd={cfg.lm_head_dim},base={cfg.lm_re_base}] torch_ref buffer vs spec",
            tlm.RotaryEmbedding(cfg).inv_freq,
            want,
            1e-6,
        )
        assert_close(
            f"rope inv_freq[hd={cfg.lm_head_dim},base={cfg.lm_re_base}] jaxvlm buffer vs spec",
            jlm.RotaryEmbedding(cfg).inv_freq[...],
            want,
            1e-6,
        )


# (start position, T) with lm_max_position_embeddings = 16: below, at and past the limit.
ROPE_CASES = [(0, 12), (0, 16), (0, 17), (0, 40), (30, 5)]


@pytest.mark.parametrize("perturb", [False, True], ids=["spec_inv_freq", "random_inv_freq"])
@pytest.mark.parametrize("start,T", ROPE_CASES)
def test_rope(start, T, perturb):
    cfg = tiny_cfg(lm_max_position_embeddings=16, lm_attn_scaling=0.9)
    t = tlm.RotaryEmbedding(cfg)
    if perturb:  # the buffer is part of the checkpoint: jaxvlm must use the loaded one
        with torch.no_grad():
            t.inv_freq.mul_(
                torch.from_numpy(np.random.default_rng(T).uniform(0.5, 1.5, t.inv_freq.shape).astype(np.float32))
            )
    j = jlm.RotaryEmbedding(cfg)
    copy_torch_to_nnx(t, j, cfg=cfg, prefix="decoder.rotary_embd")
    B = 2
    positions = np.broadcast_to(np.arange(start, start + T), (B, T)).copy()
    name = f"rope[start={start},T={T},{'random' if perturb else 'spec'} inv_freq]"
    cos_t, sin_t = t(torch.from_numpy(positions))
    cos_j, sin_j = j(jnp.asarray(positions))
    inv = to_np(t.inv_freq).astype(np.float64)
    cos_n, sin_n = nr.rope_cos_sin(positions, inv, cfg.lm_max_position_embeddings, cfg.lm_attn_scaling)
    rescaled = start + T > cfg.lm_max_position_embeddings
    if rescaled:  # the branch must matter for this case, or the test would not exercise it
        cos_plain, _ = nr.rope_cos_sin(positions, inv, 10**9, cfg.lm_attn_scaling)
        assert np.abs(cos_plain - cos_n).max() > 1e-2
    for what, got, want in (("cos", cos_t, cos_n), ("sin", sin_t, sin_n)):
        assert_close(f"{name} {what} torch_ref vs oracle", got, want, TOL)
    for what, got, want in (("cos", cos_j, cos_t), ("sin", sin_j, sin_t)):
        assert_close(f"{name} {what} jaxvlm vs torch_ref", got, want, TOL)
    # applied to q-like tensors: torch layout [B, h, T, hd], jax layout [B, T, h, hd]
    x = np.random.default_rng(T).standard_normal((B, cfg.lm_n_heads, T, cfg.lm_head_dim)).astype(np.float32)
    y_t = tlm.apply_rotary_pos_embd(torch.from_numpy(x), cos_t, sin_t)
    y_j = jlm.apply_rotary_pos_embd(jnp.asarray(x.transpose(0, 2, 1, 3)), cos_j, sin_j)
    assert_close(f"{name} applied torch_ref vs oracle", y_t, nr.apply_rope(x.astype(np.float64), cos_n, sin_n), TOL)
    assert_close(f"{name} applied jaxvlm vs torch_ref", np.asarray(y_j).transpose(0, 2, 1, 3), y_t, TOL)


def _decoder_inputs(cfg, seed, B=3, T=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, cfg.lm_hidden_dim)).astype(np.float32)
    rot = tlm.RotaryEmbedding(cfg)
    cos, sin = rot(torch.arange(T)[None].expand(B, -1))
    return x, _mask(B, T), cos, sin


GQA_CASES = [(s, 2) for s in SEEDS] + [(0, 1), (0, 4)]


@pytest.mark.parametrize("seed,n_kv", GQA_CASES)
def test_gqa_attention(seed, n_kv):
    cfg = tiny_cfg(lm_n_kv_heads=n_kv)
    t, j = _pair(
        tlm.LanguageModelGroupedQueryAttention,
        jlm.LanguageModelGroupedQueryAttention,
        cfg,
        seed,
        "decoder.blocks.0.attn",
    )
    x, mask, cos, sin = _decoder_inputs(cfg, seed)
    sd = _sd64(t, "a")
    cos_n, sin_n = to_np(cos).astype(np.float64), to_np(sin).astype(np.float64)
    for masked in (True, False):
        m = mask if masked else None
        with torch.no_grad():
            out_t, _ = t(torch.from_numpy(x), cos, sin, None if m is None else torch.from_numpy(m))
        name = f"gqa_attention[seed={seed},kv={n_kv},{'left-padded' if masked else 'no mask'}]"
        assert_close(
            f"{name} torch_ref vs oracle",
            out_t,
            nr.gqa_attention(x.astype(np.float64), sd, "a", cfg, cos_n, sin_n, m),
            TOL,
        )
        out_j = j(
            jnp.asarray(x), jnp.asarray(to_np(cos)), jnp.asarray(to_np(sin)), None if m is None else jnp.asarray(m)
        )
        assert_close(f"{name} jaxvlm vs torch_ref (all positions, padded ones included)", out_j, out_t, TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_decoder_block(seed):
    cfg = tiny_cfg()
    t, j = _pair(tlm.LanguageModelBlock, jlm.LanguageModelBlock, cfg, seed, "decoder.blocks.1")
    x, mask, cos, sin = _decoder_inputs(cfg, seed)
    with torch.no_grad():
        out_t, _ = t(torch.from_numpy(x), cos, sin, torch.from_numpy(mask))
    want = nr.decoder_block(
        x.astype(np.float64),
        _sd64(t, "b"),
        "b",
        cfg,
        to_np(cos).astype(np.float64),
        to_np(sin).astype(np.float64),
        mask,
    )
    assert_close(f"decoder_block[seed={seed}] torch_ref vs oracle", out_t, want, TOL)
    out_j = j(jnp.asarray(x), jnp.asarray(to_np(cos)), jnp.asarray(to_np(sin)), jnp.asarray(mask))
    assert_close(f"decoder_block[seed={seed}] jaxvlm vs torch_ref", out_j, out_t, TOL)


@pytest.mark.parametrize("seed,tie", [(0, True), (1, False), (2, True)])
def test_decoder(seed, tie):
    cfg = tiny_cfg(lm_n_blocks=3, lm_tie_weights=tie)
    t, j = _pair(tlm.LanguageModel, jlm.LanguageModel, cfg, seed, "decoder")
    assert (t.head.weight is t.token_embedding.weight) == tie
    x, mask, _, _ = _decoder_inputs(cfg, seed, T=40)
    with torch.no_grad():
        hid_t, _ = t(torch.from_numpy(x), attention_mask=torch.from_numpy(mask))
        logits_t = t.head(hid_t)
    sd = _sd64(t, "decoder")
    hid_n = nr.decoder(x.astype(np.float64), sd, cfg, mask)
    name = f"decoder[seed={seed},tied={tie}]"
    assert_close(f"{name} hidden torch_ref vs oracle", hid_t, hid_n, TOL)
    assert_close(f"{name} logits torch_ref vs oracle", logits_t, nr.linear(hid_n, sd["decoder.head.weight"]), TOL)
    hid_j = j(jnp.asarray(x), jnp.asarray(mask))
    assert_close(f"{name} hidden jaxvlm vs torch_ref", hid_j, hid_t, TOL)
    assert_close(f"{name} logits jaxvlm vs torch_ref", j.logits(hid_j), logits_t, TOL)
