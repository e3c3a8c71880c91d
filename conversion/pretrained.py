"""The nanoVLM checkpoint directory: `config.json` + `model.safetensors` (docs/conventions.md, "Pretrained directory").

Framework-free (numpy + safetensors): `torch_ref` and `jaxvlm` both read and write through
here, so both are equally strict. Reading validates everything before returning; writing
validates everything before touching the disk and replaces files atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import atomic
from .config import VLMConfig
from .mapping import check_keys, expected_shapes
from .safetensors_io import BF16, CheckpointError, load_safetensors, save_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# The tokenizer files a pretrained directory may carry beside the weights (tokenizer.json first).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)


def read_config(directory: str | Path, *, strict: bool = True) -> VLMConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a nanoVLM checkpoint directory")
    try:
        return VLMConfig.from_json(path, strict=strict)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_checkpoint(directory: str | Path, *, strict_config: bool = True) -> tuple[VLMConfig, dict[str, np.ndarray]]:
    """Load (config, {checkpoint key: array in torch layout}); every key and shape is checked.
    A transformers SmolVLM (Idefics3) directory is read through `conversion.smolvlm` (in memory,
    as `from-smolvlm` would write it)."""
    directory = Path(directory)
    from .smolvlm import is_smolvlm_directory, read_smolvlm  # imports this module

    if is_smolvlm_directory(directory):
        return read_smolvlm(directory)
    cfg = read_config(directory, strict=strict_config)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    tensors, _ = load_safetensors(weights)
    check_keys(expected_shapes(cfg), tensors, source=f"{weights} (config {directory / CONFIG_FILE})")
    check_values(tensors, source=str(weights))
    return cfg, tensors


def is_float_dtype(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == BF16


def check_values(tensors: dict[str, np.ndarray], *, source: str) -> None:
    """Every tensor of a model is floating point and finite: an integer dtype means the file's
    header disagrees with the data (nothing of a nanoVLM model is an integer), and a NaN or inf
    weight is a broken model, refused here rather than blamed on a framework later."""
    for key, value in tensors.items():
        if not is_float_dtype(value.dtype):
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}; model weights are floating point")
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            raise CheckpointError(
                f"{source}: tensor {key!r} has {bad} non-finite value(s) of {value.size}: a broken model"
            )


def write_checkpoint(directory: str | Path, cfg: VLMConfig, tensors: dict[str, np.ndarray]) -> None:
    """Write `config.json` and `model.safetensors` as upstream's `save_pretrained` does.

    The tensors must be exactly the checkpoint's key set (tied head stored once, as
    `decoder.head.weight`). Nothing is written unless they are.
    """
    directory = Path(directory)
    check_keys(expected_shapes(cfg), tensors, source="tensors to save")
    check_values(tensors, source="tensors to save")
    directory.mkdir(parents=True, exist_ok=True)
    # Both files are written to temporary names first and only then renamed into place, so a
    # failed write (a full disk) leaves the previous pair untouched and no partial file.
    tmp = directory / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(cfg.to_dict(), indent=4))
        # safetensors' save_model writes {"format": "pt"}; transformers-style loaders expect it.
        save_safetensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "pt"})  # temp file + rename
        os.replace(tmp, directory / CONFIG_FILE)
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_tokenizer(src: str | Path, dst: str | Path, *, replace: bool = True) -> None:
    """Copy the tokenizer files (`TOKENIZER_FILES`) of `src` into the directory `dst`.

    `src` is a directory or a tokenizer.json file (whose siblings are copied too). With
    `replace=False` a file already in `dst` is kept (only tokenizer.json of a file `src` is
    always copied)."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        atomic.write_bytes(dst / TOKENIZER_FILE, src.read_bytes())
        src, replace = src.parent, False
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (replace or not (dst / name).exists()):
            atomic.write_bytes(dst / name, (src / name).read_bytes())


# ---- the heads of a contrastive run (`jaxvlm pretrain-vision`) -------------------------------
HEADS_FILE = "contrastive_heads.safetensors"


def contrastive_head_shapes(cfg: VLMConfig, loss: str, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a contrastive run's heads, torch layout (nn.Linear weight [out, in])."""
    shapes = {
        "image_proj.weight": (embed_dim, cfg.vit_hidden_dim),
        "text_proj.weight": (embed_dim, cfg.lm_hidden_dim),
        "logit_scale": (),
    }
    if loss == "siglip":
        shapes["logit_bias"] = ()
    return shapes


def write_contrastive_heads(
    path: str | Path, cfg: VLMConfig, tensors: dict[str, np.ndarray], *, loss: str, embed_dim: int
) -> None:
    """The projections, the temperature t' and (SigLIP) the bias b of a contrastive run, with
    the loss and E in the metadata: what, beside the towers in `model/`, recomputes its
    embeddings, retrieval and zero-shot scores. Checked (keys, shapes, finite) before writing;
    written atomically."""
    check_keys(contrastive_head_shapes(cfg, loss, embed_dim), tensors, source="contrastive heads to save")
    check_values(tensors, source="contrastive heads to save")
    save_safetensors(path, tensors, metadata={"format": "pt", "loss": loss, "embed_dim": str(embed_dim)})


def read_contrastive_heads(path: str | Path, cfg: VLMConfig) -> tuple[str, int, dict[str, np.ndarray]]:
    """(loss, E, {name: array in torch layout}) of `write_contrastive_heads`'s file, checked
    against the towers' config `cfg`."""
    tensors, meta = load_safetensors(path)
    loss, embed_dim = meta.get("loss"), meta.get("embed_dim", "")
    if loss not in ("siglip", "infonce") or not embed_dim.isdigit():
        raise CheckpointError(f"{path}: not a contrastive heads file (metadata loss={loss!r}, embed_dim={embed_dim!r})")
    check_keys(contrastive_head_shapes(cfg, loss, int(embed_dim)), tensors, source=str(path))
    check_values(tensors, source=str(path))
    return loss, int(embed_dim), tensors
