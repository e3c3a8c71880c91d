"""SmolVLM (transformers' Idefics3) directories <-> nanoVLM-format checkpoints, both ways.

    python -m conversion from-smolvlm SMOLVLM_DIR OUT     # -> config.json + model.safetensors (+ tokenizer, processor)
    python -m conversion to-smolvlm CKPT_DIR OUT          # -> a directory transformers loads

SmolVLM is nanoVLM's architecture grown up: a SigLIP-style vision tower with a post-layernorm,
pixel shuffle (the same space-to-depth order as nanoVLM's), a bias-free linear projector and a
Llama (SmolLM2) decoder. What differs is outside the weights and is carried by the config's
`vlm_family = "smolvlm"` fields: images normalised with the processor's mean/std (0.5) inside
the model, the image token's id (`vlm_image_token_id`, from config.json's `image_token_id`), the
prompt and image string of the Idefics3 processor, and its image splitting (`vit_img_size` =
`max_image_size.longest_edge`, `max_img_size` = `size.longest_edge`, `vlm_image_splitting` =
`do_image_splitting`).

Weights map through `conversion.mapping.idefics3_mapping` (one table, both directions): q/k/v
are fused into `qkv_proj` and split back, the [N, D] position table gains and loses its leading
1, nothing else changes - no cast, so a round trip is byte-identical, in whatever dtype the file
holds (SmolVLM's releases are bfloat16). `decoder.rotary_embd.inv_freq` is computed from
rope_theta on the way in and dropped on the way out, as transformers computes it.

Patch positions: Idefics3 looks each patch's position id up with `torch.bucketize` on float32
fractions; for a full (unpadded) tile that is the identity for the released grids (32 x 32 for
512 px / 16, 27 x 27 for 384 px / 14) and for every power of two, which is what the nanoVLM ViT
computes. On some other grid sides (19, 25, 29, 31, ... on the machines tested) float rounding
makes transformers repeat a position id; such a model is not reproduced exactly (see the README).

The tokenizer files, the processor files (preprocessor_config.json, processor_config.json) and
the chat template travel with the weights both ways; `to-smolvlm` writes the processor files
from the config so that they always agree with it. numpy + safetensors only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .config import VLMConfig, smolvlm_extra_tokens
from .hf import _read_json, _Weights, language_fields, vision_fields
from .mapping import checkpoint_to_hf, hf_to_checkpoint, idefics3_shapes
from .pretrained import CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES, WEIGHTS_FILE, read_checkpoint, write_checkpoint
from .rope import rope_inv_freq
from .safetensors_io import CheckpointError, save_safetensors

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")
GENERATION_FILE = "generation_config.json"
# Files that travel unchanged with the weights in both directions (beside the tokenizer's).
CARRIED_FILES = CHAT_TEMPLATE_FILES + (GENERATION_FILE,)

# SmolVLM-Instruct's chat template (the Hub repos' chat_template.json), written by to-smolvlm
# when the checkpoint carries none.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Idefics3ImageProcessor's defaults for the fields a preprocessor_config.json may leave out.
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_image_splitting": True,
    "resample": 1,  # PIL LANCZOS
    "do_pad": True,
}


def _positive_int(value, what: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{path}: {what} must be a positive integer, got {value!r}")
    return value


def _longest_edge(d: Any, what: str, path: Path) -> int:
    if not isinstance(d, dict) or "longest_edge" not in d:
        raise CheckpointError(f"{path}: {what} must be an object with 'longest_edge', got {d!r}")
    return _positive_int(d["longest_edge"], f"{what}.longest_edge", path)


def _processor_settings(src: Path, tile: int, image_tokens: int, vision_path: Path) -> dict[str, Any]:
    """VLMConfig fields from the Idefics3 processor files (or their defaults, with a warning)."""
    path, processor = src / PREPROCESSOR_FILE, src / PROCESSOR_FILE
    outer = _read_json(processor, "Idefics3 processor") if processor.is_file() else {}
    if path.is_file():  # transformers 4 (the SmolVLM Hub repos): its own file
        p = _read_json(path, "Idefics3 processor")
    elif isinstance(outer.get("image_processor"), dict):  # transformers 5 nests it in processor_config.json
        p, path = outer["image_processor"], processor
    else:
        log.warning(
            "%s has neither %s nor an image_processor in %s: using Idefics3's processor defaults with %d px tiles",
            src,
            PREPROCESSOR_FILE,
            PROCESSOR_FILE,
            tile,
        )
        p = {"max_image_size": {"longest_edge": tile}, "size": {"longest_edge": 4 * tile}}
    p = {**IMAGE_PROCESSOR_DEFAULTS, **p}
    problems = []
    for k in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad"):
        if p[k] is not True:
            problems.append(f"{k} {p[k]!r} (only the released setting, true, is implemented)")
    if not isinstance(p["rescale_factor"], float) or abs(p["rescale_factor"] - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor {p['rescale_factor']!r} (only 1/255 is implemented)")
    if p["resample"] != 1:
        problems.append(f"resample {p['resample']!r} (only 1, LANCZOS, is implemented)")
    if not isinstance(p["do_image_splitting"], bool):
        problems.append(f"do_image_splitting {p['do_image_splitting']!r} must be true or false")
    if problems:
        raise CheckpointError(f"{path}: not supported: " + "; ".join(problems))
    tile_p = _longest_edge(p.get("max_image_size"), "max_image_size", path)
    if tile_p != tile:
        raise CheckpointError(
            f"{path}: max_image_size.longest_edge {tile_p} is not the vision tower's image_size {tile} "
            f"({vision_path}); the tiles would not fit its position embeddings"
        )
    longest = _longest_edge(p.get("size"), "size", path)
    for k in ("image_mean", "image_std"):
        v = p[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v] * 3
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise CheckpointError(f"{path}: {k} must be 3 numbers, got {p[k]!r}")
        p[k] = [float(x) for x in v]
    seq_len = outer.get("image_seq_len")
    if seq_len is not None and seq_len != image_tokens:
        raise CheckpointError(
            f"{processor}: image_seq_len {seq_len} is not the {image_tokens} tokens per tile that the vision tower "
            f"and scale_factor give ({vision_path})"
        )
    return {
        "max_img_size": longest,
        "vlm_image_splitting": p["do_image_splitting"],
        "vlm_image_mean": tuple(p["image_mean"]),
        "vlm_image_std": tuple(p["image_std"]),
    }


def _tokenizer_info(src: Path, vocab: int, image_token_id: int, config: Path) -> tuple[int, int]:
    """(base vocabulary, grid side of the <row_r_col_c> tokens) from tokenizer.json, checked."""
    tok = src / TOKENIZER_FILE
    if not tok.is_file():
        log.warning("%s has no %s: the token ids are not checked against SmolVLM's tokenizer", src, TOKENIZER_FILE)
        return min(vocab, image_token_id), 6  # the ids below the image token's count as text
    import tokenizers

    try:
        t = tokenizers.Tokenizer.from_file(str(tok))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{tok} is not a Hugging Face tokenizer.json: {e}") from None
    n = t.get_vocab_size(with_added_tokens=True)
    if n > vocab:
        raise CheckpointError(f"{tok} has {n} tokens but {config} has text_config.vocab_size {vocab}")
    got = t.token_to_id("<image>")
    if got != image_token_id:
        raise CheckpointError(f"{tok}: '<image>' has id {got}, {config} has image_token_id {image_token_id}")
    missing = [x for x in ("<fake_token_around_image>", "<global-img>") if t.token_to_id(x) is None]
    if missing:
        raise CheckpointError(f"{tok} lacks SmolVLM's image token(s) {', '.join(missing)}")
    grid = 0
    while t.token_to_id(f"<row_{grid + 1}_col_{grid + 1}>") is not None:
        grid += 1
    return min(t.get_vocab_size(with_added_tokens=False), vocab), max(grid, 1)


def is_smolvlm_directory(directory: str | Path) -> bool:
    """Whether `directory` holds a transformers SmolVLM / Idefics3 config.json (not a nanoVLM one)."""
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("model_type") == "idefics3"
    except (OSError, ValueError, AttributeError):
        return False


def read_smolvlm(src: str | Path) -> tuple[VLMConfig, dict[str, np.ndarray]]:
    """(VLMConfig of the smolvlm family, checkpoint tensors) from a transformers Idefics3
    directory; strict: every key and shape checked, unsupported features are errors."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"SmolVLM directory not found: {src}")
    path = src / CONFIG_FILE
    top = _read_json(path, "SmolVLM / Idefics3")
    if top.get("model_type") != "idefics3":
        raise CheckpointError(
            f"{path}: model_type {top.get('model_type')!r}; expected 'idefics3' (SmolVLM-256M/500M/2B, "
            "Idefics3ForConditionalGeneration)"
        )
    vcfg, tcfg = top.get("vision_config"), top.get("text_config")
    if not isinstance(vcfg, dict) or not isinstance(tcfg, dict):
        raise CheckpointError(f"{path}: vision_config and text_config must be objects")
    if vcfg.get("model_type", "idefics3_vision") != "idefics3_vision":
        raise CheckpointError(
            f"{path}: vision_config.model_type {vcfg.get('model_type')!r}; expected 'idefics3_vision'"
        )
    v = vision_fields(vcfg, path)
    t = language_fields({"model_type": "llama", **tcfg}, path)
    tied = bool(top.get("tie_word_embeddings", t["tie_word_embeddings"]))
    t["tie_word_embeddings"] = tied
    s = _positive_int(top.get("scale_factor", 2), "scale_factor", path)
    image_token_id = _positive_int(top.get("image_token_id", 128257), "image_token_id", path)
    V = t["vocab_size"]
    base, grid = _tokenizer_info(src, V, image_token_id, path)
    try:
        cfg = VLMConfig(
            vit_hidden_dim=v["hidden_size"],
            vit_inter_dim=v["intermediate_size"],
            vit_patch_size=v["patch_size"],
            vit_img_size=v["image_size"],
            vit_n_heads=v["num_attention_heads"],
            vit_n_blocks=v["num_hidden_layers"],
            vit_ln_eps=float(v["layer_norm_eps"]),
            vit_model_type=str(src),
            lm_hidden_dim=t["hidden_size"],
            lm_inter_dim=t["intermediate_size"],
            lm_rms_eps=float(t["rms_norm_eps"]),
            lm_re_base=t["rope_theta"],
            lm_max_position_embeddings=t["max_position_embeddings"],
            lm_base_vocab_size=base,
            extra_token_amount=V - base,
            lm_vocab_size=V,
            lm_n_heads=t["num_attention_heads"],
            lm_n_kv_heads=t["num_key_value_heads"],
            lm_n_blocks=t["num_hidden_layers"],
            lm_max_length=t["max_position_embeddings"],
            lm_tie_weights=tied,
            lm_model_type=str(src),
            lm_tokenizer=str(src),
            mp_pixel_shuffle_factor=s,
            mp_image_token_length=((v["image_size"] // v["patch_size"]) // s) ** 2,
            resize_to_max_side_len=False,
            vlm_extra_tokens=smolvlm_extra_tokens(grid),
            vlm_family="smolvlm",
            vlm_image_token_id=image_token_id,
            hf_repo_name=src.name,
            **_processor_settings(src, v["image_size"], ((v["image_size"] // v["patch_size"]) // s) ** 2, path),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None

    weights = _Weights(src, "SmolVLM")
    expected = idefics3_shapes(cfg)
    problems = []
    ignored = {"lm_head.weight"} if tied else set()  # a tied file may repeat the head
    missing = [k for k in expected if k not in weights.where]
    unknown = sorted(k for k in weights.where if k not in expected and k not in ignored and "rotary_emb" not in k)
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    if unknown:
        problems.append(f"unexpected key(s): {', '.join(unknown)}")
    for k, want in expected.items():
        if k in weights.where and weights.where[k].shape(k) != want:
            problems.append(f"{k} has shape {weights.where[k].shape(k)}, {path} implies {want}")
    if problems:
        raise CheckpointError(f"{weights.source} (config {path}): " + "; ".join(problems))
    hf = {k: weights.read(k) for k in expected}
    if tied and "lm_head.weight" in weights.where:
        if not np.array_equal(weights.read("lm_head.weight"), hf["model.text_model.embed_tokens.weight"]):
            raise CheckpointError(
                f"{weights.source}: tie_word_embeddings is true in {path} but lm_head.weight differs from "
                "model.text_model.embed_tokens.weight"
            )
    dtypes = sorted({str(a.dtype) for a in hf.values()})
    if len(dtypes) != 1:
        raise CheckpointError(f"{weights.source}: tensors of several dtypes ({', '.join(dtypes)})")
    tensors = hf_to_checkpoint(cfg, hf)
    dtype = next(iter(hf.values())).dtype
    tensors["decoder.rotary_embd.inv_freq"] = rope_inv_freq(cfg.lm_head_dim, cfg.lm_re_base).astype(dtype)
    return cfg, tensors


def _copy_files(src: Path, dst: Path, names) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            atomic.write_bytes(dst / name, (src / name).read_bytes())
            copied.append(name)
    return copied


def from_smolvlm(src: str | Path, dst: str | Path) -> VLMConfig:
    """Write a checkpoint directory (config.json + model.safetensors + the tokenizer, processor
    and chat-template files) that `jaxvlm` and `torch_ref` load, from a SmolVLM directory.
    `dst` must not exist; it appears complete or not at all."""
    src, dst = Path(src), Path(dst)
    cfg, tensors = read_smolvlm(src)
    if dst.exists():
        raise FileExistsError(f"output directory {dst} already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_directory(dst) as tmp:
        write_checkpoint(tmp, cfg, tensors)
        _copy_files(src, tmp, TOKENIZER_FILES + CARRIED_FILES + (PREPROCESSOR_FILE, PROCESSOR_FILE))
    return cfg


def idefics3_config(cfg: VLMConfig, tokenizer: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The transformers `Idefics3Config` JSON for a smolvlm-family config."""
    text = {
        "model_type": "llama",
        "hidden_size": cfg.lm_hidden_dim,
        "intermediate_size": cfg.lm_inter_dim,
        "num_hidden_layers": cfg.lm_n_blocks,
        "num_attention_heads": cfg.lm_n_heads,
        "num_key_value_heads": cfg.lm_n_kv_heads,
        "head_dim": cfg.lm_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.lm_rms_eps,
        "rope_theta": cfg.lm_re_base,
        "rope_parameters": {"rope_theta": cfg.lm_re_base, "rope_type": "default"},
        "max_position_embeddings": cfg.lm_max_position_embeddings,
        "vocab_size": cfg.lm_vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.lm_tie_weights,
    }
    text.update(tokenizer or {})
    return {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": cfg.image_token_id,
        "scale_factor": cfg.mp_pixel_shuffle_factor,
        "tie_word_embeddings": cfg.lm_tie_weights,
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": cfg.vit_hidden_dim,
            "intermediate_size": cfg.vit_inter_dim,
            "num_hidden_layers": cfg.vit_n_blocks,
            "num_attention_heads": cfg.vit_n_heads,
            "num_channels": 3,
            "image_size": cfg.vit_img_size,
            "patch_size": cfg.vit_patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": cfg.vit_ln_eps,
        },
        "text_config": text,
    }


def processor_files(cfg: VLMConfig) -> dict[str, dict[str, Any]]:
    """preprocessor_config.json and processor_config.json for a smolvlm-family config."""
    mean, std = cfg.vlm_image_mean or (0.0, 0.0, 0.0), cfg.vlm_image_std or (1.0, 1.0, 1.0)
    return {
        PREPROCESSOR_FILE: {
            "image_processor_type": "Idefics3ImageProcessor",
            "processor_class": "Idefics3Processor",
            **IMAGE_PROCESSOR_DEFAULTS,
            "image_mean": list(mean),
            "image_std": list(std),
            "do_image_splitting": cfg.vlm_image_splitting,
            "max_image_size": {"longest_edge": cfg.vit_img_size},
            "size": {"longest_edge": cfg.max_img_size},
        },
        PROCESSOR_FILE: {"processor_class": "Idefics3Processor", "image_seq_len": cfg.n_image_tokens},
    }


def _special_ids(src: Path) -> dict[str, int]:
    """bos/eos/pad ids of the tokenizer the checkpoint carries, for text_config."""
    tok_cfg = src / TOKENIZER_FILES[1]
    if not (src / TOKENIZER_FILE).is_file() or not tok_cfg.is_file():
        return {}
    import tokenizers

    t = tokenizers.Tokenizer.from_file(str(src / TOKENIZER_FILE))
    d = _read_json(tok_cfg, "tokenizer")
    out = {}
    for name in ("bos", "eos", "pad"):
        tok = d.get(f"{name}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and t.token_to_id(tok) is not None:
            out[f"{name}_token_id"] = t.token_to_id(tok)
    return out


def to_smolvlm(src: str | Path, dst: str | Path) -> VLMConfig:
    """Write a transformers SmolVLM (Idefics3) directory from a smolvlm-family checkpoint
    directory: config.json, model.safetensors (the tensors unchanged but renamed and q/k/v
    split), the tokenizer and chat template carried by `src` (SmolVLM's template written when
    there is none), and the processor files made from the config. `dst` must not exist."""
    src, dst = Path(src), Path(dst)
    cfg, tensors = read_checkpoint(src)
    if cfg.vlm_family != "smolvlm":
        raise CheckpointError(
            f"{src / CONFIG_FILE}: vlm_family is {cfg.vlm_family!r}; to-smolvlm exports SmolVLM-family checkpoints "
            "(made by from-smolvlm or fine-tuned from one)"
        )
    if cfg.projector != "pixel_shuffle_linear":
        raise CheckpointError(
            f"{src / CONFIG_FILE}: mp_type is {cfg.mp_type!r}; SmolVLM (Idefics3) has only the pixel-shuffle "
            "linear projector, so to-smolvlm cannot export this model"
        )
    hf = checkpoint_to_hf(cfg, tensors)
    if dst.exists():
        raise FileExistsError(f"output directory {dst} already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dtypes = {str(a.dtype) for a in hf.values()}
    config = idefics3_config(cfg, _special_ids(src))
    if len(dtypes) == 1:
        config["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
            dtypes.pop(), "float32"
        )
    with atomic.atomic_directory(dst) as tmp:
        save_safetensors(tmp / WEIGHTS_FILE, hf, metadata={"format": "pt"})
        atomic.write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2))
        for name, content in processor_files(cfg).items():
            atomic.write_text(tmp / name, json.dumps(content, indent=2))
        carried = _copy_files(src, tmp, TOKENIZER_FILES + CARRIED_FILES)
        if not any(name in carried for name in CHAT_TEMPLATE_FILES):
            atomic.write_text(
                tmp / CHAT_TEMPLATE_FILES[0], json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}, indent=2)
            )
    return cfg
