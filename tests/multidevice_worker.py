"""Multi-device checks run in a fresh process, for tests/test_sharding.py.

The number of CPU devices must be fixed before jax initialises, which the pytest process has
long done, so the test runs this script in a subprocess; it prints one JSON object (the last
line of stdout) with everything the test asserts on. fp32, full-precision matmuls.

    python tests/multidevice_worker.py meshes CKPT_DIR     # 8 simulated devices

`meshes`: the tiny model, 3 optimizer steps of 2 micro-batches x 8 left-padded rows (3 images
each, padded to N_max = 4), on one device without a mesh (the reference) and on the meshes
data x fsdp x tensor = 8x1x1, 2x4x1, 2x2x2. The 2x4x1 run saves a checkpoint after step 2,
which is restored onto 8x1x1 and continued for step 3. Finally greedy `generate` runs on a
model placed on the 2x2x2 mesh and on the same model on one device.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from conversion import OptimConfig, VLMConfig  # noqa: E402
from jaxvlm import sharding  # noqa: E402
from jaxvlm.generate import generate  # noqa: E402
from jaxvlm.train import Trainer, label_positions  # noqa: E402
from jaxvlm.train_checkpoints import TrainCheckpoints  # noqa: E402
from jaxvlm.vision_language_model import VisionLanguageModel  # noqa: E402

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
A, B, T, N_MAX, STEPS = 2, 8, 48, 4, 3
IMAGE_ROWS = (1, 4, 6)  # the rows with one image each; N_MAX - 3 zero images pad the batch


def micro_batch(cfg: VLMConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """8 rows, left padding of 0..12 tokens, one image (L consecutive image tokens) in rows
    IMAGE_ROWS, labels on the last 3..8 tokens (shifted), images float32[N_MAX, 3, S, S]."""
    L, S = cfg.n_image_tokens, cfg.vit_img_size
    ids = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    labels = np.full((B, T), -100, np.int32)
    for b in range(B):
        n_pad = int(rng.integers(0, 13))
        row = rng.integers(0, cfg.lm_base_vocab_size, T - n_pad)
        if b in IMAGE_ROWS:
            start = int(rng.integers(0, 10))
            row[start : start + L] = cfg.image_token_id
        ids[b, n_pad:], mask[b, n_pad:] = row, 1
        n = int(rng.integers(3, 9))
        labels[b, T - n - 1 : T - 1] = ids[b, T - n :]
    images = np.zeros((N_MAX, 3, S, S), np.float32)
    images[: len(IMAGE_ROWS)] = rng.random((len(IMAGE_ROWS), 3, S, S), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images}


def randomize(model: VisionLanguageModel, seed: int) -> VisionLanguageModel:
    """Every parameter drawn afresh so that none is at a degenerate init (house style rule 7):
    kernels N(0, 1/fan_in), embeddings N(0, 1), biases N(0, 0.3^2), norm scales N(1, 0.3^2),
    the ViT position embedding N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        name, shape = path[-1], var.shape
        if name == "kernel":
            value = rng.normal(0.0, np.prod(shape[:-1]) ** -0.5, shape)
        elif name == "embedding":
            value = rng.normal(0.0, 1.0, shape)
        elif name == "bias":
            value = rng.normal(0.0, 0.3, shape)
        elif name in ("scale", "weight"):
            value = rng.normal(1.0, 0.3, shape)
        elif name == "position_embedding":
            value = rng.normal(0.0, 0.5, shape)
        else:
            raise AssertionError(f"randomize: unknown parameter {path}")
        var.set_value(jax.numpy.asarray(value, var.dtype))
    nnx.update(model, state)
    return model


def make_groups(cfg: VLMConfig) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(STEPS):
        mbs = [micro_batch(cfg, rng) for _ in range(A)]
        group = {k: np.stack([mb[k] for mb in mbs]) for k in mbs[0]}
        pos = label_positions(group["labels"].reshape(A * B, T))
        group["label_positions"] = pos.reshape(A, B, -1)
        groups.append(group)
    return groups


def flat_params(state) -> dict[str, np.ndarray]:
    host = sharding.gather(state.params)
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(host)}


def param_error(got: dict, want: dict) -> tuple[float, str]:
    """Worst per-tensor ||got - want|| / ||want|| and its parameter."""
    errors = {k: float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])) for k in want}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def specs(state) -> dict[str, str]:
    """The mesh PartitionSpec of every trained parameter and of its Adam first moment."""
    out = {"/".join(map(str, p)): str(v[...].sharding.spec) for p, v in nnx.to_flat_state(state.params)}
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
        key = jax.tree_util.keystr(path)
        if ".mu" in key:  # e.g. [0][0].inner_states['language'].inner_state[0].mu['decoder']['blocks'][0]...
            out["mu" + key[key.index(".mu") + 3 :]] = str(x.sharding.spec)
    return out


def run_meshes(ckpt_dir: str) -> dict:
    cfg = VLMConfig.tiny()
    ocfg = OptimConfig(max_training_steps=20)  # upstream's three groups and lrs, clipping at 1.0
    groups = make_groups(cfg)
    result: dict = {"devices": jax.device_count(), "meshes": {}}

    def train(mesh, state=None, trainer=None, first=0, last=STEPS, on_step=None):
        if trainer is None:
            model = randomize(VisionLanguageModel(cfg, rngs=nnx.Rngs(0)), 0)
            trainer, state = Trainer(model, ocfg, mesh=mesh), None
            state = trainer.init_state(model)
        losses = []
        for i in range(first, last):
            state, m = trainer.step(state, trainer.place_batch(groups[i]))
            losses.append(float(m["loss"]))
            if on_step:
                on_step(i + 1, state)
        return trainer, state, losses

    _, ref_state, ref_losses = train(None)
    ref = flat_params(ref_state)
    result["reference"] = {"losses": ref_losses}

    trainers, finals = {}, {}
    saved: dict = {}
    for name, shape in MESHES.items():
        mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
        checkpoints = TrainCheckpoints(ckpt_dir, keep=1) if name == "2x4x1" else None

        def on_step(step, state, checkpoints=checkpoints):
            if checkpoints is not None and step == 2:
                checkpoints.save(step, state, {"step": step})
                saved["params"] = flat_params(state)

        trainer, state, losses = train(mesh, on_step=on_step)
        if checkpoints is not None:
            checkpoints.close()
        trainers[name], finals[name] = trainer, state
        err, worst = param_error(flat_params(state), ref)
        result["meshes"][name] = {
            "losses": losses,
            "param_error": err,
            "worst": worst,
            "specs": specs(state),
            "batch_spec": str(trainer.place_batch(groups[0])["input_ids"].sharding.spec),
            "images_spec": str(trainer.place_batch(groups[0])["images"].sharding.spec),
            "compiles": trainer.compiles,
        }

    # The 2x4x1 checkpoint of step 2, restored onto 8x1x1 (its shardings), then step 3 there.
    t81 = trainers["8x1x1"]
    checkpoints = TrainCheckpoints(ckpt_dir, keep=1)
    target = t81.init_state(VisionLanguageModel(cfg, rngs=nnx.Rngs(1)))  # shapes and 8x1x1 shardings only
    restored, meta = checkpoints.restore(target)
    checkpoints.close()
    restored_exact = all(np.array_equal(a, saved["params"][k]) for k, a in flat_params(restored).items())
    restored_specs = specs(restored)
    _, cont, cont_losses = train(None, state=restored, trainer=t81, first=2, last=STEPS)
    original = result["meshes"]["2x4x1"]
    err_vs_original, worst = param_error(flat_params(cont), flat_params(finals["2x4x1"]))
    result["restore"] = {
        "step": meta["step"],
        "restored_exact": restored_exact,
        "specs": restored_specs,
        "losses": cont_losses,
        "original_losses": original["losses"][2:],
        "param_error_vs_original": err_vs_original,
        "worst": worst,
        "param_error_vs_reference": param_error(flat_params(cont), ref)[0],
        "compiles_8x1x1": t81.compiles,
    }

    # Greedy generation: a freshly initialised model (its own small init, so greedy decoding does
    # not just repeat a token) with every variable placed on the 2x2x2 mesh, vs the same on one device.
    rng = np.random.default_rng(5)
    L = cfg.n_image_tokens
    ids = rng.integers(0, cfg.lm_base_vocab_size, (2, 20)).astype(np.int32)
    ids[0, 3 : 3 + L] = ids[1, 8 : 8 + L] = cfg.image_token_id
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    images = rng.random((2, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    host_model = VisionLanguageModel(cfg, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(host_model)
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    sharded_model = nnx.merge(graphdef, sharding.place(state, sharding.tree_shardings(state, mesh)))
    tok_sharded, logits_sharded = generate(
        sharded_model, ids, images, mask, max_new_tokens=8, greedy=True, return_logits=True
    )
    tok_host, logits_host = generate(host_model, ids, images, mask, max_new_tokens=8, greedy=True, return_logits=True)
    scale = float(np.abs(np.asarray(logits_host)).max())
    result["generate"] = {
        "sharded_tokens": np.asarray(tok_sharded).tolist(),
        "host_tokens": np.asarray(tok_host).tolist(),
        "logits_error": float(np.abs(np.asarray(logits_sharded) - np.asarray(logits_host)).max()) / scale,
        "weights_spec": str(sharded_model.decoder.blocks[0].mlp.gate_proj.kernel[...].sharding.spec),
        "embedding_spec": str(sharded_model.decoder.token_embedding.embedding[...].sharding.spec),
    }

    # bf16 compute (fp32 master weights) on the 2x2x2 mesh vs on one device, 2 steps.
    import jax.numpy as jnp

    from jaxvlm.options import ModelOptions

    bf16 = {}
    for name, mesh in (("1", None), ("2x2x2", sharding.make_mesh(sharding.MeshConfig(2, 2, 2)))):
        model = randomize(
            VisionLanguageModel(cfg, options=ModelOptions(compute_dtype=jnp.bfloat16), rngs=nnx.Rngs(0)), 0
        )
        trainer = Trainer(model, ocfg, mesh=mesh)
        state = trainer.init_state(model)
        losses = []
        for i in range(2):
            state, m = trainer.step(state, trainer.place_batch(groups[i]))
            losses.append(float(m["loss"]))
        bf16[name] = (losses, flat_params(state), specs(state) if mesh is not None else None)
    err, worst = param_error(bf16["2x2x2"][1], bf16["1"][1])
    result["bf16"] = {
        "losses_1": bf16["1"][0],
        "losses_mesh": bf16["2x2x2"][0],
        "fp32_losses": ref_losses[:2],
        "param_error": err,
        "worst": worst,
        "dtypes": sorted({str(a.dtype) for a in bf16["2x2x2"][1].values()}),
        "gate_spec": bf16["2x2x2"][2]["decoder/blocks/0/mlp/gate_proj/kernel"],
    }

    # LoRA (decoder attention + MLP and the ViT's fc1, the projector trained in full), 3 steps of 2
    # micro-batches: one device without remat vs the 2x2x2 mesh with remat. Every weight random,
    # the adapters' B included (so that the adapters' path is not zero), B then scaled by 0.1: at
    # full size (x2 scaling) the adapters dominate their layers and the random model's gradients
    # carry 4x the float32 noise of the base model's (measured: 2.1e-6 between two kernel sets on
    # one device vs 5.4e-7), which 3 Adam steps on the projector amplify past 1e-5.
    from conversion.lora import LoraSpec
    from jaxvlm.lora import _module, add_adapters

    spec = LoraSpec(rank=4, alpha=8, targets=(*LoraSpec().targets, "fc1"), modules_to_save=("MP",))
    lora_ocfg = OptimConfig(lora=spec, lr_lora=2e-3, max_training_steps=20)
    lora = {}
    for name, mesh in (("1", None), ("2x2x2", sharding.make_mesh(sharding.MeshConfig(2, 2, 2)))):
        model = VisionLanguageModel(cfg, options=ModelOptions(remat=mesh is not None), rngs=nnx.Rngs(0))
        add_adapters(model, spec)
        model = randomize(model, 0)
        for layer in map(partial(_module, model), spec.modules(cfg)):
            layer.lora_B.kernel.set_value(layer.lora_B.kernel[...] * 0.1)
        trainer = Trainer(model, lora_ocfg, mesh=mesh)
        state = trainer.init_state(model)
        losses = []
        for i in range(STEPS):
            state, m = trainer.step(state, trainer.place_batch(groups[i]))
            losses.append(float(m["loss"]))
        lora[name] = (losses, flat_params(state), specs(state) if mesh is not None else None)
    err, worst = param_error(lora["2x2x2"][1], lora["1"][1])
    s = lora["2x2x2"][2]
    result["lora"] = {
        "losses_1": lora["1"][0],
        "losses_mesh": lora["2x2x2"][0],
        "param_error": err,
        "worst": worst,
        "trained": sorted(lora["1"][1]),
        "specs": {
            k: s[k]
            for k in ("decoder/blocks/0/mlp/gate_proj/lora_A/kernel", "decoder/blocks/0/mlp/gate_proj/lora_B/kernel")
        },  # fmt: skip
    }
    return result


if __name__ == "__main__":
    # Before anything touches a device. (Importing this module, e.g. for `randomize`, sets nothing.)
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    mode = sys.argv[1]
    if mode == "meshes":
        out = run_meshes(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out))
