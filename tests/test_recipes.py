"""The recipes in configs/: every file is a valid run config, and the two-stage recipe runs as
written - stage 1 (alignment: towers frozen, projector trained) from Hugging Face backbones on
streamed parquet shards, then stage 2 (instruction: every group, upstream's learning rates)
from stage 1's output - on tiny backbones and shards of the real COCO photos. Only paths and
sizes are overridden (CPU: float32, no remat, short runs); the loss falls in each stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import record
from test_stream_loader import COCO_ROOT, SMOLLM2, coco_rows

from conversion import read_checkpoint
from jaxvlm.data.streaming import write_cauldron_shards
from jaxvlm.train_loop import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_recipe_is_a_valid_run_config(path):
    run = RunConfig.from_file(path)
    assert run.steps > 0 and run.output_dir


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def falls(losses: list[float]) -> bool:
    k = max(len(losses) // 4, 1)
    return np.mean(losses[-k:]) < np.mean(losses[:k])


@pytest.mark.slow
@pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO_ROOT / "captions.json").is_file(),
    reason="real tokenizer / COCO data not found (../shared is absent)",
)
def test_two_stage_recipe_runs_in_sequence(tmp_path):
    import torch
    from test_hf import LANGUAGE, SETTINGS, VISION, randomize_hf_
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    hf = tmp_path / "hf"
    vision = randomize_hf_(SiglipVisionModel(SiglipVisionConfig(**VISION)), 1)
    vision.save_pretrained(hf / "vision")
    cfg = {**LANGUAGE, "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 48, "rope_theta": 100000.0}
    lm = randomize_hf_(LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True)), 2)
    lm.save_pretrained(hf / "language")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(SMOLLM2 / name, hf / "language" / name)
    data = coco_rows(2)
    write_cauldron_shards(data[:90], tmp_path / "train", rows_per_shard=30, row_group_size=10)
    write_cauldron_shards(data[90:], tmp_path / "val", rows_per_shard=12, row_group_size=6)

    sizes = {"steps": 16, "batch_size": 2, "grad_accum": 1, "max_length": 256, "dtype": "float32", "remat": False,
             "loader_workers": 0, "save_every": 8, "log_every": 1, "eval_every": 8, "eval_batches": 2}  # fmt: skip
    shards = {"data": f"cauldron:{tmp_path / 'train'}/*.parquet", "eval_data": f"cauldron:{tmp_path / 'val'}/*.parquet"}
    stage1 = RunConfig.from_file(
        CONFIGS / "stage1-alignment.json",
        output_dir=str(tmp_path / "stage1"),
        init_from_hf_vision=str(hf / "vision"),
        init_from_hf_language=str(hf / "language"),
        init_from_hf_settings=json.dumps(SETTINGS),
        **shards,
        **sizes,
    )
    assert stage1.packing and stage1.lr_vision_backbone == stage1.lr_language_backbone == 0 and stage1.keep_best
    train(stage1)
    losses1 = [r["loss"] for r in rows(tmp_path / "stage1") if "loss" in r]
    record("recipe stage 1 loss (first, last)", f"{losses1[0]:.4f} -> {losses1[-1]:.4f}")
    assert falls(losses1), f"stage 1 loss did not fall: {losses1}"
    _, w1 = read_checkpoint(tmp_path / "stage1" / "model")
    with torch.no_grad():  # the towers are frozen: exactly the backbones' weights
        assert np.array_equal(
            w1["vision_encoder.blocks.0.mlp.fc1.weight"], vision.encoder.layers[0].mlp.fc1.weight.numpy()
        )
        assert np.array_equal(w1["decoder.blocks.1.mlp.up_proj.weight"], lm.model.layers[1].mlp.up_proj.weight.numpy())
    assert (tmp_path / "stage1" / "best.json").is_file()

    stage2 = RunConfig.from_file(CONFIGS / "stage2-instruct.json", output_dir=str(tmp_path / "stage2"),
                                 init_from=str(tmp_path / "stage1" / "model"), **shards,
                                 **{**sizes, "max_images_per_pack": None})  # fmt: skip
    assert stage2.lr_mp == 0.00512 and stage2.lr_vision_backbone == stage2.lr_language_backbone == 5e-5
    train(stage2)
    losses2 = [r["loss"] for r in rows(tmp_path / "stage2") if "loss" in r]
    record("recipe stage 2 loss (first, last)", f"{losses2[0]:.4f} -> {losses2[-1]:.4f}")
    assert falls(losses2), f"stage 2 loss did not fall: {losses2}"
    assert losses2[0] < losses1[0], "stage 2 starts from stage 1's projector, not from scratch"
    _, w2 = read_checkpoint(tmp_path / "stage2" / "model")
    for key in ("MP.proj.weight", "vision_encoder.blocks.0.mlp.fc1.weight", "decoder.blocks.1.mlp.up_proj.weight"):
        assert not np.array_equal(w2[key], w1[key]), f"stage 2 trains every group: {key} did not move"
