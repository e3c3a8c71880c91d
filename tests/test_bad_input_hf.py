"""Bad Hugging Face backbone directories (`python -m conversion from-hf`, `conversion.hf`):
each corruption gives one clear error naming the file and key, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    SMOLLM2,
    fail_weights,
    needs_tokenizer,
    run_cli,
    snapshot,
    truncate,
)

from conversion import CheckpointError, read_checkpoint, save_safetensors
from conversion.hf import _language_expected, _vision_expected, build_from_hf

# ---- Hugging Face backbone directories written with numpy (no transformers needed) ----------
VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
LANGUAGE = dict(
    model_type="llama",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    hidden_act="silu",
)
SETTINGS = dict(mp_pixel_shuffle_factor=2, max_img_size=64)


def write_hf(directory: Path, config: dict, expected: dict, *, shards: int = 1) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected.items()}
    if shards == 1:
        save_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_safetensors(directory / name, {k: tensors[k] for k in part}, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture()
def hf(tmp_path):
    """(vision dir, language dir (2 shards), output dir that must stay absent)."""
    v = write_hf(tmp_path / "siglip", VISION, _vision_expected(VISION, ""))
    lang = dict(LANGUAGE, num_key_value_heads=2)
    l_dir = write_hf(tmp_path / "llama", lang, _language_expected(lang), shards=2)
    return v, l_dir, tmp_path / "out"


def test_the_numpy_backbones_build(hf):
    v, l_dir, out = hf
    cfg = build_from_hf(v, l_dir, out, **SETTINGS)
    assert read_checkpoint(out)[0] == cfg


def _config(d: Path, **changes):
    c = json.loads((d / "config.json").read_text())
    for k, val in changes.items():
        if val is None:
            c.pop(k, None)
        else:
            c[k] = val
    (d / "config.json").write_text(json.dumps(c))


def _shard(d: Path, i: int = 1) -> Path:
    return sorted(d.glob("model-*.safetensors"))[i]


# (which backbone, corruption, regexes the message must match)
HF_CASES = {
    "truncated_vision_file": (
        "v",
        lambda d: truncate(d / "model.safetensors"),
        [r"siglip/model\.safetensors is not a valid safetensors file", "truncated"],
    ),
    "truncated_language_shard": (
        "l",
        lambda d: truncate(_shard(d)),
        [r"model-00002-of-00002\.safetensors is not a valid safetensors file"],
    ),
    "garbage_header": (
        "l",
        lambda d: _shard(d, 0).write_bytes(struct.pack("<Q", 12) + b"{not json!!}"),
        [r"model-00001-of-00002\.safetensors is not a valid safetensors file: header is not JSON"],
    ),
    "empty_weights_file": (
        "v",
        lambda d: (d / "model.safetensors").write_bytes(b""),
        [r"model\.safetensors is not a valid safetensors file \(0 bytes\)"],
    ),
    "missing_shard": (
        "l",
        lambda d: _shard(d).unlink(),
        [r"weights file not found: .*model-00002-of-00002\.safetensors"],
    ),
    "index_lists_absent_key": (
        "l",
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        **json.loads((d / "model.safetensors.index.json").read_text())["weight_map"],
                        "model.layers.9.mlp.up_proj.weight": _shard(d).name,
                    }
                }
            )
        ),
        [
            r"model\.safetensors\.index\.json: the weight_map lists key\(s\) missing from their shard: model\.layers\.9\.mlp\.up_proj\.weight"
        ],
    ),
    "no_weights": (
        "v",
        lambda d: (d / "model.safetensors").unlink(),
        [r"siglip has neither model\.safetensors nor model\.safetensors\.index\.json"],
    ),
    "only_pytorch_bin": (
        "v",
        lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        [r"found pytorch_model\.bin: only safetensors"],
    ),
    "no_config": ("l", lambda d: (d / "config.json").unlink(), [r"llama has no config\.json"]),
    "config_not_json": (
        "v",
        lambda d: (d / "config.json").write_text("{oops"),
        [r"siglip/config\.json is not valid JSON"],
    ),
    # config.json disagreeing with the weights
    "more_layers_than_weights": (
        "l",
        lambda d: _config(d, num_hidden_layers=3),
        [r"missing key\(s\): model\.layers\.2\.self_attn\.q_proj\.weight", r"llama/config\.json"],
    ),
    "fewer_layers_than_weights": (
        "v",
        lambda d: _config(d, num_hidden_layers=1),
        [r"unexpected key\(s\): encoder\.layers\.1\.layer_norm1\.bias", r"siglip/config\.json"],
    ),
    "hidden_size_disagrees": (
        "l",
        lambda d: _config(d, hidden_size=96),
        [
            r"model\.embed_tokens\.weight \(in model-0000\d-of-00002\.safetensors\) has shape \(320, 64\), .*llama/config\.json implies \(320, 96\)"
        ],
    ),
    "image_size_disagrees": (
        "v",
        lambda d: _config(d, image_size=64),
        [
            r"embeddings\.position_embedding\.weight \(in model\.safetensors\) has shape \(16, 32\), .*siglip/config\.json implies \(64, 32\)"
        ],
    ),
    "untied_without_lm_head": (
        "l",
        lambda d: _config(d, tie_word_embeddings=False),
        [r"missing key\(s\): lm_head\.weight"],
    ),
    # fields missing or features nanoVLM does not have
    "missing_field": (
        "l",
        lambda d: _config(d, hidden_size=None),
        [r"llama/config\.json: missing config field\(s\): hidden_size"],
    ),
    "wrong_model_type": (
        "l",
        lambda d: _config(d, model_type="mistral"),
        [r"unsupported language model_type 'mistral'"],
    ),
    "vision_dir_is_not_siglip": (
        "v",
        lambda d: _config(d, model_type="clip_vision_model"),
        [r"unsupported vision model_type 'clip_vision_model'"],
    ),
    "siglip2_naflex": (
        "v",
        lambda d: _config(d, model_type="siglip2_vision_model"),
        [r"SigLIP2 NaFlex.* not supported"],
    ),
    "rope_scaling": (
        "l",
        lambda d: _config(d, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        [r"rope_scaling rope_type 'linear' is not supported"],
    ),
    "attention_bias": (
        "l",
        lambda d: _config(d, attention_bias=True),
        [r"not supported: attention_bias / mlp_bias true"],
    ),
    "other_activation": (
        "v",
        lambda d: _config(d, hidden_act="gelu"),
        [r"hidden_act 'gelu' is not supported.*gelu_pytorch_tanh"],
    ),
    "odd_head_dim": (
        "l",
        lambda d: _config(d, head_dim=32),
        [r"head_dim 32 with hidden_size 64 and num_attention_heads 4"],
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_backbone(case, hf):
    which, corrupt, patterns = HF_CASES[case]
    v, l_dir, out = hf
    corrupt(v if which == "v" else l_dir)
    with pytest.raises(CheckpointError) as info:
        build_from_hf(v, l_dir, out, **SETTINGS)
    msg = str(info.value)
    print(f"{case}: {msg[:200]}")
    for pattern in patterns:
        assert __import__("re").search(pattern, msg), f"{case}: {pattern!r} not in {msg}"
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert not out.exists() and not list(out.parent.glob(".out.tmp-*")), f"{case}: something was written"


@pytest.mark.parametrize(
    "settings,pattern",
    [
        (
            {"mp_pixel_shuffle_factor": 3, "max_img_size": 64},
            r"patch grid side 4 is not divisible by mp_pixel_shuffle_factor 3",
        ),
        ({**SETTINGS, "mp_image_token_length": 9}, r"mp_image_token_length 9 != .* = 4"),
        (
            {"mp_pixel_shuffle_factor": 2, "max_img_size": 2048},
            r"max_img_size 2048 gives a 64x64 tile grid .* use max_img_size <= 256",
        ),
        (
            {**SETTINGS, "vit_img_size": 64},
            r"position embeddings are for image_size 32; vit_img_size 64 would need them interpolated",
        ),
        ({**SETTINGS, "max_img_size": 48}, r"max_img_size 48 must be a multiple of the tile size 32"),
        (
            {**SETTINGS, "lm_hidden_dim": 8},
            r"unknown VLM setting\(s\): lm_hidden_dim .*architecture numbers come from the backbones",
        ),
    ],
    ids=["shuffle_factor", "token_length", "too_many_tiles", "image_size", "max_img_size", "architecture_field"],
)
def test_bad_vlm_settings(settings, pattern, hf):
    v, l_dir, out = hf
    with pytest.raises(ValueError, match=pattern):
        build_from_hf(v, l_dir, out, **settings)
    assert not out.exists()


@needs_tokenizer
def test_hf_tokenizer_that_does_not_fit(hf):
    v, l_dir, out = hf
    shutil.copyfile(SMOLLM2 / "tokenizer.json", l_dir / "tokenizer.json")
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json has 49152 tokens but .*config\.json has vocab_size 320"
    ):
        build_from_hf(v, l_dir, out, **SETTINGS)
    (l_dir / "tokenizer.json").write_text('{"version": "1.0", "model": 17}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a Hugging Face tokenizer\.json"):
        build_from_hf(v, l_dir, out, **SETTINGS)
    assert not out.exists()


def test_from_hf_output_directory_must_be_empty(hf):
    v, l_dir, out = hf
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_from_hf(v, l_dir, out, **SETTINGS)
    assert snapshot(out) == {"keep.txt": b"mine"}


def test_from_hf_disk_full_leaves_nothing(hf, monkeypatch):
    v, l_dir, out = hf
    fail_weights(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        build_from_hf(v, l_dir, out, **SETTINGS)
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["llama", "siglip"]


def test_from_hf_defaults_fit_a_224_px_tower(tmp_path):
    """nanoVLM-222M's tower (224 px tiles, 14 x 14 patches) with no flags: the defaults are
    derived from it (pixel shuffle 2, since 14 is not divisible by upstream's 4; max_img_size the
    largest multiple of 224 up to upstream's 2048 px that the 8 x 8 grid tokens name: 1792)
    instead of refusing, and the CLI says what it chose."""
    vision = dict(VISION, image_size=224, patch_size=16)
    v = write_hf(tmp_path / "siglip", vision, _vision_expected(vision, ""))
    l_dir = write_hf(tmp_path / "llama", LANGUAGE, _language_expected(LANGUAGE))
    cfg = build_from_hf(v, l_dir, tmp_path / "out")
    assert (cfg.vit_img_size, cfg.max_img_size, cfg.resize_to_max_side_len) == (224, 1792, True)
    assert (cfg.mp_pixel_shuffle_factor, cfg.n_image_tokens) == (2, 49)  # as nanoVLM-222M
    code, out, err = run_cli("-m", "conversion", "from-hf", "--vision", str(v), "--language", str(l_dir),
                             "--out", str(tmp_path / "cli"))  # fmt: skip
    assert code == 0, err
    assert "images up to 1792 px (split into tiles)" in out
