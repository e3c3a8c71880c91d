"""Whole-model parity: jaxvlm vs torch_ref logits (eager `model(...)` and jitted
`jaxvlm.forward`), and torch_ref vs the float64 numpy oracle (upstream semantics).

Weights: every torch_ref parameter random (`conftest.randomize_torch_`), moved to jaxvlm only
through the real path: `torch_ref.save_pretrained` -> `jaxvlm.VisionLanguageModel.from_pretrained`
(the 222m test uses `conversion.mapping.torch_to_jax` via `model_from_torch_tensors`, no disk).

Tolerances: jaxvlm vs torch_ref max|diff| <= 1e-4 * max|logits| (JAX_TOL); torch_ref (fp32) vs
oracle (float64) <= 1e-5 * max|logits| (ORACLE_TOL); jitted vs eager jaxvlm <= 1e-5; long
prompts also KL(torch || jax) <= 1e-6 nats at every position and top-1 agreement everywhere
except exact near-ties (top-2 gap below the measured max|diff|).
All positions are compared, padded ones included.
"""

from __future__ import annotations

import numpy as np
import numpy_reference as nr
import pytest
import torch
from conftest import (
    SEEDS,
    assert_close,
    checkpoint_arrays,
    make_batch,
    random_torch_vlm,
    record,
    state_arrays_f64,
    tiny_cfg,
    to_np,
)

import jaxvlm
from conversion import VLMConfig

JAX_TOL = 1e-4  # jaxvlm vs torch_ref, relative to max|logits|
ORACLE_TOL = 1e-5  # torch_ref fp32 vs float64 oracle, relative to max|logits|
JIT_TOL = 1e-5  # jitted vs eager jaxvlm
KL_TOL = 1e-6  # nats, per position


def _torch_logits(tmodel, ids, images, mask):
    with torch.no_grad():
        logits, _ = tmodel(ids, images, mask)
    return to_np(logits)


def _pair_via_disk(cfg, seed, tmp_path):
    tmodel = random_torch_vlm(cfg, seed)
    tmodel.save_pretrained(tmp_path / "ckpt")
    jmodel = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert jmodel.cfg == cfg
    return tmodel, jmodel


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_and_top1(name, ref, got, mask):
    """KL(softmax(ref) || softmax(got)) per position and top-1 agreement, reported and checked."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)  # [B, T]
    real = mask.astype(bool)
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agree = top_ref == top_got
    srt = np.sort(ref, axis=-1)
    gap = srt[..., -1] - srt[..., -2]
    max_diff = float(np.abs(ref - got).max())
    record(
        name,
        f"KL max {kl.max():.2e} / mean {kl[real].mean():.2e} nats (tol {KL_TOL:.0e}); top-1 agreement "
        f"{agree[real].mean():.4f} on {real.sum()} real positions, {agree.mean():.4f} on all {agree.size}",
    )
    assert np.isfinite(kl).all()
    assert kl.max() <= KL_TOL, f"{name}: KL max {kl.max():.2e} (tol {KL_TOL:.0e})"
    bad = ~agree & (gap > max_diff)
    assert not bad.any(), (
        f"{name}: top-1 differs at {np.argwhere(bad)[:5].tolist()} where the top-2 gap exceeds max|diff| {max_diff:.2e}"
    )


def _check_no_nan(name, logits):
    n_bad = int(np.count_nonzero(~np.isfinite(logits)))
    assert n_bad == 0, f"{name}: {n_bad} non-finite logits"


# ---- the mixed batch: 3, 1, 0 images; left padding; a row of almost only padding -------------
@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_batch(seed, tmp_path):
    cfg = tiny_cfg()
    tmodel, jmodel = _pair_via_disk(cfg, seed, tmp_path)
    T = 80
    # (left padding, images): several images, one image under padding, none, all but one token padding
    ids, images, mask = make_batch(cfg, [(0, 3), (17, 1), (5, 0), (T - 1, 0)], T, seed)
    ref = _torch_logits(tmodel, ids, images, mask)
    _check_no_nan("torch_ref", ref)
    oracle = nr.vlm_logits(
        state_arrays_f64(tmodel), cfg, ids, None if images is None else images.astype(np.float64), mask
    )
    assert_close(f"model mixed batch[seed={seed}] torch_ref vs oracle", ref, oracle, ORACLE_TOL)
    eager = np.asarray(jmodel(ids, images, mask))
    jitted = np.asarray(jaxvlm.forward(jmodel, ids, images, mask))
    assert_close(f"model mixed batch[seed={seed}] jaxvlm eager vs torch_ref", eager, ref, JAX_TOL)
    assert_close(f"model mixed batch[seed={seed}] jaxvlm jit vs torch_ref", jitted, ref, JAX_TOL)
    assert_close(f"model mixed batch[seed={seed}] jaxvlm jit vs eager", jitted, eager, JIT_TOL)
    # the near-empty row, on its own scale (its logits are not dominated by the other rows')
    assert_close(
        f"model mixed batch[seed={seed}] almost-all-padding row jaxvlm vs torch_ref", eager[3], ref[3], JAX_TOL
    )


def test_no_images(tmp_path):
    cfg = tiny_cfg()
    tmodel, jmodel = _pair_via_disk(cfg, 3, tmp_path)
    T = 48
    ids, images, mask = make_batch(cfg, [(0, 0), (11, 0), (T - 2, 0)], T, 3)
    assert images is None
    ref = _torch_logits(tmodel, ids, None, mask)
    oracle = nr.vlm_logits(state_arrays_f64(tmodel), cfg, ids, None, mask)
    assert_close("model no images torch_ref vs oracle", ref, oracle, ORACLE_TOL)
    assert_close("model no images jaxvlm eager vs torch_ref", jmodel(ids, None, mask), ref, JAX_TOL)
    assert_close("model no images jaxvlm jit vs torch_ref", jaxvlm.forward(jmodel, ids, None, mask), ref, JAX_TOL)
    # no attention mask at all (upstream's generate prefill): plain causal attention
    ref_nomask = _torch_logits(tmodel, ids[:1], None, None)
    assert_close(
        "model no images, no mask jaxvlm jit vs torch_ref",
        jaxvlm.forward(jmodel, ids[:1], None, None),
        ref_nomask,
        JAX_TOL,
    )
    # left padding must not change a row's real positions beyond rounding (RoPE is relative)
    assert_close(
        "model no images: padded row vs the same tokens unpadded (torch_ref)",
        ref[1, 11:],
        _torch_logits(tmodel, ids[1:2, 11:], None, mask[1:2, 11:])[0],
        ORACLE_TOL,
    )


# ---- long prompts (>= 512 tokens), with and without the RoPE rescale branch --------------------
@pytest.mark.parametrize("max_pos", [8192, 256], ids=["no_rescale", "rope_rescale"])
def test_long_prompt(max_pos, tmp_path):
    cfg = tiny_cfg(lm_max_position_embeddings=max_pos)
    tmodel, jmodel = _pair_via_disk(cfg, 4, tmp_path)
    T = 544
    ids, images, mask = make_batch(cfg, [(0, 5), (131, 2)], T, 4)
    ref = _torch_logits(tmodel, ids, images, mask)
    name = f"model long T={T}[{'rescale' if T > max_pos else 'no rescale'}]"
    oracle = nr.vlm_logits(state_arrays_f64(tmodel), cfg, ids, images.astype(np.float64), mask)
    assert_close(f"{name} torch_ref vs oracle", ref, oracle, ORACLE_TOL)
    jitted = np.asarray(jaxvlm.forward(jmodel, ids, images, mask))
    assert_close(f"{name} jaxvlm jit vs torch_ref", jitted, ref, JAX_TOL)
    _kl_and_top1(f"{name} jaxvlm jit vs torch_ref", ref, jitted, mask)
    _kl_and_top1(f"{name} torch_ref vs oracle", oracle, ref, mask)


def test_image_token_count_mismatch(tmp_path):
    cfg = tiny_cfg()
    tmodel, jmodel = _pair_via_disk(cfg, 0, tmp_path)
    ids, images, mask = make_batch(cfg, [(0, 2)], 32, 0)
    for imgs in (images[:1], None, np.concatenate([images, images[:1]])):
        with pytest.raises(ValueError, match="image tokens"):
            tmodel(ids, imgs, mask)
        with pytest.raises(ValueError, match="image tokens"):
            jmodel(ids, imgs, mask)


# ---- the released 222M shapes, once -----------------------------------------------------------
@pytest.mark.slow
def test_nanovlm_222m_logits():
    from jaxvlm.pretrained import model_from_torch_tensors

    cfg = VLMConfig.nanovlm_222m()
    tmodel = random_torch_vlm(cfg, 0)
    jmodel = model_from_torch_tensors(cfg, checkpoint_arrays(tmodel))
    T = 520
    ids, images, mask = make_batch(cfg, [(0, 1), (37, 1)], T, 0)
    assert images.shape == (2, 3, 224, 224) and int((ids == cfg.image_token_id).sum()) == 2 * 49
    ref = _torch_logits(tmodel, ids, images, mask)
    jitted = np.asarray(jaxvlm.forward(jmodel, ids, images, mask))
    del tmodel, jmodel
    assert_close(f"nanovlm-222m T={T} jaxvlm jit vs torch_ref", jitted, ref, JAX_TOL)
    _kl_and_top1(f"nanovlm-222m T={T} jaxvlm jit vs torch_ref", ref, jitted, mask)
