"""`conversion.hf` (nanoVLM from Hugging Face backbones) against transformers' own models.

Small SigLIP and Llama models are built offline from configs with every weight randomised
(norms and biases included), saved with `save_pretrained` in each file layout `conversion.hf`
reads, converted, and run: our vision encoder must give `SiglipVisionModel`'s
`last_hidden_state` and our text-only logits `LlamaForCausalLM`'s, to 1e-5 (torch_ref) and
1e-4 (jaxvlm) of the output scale. The configs use non-default numbers wherever a misread
field would change the output (layer_norm_eps 1e-3, rms_norm_eps 1e-4, rope_theta 5000, MLP
widths that are not 4x, grouped-query attention) and the text is 256 tokens long, so that
RoPE errors cannot hide. nanoVLM applies no image normalisation: both get the same pixels.

transformers is a test-only dependency (the `dev` extra); without it this module is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip(
    "transformers",
    reason="transformers is not installed (test-only dependency: pip install -c constraints.txt -e '.[dev]')",
)

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from conftest import assert_close, record, to_np  # noqa: E402

import jaxvlm  # noqa: E402
import torch_ref  # noqa: E402
from conversion import load_safetensors, read_checkpoint, save_safetensors  # noqa: E402
from conversion.hf import build_from_hf, from_hf, rope_inv_freq  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2"

IMG, PATCH = 32, 8
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMG,
    patch_size=PATCH,
    layer_norm_eps=1e-3,
)
V0 = 320
LANGUAGE = dict(
    vocab_size=V0,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5000.0,
    rms_norm_eps=1e-4,
    max_position_embeddings=512,
)
SETTINGS = dict(mp_pixel_shuffle_factor=2, max_img_size=64)  # 32 px tiles: 4x4 patches -> 2x2 = 4 tokens
T_TEXT = 256


@torch.no_grad()
def randomize_hf_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter (a tied one once) seeded random, scaled so activations stay O(1):
    norm weights N(1, 0.3^2), biases and other vectors N(0, 0.3^2), token embeddings N(0, 1),
    position embeddings N(0, 0.5^2), matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            mean, std = 1.0, 0.3
        elif p.ndim == 1:
            mean, std = 0.0, 0.3
        elif "embed_tokens" in name or "token_embedding" in name:
            mean, std = 0.0, 1.0
        elif "position_embedding" in name:
            mean, std = 0.0, 0.5
        else:
            mean, std = 0.0, float(np.prod(p.shape[1:])) ** -0.5
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul(std).add(mean).to(p.dtype))
    return model.eval()


def _restyle_prefix(src: Path, dst: Path, prefix: str) -> None:
    """A copy of a vision-only directory with the other key style: transformers 4's
    SiglipVisionModel wrote `vision_model.*` keys, 5 writes the bare names."""
    dst.mkdir()
    shutil.copyfile(src / "config.json", dst / "config.json")
    tensors, meta = load_safetensors(src / "model.safetensors")
    if all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    else:
        assert not any(k.startswith(prefix) for k in tensors)
        tensors = {prefix + k: v for k, v in tensors.items()}
    save_safetensors(dst / "model.safetensors", tensors, metadata=meta)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """{layout: (directory, torch reference module)}: vision layouts map to a module whose output
    is the SigLIP vision transformer's last_hidden_state, language layouts to a LlamaForCausalLM."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("hf")
    out = {}
    vision = randomize_hf_(SiglipVisionModel(SiglipVisionConfig(**VISION)), 10)
    vision.save_pretrained(root / "siglip_vision")
    out["siglip_vision"] = (root / "siglip_vision", vision)  # keys as this transformers writes them
    _restyle_prefix(root / "siglip_vision", root / "siglip_vision_restyled", "vision_model.")
    out["siglip_vision_restyled"] = (root / "siglip_vision_restyled", vision)  # the other style
    dual = randomize_hf_(
        SiglipModel(
            SiglipConfig(
                text_config=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    vocab_size=64,
                    bos_token_id=1,
                    eos_token_id=2,
                    pad_token_id=0,
                ),
                vision_config=VISION,
            )
        ),
        11,
    )
    dual.save_pretrained(root / "siglip_dual")
    dual.save_pretrained(root / "siglip_dual_sharded", max_shard_size="40KB")
    out["siglip_dual"] = (root / "siglip_dual", dual.vision_model)
    out["siglip_dual_sharded"] = (root / "siglip_dual_sharded", dual.vision_model)
    for tie in (True, False):
        name = "llama_tied" if tie else "llama_untied"
        lm = randomize_hf_(LlamaForCausalLM(LlamaConfig(**LANGUAGE, tie_word_embeddings=tie)), 20 + tie)
        if tie:
            assert lm.lm_head.weight is lm.model.embed_tokens.weight
        lm.save_pretrained(root / name)
        lm.save_pretrained(root / f"{name}_sharded", max_shard_size="40KB")
        out[name] = (root / name, lm)
        out[f"{name}_sharded"] = (root / f"{name}_sharded", lm)
    for name in ("siglip_dual_sharded", "llama_tied_sharded", "llama_untied_sharded"):
        index = json.loads((out[name][0] / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, f"{name}: expected several shards"
    return out


PAIRS = [
    ("siglip_vision", "llama_tied"),
    ("siglip_vision_restyled", "llama_untied"),
    ("siglip_dual", "llama_tied_sharded"),
    ("siglip_dual_sharded", "llama_untied_sharded"),
]


@pytest.mark.parametrize("vision_layout,language_layout", PAIRS)
def test_outputs_equal_transformers(vision_layout, language_layout, backbones, tmp_path):
    vdir, hf_vision = backbones[vision_layout]
    ldir, hf_lm = backbones[language_layout]
    out = tmp_path / "vlm"
    cfg = build_from_hf(vdir, ldir, out, seed=0, **SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    keys = load_safetensors(vdir / "model.safetensors")[0] if (vdir / "model.safetensors").is_file() else {}
    record(
        f"from-hf {vision_layout} key style",
        "vision_model.*"
        if any(k.startswith("vision_model.") for k in keys)
        else ("bare" if keys else "sharded dual tower"),
    )
    assert cfg.lm_tie_weights == ("untied" not in language_layout)
    assert (cfg.vit_ln_eps, cfg.lm_rms_eps, cfg.lm_re_base, cfg.vit_inter_dim, cfg.lm_inter_dim) == (
        1e-3,
        1e-4,
        5000,
        48,
        96,
    )
    tmodel = torch_ref.VisionLanguageModel.from_pretrained(out).eval()
    jmodel = jaxvlm.VisionLanguageModel.from_pretrained(out)
    name = f"from-hf {vision_layout} + {language_layout}"

    pixels = np.random.default_rng(0).random((3, 3, IMG, IMG), dtype=np.float32)
    with torch.no_grad():
        want = hf_vision(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        got_t = tmodel.vision_encoder(torch.from_numpy(pixels))
    assert_close(f"{name}: vision torch_ref vs transformers SigLIP", got_t, want, 1e-5)
    assert_close(
        f"{name}: vision jaxvlm vs transformers SigLIP", jmodel.vision_encoder(jnp.asarray(pixels)), want, 1e-4
    )

    ids = np.random.default_rng(1).integers(0, V0, size=(2, T_TEXT))
    with torch.no_grad():
        want = hf_lm(input_ids=torch.from_numpy(ids)).logits
        got_t, _ = tmodel(ids)  # no image tokens: the decoder runs on the token embeddings
    assert got_t.shape == (2, T_TEXT, V0 + 66)
    assert_close(f"{name}: text logits torch_ref vs transformers Llama", got_t[..., :V0], want, 1e-5)
    got_j = np.asarray(jaxvlm.forward(jmodel, jnp.asarray(ids)))
    assert_close(f"{name}: text logits jaxvlm vs transformers Llama", got_j[..., :V0], want, 1e-4)


@pytest.mark.parametrize("language_layout", ["llama_tied", "llama_untied"])
def test_weights_are_copied_and_new_rows_are_upstreams_init(language_layout, backbones, tmp_path):
    ldir, hf_lm = backbones[language_layout]
    vdir, _ = backbones["siglip_vision"]
    cfg, t0 = from_hf(vdir, ldir, seed=0, **SETTINGS)
    _, t0b = from_hf(vdir, ldir, seed=0, **SETTINGS)
    _, t1 = from_hf(vdir, ldir, seed=1, **SETTINGS)
    assert all(np.array_equal(t0[k], t0b[k]) for k in t0), "the same seed must give the same checkpoint"
    seeded = {"MP.proj.weight", "decoder.head.weight", "decoder.token_embedding.weight"}
    assert {k for k in t0 if not np.array_equal(t0[k], t1[k])} == seeded & set(t0)

    embed = to_np(hf_lm.model.embed_tokens.weight)
    head = to_np(hf_lm.lm_head.weight)
    if cfg.lm_tie_weights:
        assert "decoder.token_embedding.weight" not in t0
        tables = {"decoder.head.weight": embed}
    else:
        tables = {"decoder.token_embedding.weight": embed, "decoder.head.weight": head}
        assert not np.array_equal(embed, head)
    new_rows = []
    for key, hf_table in tables.items():
        assert t0[key].shape == (V0 + 66, 64) and t0[key].dtype == np.float32
        assert np.array_equal(t0[key][:V0], hf_table), f"{key}: the first {V0} rows must be the backbone's"
        new_rows.append(t0[key][V0:])
    if len(new_rows) == 2:
        assert not np.array_equal(*new_rows), "the untied head's new rows are drawn on their own"
    for x in new_rows + [t0["MP.proj.weight"]]:
        n = x.size
        assert abs(float(x.mean())) < 4 * 0.02 / np.sqrt(n) and abs(float(x.std()) / 0.02 - 1) < 4 / np.sqrt(2 * n), (
            f"N(0, 0.02) expected: mean {x.mean():.2e}, std {x.std():.4f} over {n}"
        )
    assert np.array_equal(
        t0["decoder.blocks.1.attn.out_proj.weight"], to_np(hf_lm.model.layers[1].self_attn.o_proj.weight)
    )
    assert np.array_equal(
        t0["decoder.blocks.0.norm2.weight"], to_np(hf_lm.model.layers[0].post_attention_layernorm.weight)
    )
    assert np.array_equal(t0["decoder.rotary_embd.inv_freq"], to_np(torch_ref.language_model.rope_inv_freq(16, 5000.0)))


def test_vision_qkv_and_position_embedding(backbones):
    vdir, hf_vision = backbones["siglip_dual"]
    _, t = from_hf(vdir, backbones["llama_tied"][0], **SETTINGS)
    layer = hf_vision.encoder.layers[1].self_attn
    want = np.concatenate([to_np(layer.q_proj.weight), to_np(layer.k_proj.weight), to_np(layer.v_proj.weight)])
    assert np.array_equal(t["vision_encoder.blocks.1.attn.qkv_proj.weight"], want)
    pos = to_np(hf_vision.embeddings.position_embedding.weight)
    assert np.array_equal(t["vision_encoder.patch_embedding.position_embedding"], pos[None])
    assert np.array_equal(t["vision_encoder.layer_norm.bias"], to_np(hf_vision.post_layernorm.bias))


def test_bfloat16_backbone_and_bfloat16_output(backbones, tmp_path):
    """bf16 files (as SmolLM2 ships) are read exactly; dtype="bfloat16" writes bf16 tensors."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(backbones["llama_tied"][0]).to(torch.bfloat16)
    lm.save_pretrained(tmp_path / "bf16")
    stored, _ = load_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert str(stored["model.norm.weight"].dtype) == "bfloat16"
    _, t = from_hf(backbones["siglip_vision"][0], tmp_path / "bf16", **SETTINGS)
    want = lm.model.layers[0].mlp.gate_proj.weight.detach().float().numpy()
    assert t["decoder.blocks.0.mlp.gate_proj.weight"].dtype == np.float32
    assert np.array_equal(t["decoder.blocks.0.mlp.gate_proj.weight"], want)
    build_from_hf(backbones["siglip_vision"][0], tmp_path / "bf16", tmp_path / "out", dtype="bfloat16", **SETTINGS)
    cfg, tensors = read_checkpoint(tmp_path / "out")
    assert {str(a.dtype) for a in tensors.values()} == {"bfloat16"}
    assert torch_ref.VisionLanguageModel.from_pretrained(tmp_path / "out").cfg == cfg


# ---- RoPE inv_freq --------------------------------------------------------------------------
# (head dim, rope_theta): SmolLM2-135M/360M, SmolLM2-1.7B, Llama 2, Llama 3, this module's
# test model, jaxvlm's tiny preset.
RELEASED_ROPE = [(64, 100000), (64, 130000), (128, 10000), (128, 500000), (16, 5000.0), (16, 100000)]


@pytest.mark.parametrize("head_dim,base", RELEASED_ROPE)
def test_rope_inv_freq_bit_equal_to_torch_ref(head_dim, base):
    ours = rope_inv_freq(head_dim, base)
    theirs = to_np(torch_ref.language_model.rope_inv_freq(head_dim, base))
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    assert np.array_equal(ours.view(np.int32), theirs.view(np.int32)), (
        f"hd {head_dim} base {base}: {int((ours != theirs).sum())} element(s) differ"
    )


def test_rope_inv_freq_within_two_ulp_of_torch_everywhere():
    """torch's CPU pow is SLEEF's vectorised powf (<= 1 ulp, not correctly rounded) plus glibc's
    powf for the tail, so no numpy expression matches it bit for bit in general; ours is the
    correctly rounded power. Measured over head dims 2..512 and eight bases."""
    worst, exact, total = 0, 0, 0
    for base in (10000, 100000, 130000, 500000, 1e6, 5000.0, 12345.678, 3.3):
        for hd in range(2, 514, 2):
            a = rope_inv_freq(hd, base).view(np.int32).astype(np.int64)
            b = to_np(torch_ref.language_model.rope_inv_freq(hd, base)).view(np.int32).astype(np.int64)
            worst = max(worst, int(np.abs(a - b).max()))
            exact += int((a == b).sum())
            total += a.size
    record(
        "rope inv_freq numpy vs torch_ref (hd 2..512, 8 bases)",
        f"{exact}/{total} elements bit-equal ({exact / total:.1%}), worst {worst} ulp",
    )
    assert worst <= 2


# ---- tokenizer and `jaxvlm train --init-from-hf-*` -----------------------------------------
@pytest.fixture(scope="module")
def smollm2_sized(backbones, tmp_path_factory):
    """A tiny Llama with SmolLM2's 49152-token vocabulary and SmolLM2's tokenizer files."""
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found at {TOKENIZER} (../shared is absent)")
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("smollm2_sized")
    cfg = {**LANGUAGE, "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 48, "rope_theta": 100000.0}
    lm = randomize_hf_(LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True)), 30)
    lm.save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(TOKENIZER / name, d / name)
    return d, lm


def test_tokenizer_is_copied_and_its_ids_fit(smollm2_sized, backbones, tmp_path):
    from jaxvlm.tokenizer import from_config

    ldir, _ = smollm2_sized
    cfg = build_from_hf(backbones["siglip_vision"][0], ldir, tmp_path / "out", **SETTINGS)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (TOKENIZER / name).read_bytes()
    tok = from_config(cfg, tmp_path / "out")
    assert tok.image_token_id == cfg.image_token_id == 49152 and tok.vocab_size == cfg.lm_vocab_size == 49218


def test_jaxvlm_train_init_from_hf(smollm2_sized, backbones, tmp_path):
    """Two steps from HF backbones with only the projector trained: the exported checkpoint
    carries the backbones' weights unchanged, the tokenizer and the VLM settings."""
    from jaxvlm.train_loop import RunConfig, train

    ldir, lm = smollm2_sized
    vdir, vision = backbones["siglip_dual_sharded"]
    run = RunConfig(
        output_dir=str(tmp_path / "run"),
        init_from_hf_vision=str(vdir),
        init_from_hf_language=str(ldir),
        init_from_hf_settings=json.dumps(SETTINGS),
        steps=2,
        batch_size=2,
        synthetic_size=16,
        save_every=1,
        log_every=1,
        max_length=128,
        lr_vision_backbone=0.0,
        lr_language_backbone=0.0,
        seed=5,
    )
    summary = train(run)
    assert summary["steps"] == 2
    cfg, t = read_checkpoint(tmp_path / "run" / "model")
    assert (cfg.mp_pixel_shuffle_factor, cfg.max_img_size, cfg.lm_base_vocab_size, cfg.vit_ln_eps) == (
        2,
        64,
        49152,
        1e-3,
    )
    assert (tmp_path / "run" / "model" / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()
    assert np.array_equal(t["decoder.head.weight"][:49152], to_np(lm.model.embed_tokens.weight))
    assert np.array_equal(t["vision_encoder.blocks.0.mlp.fc2.weight"], to_np(vision.encoder.layers[0].mlp.fc2.weight))
    _, fresh = from_hf(vdir, ldir, seed=5, **SETTINGS)
    assert np.array_equal(t["decoder.head.weight"][49152:], fresh["decoder.head.weight"][49152:]), (
        "new rows from --seed"
    )
    assert not np.array_equal(t["MP.proj.weight"], fresh["MP.proj.weight"]), "the projector was trained"


def test_cli_from_hf(backbones, tmp_path):
    from cli.convert import main

    vdir, ldir = backbones["siglip_dual"][0], backbones["llama_untied_sharded"][0]
    assert (
        main(
            [
                "from-hf",
                "--vision",
                str(vdir),
                "--language",
                str(ldir),
                "--out",
                str(tmp_path / "a"),
                "--pixel-shuffle-factor",
                "2",
                "--max-img-size",
                "64",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    cfg_a, ta = read_checkpoint(tmp_path / "a")
    _, tb = from_hf(vdir, ldir, seed=3, **SETTINGS)
    assert not cfg_a.lm_tie_weights and all(np.array_equal(ta[k], tb[k]) for k in tb)
    assert (
        main(
            [
                "from-hf",
                "--vision",
                str(vdir),
                "--language",
                str(ldir),
                "--out",
                str(tmp_path / "b"),
                "--pixel-shuffle-factor",
                "4",
                "--extra-tokens",
                "legacy",
            ]
        )
        == 0
    )
    cfg_b, _ = read_checkpoint(tmp_path / "b")
    assert (cfg_b.n_image_tokens, cfg_b.extra_token_amount, cfg_b.max_img_size, cfg_b.resize_to_max_side_len) == (
        1,
        1,
        32,
        False,
    )
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        build_from_hf(vdir, ldir, tmp_path / "a", **SETTINGS)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == before
