"""Multimodal packing (jaxvlm.data.packing): the knapsack, the packed batch, and the exactness
of `segments` mode - a packed batch's loss and every gradient equal those of the same samples
run one by one, unpacked, in jaxvlm and in torch_ref - plus jaxvlm vs torch_ref on packed
batches in both modes.

Tolerances. Packed vs unpacked: torch_ref in float64, loss and every gradient 1e-12 relative
(exact: no rounding to hide behind); jaxvlm in float32, loss 1e-6 relative and gradients per
parameter ||g_packed - g_unpacked|| / ||g_unpacked|| <= 3e-6. Why 3e-6 and not 1e-6: with these
random weights (loss ~40, peaky softmaxes) float32 rounding alone moves the gradients by
~1e-6 - the *unpacked* gradients through the xla_cpu and the plain kernels (the same
mathematics, sums in another order) differ by 1.1e-6 (`test_gradient_noise_floor` measures and
records it); packing, which changes the order of the sums over tokens and images, lands at
1-2.5e-6. A sample that saw another would miss by far more (the upstream mode, checked to
differ by > 1e-4). jaxvlm vs torch_ref: logits 1e-4 relative to the logits' scale and
gradients 1e-4 per parameter, as for every unpacked parity test. All weights random (norms
and biases too); worst misses recorded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close, make_batch, random_torch_vlm, record, tiny_cfg, to_np
from flax import nnx

import jaxvlm
from conversion.mapping import mapping
from jaxvlm.data.packing import collate_packed, pack_greedy
from jaxvlm.options import ModelOptions
from jaxvlm.pretrained import model_from_torch_tensors
from jaxvlm.train import loss_fn

LOSS_TOL = 1e-6  # jaxvlm fp32, packed vs unpacked
GRAD_TOL = 3e-6  # jaxvlm fp32, packed vs unpacked: see the module docstring
EXACT_TOL = 1e-12  # torch_ref float64, packed vs unpacked
PARITY_TOL = 1e-4


# ---- the knapsack -------------------------------------------------------------------------------
def test_pack_greedy_places_every_item_once_within_the_caps():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 60))
        shapes = [(int(rng.integers(1, 100)), int(rng.integers(0, 4))) for _ in range(n)]
        max_tiles = None if trial % 3 == 0 else 6
        rows = pack_greedy(shapes, 128, max_tiles)
        flat = sorted(i for r in rows for i in r)
        assert flat == list(range(n)), "every item exactly once"
        for r in rows:
            assert r == sorted(r) and sum(shapes[i][0] for i in r) <= 128
            assert max_tiles is None or sum(shapes[i][1] for i in r) <= max_tiles
        assert len(rows) >= -(-sum(t for t, _ in shapes) // 128)
        assert rows == pack_greedy(shapes, 128, max_tiles), "deterministic"


def test_pack_greedy_fills_rows_as_upstream_balanced_knapsack():
    # 6 items of 50 tokens into rows of 100: 3 full rows, no more
    assert len(pack_greedy([(50, 0)] * 6, 100)) == 3
    # a tile cap forces a row that tokens alone would not
    assert len(pack_greedy([(10, 2)] * 4, 100, max_tiles=4)) == 2
    with pytest.raises(ValueError, match="does not fit"):
        pack_greedy([(101, 0)], 100)


# ---- samples ------------------------------------------------------------------------------------
def _samples(cfg, specs, seed):
    """One dict per (tokens, images) spec, as `SampleEncoder.encode` gives: random text with its
    image tokens, labels shifted on random answer spans (-100 at image tokens and the end)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, (T, n_img) in enumerate(specs):
        ids, images, mask = make_batch(cfg, [(0, n_img)], T, seed * 100 + k)
        ids, mask = ids[0].astype(np.int32), mask[0].astype(np.int32)
        nxt = ids[1:]
        train = (nxt != cfg.image_token_id) & (rng.random(T - 1) < 0.6)
        labels = np.full(T, -100, np.int32)
        labels[:-1] = np.where(train, nxt, -100)
        S = cfg.vit_img_size
        pixels = images if images is not None else np.zeros((0, 3, S, S), np.float32)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "images": pixels})
    return out


SPECS = [(37, 1), (22, 0), (61, 2), (15, 1), (44, 0), (30, 1)]  # 209 tokens, 5 images


def _packed(cfg, samples, T, mode):
    rows = pack_greedy([(len(s["input_ids"]), s["images"].shape[0]) for s in samples], T)
    batch = collate_packed(
        [[samples[i] for i in r] for r in rows],
        seq_len=T,
        n_images=sum(s["images"].shape[0] for s in samples) + 1,  # one padding tile, never read
        pad_id=0,
        image_size=cfg.vit_img_size,
        mode=mode,
    )
    return rows, batch


def test_collate_packed_rows_restart_positions_and_keep_labels_inside_samples():
    cfg = tiny_cfg()
    samples = _samples(cfg, SPECS, 0)
    rows, batch = _packed(cfg, samples, 128, "segments")
    assert len(rows) == 2 and batch["n_samples"] == len(SPECS) and batch["n_images"] == 5
    k = 0
    for b, r in enumerate(rows):
        seg, pos = batch["segment_ids"][b], batch["position_ids"][b]
        t = 128 - sum(len(samples[i]["input_ids"]) for i in r)
        assert not batch["attention_mask"][b, :t].any() and (seg[:t] == 0).all()
        for j, i in enumerate(r, 1):
            n = len(samples[i]["input_ids"])
            np.testing.assert_array_equal(batch["input_ids"][b, t : t + n], samples[i]["input_ids"])
            np.testing.assert_array_equal(batch["labels"][b, t : t + n], samples[i]["labels"])
            assert batch["labels"][b, t + n - 1] == -100, "no label crosses into the next sample"
            assert (seg[t : t + n] == j).all() and (pos[t : t + n] == np.arange(n)).all()
            tiles = samples[i]["images"].shape[0]
            np.testing.assert_array_equal(batch["images"][k : k + tiles], samples[i]["images"])
            k, t = k + tiles, t + n
    assert not batch["images"][k:].any()
    _, up = _packed(cfg, samples, 128, "upstream")
    assert "segment_ids" not in up and "position_ids" not in up
    np.testing.assert_array_equal(up["input_ids"], batch["input_ids"])


# ---- exactness: packed (segments) == unpacked ---------------------------------------------------
def _flat_grads(grads) -> dict:
    return {tuple(path): np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(grads)}


@nnx.jit
def _value_and_grad(model, batch):
    return nnx.value_and_grad(loss_fn)(model, batch)


def _jax_loss_and_grads(model, batch):
    """Jitted (one compile per batch shape; the op-by-op form spent minutes compiling each op for each shape)."""
    loss, grads = _value_and_grad(model, batch)
    return float(loss), _flat_grads(grads)


def _jax_unpacked(model, samples):
    """Token-weighted mean loss and gradients over the samples run one at a time (B = 1, no padding)."""
    total, grads, n_all = 0.0, None, 0
    for s in samples:
        n = int((s["labels"] != -100).sum())
        batch = {k: s[k][None] for k in ("input_ids", "attention_mask", "labels")}
        batch["images"] = s["images"] if s["images"].shape[0] else None
        loss, g = _jax_loss_and_grads(model, batch)
        total += loss * n
        grads = {k: v * n for k, v in g.items()} if grads is None else {k: grads[k] + v * n for k, v in g.items()}
        n_all += n
    return total / n_all, {k: v / n_all for k, v in grads.items()}


def _compare_grads(name, got, want, tol):
    worst = 0.0
    for key, ref in want.items():
        norm = float(np.linalg.norm(ref))
        if norm == 0:
            continue
        rel = float(np.linalg.norm(got[key] - ref)) / norm
        worst = max(worst, rel)
        assert rel <= tol, (
            f"{name}: gradient of {'.'.join(map(str, key))} differs by {rel:.2e} relative (tol {tol:.0e})"
        )
    record(name, f"worst parameter gradient ||diff|| / ||ref|| {worst:.2e} (tol {tol:.0e})")


@pytest.mark.parametrize("kernels,T", [("xla_cpu", 160), pytest.param("plain", 128, marks=pytest.mark.slow)])
def test_segments_packing_equals_unpacked_in_jaxvlm(kernels, T):
    """xla_cpu at T = 160 also runs its query-chunked causal path (chunks of 80)."""
    cfg = tiny_cfg()
    tmodel = random_torch_vlm(cfg, 3)
    state = {k: to_np(v).copy() for k, v in tmodel.checkpoint_state().items()}
    model = model_from_torch_tensors(cfg, state, options=ModelOptions(kernels=kernels))
    samples = _samples(cfg, SPECS, 1)
    rows, batch = _packed(cfg, samples, T, "segments")
    assert max(len(r) for r in rows) >= 3, "rows must really pack several samples"
    batch = {k: v for k, v in batch.items() if k not in ("n_images", "n_samples")}
    loss_p, grads_p = _jax_loss_and_grads(model, batch)
    loss_u, grads_u = _jax_unpacked(model, samples)
    name = f"packing[jaxvlm,{kernels},T={T}]"
    record(f"{name} loss", f"packed {loss_p:.8f} unpacked {loss_u:.8f} rel {abs(loss_p - loss_u) / loss_u:.2e}")
    assert abs(loss_p - loss_u) <= LOSS_TOL * abs(loss_u)
    _compare_grads(f"{name} gradients", grads_p, grads_u, GRAD_TOL)
    # and the mode that lets samples see each other really differs: the test can fail
    _, up = _packed(cfg, samples, T, "upstream")
    loss_up, _ = _jax_loss_and_grads(model, {k: v for k, v in up.items() if k not in ("n_images", "n_samples")})
    assert abs(loss_up - loss_u) > 1e-4 * abs(loss_u)


def _torch_loss_and_grads(tmodel, batch):
    tmodel.zero_grad()
    images = batch["images"] if batch["images"] is not None and batch["images"].shape[0] else None
    logits, _ = tmodel(
        batch["input_ids"],
        images,
        batch["attention_mask"],
        segment_ids=batch.get("segment_ids"),
        position_ids=batch.get("position_ids"),
    )
    # the loss in the logits' dtype (torch_ref's own casts the logits to float32, as upstream)
    targets = torch.as_tensor(batch["labels"], dtype=torch.long).reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-100)
    loss.backward()
    grads = {k: np.zeros(p.shape) if p.grad is None else to_np(p.grad).astype(np.float64)  # None: unused (no images)
             for k, p in tmodel.named_parameters()}  # fmt: skip
    return float(loss.detach()), grads


def test_segments_packing_equals_unpacked_in_torch_ref_float64():
    cfg = tiny_cfg()
    tmodel = random_torch_vlm(cfg, 4).double().train()
    samples = [{**s, "images": s["images"].astype(np.float64)} for s in _samples(cfg, SPECS, 2)]
    rows, batch = _packed(cfg, samples, 128, "segments")
    assert max(len(r) for r in rows) >= 3
    batch["images"] = batch["images"][: batch["n_images"]]  # torch_ref checks the count eagerly
    loss_p, grads_p = _torch_loss_and_grads(tmodel, batch)
    total, acc, n_all = 0.0, None, 0
    for s in samples:
        n = int((s["labels"] != -100).sum())
        one = {k: s[k][None] for k in ("input_ids", "attention_mask", "labels")}
        one["images"] = s["images"]
        loss, g = _torch_loss_and_grads(tmodel, one)
        total += loss * n
        acc = {k: v * n for k, v in g.items()} if acc is None else {k: acc[k] + v * n for k, v in g.items()}
        n_all += n
    loss_u, grads_u = total / n_all, {k: v / n_all for k, v in acc.items()}
    record("packing[torch_ref,float64] loss", f"packed {loss_p:.12f} unpacked {loss_u:.12f}")
    assert abs(loss_p - loss_u) <= EXACT_TOL * abs(loss_u)
    _compare_grads("packing[torch_ref,float64] gradients", {(k,): v for k, v in grads_p.items()},
                   {(k,): v for k, v in grads_u.items()}, EXACT_TOL)  # fmt: skip
    # the upstream mode lets samples see each other: far from the unpacked result
    _, up = _packed(cfg, samples, 128, "upstream")
    loss_up, _ = _torch_loss_and_grads(tmodel, {**up, "images": up["images"][: up["n_images"]]})
    assert abs(loss_up - loss_u) > 1e-4 * abs(loss_u)


def test_gradient_noise_floor():
    """What float32 rounding alone does to these gradients: the unpacked samples through two
    kernel implementations of the same mathematics. Recorded, and bounded by GRAD_TOL: the
    packing tolerance sits just above what rounding alone gives."""
    cfg = tiny_cfg()
    tmodel = random_torch_vlm(cfg, 3)
    state = {k: to_np(v).copy() for k, v in tmodel.checkpoint_state().items()}
    samples = _samples(cfg, SPECS, 1)
    _, a = _jax_unpacked(model_from_torch_tensors(cfg, state, options=ModelOptions(kernels="xla_cpu")), samples)
    _, b = _jax_unpacked(model_from_torch_tensors(cfg, state, options=ModelOptions(kernels="plain")), samples)
    worst = max(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k]) for k in b if np.linalg.norm(b[k]) > 0)
    record("float32 gradient noise floor (unpacked, xla_cpu vs plain)", f"worst parameter {worst:.2e}")
    assert 0 < worst < GRAD_TOL


# ---- jaxvlm vs torch_ref on packed batches ------------------------------------------------------
@pytest.mark.parametrize("mode", ["segments", "upstream"])
def test_packed_batches_jaxvlm_vs_torch_ref(mode):
    cfg = tiny_cfg(lm_tie_weights=False)
    tmodel = random_torch_vlm(cfg, 5)
    state = {k: to_np(v).copy() for k, v in tmodel.checkpoint_state().items()}
    jmodel = model_from_torch_tensors(cfg, state)
    samples = _samples(cfg, SPECS, 3)
    _, batch = _packed(cfg, samples, 160, mode)
    images = batch["images"][: batch["n_images"]]
    seg, pos = batch.get("segment_ids"), batch.get("position_ids")
    with torch.no_grad():
        logits_t, _ = tmodel(batch["input_ids"], images, batch["attention_mask"], segment_ids=seg, position_ids=pos)
    logits_j = jaxvlm.forward(jmodel, batch["input_ids"], images, batch["attention_mask"], seg, pos)
    real = batch["attention_mask"].astype(bool)
    assert_close(f"packed logits[{mode}]", np.asarray(logits_j)[real], to_np(logits_t)[real], PARITY_TOL)

    # gradients of the training loss, every parameter
    tmodel.train()
    loss_t, grads_t = _torch_loss_and_grads(tmodel, {**batch, "images": images})
    jbatch = {k: v for k, v in batch.items() if k not in ("n_images", "n_samples")}
    loss_j, grads_j = _jax_loss_and_grads(jmodel, jbatch)
    assert abs(loss_j - loss_t) <= 1e-5 * abs(loss_t), f"loss jaxvlm {loss_j} vs torch_ref {loss_t}"
    worst, n_checked = 0.0, 0
    for e in mapping(cfg):
        if e.torch_key == "decoder.rotary_embd.inv_freq":
            continue
        want = grads_t[e.torch_key]
        got = e.transform.to_torch(grads_j[e.jax_path]).astype(np.float64)
        assert np.linalg.norm(want) > 0, f"{e.torch_key}: zero torch gradient, the comparison would be vacuous"
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        worst, n_checked = max(worst, rel), n_checked + 1
        assert rel <= PARITY_TOL, f"packed gradients[{mode}] {e.torch_key}: {rel:.2e} relative (tol {PARITY_TOL:.0e})"
    assert n_checked == len(grads_t)
    record(f"packed gradients[{mode}]", f"worst parameter {worst:.2e} (tol {PARITY_TOL:.0e})")
