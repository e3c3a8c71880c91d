"""Training: jaxvlm's jitted step vs torch_ref's eager recipe, the label-position loss, compile
counts per bucket, and the run loop's exact resume.

Tolerances: losses and parameters after 5 optimizer steps equal to 1e-5 relative (per tensor:
||p_jax - p_torch|| / ||p_torch||), fp32 on CPU with full-precision matmuls.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import assert_close, make_batch, random_torch_vlm, record, tiny_cfg
from flax import nnx

import jaxvlm
from conversion import OptimConfig, jax_to_torch
from conversion.recipe import upstream_lr as recipe_upstream_lr
from jaxvlm.options import ModelOptions
from jaxvlm.pretrained import flat_state
from jaxvlm.train import Trainer, label_positions, loss_fn, upstream_lr
from torch_ref.train import make_optimizer, train_step

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "data" / "smollm2"
needs_tokenizer = pytest.mark.skipif(
    not (TOKENIZER / "tokenizer.json").is_file(),
    reason=f"the real SmolLM2 tokenizer is not at {TOKENIZER} (../shared is absent)",
)


@pytest.fixture
def cfg():
    return tiny_cfg()


def micro_batch(cfg, seed, T=48):
    """A left-padded micro-batch with 0, 1 and 2 images per row and labels on the last tokens."""
    ids, images, mask = make_batch(cfg, [(0, 1), (5, 0), (11, 2)], T, seed)
    rng = np.random.default_rng(seed + 100)
    labels = np.full(ids.shape, -100, np.int64)
    for b in range(ids.shape[0]):
        n = int(rng.integers(3, 9))
        labels[b, T - n - 1 : T - 1] = ids[b, T - n :]  # shifted: label t = next token
    return {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "labels": labels.astype(np.int32),
        "images": images,
    }


def to_torch(mb):
    return {k: torch.as_tensor(v) if v.dtype == np.float32 else torch.as_tensor(v).long() for k, v in mb.items()}


def test_schedules_agree():
    for max_steps in (5, 100, 1000):
        for lr in (5e-5, 5.12e-3):
            for step in range(0, max_steps + 3, max(1, max_steps // 50)):
                want = recipe_upstream_lr(step, lr, max_steps)
                got = float(upstream_lr(step, lr, max_steps))
                assert abs(got - want) <= 1e-6 * lr, f"lr at step {step}/{max_steps}: {got} != {want}"


def test_label_positions_give_the_full_loss(cfg):
    tmodel = random_torch_vlm(cfg, 0)
    model = jaxvlm.pretrained.model_from_torch_tensors(
        cfg, {k: v.detach().numpy() for k, v in tmodel.checkpoint_state().items()}
    )
    mb = micro_batch(cfg, 0)
    full = float(loss_fn(model, mb))
    pos = label_positions(mb["labels"])
    assert pos.shape[1] == 8 and pos.shape[1] < mb["labels"].shape[1]
    fast = float(loss_fn(model, {**mb, "label_positions": pos}))
    assert_close("label-position loss vs full loss", np.float64(fast), np.float64(full), 1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_five_steps_match_torch_ref(cfg, accum):
    """Upstream's recipe (three groups and lrs, clipping at 1.0, warmup + cosine) for 5 steps."""
    ocfg = OptimConfig(max_training_steps=50)  # warmup 1.5 steps, then cosine
    tmodel = random_torch_vlm(cfg, 1).train()
    t64 = copy.deepcopy(tmodel).double()  # float64 torch: how far each fp32 run is from exact
    opt64 = make_optimizer(t64, ocfg)
    model = jaxvlm.pretrained.model_from_torch_tensors(
        cfg, {k: v.detach().numpy().copy() for k, v in tmodel.checkpoint_state().items()}
    )
    optimizer = make_optimizer(tmodel, ocfg)
    trainer = Trainer(model, ocfg)
    state = trainer.init_state(model)
    worst_loss = 0.0
    for step in range(5):
        mbs = [micro_batch(cfg, 10 * step + a) for a in range(accum)]
        t_metrics = train_step(tmodel, optimizer, [to_torch(mb) for mb in mbs], step, ocfg)
        train_step(
            t64,
            opt64,
            [{k: v.double() if v.is_floating_point() else v for k, v in to_torch(mb).items()} for mb in mbs],
            step,
            ocfg,
        )
        group = {k: np.stack([mb[k] for mb in mbs]) for k in mbs[0]}
        pos = label_positions(group["labels"].reshape(-1, group["labels"].shape[-1]))
        group["label_positions"] = pos.reshape(accum, -1, pos.shape[-1])
        state, j_metrics = trainer.step(state, group)
        rel = abs(float(j_metrics["loss"]) - t_metrics["loss"]) / abs(t_metrics["loss"])
        worst_loss = max(worst_loss, rel)
        assert rel <= 1e-5, (
            f"step {step}: loss {float(j_metrics['loss'])} vs torch {t_metrics['loss']} ({rel:.2e} relative)"
        )
    want = {k: v.detach().numpy() for k, v in tmodel.checkpoint_state().items()}
    got = jax_to_torch(cfg, flat_state(trainer.model(state)))
    errors = {k: np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k]) for k in want}
    worst = max(errors, key=errors.get)
    exact = {k: v.detach().numpy() for k, v in t64.checkpoint_state().items()}
    to_exact = {
        name: np.linalg.norm(w[worst] - exact[worst]) / np.linalg.norm(exact[worst])
        for name, w in (("jaxvlm", got), ("torch_ref", want))
    }
    record(
        f"train parity accum={accum}",
        f"losses {worst_loss:.2e} relative; worst parameter {worst} {errors[worst]:.2e} "
        f"relative (tol 1e-5); vs float64 torch: jaxvlm {to_exact['jaxvlm']:.2e}, torch_ref fp32 {to_exact['torch_ref']:.2e}",
    )
    assert errors[worst] <= 1e-5, f"after 5 steps {worst} differs by {errors[worst]:.2e} relative (tol 1e-5)"
    initial = random_torch_vlm(cfg, 1).checkpoint_state()
    for k in ("MP.proj.weight", "decoder.head.weight", "vision_encoder.blocks.0.mlp.fc1.weight"):
        assert not np.array_equal(want[k], initial[k].numpy()), f"training did not change {k}"


def test_frozen_groups_keep_no_state_and_do_not_move(cfg):
    ocfg = OptimConfig(lr_vision_backbone=0.0, max_training_steps=10)
    model = jaxvlm.VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    before = flat_state(model)
    trainer = Trainer(model, ocfg)
    state = trainer.init_state(model)
    assert all(p[0] != "vision_encoder" for p, _ in nnx.to_flat_state(state.params))
    opt_leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    assert not any("vision_encoder" in jax.tree_util.keystr(p) for p, _ in opt_leaves), (
        "frozen group has optimizer state"
    )
    group = {k: v[None] for k, v in micro_batch(cfg, 0).items()}
    state, _ = trainer.step(state, group)
    after = flat_state(trainer.model(state))
    assert all(np.array_equal(before[p], after[p]) for p in before if p[0] == "vision_encoder")
    assert not np.array_equal(before[("MP", "proj", "kernel")], after[("MP", "proj", "kernel")])


def test_one_compile_per_bucket(cfg):
    model = jaxvlm.VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    trainer = Trainer(model, OptimConfig(max_training_steps=10))
    state = trainer.init_state(model)
    for seed in range(6):  # two sequence buckets, three batches each, new contents every time
        mb = micro_batch(cfg, seed, T=48 if seed % 2 else 64)
        group = {k: v[None] for k, v in mb.items()}
        group["label_positions"] = label_positions(mb["labels"])[None]
        state, _ = trainer.step(state, group)
    record("train step compiles", f"{trainer.compiles} for 6 steps over 2 buckets")
    assert trainer.compiles == 2


# ---- the run loop ---------------------------------------------------------------------------------
def run_config(out, **kw):
    from jaxvlm.train_loop import RunConfig

    base = dict(
        output_dir=str(out),
        tokenizer=str(TOKENIZER),
        steps=6,
        batch_size=4,
        synthetic_size=64,
        save_every=2,
        log_every=1,
        lr_language_backbone=1e-3,
        lr_vision_backbone=1e-3,
        seed=3,
    )
    return RunConfig(**{**base, **kw})


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@needs_tokenizer
def test_resume_is_exact(tmp_path):
    from jaxvlm.train_loop import train

    train(run_config(tmp_path / "full", grad_accum=2))
    part = train(run_config(tmp_path / "part", grad_accum=2, stop_after=3))
    assert part["steps"] == 3
    resumed = train(run_config(tmp_path / "part", grad_accum=2, resume=True))
    assert resumed["steps"] == 6
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b], "resumed losses differ from the uninterrupted run"
    from conversion import read_checkpoint

    _, wa = read_checkpoint(tmp_path / "full" / "model")
    _, wb = read_checkpoint(tmp_path / "part" / "model")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa), "resumed final weights differ"
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 1000


@needs_tokenizer
def test_existing_checkpoints_need_resume(tmp_path):
    from jaxvlm.train_loop import train

    train(run_config(tmp_path, steps=2, save_every=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(run_config(tmp_path, steps=2))


COCO = SHARED / "data" / "coco-mini"


@pytest.mark.slow
@needs_tokenizer
@pytest.mark.skipif(not (COCO / "captions.json").is_file(), reason=f"COCO-mini is not at {COCO} (../shared is absent)")
def test_finetune_on_real_coco_jpegs_lowers_the_loss(tmp_path):
    """Fine-tune a checkpoint on real JPEGs with their captions as answers (the real tokenizer):
    the loss over the same fixed batches falls."""
    from conversion import read_checkpoint
    from jaxvlm.data import DataLoader, SampleEncoder, coco_captions_dataset
    from jaxvlm.evaluation import mean_loss
    from jaxvlm.pretrained import model_from_torch_tensors
    from jaxvlm.tokenizer import load_tokenizer
    from jaxvlm.train_loop import train

    start = train(run_config(tmp_path / "init", steps=1, stop_after=0, save_every=10))  # a fresh tiny checkpoint
    assert start["steps"] == 0
    run = train(
        run_config(
            tmp_path / "ft",
            init_from=str(tmp_path / "init" / "model"),
            data=f"coco:{COCO}",
            steps=12,
            batch_size=4,
            lr_mp=3e-3,
            lr_language_backbone=3e-3,
            lr_vision_backbone=1e-3,
            save_every=100,
        )
    )
    cfg, before = read_checkpoint(tmp_path / "init" / "model")
    _, after = read_checkpoint(tmp_path / "ft" / "model")
    tokenizer = load_tokenizer(TOKENIZER, extra_tokens=cfg.extra_tokens)
    dataset = coco_captions_dataset(COCO, SampleEncoder.from_config(cfg, tokenizer))
    assert len(dataset) >= 40 and dataset[0]["images"].shape[0] >= 1
    losses = [
        mean_loss(model_from_torch_tensors(cfg, w), DataLoader(dataset, 4, shuffle=False, prefetch=0), max_batches=4)
        for w in (before, after)
    ]
    record("coco fine-tune", f"loss on 16 real captions {losses[0]:.3f} -> {losses[1]:.3f} after 12 steps")
    assert losses[1] < 0.9 * losses[0], f"fine-tuning on COCO did not lower the loss: {losses}"
    assert run["compiles"] <= 4


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights_and_tracks_fp32(cfg):
    """--dtype bfloat16: activations and matmuls in bf16, parameters, optimizer state and loss in
    float32; the loss stays within 2% of the fp32 loss on the same weights and batch."""
    import jax.numpy as jnp

    from jaxvlm.options import ModelOptions
    from jaxvlm.pretrained import model_from_torch_tensors

    tensors = {k: v.detach().numpy() for k, v in random_torch_vlm(cfg, 4).checkpoint_state().items()}
    mb = micro_batch(cfg, 4)
    group = {k: v[None] for k, v in mb.items()}
    group["label_positions"] = label_positions(mb["labels"])[None]
    losses = {}
    for name, compute in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        model = model_from_torch_tensors(
            cfg, tensors, options=ModelOptions(param_dtype=jnp.float32, compute_dtype=compute)
        )
        trainer = Trainer(model, OptimConfig(max_training_steps=10))
        state, m = trainer.step(trainer.init_state(model), group)
        losses[name] = float(m["loss"])
        assert {v.dtype for v in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
        assert {v.dtype for v in jax.tree.leaves(state.opt_state) if hasattr(v, "dtype") and v.ndim} == {
            jnp.dtype(jnp.float32)
        }
    rel = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
    record("bf16 compute vs fp32 loss", f"{losses['bf16']:.4f} vs {losses['fp32']:.4f} ({rel:.2e} relative, tol 2e-2)")
    assert losses["bf16"] != losses["fp32"], "bf16 compute had no effect"
    assert rel <= 2e-2


@pytest.mark.slow
def test_remat_gives_the_same_gradients(cfg):
    """--remat (each block's activations recomputed in the backward pass, through the
    hand-written backwards of `layers.matmul` and the cross-entropy) changes memory, not
    results: the loss and the gradient of every parameter equal the plain ones (the same
    float32 operations recomputed, which XLA may fuse and reassociate differently: rounding,
    measured ~1e-6 relative to each tensor's largest entry; tolerance 1e-5, ten times below the
    jaxvlm-vs-torch_ref gradient tolerance of tests/test_gradients.py)."""
    tensors = {k: v.detach().numpy() for k, v in random_torch_vlm(cfg, 5).checkpoint_state().items()}
    mb = micro_batch(cfg, 5)
    mb["label_positions"] = label_positions(mb["labels"])
    out = {}
    for key, options in {
        False: ModelOptions(),
        True: ModelOptions(remat=True),
        "dots_saveable": ModelOptions(remat=True, remat_policy="dots_saveable"),
    }.items():
        model = jaxvlm.pretrained.model_from_torch_tensors(cfg, tensors, options=options)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), mb)))(params)
        out[key] = (float(loss), {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)})
    assert_close("remat loss", np.float64(out[True][0]), np.float64(out[False][0]), 1e-6)
    assert_close("remat dots_saveable loss", np.float64(out["dots_saveable"][0]), np.float64(out[False][0]), 1e-6)
    for k, want in out[False][1].items():
        assert_close(f"remat dots_saveable grad {k}", out["dots_saveable"][1][k], want, 1e-5)
    worst = max(assert_close(f"remat grad {k}", out[True][1][k], want, 1e-5) for k, want in out[False][1].items())
    record(
        "remat vs plain gradients",
        f"losses differ by {abs(out[True][0] - out[False][0]):.1e}; worst gradient "
        f"{worst:.1e} relative (tol 1e-5) over {len(out[False][1])} tensors",
    )


def test_bf16_compute_gradients_track_fp32(cfg):
    """bf16 compute through the hand-written backwards (`layers.matmul`, the cross-entropy):
    every parameter's gradient arrives in float32 and points the same way as the fp32
    gradient (relative error of the whole gradient vector <= 5%, the size of bf16 rounding
    carried through a few layers; per tensor >= 0.99 cosine for tensors with a sizeable
    gradient)."""
    import jax.numpy as jnp

    from jaxvlm.options import ModelOptions

    tensors = {k: v.detach().numpy() for k, v in random_torch_vlm(cfg, 6).checkpoint_state().items()}
    mb = micro_batch(cfg, 6)
    mb["label_positions"] = label_positions(mb["labels"])
    grads = {}
    for name, compute in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        model = jaxvlm.pretrained.model_from_torch_tensors(
            cfg, tensors, options=ModelOptions(param_dtype=jnp.float32, compute_dtype=compute)
        )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        g = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), mb)))(params)
        grads[name] = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(g)}
    assert {v.dtype for v in grads["bf16"].values()} == {jnp.dtype(jnp.float32)}
    a = np.concatenate([np.asarray(v, np.float64).ravel() for v in grads["fp32"].values()])
    b = np.concatenate([np.asarray(grads["bf16"][k], np.float64).ravel() for k in grads["fp32"]])
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    worst_cos = 1.0
    for k, v in grads["fp32"].items():
        x, y = np.asarray(v, np.float64).ravel(), np.asarray(grads["bf16"][k], np.float64).ravel()
        if np.linalg.norm(x) > 1e-3 * np.linalg.norm(a):
            worst_cos = min(worst_cos, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    record(
        "bf16 vs fp32 gradients",
        f"whole-vector relative error {rel:.2e} (tol 5e-2); worst per-tensor cosine {worst_cos:.4f} (tol 0.99)",
    )
    assert rel <= 5e-2 and worst_cos >= 0.99


@pytest.mark.slow
@pytest.mark.skipif(not (COCO / "captions.json").is_file(), reason=f"COCO-mini is not at {COCO} (../shared is absent)")
def test_loader_worker_processes_train_exactly_as_the_main_process(tmp_path):
    """The same 3 steps on COCO JPEGs with samples built in this process and in 2 worker
    processes: the same losses and the same final parameters, bit for bit."""
    from conversion import load_safetensors
    from jaxvlm.train_loop import train

    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(run_config(out, data=f"coco:{COCO}", steps=3, batch_size=2, loader_workers=workers))
        runs[workers] = (metrics(out), load_safetensors(out / "model" / "model.safetensors")[0])
    assert [r["loss"] for r in runs[0][0]] == [r["loss"] for r in runs[2][0]]
    assert all(np.array_equal(runs[0][1][k], runs[2][1][k]) for k in runs[0][1])
