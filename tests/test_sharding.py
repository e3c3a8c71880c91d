"""Sharding and multi-process training: the same step on 1 device and on a mesh, checkpoints that
move between mesh shapes, and `jaxvlm train` over two real processes.

The device count is fixed when jax initialises, so everything that needs several devices runs in
subprocesses: `multidevice_worker.py` on 8 simulated CPU devices, and `python -m jaxvlm train`
as two processes (2 CPU devices each) joined by `jax.distributed` on 127.0.0.1.

Tolerances: losses and every parameter tensor (||p - p_ref|| / ||p_ref||) equal to 1e-5 relative
after 3 (mesh) or 4 (processes) optimizer steps, fp32 with full-precision matmuls, on randomised
weights (house rule 7; at the default init the zero-initialised ViT k-biases have a gradient that
is exactly zero in exact arithmetic, so the update Adam makes from their rounding noise differs
with any change of reduction order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import record
from flax import nnx

from conversion import VLMConfig
from jaxvlm import sharding
from jaxvlm.sharding import MeshConfig, mesh_spec
from jaxvlm.train import image_offsets
from jaxvlm.vision_language_model import VisionLanguageModel, merge_image_embeddings

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multidevice_worker.py")
TOKENIZER = ROOT.parent / "shared" / "data" / "smollm2"
TOL = 1e-5


# ---- in this process (one device) ------------------------------------------------------------------
def test_rules_resolve_with_divisibility_fallback():
    mesh = {"data": 2, "fsdp": 4, "tensor": 2}
    assert mesh_spec(("embed", "mlp"), (64, 160), mesh) == jax.P("fsdp", "tensor")
    assert mesh_spec(("vocab", "embed"), (49218, 64), mesh) == jax.P("tensor", "fsdp")
    assert mesh_spec((None, "batch", None), (2, 16, 48), mesh) == jax.P(None, ("data", "fsdp"), None)
    assert mesh_spec((None, "batch"), (2, 4), mesh) == jax.P(None, "data")  # 8 does not divide 4: data only
    assert mesh_spec((None, "batch"), (2, 3), mesh) == jax.P(None, None)  # nor does 2 divide 3: replicated
    assert mesh_spec(("vocab", "embed"), (49218, 64), {"data": 1, "fsdp": 8, "tensor": 4}) == jax.P(None, "fsdp")
    assert mesh_spec(("embed", "embed"), (64, 64), mesh) == jax.P("fsdp", None)  # a mesh axis is used once
    assert mesh_spec(("norm",), (64,), mesh) == jax.P(None)
    assert mesh_spec(("embed", "mlp"), (64, 160), {"data": 8, "fsdp": 1, "tensor": 1}) == jax.P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        mesh_spec(("nonsense",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match"):
        mesh_spec(("embed",), (4, 4), mesh)


def test_mesh_config_sizes():
    assert MeshConfig().sizes(8) == (1, 8, 1)  # the library's default: every device on fsdp
    from jaxvlm.train_loop import RunConfig

    assert RunConfig().mesh().sizes(8) == (8, 1, 1)  # jaxvlm train's: data parallel
    assert RunConfig(mesh_data=1, mesh_fsdp=-1).mesh().sizes(8) == (1, 8, 1)
    assert MeshConfig(data=2).sizes(8) == (2, 4, 1)
    assert MeshConfig(data=2, fsdp=2, tensor=2).sizes(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1).sizes(8) == (8, 1, 1)
    for bad in (
        MeshConfig(data=3),
        MeshConfig(data=2, fsdp=2, tensor=1),
        MeshConfig(data=-1, fsdp=-1),
        MeshConfig(tensor=0),
    ):
        with pytest.raises(ValueError, match="mesh"):
            bad.sizes(8)
    mesh = sharding.make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)


def test_every_variable_names_its_axes():
    """Every parameter and buffer carries logical axis names (NNX `out_sharding` metadata, read
    back by `nnx.get_partition_spec`), one per dimension, each with a rule."""
    model = nnx.eval_shape(lambda: VisionLanguageModel(VLMConfig.tiny(lm_tie_weights=False), rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    n = 0
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        assert names is not None, f"{'.'.join(map(str, path))} has no logical axis names"
        assert len(names) == len(var.shape), f"{path}: names {names} for shape {var.shape}"
        assert all(a is None or a in sharding.RULES for a in names), f"{path}: {names}"
        assert tuple(specs[path].get_value()) == names
        n += 1
    assert n > 40
    names = {path: var.get_metadata()["out_sharding"] for path, var in nnx.to_flat_state(state)}
    assert names[("decoder", "blocks", 0, "mlp", "gate_proj", "kernel")] == ("embed", "mlp")
    assert names[("decoder", "head", "kernel")] == ("embed", "vocab")
    assert names[("decoder", "token_embedding", "embedding")] == ("vocab", "embed")


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.ones((4, 8, 16))
    assert sharding.constrain(x, "batch", "length", None) is x
    mesh = sharding.make_mesh(MeshConfig())
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a, "batch", "length", None))(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_image_offsets_read_per_process_image_blocks():
    """A global batch made of per-process blocks (each process's images padded to its own N_max)
    merges the same embeddings as the compact single-process layout."""
    rng = np.random.default_rng(0)
    img_id, L, H, T = 7, 2, 4, 10
    n_imgs = [[1, 0, 2], [0, 1, 1]]  # images per row, process 0 and process 1
    ids, real_images = [], []
    for rows in n_imgs:
        block = rng.integers(10, 50, (len(rows), T))
        for b, n in enumerate(rows):
            block[b, 1 : 1 + n * L] = img_id
        ids.append(block)
        real_images.append(rng.normal(size=(sum(rows), L, H)).astype(np.float32))
    n_max = 3  # each process pads its images to 3
    padded = [np.concatenate([im, np.full((n_max - len(im), L, H), 99.0, np.float32)]) for im in real_images]
    global_ids = np.concatenate(ids)
    offsets = np.concatenate([image_offsets(block, img_id, L, first=p * n_max) for p, block in enumerate(ids)])
    np.testing.assert_array_equal(offsets, [0, 1, 1, 3, 3, 4])
    token_embd = jnp.asarray(rng.normal(size=(6, T, H)).astype(np.float32))
    got = merge_image_embeddings(
        jnp.asarray(global_ids), token_embd, jnp.asarray(np.concatenate(padded)), img_id, jnp.asarray(offsets)
    )
    want = merge_image_embeddings(jnp.asarray(global_ids), token_embd, jnp.asarray(np.concatenate(real_images)), img_id)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.any(np.asarray(got) == 99.0), "a padding image was read"
    one = image_offsets(global_ids, img_id, L)  # one process: offsets give the default order
    np.testing.assert_array_equal(
        np.asarray(
            merge_image_embeddings(
                jnp.asarray(global_ids), token_embd, jnp.asarray(np.concatenate(real_images)), img_id, jnp.asarray(one)
            )
        ),
        np.asarray(want),
    )


def test_distributed_settings(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed() is False  # one process: nothing to do
    assert sharding.initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="--coordinator-address"):
        sharding.initialize_distributed(num_processes=2, process_id=0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ValueError, match="--process-id"):
        sharding.initialize_distributed()
    with pytest.raises(ValueError, match="not in 0..1"):
        sharding.initialize_distributed(process_id=2)


# ---- 8 simulated devices (a subprocess) -------------------------------------------------------------
@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("mesh_ckpt")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), "meshes", str(ckpt)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_meshes_train_like_one_device(meshes):
    assert meshes["devices"] == 8
    ref = meshes["reference"]["losses"]
    for name, run in meshes["meshes"].items():
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref))
        record(
            f"mesh {name} vs 1 device, 3 steps",
            f"losses {loss_err:.1e} relative; worst parameter {run['worst']} {run['param_error']:.1e} (tol {TOL:.0e})",
        )
        assert loss_err <= TOL, f"{name}: losses {run['losses']} vs {ref} ({loss_err:.2e} relative)"
        assert run["param_error"] <= TOL, f"{name}: {run['worst']} differs by {run['param_error']:.2e} relative"
        assert run["compiles"] == 1


def test_parameters_and_batches_are_really_sharded(meshes):
    runs = meshes["meshes"]
    gate, embed = "decoder/blocks/0/mlp/gate_proj/kernel", "decoder/token_embedding/embedding"
    mu_gate = "mu['decoder']['blocks'][0]['mlp']['gate_proj']['kernel'].value"
    # 8x1x1: pure data parallelism, every parameter replicated, rows split 8 ways.
    assert not any("fsdp" in s or "tensor" in s for s in runs["8x1x1"]["specs"].values())
    assert runs["8x1x1"]["batch_spec"] == "P(None, 'data', None)"
    assert runs["8x1x1"]["images_spec"] == "P(None, None, None, None, None)"  # N_max 4 does not split 8 ways
    # 2x4x1: FSDP, parameters and Adam moments split over fsdp.
    s = runs["2x4x1"]["specs"]
    assert s[gate] == s[mu_gate] == "P('fsdp', None)" and s[embed] == "P(None, 'fsdp')"
    assert runs["2x4x1"]["batch_spec"] == "P(None, ('data', 'fsdp'), None)"
    assert runs["2x4x1"]["images_spec"] == "P(None, 'data', None, None, None)"  # 4 images: over data only
    # 2x2x2: FSDP x tensor parallelism.
    s = runs["2x2x2"]["specs"]
    assert s[gate] == s[mu_gate] == "P('fsdp', 'tensor')" and s[embed] == "P('tensor', 'fsdp')"
    assert s["decoder/blocks/0/attn/out_proj/kernel"] == "P('tensor', 'fsdp')"
    assert s["decoder/blocks/0/norm1/weight"] == "P(None,)"
    assert runs["2x2x2"]["images_spec"] == "P(None, ('data', 'fsdp'), None, None, None)"
    n_split = sum("fsdp" in v for v in s.values())
    assert n_split >= 0.6 * len(s), f"only {n_split} of {len(s)} arrays are FSDP-sharded"


def test_checkpoint_restores_onto_another_mesh(meshes):
    r = meshes["restore"]
    assert r["step"] == 2
    assert r["restored_exact"], "the restored parameters differ from the saved ones"
    assert r["specs"] == meshes["meshes"]["8x1x1"]["specs"], "not restored with the 8x1x1 shardings"
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], r["original_losses"]))
    record(
        "checkpoint 2x4x1 -> 8x1x1, step 3",
        f"loss {loss_err:.1e} relative; parameters {r['param_error_vs_original']:.1e} "
        f"vs continuing on 2x4x1 (tol {TOL:.0e})",
    )
    assert loss_err <= TOL and r["param_error_vs_original"] <= TOL, r
    assert r["compiles_8x1x1"] == 1, "the restored state recompiled the 8x1x1 step"


def test_bf16_compute_on_a_mesh(meshes):
    """bf16 activations with fp32 master weights, 2 steps on 2x2x2 vs 1 device. The mesh changes
    only the order of bf16 reductions: the losses agree to 1e-3 relative (a bf16 ulp is 7.8e-3;
    the loss is accumulated in fp32) and track the fp32 run to 2e-2 (as tests/test_train.py's
    bf16 test). Parameters are recorded, not asserted: Adam's first updates are ~lr * sign(g),
    so bf16 noise on near-zero gradient entries flips whole updates (measured ~2e-2 relative)."""
    r = meshes["bf16"]
    assert r["dtypes"] == ["float32"] and r["gate_spec"] == "P('fsdp', 'tensor')"
    mesh_vs_1 = max(abs(a - b) / abs(b) for a, b in zip(r["losses_mesh"], r["losses_1"]))
    vs_fp32 = max(abs(a - b) / abs(b) for a, b in zip(r["losses_mesh"], r["fp32_losses"]))
    record(
        "bf16 compute on 2x2x2 vs 1 device, 2 steps",
        f"losses {mesh_vs_1:.1e} relative (tol 1e-3), vs fp32 "
        f"{vs_fp32:.1e} (tol 2e-2); parameters after 2 Adam steps: worst {r['worst']} {r['param_error']:.1e}",
    )
    assert mesh_vs_1 <= 1e-3 and vs_fp32 <= 2e-2, r


def test_lora_on_a_mesh_with_remat(meshes):
    """LoRA, 3 steps with accumulation: the 2x2x2 mesh with remat vs one device without it. Only
    the adapters and the projector (modules to save) train; the adapters shard with their layer."""
    r = meshes["lora"]
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(r["losses_mesh"], r["losses_1"]))
    record(
        "LoRA on 2x2x2 (remat) vs 1 device, 3 steps",
        f"losses {loss_err:.1e} relative; worst parameter {r['worst']} {r['param_error']:.1e} (tol {TOL:.0e})",
    )
    assert loss_err <= TOL and r["param_error"] <= TOL, r
    assert r["trained"] and all("lora_" in k or k.startswith("MP/") for k in r["trained"]), r["trained"]
    assert any(k.startswith("MP/") for k in r["trained"]) and any("vision_encoder" in k for k in r["trained"])
    assert r["specs"]["decoder/blocks/0/mlp/gate_proj/lora_A/kernel"] == "P('fsdp', None)", r["specs"]
    assert r["specs"]["decoder/blocks/0/mlp/gate_proj/lora_B/kernel"] == "P(None, 'tensor')", r["specs"]


def test_generate_on_a_sharded_model(meshes):
    g = meshes["generate"]
    assert g["weights_spec"] == "P('fsdp', 'tensor')" and g["embedding_spec"] == "P('tensor', 'fsdp')"
    record(
        "generate on a 2x2x2 mesh vs 1 device",
        f"tokens equal: {g['sharded_tokens'] == g['host_tokens']}; logits {g['logits_error']:.1e} x max|logits|",
    )
    assert g["sharded_tokens"] == g["host_tokens"]
    assert g["logits_error"] <= TOL


# ---- `jaxvlm train` on two processes (subprocesses) --------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_train(args: list[str], *, processes: int = 1, devices: int = 1, env_vars: bool = False) -> list:
    """Start `python -m jaxvlm train ARGS` as `processes` processes of `devices` CPU devices each
    (distributed settings as flags, or as JAX_* environment variables); the Popen objects, not waited for."""
    port = free_port()
    base = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip(),
    }
    procs = []
    for pid in range(processes):
        env, extra = dict(base), []
        if processes > 1 and env_vars:
            env.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid)
            )
        elif processes > 1:
            extra = [
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(processes),
                "--process-id",
                str(pid),
            ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "jaxvlm", "--debug", "train", *args, *extra],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def jaxvlm_train(args: list[str], *, processes: int = 1, devices: int = 1, env_vars: bool = False) -> None:
    """`start_train`, waited for; raise with the logs on failure."""
    procs = start_train(args, processes=processes, devices=devices, env_vars=env_vars)
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"jaxvlm train failed:\n{log[-4000:]}"


@pytest.mark.slow
@pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").is_file(), reason=f"the SmolLM2 tokenizer is not at {TOKENIZER}")
def test_two_processes_train_like_one(tmp_path):
    """4 steps of 4 rows on one process (one device) vs two processes of 2 rows each (2 devices
    each): steps 1-2 on a data=2 x fsdp=2 mesh, then --resume onto fsdp=4 (every process restores
    its shards of the checkpoint with the new mesh's shardings)."""
    from multidevice_worker import randomize

    from conversion import read_checkpoint

    init = tmp_path / "init"  # randomised weights (house rule 7), as a nanoVLM directory
    randomize(VisionLanguageModel(VLMConfig.tiny(), rngs=nnx.Rngs(0)), 0).save_pretrained(init)
    common = [
        "--init-from",
        str(init),
        "--tokenizer",
        str(TOKENIZER),
        "--steps",
        "4",
        "--synthetic-size",
        "64",
        "--log-every",
        "1",
        "--save-every",
        "100",
        "--seed",
        "3",
    ]
    jaxvlm_train([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"])
    two = ["--output-dir", str(tmp_path / "two"), "--batch-size", "2"]
    jaxvlm_train([*common, *two, "--stop-after", "2", "--mesh-data", "2", "--mesh-fsdp", "2"], processes=2, devices=2)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2"]
    jaxvlm_train(
        [*common, *two, "--resume", "--mesh-data", "1", "--mesh-fsdp", "4"], processes=2, devices=2, env_vars=True
    )

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows], [r["loss"] for r in rows], [r["tokens"] for r in rows]

    steps_1, loss_1, tokens_1 = losses("one")
    steps_2, loss_2, tokens_2 = losses("two")
    assert steps_1 == steps_2 == [1, 2, 3, 4]
    assert tokens_1 == tokens_2, "the two runs did not see the same global batches"
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(loss_2, loss_1))
    _, w1 = read_checkpoint(tmp_path / "one" / "model")
    _, w2 = read_checkpoint(tmp_path / "two" / "model")
    errors = {k: float(np.linalg.norm(w2[k] - w1[k]) / np.linalg.norm(w1[k])) for k in w1}
    worst = max(errors, key=errors.get)
    record(
        "2 processes x 2 devices vs 1 process, 4 steps",
        f"losses {loss_err:.1e} relative; worst parameter {worst} {errors[worst]:.1e} (tol {TOL:.0e})",
    )
    assert loss_err <= TOL, f"losses {loss_2} vs {loss_1}"
    assert errors[worst] <= TOL, f"{worst} differs by {errors[worst]:.2e} relative"
