"""LoRA: jaxvlm's adapters trained against PEFT's on torch_ref (the reference), PEFT reading the
adapter directory jaxvlm writes, the merged export in both frameworks, bad input, and the CLI.

Tolerances: losses and adapter weights after 5 AdamW steps 1e-5 relative (fp32 on CPU, full-
precision matmuls); logits of the merged export 1e-5 (torch_ref) / 1e-4 (jaxvlm) relative to
PEFT's adapted model's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SMOLLM2, assert_close, needs_tokenizer, random_torch_vlm, record, run_cli, tiny_cfg
from test_train import micro_batch, to_torch

import jaxvlm
import torch_ref
from conversion import OptimConfig, read_checkpoint
from conversion.lora import LoraSpec, merge, read_adapter
from conversion.safetensors_io import CheckpointError
from jaxvlm.lora import add_adapters, load_adapter, save_adapter, save_merged, split_tensors
from jaxvlm.train import Trainer, label_positions
from torch_ref.train import train_step

peft = pytest.importorskip("peft")

SPEC = LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "decoder.out_proj", "down_proj", "fc1"),
                modules_to_save=("MP",))  # fmt: skip
OCFG = OptimConfig(lora=SPEC, lr_lora=2e-3, max_training_steps=50)  # warmup 1.5 steps, then cosine
ACCUM = 2


def _jax_model(cfg, tmodel):
    return jaxvlm.pretrained.model_from_torch_tensors(
        cfg, {k: v.detach().numpy().copy() for k, v in tmodel.checkpoint_state().items()}
    )


def _peft_model(tmodel, spec=SPEC):
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=spec.modules(tmodel.cfg), modules_to_save=list(spec.modules_to_save))  # fmt: skip
    return peft.get_peft_model(tmodel, config)


def _peft_adapter(pm) -> dict[str, np.ndarray]:
    from peft.utils import get_peft_model_state_dict

    prefix = "base_model.model."
    return {k[len(prefix) :]: v.detach().numpy() for k, v in get_peft_model_state_dict(pm).items()}


def _peft_optimizer(pm, ocfg):
    groups = {"lora": [], "mp": []}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            groups["lora" if "lora_" in name else "mp"].append(p)
    lrs = ocfg.group_lrs()
    return torch.optim.AdamW(
        [{"params": ps, "lr": lrs[g], "name": g} for g, ps in groups.items()],
        betas=(ocfg.b1, ocfg.b2),
        eps=ocfg.eps,
        weight_decay=ocfg.weight_decay,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """5 LoRA steps (2 micro-batches each) in jaxvlm and in PEFT on torch_ref from one random
    base, adapters initialised identically: jaxvlm's lora_A, and a lora_B drawn U(+-1/sqrt(r))
    instead of PEFT's zeros, both copied into PEFT. Why not B = 0: B would then be made of its
    Adam updates alone, the first of which is sign(g) elementwise, so the fp32 noise of the
    gradients (1e-6 relative to float64 in both frameworks) sets B's relative error (measured
    1.15e-5 after 5 steps, torch_ref fp32 2.8e-6 from float64, jaxvlm 1.07e-5); from a
    nonzero B the miss is the full fine-tune's (a few 1e-6). The zero init is checked below."""
    cfg = tiny_cfg()
    base = random_torch_vlm(cfg, 1).train()
    model = _jax_model(cfg, base)
    add_adapters(model, SPEC, seed=0)
    _, fresh = split_tensors(model, SPEC)
    rng = np.random.default_rng(0)
    init = {k: rng.uniform(-1, 1, v.shape).astype(np.float32) / SPEC.rank**0.5 if ".lora_B." in k else v
            for k, v in fresh.items()}  # fmt: skip
    load_adapter(model, SPEC, init, source="test init")
    pm = _peft_model(copy.deepcopy(base))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.from_numpy(init[name.replace("base_model.model.", "").replace(".default", "")]))
    optimizer = _peft_optimizer(pm, OCFG)
    trainer = Trainer(model, OCFG)
    state = trainer.init_state(model)
    losses = []
    for step in range(5):
        mbs = [micro_batch(cfg, 10 * step + a) for a in range(ACCUM)]
        t_metrics = train_step(pm, optimizer, [to_torch(mb) for mb in mbs], step, OCFG)
        group = {k: np.stack([mb[k] for mb in mbs]) for k in mbs[0]}
        pos = label_positions(group["labels"].reshape(-1, group["labels"].shape[-1]))
        group["label_positions"] = pos.reshape(ACCUM, -1, pos.shape[-1])
        state, j_metrics = trainer.step(state, group)
        losses.append((float(j_metrics["loss"]), t_metrics["loss"]))
    out = tmp_path_factory.mktemp("lora")
    jmodel = trainer.host_model(state)
    save_adapter(jmodel, SPEC, out / "adapter")
    save_merged(jmodel, SPEC, out / "model")
    return {"cfg": cfg, "base": base, "pm": pm, "jmodel": jmodel, "losses": losses, "init": init, "out": out,
            "fresh": fresh}  # fmt: skip


def test_five_lora_steps_match_peft(trained):
    losses = np.array(trained["losses"])
    assert_close("LoRA 5-step losses (jaxvlm vs PEFT)", losses[:, 0], losses[:, 1], 1e-5)
    _, got = split_tensors(trained["jmodel"], SPEC)
    want = _peft_adapter(trained["pm"])
    assert set(got) == set(want), f"adapter keys differ: {sorted(set(got) ^ set(want))[:4]}"
    errors = {k: np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k]) for k in want}
    worst = max(errors, key=errors.get)
    record("LoRA 5-step adapters", f"worst {worst} {errors[worst]:.2e} relative (tol 1e-5), of {len(errors)} tensors")
    assert errors[worst] <= 1e-5, f"after 5 steps {worst} differs by {errors[worst]:.2e} relative (tol 1e-5)"
    for k in (
        "decoder.blocks.0.attn.q_proj.lora_B.weight",
        "decoder.blocks.0.attn.q_proj.lora_A.weight",
        "MP.proj.weight",
    ):
        assert np.abs(got[k] - trained["init"][k]).max() > 0, f"{k} did not train"
    # a fresh adapter is PEFT's: B = 0, A ~ U(+-1/sqrt(in)) (kaiming-uniform, a = sqrt(5))
    for k, v in trained["fresh"].items():
        if ".lora_B." in k:
            assert not v.any(), f"{k} is not zero"
        elif ".lora_A." in k:
            bound = v.shape[1] ** -0.5
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, f"{k} is not U(+-{bound:.3f})"
    # the base stayed where it was: only adapters and the module to save moved
    base, _ = split_tensors(trained["jmodel"], SPEC)
    start = {k: v.detach().numpy() for k, v in trained["base"].checkpoint_state().items()}
    moved = [k for k in start if not np.array_equal(base[k], start[k])]
    assert moved == ["MP.proj.weight"], f"frozen weights moved: {moved[:4]}"


def _inputs(cfg, seed=5):
    mb = micro_batch(cfg, seed, T=64)
    return mb["input_ids"], mb["images"], mb["attention_mask"]


def test_peft_loads_the_adapter_and_the_merged_export_agrees(trained):
    cfg, out = trained["cfg"], trained["out"]
    ids, images, mask = _inputs(cfg)
    t_args = (torch.as_tensor(ids).long(), torch.as_tensor(images), torch.as_tensor(mask).long())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(trained["base"]).eval(), str(out / "adapter")).eval()
    with torch.no_grad():
        want = pm(*t_args)[0].numpy()
        trained_logits = trained["pm"].eval()(*t_args)[0].numpy()
    assert_close("PEFT from_pretrained(adapter/) vs PEFT trained", want, trained_logits, 1e-5)
    # torch_ref's own LoRA layer reading the same directory
    from torch_ref.lora import add_adapters as t_add
    from torch_ref.lora import load_adapter

    spec, tensors = read_adapter(out / "adapter", cfg)
    own = copy.deepcopy(trained["base"]).eval()
    t_add(own, spec)
    load_adapter(own, spec, tensors, source="adapter/")
    with torch.no_grad():
        assert_close("torch_ref LoRALinear vs PEFT", own(*t_args)[0].numpy(), want, 1e-5)
    assert_close("jaxvlm adapted vs PEFT", np.asarray(trained["jmodel"](ids, images, mask)), want, 1e-4)
    merged_t = torch_ref.VisionLanguageModel.from_pretrained(out / "model").eval()
    with torch.no_grad():
        assert_close("torch_ref merged model/ vs PEFT", merged_t(*t_args)[0].numpy(), want, 1e-5)
    merged_j = jaxvlm.VisionLanguageModel.from_pretrained(out / "model")
    assert_close("jaxvlm merged model/ vs PEFT", np.asarray(jaxvlm.forward(merged_j, ids, images, mask)), want, 1e-4)


def test_merge_command_is_the_export_bit_for_bit(trained, tmp_path):
    base_dir = tmp_path / "base"
    trained["base"].save_pretrained(base_dir)
    code, stdout, err = run_cli(
        "-m", "conversion", "merge", str(base_dir), str(trained["out"] / "adapter"), str(tmp_path / "m")
    )
    assert code == 0, err
    _, got = read_checkpoint(tmp_path / "m")
    _, want = read_checkpoint(trained["out"] / "model")
    assert all(got[k].tobytes() == want[k].tobytes() for k in want), "merge command differs from the run's export"
    code, _, err = run_cli(
        "-m", "conversion", "merge", str(base_dir), str(trained["out"] / "adapter"), str(tmp_path / "m")
    )
    assert code == 2 and len(err) == 1 and "not empty" in err[0], err  # never over an existing output


def test_bad_input_one_clear_error(trained, tmp_path):
    other = tiny_cfg(lm_hidden_dim=96)
    with pytest.raises(
        CheckpointError, match=r"tensor base_model\.model\.\S+ has shape \(\d+, \d+\), this model needs \(\d+, \d+\)"
    ):
        read_adapter(trained["out"] / "adapter", other)
    with pytest.raises(ValueError, match=r"unknown LoRA target 'o_proj': choose from q_proj, .*MP\.proj"):
        LoraSpec(targets=("o_proj",))
    for bad, what in (({"rank": 0}, "rank 0"), ({"alpha": -1.0}, "alpha -1.0"), ({"dropout": 1.0}, "dropout 1.0")):
        with pytest.raises(ValueError, match=what):
            LoraSpec(**bad)
    with pytest.raises(ValueError, match="inside module to save"):
        LoraSpec(targets=("MP.proj",), modules_to_save=("MP",)).modules(tiny_cfg())
    # on the command line: one line, exit 2
    other_dir = tmp_path / "other"
    random_torch_vlm(other, 0).save_pretrained(other_dir)
    code, _, err = run_cli(
        "-m", "conversion", "merge", str(other_dir), str(trained["out"] / "adapter"), str(tmp_path / "x")
    )
    assert code == 2 and len(err) == 1 and "this model needs" in err[0], err
    code, _, err = run_cli("-m", "jaxvlm", "train", "--lora-rank", "4", "--lora-targets", "q_proj,o_proj",
                           "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and len(err) == 1 and "unknown LoRA target 'o_proj'" in err[0], err


@pytest.mark.slow
@needs_tokenizer
def test_cli_lora_run_writes_adapter_and_merged_model(tmp_path):
    start = tmp_path / "start"
    cfg = tiny_cfg()
    random_torch_vlm(cfg, 2).save_pretrained(start)
    run = tmp_path / "run"
    args = ["-m", "jaxvlm", "train", "--init-from", str(start), "--tokenizer", str(SMOLLM2), "--lora-rank", "4",
            "--lora-modules-to-save", "MP", "--lr-lora", "1e-2", "--steps", "3", "--batch-size", "4",
            "--synthetic-size", "64", "--save-every", "2", "--log-every", "1", "--output-dir", str(run)]  # fmt: skip
    code, stdout, err = run_cli(*args)
    assert code == 0, "\n".join(err[-5:])
    spec, adapter = read_adapter(run / "adapter", cfg)
    assert spec.rank == 4 and spec.modules_to_save == ("MP",) and len(spec.modules(cfg)) == 7 * cfg.lm_n_blocks
    _, begin = read_checkpoint(start)
    _, final = read_checkpoint(run / "model")
    want = merge(spec, cfg, begin, adapter)
    same = [k for k in final if final[k].tobytes() == want[k].tobytes()]
    assert len(same) == len(final), f"model/ is not start + merged delta: {sorted(set(final) - set(same))[:4]}"
    changed = sorted(k for k in final if not np.array_equal(final[k], begin[k]))
    adapted = {f"{m}.weight" for m in spec.modules(cfg)} | {"MP.proj.weight"}
    assert set(changed) <= adapted and "MP.proj.weight" in changed and len(changed) > 1, changed
    assert (run / "model" / "tokenizer.json").is_file()
    # resume from the step-2 checkpoint (orbax state holds the adapters) and --init-adapter read back
    code, _, err = run_cli(*args, "--steps", "4", "--resume")
    assert code == 0, "\n".join(err[-5:])
    again = tmp_path / "again"  # the step-4 adapter read back, exported at once: the same model/
    code, _, err = run_cli(
        *args[:7], "--init-adapter", str(run / "adapter"), *args[11:-1], str(again), "--stop-after", "0"
    )
    assert code == 0, "\n".join(err[-5:])
    _, final = read_checkpoint(run / "model")
    _, back = read_checkpoint(again / "model")
    assert all(back[k].tobytes() == final[k].tobytes() for k in final), "--init-adapter did not load the adapter"


def test_bf16_remat_and_dropout_train_the_adapters(trained):
    """bf16 compute + remat: one step's loss tracks fp32's, the adapters stay fp32 master weights;
    dropout > 0 changes the loss, and the same step draws the same masks (resumable)."""
    from dataclasses import replace

    from flax import nnx

    from jaxvlm.options import ModelOptions

    cfg = trained["cfg"]
    tensors = {k: v.detach().numpy().copy() for k, v in trained["base"].checkpoint_state().items()}
    group = {k: v[None] for k, v in micro_batch(cfg, 3).items()}

    def one_step(options, spec):
        model = jaxvlm.pretrained.model_from_torch_tensors(cfg, tensors, options=options)
        add_adapters(model, spec, seed=0)
        trainer = Trainer(model, replace(OCFG, lora=spec))
        state, m = trainer.step(trainer.init_state(model), group)
        state, m = trainer.step(state, group)  # B != 0 now: the adapters take part
        assert all(v[...].dtype == np.float32 for _, v in nnx.to_flat_state(state.params))
        return float(m["loss"])

    fp32 = one_step(ModelOptions(), SPEC)
    bf16 = one_step(ModelOptions(compute_dtype="bfloat16", remat=True), SPEC)
    record("LoRA bf16+remat step loss vs fp32", f"{abs(bf16 - fp32) / fp32:.2e} relative (tol 2e-2)")
    assert abs(bf16 - fp32) <= 2e-2 * fp32
    dropped = replace(SPEC, dropout=0.3)
    a, b = one_step(ModelOptions(), dropped), one_step(ModelOptions(), dropped)
    assert a == b and a != fp32, (a, b, fp32)


def test_default_targets_are_the_decoders_whatever_the_projector():
    """The default targets name the decoder's projections: the resampler projector's own q/k/v/out
    projections are not adapted, so it can be a module to save beside the default adapters."""
    cfg = tiny_cfg(mp_type="resampler", mp_pixel_shuffle_factor=1, mp_resampler_queries=4, mp_image_token_length=4)
    chosen = LoraSpec(modules_to_save=("MP",)).modules(cfg)
    assert chosen == LoraSpec().modules(tiny_cfg()), chosen
    assert len(chosen) == 7 * cfg.lm_n_blocks and all(m.startswith("decoder.") for m in chosen)
    assert any(m.startswith("MP.") for m in LoraSpec(targets=("q_proj",)).modules(cfg))  # PEFT's suffix rule
