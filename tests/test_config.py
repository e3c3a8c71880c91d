"""VLMConfig: presets, derived numbers (checked against the reference's numbers, not recomputed
with the same formulas), released config.json versions, strictness, frozenness, hashing."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from conftest import UPSTREAM_CONFIG_FIELDS, upstream_config_dict

from conversion import PRESETS, CheckpointError, VLMConfig, read_config
from conversion.config import CHATML_TEMPLATE


# ---- presets and derived numbers ----------------------------------------------------------------
def test_presets_build():
    assert set(PRESETS) == {"tiny", "nanovlm-222m", "nanovlm-460m"}
    for name in PRESETS:
        cfg = VLMConfig.preset(name)
        assert isinstance(cfg, VLMConfig)
        assert VLMConfig.preset(name, hf_repo_name="x").hf_repo_name == "x"
    with pytest.raises(ValueError, match="unknown preset 'nanovlm-1b'"):
        VLMConfig.preset("nanovlm-1b")


def test_derived_numbers_222m():
    # docs/conventions.md, "Model" and "Config": 224/16 = 14 -> 196 patches, s = 2 -> 49 tokens; H 576 / 9 heads
    cfg = VLMConfig.nanovlm_222m()
    assert (cfg.vit_n_patches, cfg.n_image_tokens, cfg.mp_input_dim) == (196, 49, 4 * 768)
    assert (cfg.vit_head_dim, cfg.lm_head_dim) == (64, 64)
    assert (cfg.lm_vocab_size, cfg.image_token_id, cfg.image_token) == (49153, 49152, "<|image|>")
    assert (cfg.lm_n_heads, cfg.lm_n_kv_heads, cfg.lm_n_blocks, cfg.lm_inter_dim) == (9, 3, 30, 1536)
    assert (cfg.vit_n_blocks, cfg.vit_n_heads, cfg.vit_inter_dim) == (12, 12, 3072)


def test_derived_numbers_460m_is_upstreams_default():
    # reference: 512/16 = 32 -> 1024 patches, s = 4 -> 64 tokens; 49152 + 66 extra = 49218
    cfg = VLMConfig.nanovlm_460m()
    assert cfg == VLMConfig()
    assert (cfg.vit_n_patches, cfg.n_image_tokens, cfg.mp_input_dim) == (1024, 64, 16 * 768)
    assert (cfg.lm_hidden_dim, cfg.lm_n_heads, cfg.lm_n_kv_heads, cfg.lm_head_dim) == (960, 15, 5, 64)
    assert (cfg.lm_vocab_size, cfg.extra_token_amount, len(cfg.vlm_extra_tokens)) == (49218, 66, 66)
    # extra tokens follow the base vocabulary in dict order (docs/conventions.md, "Tokenizer and prompts")
    tokens = list(cfg.extra_tokens.values())
    assert tokens[0] == "<|image|>" and tokens[1] == "<|global_image|>"
    assert tokens[2] == "<row_1_col_1>" and tokens[-1] == "<row_8_col_8>"
    assert cfg.image_token_id == 49152
    assert cfg.lm_chat_template == CHATML_TEMPLATE
    # upstream's class-level defaults are constants computed once at import, not from overrides
    assert VLMConfig(vit_hidden_dim=1152, vit_n_heads=16).vit_inter_dim == 3072
    assert VLMConfig(lm_base_vocab_size=49152, extra_token_amount=66).lm_vocab_size == 49218


def test_image_token_id_follows_dict_order():
    cfg = VLMConfig.tiny(
        vlm_extra_tokens={"global_image_token": "<|global_image|>", "image_token": "<|image|>"}, lm_vocab_size=49154
    )
    assert cfg.image_token_id == 49153


def test_tiny_uses_the_real_vocabulary():
    cfg = VLMConfig.tiny()
    assert cfg.lm_vocab_size == 49218 and cfg.image_token_id == 49152
    assert cfg.n_image_tokens == cfg.mp_image_token_length == 4


# ---- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(lm_hidden_dim=65), "lm_hidden_dim 65 is not divisible by lm_n_heads 4"),
        (dict(vit_hidden_dim=66), "vit_hidden_dim 66 is not divisible by vit_n_heads 4"),
        (dict(lm_n_kv_heads=3), "lm_n_heads 4 is not divisible by lm_n_kv_heads 3"),
        (dict(mp_image_token_length=16), "mp_image_token_length 16"),
        (dict(mp_pixel_shuffle_factor=3), "not divisible by mp_pixel_shuffle_factor 3"),
        (dict(lm_vocab_size=49200), "lm_vocab_size 49200 < lm_base_vocab_size 49152 + 66"),
        (dict(vlm_extra_tokens={"global_image_token": "<|global_image|>"}), "no 'image_token'"),
        (dict(vit_cls_flag=True), "vit_cls_flag"),
        (dict(lm_dropout=0.1), "dropout"),
    ],
)
def test_invalid_configs_raise(overrides, needle):
    with pytest.raises(ValueError, match="invalid VLMConfig") as e:
        VLMConfig.tiny(**overrides)
    assert needle in str(e.value)


# ---- released config.json versions ---------------------------------------------------------------------
def _current_460m_json():
    """A config.json as upstream's current save_pretrained writes it (all current fields)."""
    d = {
        "vit_hidden_dim": 768,
        "vit_inter_dim": 3072,
        "vit_patch_size": 16,
        "vit_img_size": 512,
        "vit_n_heads": 12,
        "vit_dropout": 0.0,
        "vit_n_blocks": 12,
        "vit_ln_eps": 1e-06,
        "vit_cls_flag": False,
        "vit_model_type": "google/siglip2-base-patch16-512",
        "lm_hidden_dim": 960,
        "lm_inter_dim": 2560,
        "lm_rms_eps": 1e-05,
        "lm_re_base": 100000,
        "lm_max_position_embeddings": 8192,
        "lm_base_vocab_size": 49152,
        "extra_token_amount": 66,
        "lm_vocab_size": 49218,
        "lm_n_heads": 15,
        "lm_n_kv_heads": 5,
        "lm_dropout": 0.0,
        "lm_n_blocks": 32,
        "lm_attn_scaling": 1.0,
        "lm_max_length": 4096,
        "lm_use_tokens": False,
        "lm_tie_weights": True,
        "lm_model_type": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "lm_tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "lm_chat_template": CHATML_TEMPLATE,
        "mp_pixel_shuffle_factor": 4,
        "mp_image_token_length": 64,
        "max_img_size": 2048,
        "resize_to_max_side_len": True,
        "vlm_extra_tokens": {
            "image_token": "<|image|>",
            "global_image_token": "<|global_image|>",
            **{f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)},
        },
        "vlm_load_backbone_weights": True,
        "vlm_checkpoint_path": "checkpoints",
        "hf_repo_name": "nanoVLM",
    }
    assert list(d) == UPSTREAM_CONFIG_FIELDS
    return d


def _older_230m_json():
    """An older release: has lm_eos_token_id, lacks max_img_size / resize_to_max_side_len
    (no image splitting), one extra token, vocabulary 49152 + 1."""
    return {
        "vit_hidden_dim": 768,
        "vit_inter_dim": 3072,
        "vit_patch_size": 16,
        "vit_img_size": 224,
        "vit_n_heads": 12,
        "vit_dropout": 0.0,
        "vit_n_blocks": 12,
        "vit_ln_eps": 1e-06,
        "vit_cls_flag": False,
        "vit_model_type": "google/siglip-base-patch16-224",
        "lm_hidden_dim": 576,
        "lm_inter_dim": 1536,
        "lm_rms_eps": 1e-05,
        "lm_re_base": 100000,
        "lm_max_position_embeddings": 8192,
        "lm_base_vocab_size": 49152,
        "extra_token_amount": 1,
        "lm_vocab_size": 49153,
        "lm_n_heads": 9,
        "lm_n_kv_heads": 3,
        "lm_dropout": 0.0,
        "lm_n_blocks": 30,
        "lm_attn_scaling": 1.0,
        "lm_max_length": 1024,
        "lm_use_tokens": False,
        "lm_tie_weights": True,
        "lm_model_type": "HuggingFaceTB/SmolLM2-135M",
        "lm_tokenizer": "HuggingFaceTB/cosmo2-tokenizer",
        "lm_chat_template": CHATML_TEMPLATE,
        "lm_eos_token_id": 0,
        "mp_pixel_shuffle_factor": 2,
        "mp_image_token_length": 49,
        "vlm_extra_tokens": {"image_token": "<|image|>"},
        "vlm_load_backbone_weights": True,
        "vlm_checkpoint_path": "checkpoints/nanoVLM-230M",
        "hf_repo_name": "nanoVLM-230M",
    }


def _oldest_placeholder_json():
    """The first image-token release: only vlm_extra_tokens={"image_token": ...}; no
    lm_base_vocab_size / extra_token_amount / mp_image_token_length; lm_re_base as a float."""
    d = _older_230m_json()
    for k in ("lm_base_vocab_size", "extra_token_amount", "mp_image_token_length", "lm_chat_template"):
        del d[k]
    d["lm_re_base"] = 100000.0
    return d


def test_current_config_loads_and_round_trips(tmp_path):
    d = _current_460m_json()
    cfg = VLMConfig.from_dict(d)
    assert cfg == VLMConfig.nanovlm_460m()
    assert cfg.to_dict() == d and list(cfg.to_dict()) == list(d)
    (tmp_path / "config.json").write_text(json.dumps(d, indent=4))
    assert read_config(tmp_path) == cfg
    cfg.to_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == d


def test_older_config_with_eos_and_without_image_splitting():
    cfg = VLMConfig.from_dict(_older_230m_json())
    assert cfg.lm_eos_token_id == 0
    assert cfg.max_img_size == 224 and cfg.resize_to_max_side_len is False  # that release did not split images
    assert (cfg.n_image_tokens, cfg.image_token_id, cfg.lm_vocab_size) == (49, 49152, 49153)
    assert cfg == VLMConfig.nanovlm_222m(
        lm_eos_token_id=0, vlm_checkpoint_path="checkpoints/nanoVLM-230M", hf_repo_name="nanoVLM-230M"
    )
    d = cfg.to_dict()
    assert d["lm_eos_token_id"] == 0  # kept when the config has it
    assert set(d) == set(UPSTREAM_CONFIG_FIELDS) | {"lm_eos_token_id"}
    assert VLMConfig.from_dict(d) == cfg


def test_oldest_placeholder_config():
    cfg = VLMConfig.from_dict(_oldest_placeholder_json())
    assert cfg.vlm_extra_tokens == (("image_token", "<|image|>"),)
    assert (cfg.lm_base_vocab_size, cfg.extra_token_amount, cfg.mp_image_token_length) == (49152, 1, 49)
    assert (cfg.image_token_id, cfg.lm_vocab_size, cfg.max_img_size) == (49152, 49153, 224)
    assert cfg.lm_re_base == 100000 and isinstance(cfg.lm_re_base, int)
    assert cfg.lm_chat_template == CHATML_TEMPLATE
    # written back with upstream's current field set (plus the eos id it carried)
    assert set(cfg.to_dict()) == set(UPSTREAM_CONFIG_FIELDS) | {"lm_eos_token_id"}


def test_upstream_style_dict_of_any_preset_round_trips():
    for name in PRESETS:
        cfg = VLMConfig.preset(name)
        assert cfg.to_dict() == upstream_config_dict(cfg)
        assert VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_fields_raise_naming_the_field(tmp_path, caplog):
    d = _current_460m_json()
    d["IMAGE_TOKEN_LENGTH"] = 49  # a field of a pre-placeholder release
    d["zzz_extra"] = 1
    with pytest.raises(ValueError, match="unknown config field\\(s\\): IMAGE_TOKEN_LENGTH, zzz_extra"):
        VLMConfig.from_dict(d)
    with caplog.at_level("WARNING"):
        assert VLMConfig.from_dict(d, strict=False) == VLMConfig.nanovlm_460m()
    assert "IMAGE_TOKEN_LENGTH" in caplog.text
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="IMAGE_TOKEN_LENGTH"):
        read_config(tmp_path)
    with pytest.raises(TypeError):
        VLMConfig(zzz_extra=1)


# ---- frozen, hashable ------------------------------------------------------------------------------
def test_frozen():
    cfg = VLMConfig.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lm_hidden_dim = 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vlm_extra_tokens = ()
    assert cfg.replace(lm_n_blocks=3).lm_n_blocks == 3 and cfg.lm_n_blocks == 2
    assert isinstance(cfg.vlm_extra_tokens, tuple)  # a dict input is stored immutably
    d = cfg.extra_tokens
    d["image_token"] = "<mutated>"
    assert cfg.image_token == "<|image|>"


def test_hashable_and_usable_as_static_jit_argument():
    a, b = VLMConfig.tiny(), VLMConfig.from_dict(VLMConfig.tiny().to_dict())
    assert a == b and hash(a) == hash(b)
    assert a != a.replace(lm_n_blocks=3)
    assert len({a, b, a.replace(lm_n_blocks=3)}) == 2
    traces = []

    def f(x, cfg):
        traces.append(cfg)
        return x * cfg.n_image_tokens

    g = jax.jit(f, static_argnums=1)
    assert int(g(jnp.int32(2), a)) == 8
    assert int(g(jnp.int32(3), b)) == 12
    assert len(traces) == 1  # equal configs hit the same compiled function
