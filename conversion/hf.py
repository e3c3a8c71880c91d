"""A nanoVLM checkpoint from local Hugging Face backbones (docs/conventions.md, "Hugging Face backbones").

    cfg = build_from_hf("siglip_dir", "smollm2_dir", "out_dir", mp_pixel_shuffle_factor=2, seed=0)
    cfg, tensors = from_hf("siglip_dir", "smollm2_dir")        # the same, in memory

What upstream nanoVLM's `ViT.from_pretrained` / `LanguageModel.from_pretrained` do, from local
directories (no download) and strictly (every key and shape checked; errors, not prints):

Vision tower: SigLIP and the fixed-resolution SigLIP2 checkpoints (`model_type` `siglip` or
`siglip_vision_model`), either the whole dual-tower model (config.json with a nested
`vision_config`, weights `vision_model.*`; the text tower, `logit_scale`/`logit_bias` and the
attention-pooling `head.*` are not used) or a standalone vision model (weights with or
without the `vision_model.` prefix). q/k/v are concatenated into `qkv_proj` (that order), the
[N, D] position Embedding gets its leading 1, `post_layernorm` becomes `layer_norm`.

Language model: Llama / SmolLM2 (`model_type` `llama`), one `model.safetensors` or shards
listed in `model.safetensors.index.json`. Tied (`tie_word_embeddings`: the file's
`model.embed_tokens.weight` becomes `decoder.head.weight`, stored once) or untied
(`lm_tie_weights=False`; `lm_head.weight` becomes `decoder.head.weight`). The vocabulary grows
by the VLM's extra tokens: new rows N(0, 0.02) (upstream's init), in the head too when untied.
`decoder.rotary_embd.inv_freq` is computed from `rope_theta` (see `rope_inv_freq`).

Architecture numbers come from each backbone's config.json. A field the file leaves out takes
the default of the transformers config class that wrote it (`SIGLIP_VISION_DEFAULTS`,
`LLAMA_DEFAULTS`; transformers 4 saved only the fields that differ from them), except the
Llama shape fields in `LLAMA_REQUIRED`, which must be present. Every shape is then checked against
the weights, so a default that does not fit is reported with the key and both shapes.
Features nanoVLM's modules do not have (biases in Llama attention, rope scaling, another
activation, a head dim other than hidden/heads, SigLIP2 NaFlex) are errors naming the field.

VLM settings (`VLM_SETTINGS`, upstream's current defaults): pixel-shuffle factor, image tokens
per tile (derived), extra tokens, tile size (the vision tower's), max image size,
resize_to_max_side_len, max length, the projector variant (`mp_type`, `mp_resampler_queries`,
`mp_resampler_layers`). The projector is initialised as both frameworks do it (`projector_init`:
nanoVLM's `MP.proj` N(0, 0.02) as upstream); all random draws come from `numpy.random.default_rng(seed)` in a fixed order
(projector, new embedding rows, new head rows).

The language model's tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) is
copied when present; its size must equal `vocab_size`, since nanoVLM numbers its extra tokens
from the end of the base vocabulary. Errors are `CheckpointError`s naming the file and key;
nothing is written unless everything validated, and the output directory appears atomically.

numpy + safetensors only (bfloat16 through `conversion.safetensors_io`'s dtype table).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_EXTRA_TOKENS, LEGACY_EXTRA_TOKENS, VLMConfig
from .mapping import LINEAR, check_keys, expected_shapes, mapping
from .pretrained import CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES, WEIGHTS_FILE, write_checkpoint
from .rope import rope_inv_freq
from .safetensors_io import _FROM_ST, CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

# transformers' SiglipVisionConfig defaults (what transformers uses for a field config.json omits).
SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# transformers' LlamaConfig defaults for the fields that do not set a shape.
LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
LLAMA_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Settings of the VLM itself (not of a backbone), with upstream's current defaults
# (None: derived, see `_settings`).
VLM_SETTINGS: dict[str, Any] = {
    "mp_type": None,  # the projector variant (None: nanoVLM's pixel_shuffle_linear), see VLMConfig
    "mp_resampler_queries": None,  # mp_type "resampler": its learned queries
    "mp_resampler_layers": 2,  # mp_type "resampler": its layers
    "mp_pixel_shuffle_factor": None,  # 4 where the patch grid allows it, else 2, else 1
    "mp_image_token_length": None,  # (vit_img_size / vit_patch_size / s)^2, or the resampler's queries
    "vlm_extra_tokens": DEFAULT_EXTRA_TOKENS,  # or "legacy" (the single image token), or {name: token}
    "vit_img_size": None,  # the vision tower's image_size (its position embeddings fix it)
    "max_img_size": None,  # 2048 with image splitting; vit_img_size with the legacy single token
    "resize_to_max_side_len": None,  # True with image splitting; False with the legacy single token
    "lm_max_length": 4096,
    "vit_model_type": None,  # informational names; default: the directories given
    "lm_model_type": None,
    "lm_tokenizer": None,
    "hf_repo_name": "nanoVLM",
}


# ---- files ----------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: not a Hugging Face {what} directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class _SafetensorsFile:
    """One safetensors file, read lazily: the header is parsed and checked when opened (a
    truncated or corrupt file fails here), a tensor is read from disk only when asked for."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"weights file not found: {path}")
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise CheckpointError(
                    f"{path} is not a valid safetensors file ({size} bytes): truncated or bad header length"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a valid safetensors file: header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            try:
                st_dtype, shape, (begin, end) = (
                    info["dtype"],
                    tuple(int(s) for s in info["shape"]),
                    info["data_offsets"],
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{path} is not a valid safetensors file: bad header entry for {name!r}"
                ) from None
            dtype = _FROM_ST.get(st_dtype)
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}")
            if not (0 <= begin <= end <= data_size) or end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(
                    f"{path} is not a valid safetensors file ({size} bytes): tensor {name!r} "
                    f"lies outside the file or has the wrong byte length (truncated?)"
                )
            self.entries[name] = (dtype, shape, begin)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin = self.entries[name]
        return np.fromfile(self.path, dtype=dtype, count=math.prod(shape), offset=self.data_start + begin).reshape(
            shape
        )


class _Weights:
    """The tensors of a Hugging Face model directory: `model.safetensors`, or the shards of
    `model.safetensors.index.json` (every key of its weight_map must be in its shard)."""

    def __init__(self, directory: Path, what: str):
        self.directory = directory
        single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
        self.where: dict[str, _SafetensorsFile] = {}
        if index.is_file():
            weight_map = _read_json(index, what).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map' object")
            shards: dict[str, _SafetensorsFile] = {}
            missing = []
            for key, shard in weight_map.items():
                if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
                    raise CheckpointError(f"{index}: bad shard file name {shard!r} for {key}")
                if shard not in shards:
                    shards[shard] = _SafetensorsFile(directory / shard)
                if key not in shards[shard].entries:
                    missing.append(f"{key} (in {shard})")
                self.where[key] = shards[shard]
            if missing:
                raise CheckpointError(
                    f"{index}: the weight_map lists key(s) missing from their shard: {', '.join(missing)}"
                )
        elif single.is_file():
            f = _SafetensorsFile(single)
            self.where = {k: f for k in f.entries}
        else:
            other = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pth"))
            hint = f" (found {', '.join(other)}: only safetensors weights are read)" if other else ""
            raise CheckpointError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")

    @property
    def source(self) -> str:
        files = sorted({str(f.path) for f in self.where.values()})
        return files[0] if len(files) == 1 else f"{self.directory / INDEX_FILE} ({len(files)} shards)"

    def file_of(self, key: str) -> Path:
        return self.where[key].path

    def read(self, key: str) -> np.ndarray:
        return self.where[key].read(key)


def _check_shapes(
    weights: _Weights, expected: dict[str, tuple[int, ...]], *, prefix: str, ignore, config: Path
) -> None:
    """Every expected key present with its shape and no unknown key under `prefix` (keys for
    which `ignore(rest)` holds are skipped); all problems in one CheckpointError."""
    problems = []
    missing = [k for k in expected if k not in weights.where]
    unknown = [k for k in weights.where if k.startswith(prefix) and k not in expected and not ignore(k[len(prefix) :])]
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    if unknown:
        problems.append(f"unexpected key(s): {', '.join(sorted(unknown))}")
    for k, want in expected.items():
        if k in weights.where and weights.where[k].shape(k) != tuple(want):
            problems.append(
                f"{k} (in {weights.file_of(k).name}) has shape {weights.where[k].shape(k)}, "
                f"{config} implies {tuple(want)}"
            )
    if problems:
        raise CheckpointError(f"{weights.source} (config {config}): " + "; ".join(problems))


# ---- vision tower ---------------------------------------------------------------------------
def _vision_config(directory: Path) -> tuple[dict, Path]:
    """(SigLIP vision config with defaults filled in, config.json path)."""
    path = directory / CONFIG_FILE
    top = _read_json(path, "SigLIP")
    model_type = top.get("model_type")
    if model_type in ("siglip2", "siglip2_vision_model"):
        raise CheckpointError(
            f"{path}: model_type {model_type!r} (SigLIP2 NaFlex: a Linear patch embedding over flattened "
            "patches and resized position embeddings) is not supported; the fixed-resolution SigLIP2 "
            "checkpoints (model_type 'siglip', e.g. google/siglip2-base-patch16-512) are"
        )
    if model_type == "siglip" or "vision_config" in top:
        vcfg = top.get("vision_config") or {}
        if not isinstance(vcfg, dict):
            raise CheckpointError(f"{path}: 'vision_config' must be an object")
        vmt = vcfg.get("model_type", "siglip_vision_model")
    else:
        vcfg, vmt = top, model_type
    if vmt != "siglip_vision_model":
        raise CheckpointError(
            f"{path}: unsupported vision model_type {vmt!r}; expected a SigLIP vision tower "
            "(model_type 'siglip' or 'siglip_vision_model')"
        )
    return vision_fields(vcfg, path), path


def vision_fields(vcfg: dict, path: Path) -> dict:
    """A SigLIP-style vision config (SigLIP's or Idefics3's vision_config) with transformers'
    defaults filled in, checked for what nanoVLM's ViT can run."""
    used = {k: vcfg.get(k, v) for k, v in SIGLIP_VISION_DEFAULTS.items()}
    defaulted = sorted(k for k in SIGLIP_VISION_DEFAULTS if k not in vcfg)
    if defaulted:
        log.info("%s: %s not given, using SiglipVisionConfig's default(s)", path, ", ".join(defaulted))
    if used["hidden_act"] != "gelu_pytorch_tanh":
        raise CheckpointError(
            f"{path}: hidden_act {used['hidden_act']!r} is not supported; nanoVLM's ViT uses GELU with "
            "the tanh approximation ('gelu_pytorch_tanh')"
        )
    if used["num_channels"] != 3:
        raise CheckpointError(f"{path}: num_channels {used['num_channels']} is not supported (RGB only)")
    if vcfg.get("attention_dropout", 0.0):
        log.warning(
            "%s: attention_dropout %s is ignored (nanoVLM trains without dropout)", path, vcfg["attention_dropout"]
        )
    for k in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
    ):
        if not isinstance(used[k], int) or isinstance(used[k], bool) or used[k] <= 0:
            raise CheckpointError(f"{path}: {k} must be a positive integer, got {used[k]!r}")
    return used


def _vision_prefix(weights: _Weights) -> str:
    for prefix in ("vision_model.", ""):
        if f"{prefix}embeddings.patch_embedding.weight" in weights.where:
            return prefix
    raise CheckpointError(
        f"{weights.source}: no SigLIP vision weights (neither vision_model.embeddings.patch_embedding.weight "
        "nor embeddings.patch_embedding.weight)"
    )


def _vision_expected(v: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    D, I, P = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    N = (v["image_size"] // P) ** 2
    e = {
        f"{prefix}embeddings.patch_embedding.weight": (D, 3, P, P),
        f"{prefix}embeddings.patch_embedding.bias": (D,),
        f"{prefix}embeddings.position_embedding.weight": (N, D),
    }
    for i in range(v["num_hidden_layers"]):
        b = f"{prefix}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            e[f"{b}{ln}.weight"] = e[f"{b}{ln}.bias"] = (D,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e[f"{b}self_attn.{proj}.weight"], e[f"{b}self_attn.{proj}.bias"] = (D, D), (D,)
        e[f"{b}mlp.fc1.weight"], e[f"{b}mlp.fc1.bias"] = (I, D), (I,)
        e[f"{b}mlp.fc2.weight"], e[f"{b}mlp.fc2.bias"] = (D, I), (D,)
    e[f"{prefix}post_layernorm.weight"] = e[f"{prefix}post_layernorm.bias"] = (D,)
    return e


def _vision_ignored(rest: str) -> bool:
    """Keys of the vision namespace nanoVLM does not use: the attention-pooling head and old
    transformers' `position_ids` buffer."""
    return rest.startswith("head.") or rest.endswith("position_ids")


def _vision_tensors(weights: _Weights, v: dict, prefix: str, n: int) -> dict[str, np.ndarray]:
    """nanoVLM `vision_encoder.*` tensors (torch layout) from SigLIP's."""

    def get(k):
        return weights.read(prefix + k)

    out = {
        "vision_encoder.patch_embedding.conv.weight": get("embeddings.patch_embedding.weight"),
        "vision_encoder.patch_embedding.conv.bias": get("embeddings.patch_embedding.bias"),
        "vision_encoder.patch_embedding.position_embedding": get("embeddings.position_embedding.weight")[None],
    }
    for i in range(n):
        s, d = f"encoder.layers.{i}.", f"vision_encoder.blocks.{i}."
        for src, dst in (
            ("layer_norm1", "ln1"),
            ("layer_norm2", "ln2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            out[f"{d}{dst}.weight"], out[f"{d}{dst}.bias"] = get(f"{s}{src}.weight"), get(f"{s}{src}.bias")
        for leaf in ("weight", "bias"):  # fused in the order q, k, v
            out[f"{d}attn.qkv_proj.{leaf}"] = np.concatenate(
                [get(f"{s}self_attn.{p}.{leaf}") for p in ("q_proj", "k_proj", "v_proj")]
            )
    out["vision_encoder.layer_norm.weight"] = get("post_layernorm.weight")
    out["vision_encoder.layer_norm.bias"] = get("post_layernorm.bias")
    return out


# ---- language model -------------------------------------------------------------------------
def _rope_theta(c: dict, path: Path) -> float:
    """rope_theta from transformers <= 4 (`rope_theta`, `rope_scaling`) or >= 5 (`rope_parameters`)."""
    params = c.get("rope_parameters")
    scaling = c.get("rope_scaling")
    for name, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise CheckpointError(f"{path}: {name} must be an object or null")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{path}: {name} rope_type {kind!r} is not supported (nanoVLM's RoPE has no scaling)")
    theta = (params or {}).get("rope_theta", c.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 1:
        raise CheckpointError(f"{path}: rope_theta must be a number > 1, got {theta!r}")
    return int(theta) if float(theta).is_integer() else float(theta)  # as VLMConfig.from_dict reads lm_re_base


def _language_config(directory: Path) -> tuple[dict, Path]:
    path = directory / CONFIG_FILE
    return language_fields(_read_json(path, "Llama"), path), path


def language_fields(c: dict, path: Path) -> dict:
    """A Llama config (a SmolLM2 directory's or Idefics3's text_config) with transformers'
    defaults filled in, checked for what nanoVLM's decoder can run."""
    if c.get("model_type") != "llama":
        raise CheckpointError(
            f"{path}: unsupported language model_type {c.get('model_type')!r}; expected 'llama' (SmolLM2 / Llama)"
        )
    missing = [k for k in LLAMA_REQUIRED if k not in c]
    if missing:
        raise CheckpointError(f"{path}: missing config field(s): {', '.join(missing)}")
    used = {k: c[k] for k in LLAMA_REQUIRED}
    used.update({k: c.get(k, v) for k, v in LLAMA_DEFAULTS.items() if k != "rope_theta"})
    used["rope_theta"] = _rope_theta(c, path)
    for k in LLAMA_REQUIRED:
        if not isinstance(used[k], int) or isinstance(used[k], bool) or used[k] <= 0:
            raise CheckpointError(f"{path}: {k} must be a positive integer, got {used[k]!r}")
    kv = c.get("num_key_value_heads") or used["num_attention_heads"]
    used["num_key_value_heads"] = kv
    H, nh = used["hidden_size"], used["num_attention_heads"]
    problems = []
    if used["hidden_act"] != "silu":
        problems.append(f"hidden_act {used['hidden_act']!r} (nanoVLM's MLP uses silu)")
    if used["attention_bias"] or used["mlp_bias"]:
        problems.append("attention_bias / mlp_bias true (nanoVLM's decoder has no biases)")
    if H % nh or (c.get("head_dim") is not None and c["head_dim"] != H // nh):
        problems.append(
            f"head_dim {c.get('head_dim')} with hidden_size {H} and num_attention_heads {nh} "
            "(nanoVLM's head dim is hidden_size / num_attention_heads)"
        )
    if not isinstance(kv, int) or nh % kv:
        problems.append(f"num_key_value_heads {kv} does not divide num_attention_heads {nh}")
    if problems:
        raise CheckpointError(f"{path}: not supported: " + "; ".join(problems))
    return used


def _language_expected(c: dict) -> dict[str, tuple[int, ...]]:
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (H // c["num_attention_heads"])
    e = {"model.embed_tokens.weight": (V, H)}
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        e.update(
            {
                f"{b}self_attn.q_proj.weight": (H, H),
                f"{b}self_attn.k_proj.weight": (kv, H),
                f"{b}self_attn.v_proj.weight": (kv, H),
                f"{b}self_attn.o_proj.weight": (H, H),
                f"{b}mlp.gate_proj.weight": (I, H),
                f"{b}mlp.up_proj.weight": (I, H),
                f"{b}mlp.down_proj.weight": (H, I),
                f"{b}input_layernorm.weight": (H,),
                f"{b}post_attention_layernorm.weight": (H,),
            }
        )
    e["model.norm.weight"] = (H,)
    if not c["tie_word_embeddings"]:
        e["lm_head.weight"] = (V, H)
    return e


def _language_ignored(c: dict):
    def ignored(key: str) -> bool:  # old transformers stored RoPE buffers; a tied file may repeat the head
        return key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and c["tie_word_embeddings"])

    return ignored


def _language_tensors(
    weights: _Weights, c: dict, n_extra: int, rng: np.random.Generator, dtype, config: Path
) -> dict[str, np.ndarray]:
    """nanoVLM `decoder.*` tensors: blocks, norm, the embedding (and head) grown by n_extra rows."""
    out = {}
    for i in range(c["num_hidden_layers"]):
        s, d = f"model.layers.{i}.", f"decoder.blocks.{i}."
        for src, dst in (
            ("self_attn.q_proj", "attn.q_proj"),
            ("self_attn.k_proj", "attn.k_proj"),
            ("self_attn.v_proj", "attn.v_proj"),
            ("self_attn.o_proj", "attn.out_proj"),
            ("mlp.gate_proj", "mlp.gate_proj"),
            ("mlp.up_proj", "mlp.up_proj"),
            ("mlp.down_proj", "mlp.down_proj"),
            ("input_layernorm", "norm1"),
            ("post_attention_layernorm", "norm2"),
        ):
            out[f"{d}{dst}.weight"] = weights.read(f"{s}{src}.weight")
    out["decoder.norm.weight"] = weights.read("model.norm.weight")

    def grow(table: np.ndarray) -> np.ndarray:  # upstream: new rows N(0, 0.02)
        new = rng.normal(0.0, 0.02, size=(n_extra, table.shape[1]))
        return np.concatenate([table.astype(dtype), new.astype(dtype)])

    embed = weights.read("model.embed_tokens.weight")
    if c["tie_word_embeddings"]:
        if "lm_head.weight" in weights.where and not np.array_equal(weights.read("lm_head.weight"), embed):
            raise CheckpointError(
                f"{weights.file_of('lm_head.weight')}: tie_word_embeddings is true in {config} but "
                "lm_head.weight differs from model.embed_tokens.weight"
            )
        out["decoder.head.weight"] = grow(embed)  # the tied table, stored once under the head's name
    else:
        out["decoder.token_embedding.weight"] = grow(embed)
        out["decoder.head.weight"] = grow(weights.read("lm_head.weight"))
    return out


# ---- the VLM --------------------------------------------------------------------------------
def _settings(given: Mapping[str, Any], v: dict, vision_dir: Path, language_dir: Path, vision_config: Path) -> dict:
    unknown = sorted(set(given) - set(VLM_SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown VLM setting(s): {', '.join(unknown)} (allowed: {', '.join(VLM_SETTINGS)}; "
            "architecture numbers come from the backbones' config.json)"
        )
    s = {k: given.get(k, d) for k, d in VLM_SETTINGS.items()}
    s = {k: (d if s[k] is None and d is not None else s[k]) for k, d in VLM_SETTINGS.items()}
    extra = s["vlm_extra_tokens"]
    if isinstance(extra, str):
        if extra not in ("default", "legacy"):
            raise ValueError(f"vlm_extra_tokens {extra!r}: expected 'default', 'legacy' or {{name: token}}")
        extra = DEFAULT_EXTRA_TOKENS if extra == "default" else LEGACY_EXTRA_TOKENS
    extra = tuple(extra.items()) if isinstance(extra, Mapping) else tuple(tuple(p) for p in extra)
    s["vlm_extra_tokens"] = extra
    splitting = "r1c1" in dict(extra)
    img, P = v["image_size"], v["patch_size"]
    if s["vit_img_size"] is None:
        s["vit_img_size"] = img
    elif s["vit_img_size"] != img:
        raise CheckpointError(
            f"{vision_config}: the vision tower's position embeddings are for image_size {img}; "
            f"vit_img_size {s['vit_img_size']} would need them interpolated, which nanoVLM does not do"
        )
    if given.get("mp_pixel_shuffle_factor") is None and isinstance(P, int) and P > 0 and img % P == 0:
        # upstream's 4 where the tower's patch grid allows it (512 px / 16 = 32), else 2 as the
        # 224 px nanoVLM-222M uses (224 / 16 = 14), else 1
        s["mp_pixel_shuffle_factor"] = next(f for f in (4, 2, 1) if (img // P) % f == 0)
    sf = s["mp_pixel_shuffle_factor"]
    if s["mp_image_token_length"] is None and s["mp_type"] == "resampler":
        s["mp_image_token_length"] = s["mp_resampler_queries"]
    elif s["mp_image_token_length"] is None and isinstance(sf, int) and sf > 0:
        s["mp_image_token_length"] = ((img // P) // sf) ** 2
    if s["max_img_size"] is None:  # upstream's 2048 px budget, in whole tiles the grid tokens can name
        s["max_img_size"] = img * max(1, min(2048 // img, _grid_side(extra))) if splitting else img
    if s["resize_to_max_side_len"] is None:
        s["resize_to_max_side_len"] = splitting
    if splitting:
        m = s["max_img_size"]
        if m < img or m % img:
            raise ValueError(f"max_img_size {m} must be a multiple of the tile size {img} (image splitting)")
        if f"r{m // img}c{m // img}" not in dict(extra):
            raise ValueError(
                f"max_img_size {m} gives a {m // img}x{m // img} tile grid but the extra tokens have no "
                f"r{m // img}c{m // img} token; use max_img_size <= {img * _grid_side(extra)}"
            )
    s["vit_model_type"] = s["vit_model_type"] or str(vision_dir)
    s["lm_model_type"] = s["lm_model_type"] or str(language_dir)
    s["lm_tokenizer"] = s["lm_tokenizer"] or str(language_dir)
    return s


def _grid_side(extra) -> int:
    names = dict(extra)
    n = 0
    while f"r{n + 1}c{n + 1}" in names:
        n += 1
    return max(n, 1)


def _tokenizer_files(directory: Path, vocab_size: int, config: Path) -> list[Path]:
    """The tokenizer files to copy (checked: the tokenizer's size must be the model's vocab_size)."""
    tok = directory / TOKENIZER_FILE
    if not tok.is_file():
        log.warning("%s has no %s: the checkpoint is written without a tokenizer", directory, TOKENIZER_FILE)
        return []
    import tokenizers

    try:
        n = tokenizers.Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{tok} is not a Hugging Face tokenizer.json: {e}") from None
    if n != vocab_size:
        raise CheckpointError(
            f"{tok} has {n} tokens but {config} has vocab_size {vocab_size}; nanoVLM numbers its extra "
            "tokens from the end of the base vocabulary, so the two must agree"
        )
    for name in TOKENIZER_FILES[1:]:
        if (directory / name).is_file():
            _read_json(directory / name, "tokenizer")  # must parse: the tokenizer loader reads it
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def from_hf(
    vision_dir: str | Path, language_dir: str | Path, *, seed: int = 0, dtype: str = "float32", **vlm_settings
) -> tuple[VLMConfig, dict[str, np.ndarray]]:
    """(VLMConfig, {checkpoint key: array in torch layout}) from two local Hugging Face
    directories; see the module docstring. `vlm_settings` are `VLM_SETTINGS` by their
    VLMConfig names; `dtype` ("float32" or "bfloat16") is the output tensors' dtype."""
    cfg, tensors, _ = _build(Path(vision_dir), Path(language_dir), seed=seed, dtype=dtype, settings=vlm_settings)
    return cfg, tensors


def _build(vision_dir: Path, language_dir: Path, *, seed: int, dtype: str, settings: Mapping[str, Any]):
    for d, what in ((vision_dir, "vision"), (language_dir, "language")):
        if not d.is_dir():
            raise CheckpointError(f"{what} backbone directory not found: {d}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    out_dtype = np.dtype(np.float32) if dtype == "float32" else _FROM_ST["BF16"]

    v, vpath = _vision_config(vision_dir)
    vweights = _Weights(vision_dir, "SigLIP")
    prefix = _vision_prefix(vweights)
    _check_shapes(vweights, _vision_expected(v, prefix), prefix=prefix, ignore=_vision_ignored, config=vpath)

    c, lpath = _language_config(language_dir)
    lweights = _Weights(language_dir, "Llama")
    _check_shapes(lweights, _language_expected(c), prefix="", ignore=_language_ignored(c), config=lpath)

    s = _settings(settings, v, vision_dir, language_dir, vpath)
    n_extra = len(s["vlm_extra_tokens"])
    try:
        cfg = VLMConfig(
            vit_hidden_dim=v["hidden_size"],
            vit_inter_dim=v["intermediate_size"],
            vit_patch_size=v["patch_size"],
            vit_n_heads=v["num_attention_heads"],
            vit_n_blocks=v["num_hidden_layers"],
            vit_ln_eps=float(v["layer_norm_eps"]),
            lm_hidden_dim=c["hidden_size"],
            lm_inter_dim=c["intermediate_size"],
            lm_rms_eps=float(c["rms_norm_eps"]),
            lm_re_base=c["rope_theta"],
            lm_max_position_embeddings=c["max_position_embeddings"],
            lm_base_vocab_size=c["vocab_size"],
            extra_token_amount=n_extra,
            lm_vocab_size=c["vocab_size"] + n_extra,
            lm_n_heads=c["num_attention_heads"],
            lm_n_kv_heads=c["num_key_value_heads"],
            lm_n_blocks=c["num_hidden_layers"],
            lm_tie_weights=bool(c["tie_word_embeddings"]),
            **s,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"backbones {vpath} + {lpath}: {e}") from None
    tokenizer_files = _tokenizer_files(language_dir, c["vocab_size"], lpath)

    rng = np.random.default_rng(seed)
    tensors = {k: a.astype(out_dtype) for k, a in _vision_tensors(vweights, v, prefix, v["num_hidden_layers"]).items()}
    tensors.update(projector_init(cfg, rng, out_dtype))
    tensors.update(
        {k: a.astype(out_dtype) for k, a in _language_tensors(lweights, c, n_extra, rng, out_dtype, lpath).items()}
    )
    tensors["decoder.rotary_embd.inv_freq"] = rope_inv_freq(cfg.lm_head_dim, cfg.lm_re_base).astype(out_dtype)
    check_keys(expected_shapes(cfg), tensors, source=f"backbones {vpath} + {lpath}")
    return cfg, tensors, tokenizer_files


def projector_init(cfg: VLMConfig, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """A fresh projector for `cfg.mp_type`, drawn in the mapping table's order as both frameworks
    initialise it (jaxvlm/modality_projector.py): linear weights N(0, 0.02), biases 0, LayerNorms
    1 / 0, the resampler's queries N(0, 1). (nanoVLM's projector is one N(0, 0.02) draw, as before.)"""
    out = {}
    for e in mapping(cfg):
        if not e.torch_key.startswith("MP."):
            continue
        if e.torch_key == "MP.latents":
            value = rng.normal(0.0, 1.0, size=e.torch_shape)
        elif e.transform is LINEAR:
            value = rng.normal(0.0, 0.02, size=e.torch_shape)
        elif e.torch_key.endswith(".weight"):  # LayerNorm scales
            value = np.ones(e.torch_shape)
        else:  # linear and LayerNorm biases
            value = np.zeros(e.torch_shape)
        out[e.torch_key] = value.astype(dtype)
    return out


def build_from_hf(
    vision_dir: str | Path,
    language_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    **vlm_settings,
) -> VLMConfig:
    """Write a nanoVLM checkpoint directory (config.json + model.safetensors, and the language
    model's tokenizer files when present) built from two local Hugging Face directories.

    `out_dir` must not exist or be empty. Everything is read and validated first; the files
    are then written into a temporary sibling directory that is renamed to `out_dir`, so a
    failure (a bad input, a full disk) leaves no partial output. Returns the config.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {out_dir} is not empty")
    cfg, tensors, tokenizer_files = _build(
        Path(vision_dir), Path(language_dir), seed=seed, dtype=dtype, settings=vlm_settings
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        write_checkpoint(tmp, cfg, tensors)
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, out_dir)  # replaces an empty directory atomically
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cfg
