"""The one model configuration, shared by `jaxvlm`, `torch_ref` and `conversion`.

Field names are exactly nanoVLM's `config.json` fields (docs/conventions.md, "Config"), so a config
written by upstream loads here and one written here loads in upstream. Unlike upstream,
nothing is computed at import time and the dataclass is frozen: derived numbers (head dims,
patch count, image-token id) are properties and cannot disagree with the fields.

This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .validation import range_problems, read_utf8, type_problems

log = logging.getLogger(__name__)

# Allowed ranges. The upper bounds are far above any released model and refuse, before anything
# is allocated, a value that would need more memory than a machine has (a 30M-token vocabulary,
# an image side of 10^6 pixels); a model beyond them is not a small VLM.
_POSITIVE = (1, None)
VLM_RANGES: dict[str, tuple[float | None, float | None]] = {
    "vit_hidden_dim": (1, 16384), "vit_inter_dim": (1, 65536), "vit_patch_size": (1, 1024),
    "vit_img_size": (1, 4096), "vit_n_heads": (1, 1024), "vit_n_blocks": (1, 512), "vit_ln_eps": (1e-12, 1.0),
    "lm_hidden_dim": (1, 32768), "lm_inter_dim": (1, 131072), "lm_rms_eps": (1e-12, 1.0), "lm_re_base": (1.0, None),
    "lm_max_position_embeddings": (1, 1 << 24), "lm_base_vocab_size": (1, 1 << 20), "extra_token_amount": (0, 1 << 16),
    "lm_vocab_size": (1, 1 << 20), "lm_n_heads": (1, 1024), "lm_n_kv_heads": (1, 1024), "lm_n_blocks": (1, 512),
    "lm_attn_scaling": (0.0, None), "lm_max_length": (1, 1 << 24), "lm_eos_token_id": (0, None),
    "mp_pixel_shuffle_factor": (1, 64), "mp_image_token_length": (1, 1 << 20), "max_img_size": (1, 16384),
    "vit_dropout": (0.0, 1.0), "lm_dropout": (0.0, 1.0),
    "mp_resampler_queries": (1, 4096), "mp_resampler_layers": (1, 64),
}  # fmt: skip

# The projector variants (`mp_type`; None = "pixel_shuffle_linear", nanoVLM's own). Every one
# starts with the pixel shuffle of factor s = mp_pixel_shuffle_factor (1: none), see
# `jaxvlm/modality_projector.py` for the architectures.
MP_TYPES = ("pixel_shuffle_linear", "mlp", "resampler")
# The Perceiver resampler's fixed numbers (Flamingo's / open_flamingo's): MLP width = 4 x its
# width, LayerNorm eps torch's default.
RESAMPLER_MLP_RATIO = 4
RESAMPLER_LN_EPS = 1e-5

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _grid_tokens(n: int = 8) -> tuple[tuple[str, str], ...]:
    return tuple((f"r{r}c{c}", f"<row_{r}_col_{c}>") for r in range(1, n + 1) for c in range(1, n + 1))


# Upstream's current extra tokens (66 of them), in upstream's dict order: the order fixes their ids.
DEFAULT_EXTRA_TOKENS: tuple[tuple[str, str], ...] = (
    ("image_token", "<|image|>"),
    ("global_image_token", "<|global_image|>"),
) + _grid_tokens()


def smolvlm_extra_tokens(grid: int = 6) -> tuple[tuple[str, str], ...]:
    """SmolVLM's (Idefics3's) image tokens as extra-token pairs. Their ids are the tokenizer's
    (SmolVLM's tokenizer already holds them), so the config names the image token's id
    (`vlm_image_token_id`) instead of deriving it."""
    return (
        ("image_token", "<image>"),
        ("fake_image_token", "<fake_token_around_image>"),
        ("global_image_token", "<global-img>"),
    ) + _grid_tokens(grid)


FAMILIES = ("nanovlm", "smolvlm")

# Older releases (nanoVLM-230M) carried a single extra token.
LEGACY_EXTRA_TOKENS: tuple[tuple[str, str], ...] = (("image_token", "<|image|>"),)


@dataclass(frozen=True)
class VLMConfig:
    """nanoVLM's configuration. Defaults are upstream's current class defaults (the 460M model).

    `vlm_extra_tokens` is held as a tuple of (name, token) pairs so that the config is
    hashable (it is static data for `jax.jit`); `to_dict` writes it back as a JSON object.
    """

    # Vision encoder (SigLIP-style ViT).
    vit_hidden_dim: int = 768
    vit_inter_dim: int = 3072  # upstream: 4 * vit_hidden_dim, but computed once at import
    vit_patch_size: int = 16
    vit_img_size: int = 512
    vit_n_heads: int = 12
    vit_dropout: float = 0.0
    vit_n_blocks: int = 12
    vit_ln_eps: float = 1e-6
    vit_cls_flag: bool = False
    vit_model_type: str = "google/siglip2-base-patch16-512"

    # Language decoder (SmolLM2 / Llama).
    lm_hidden_dim: int = 960
    lm_inter_dim: int = 2560
    lm_rms_eps: float = 1e-5
    lm_re_base: float = 100000
    lm_max_position_embeddings: int = 8192
    lm_base_vocab_size: int = 49152
    extra_token_amount: int = 66
    lm_vocab_size: int = 49152 + 66  # upstream: base + extra, computed once at import
    lm_n_heads: int = 15
    lm_n_kv_heads: int = 5
    lm_dropout: float = 0.0
    lm_n_blocks: int = 32
    lm_attn_scaling: float = 1.0
    lm_max_length: int = 4096
    lm_use_tokens: bool = False
    lm_tie_weights: bool = True
    lm_model_type: str = "HuggingFaceTB/SmolLM2-360M-Instruct"
    lm_tokenizer: str = "HuggingFaceTB/SmolLM2-360M-Instruct"
    lm_chat_template: str = CHATML_TEMPLATE
    lm_eos_token_id: int | None = None  # only in older configs; the tokenizer's EOS wins

    # Modality projector.
    mp_pixel_shuffle_factor: int = 4
    mp_image_token_length: int = 64
    # jaxvlm's projector variants (absent from upstream's configs, left out of to_dict at these
    # defaults): None = "pixel_shuffle_linear" (nanoVLM's), "mlp" (LLaVA-1.5), "resampler"
    # (Perceiver, Flamingo-style); see MP_TYPES and `jaxvlm/modality_projector.py`.
    mp_type: str | None = None
    mp_resampler_queries: int | None = None  # resampler: learned queries = image tokens per image
    mp_resampler_layers: int = 2  # resampler: cross-attention + MLP layers (Flamingo's 6 at scale)

    # Image processing.
    max_img_size: int = 2048
    resize_to_max_side_len: bool = True

    vlm_extra_tokens: tuple[tuple[str, str], ...] = DEFAULT_EXTRA_TOKENS

    # Model family (jaxvlm's fields; absent from upstream's configs and left out of to_dict at
    # these defaults, so a nanoVLM config round-trips unchanged). "smolvlm": transformers'
    # Idefics3 (SmolVLM) - its patch position ids, its prompt and image string, its image
    # processor; the image token's id comes from `vlm_image_token_id`.
    vlm_family: str = "nanovlm"
    # Per-channel normalisation applied inside the model to images in [0, 1]: (x - mean) / std.
    # None: none (nanoVLM feeds [0, 1] images to its ViT). SmolVLM: 0.5, 0.5.
    vlm_image_mean: tuple[float, ...] | None = None
    vlm_image_std: tuple[float, ...] | None = None
    vlm_image_token_id: int | None = None  # None: lm_base_vocab_size + the image token's index
    vlm_image_splitting: bool = True  # smolvlm: the Idefics3 processor's do_image_splitting
    vlm_load_backbone_weights: bool = True
    vlm_checkpoint_path: str = "checkpoints"
    hf_repo_name: str = "nanoVLM"

    def __post_init__(self):
        for name in ("vlm_image_mean", "vlm_image_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        extra = self.vlm_extra_tokens
        if isinstance(extra, Mapping):
            object.__setattr__(self, "vlm_extra_tokens", tuple((str(k), str(v)) for k, v in extra.items()))
        elif not isinstance(extra, tuple):
            object.__setattr__(self, "vlm_extra_tokens", tuple((str(k), str(v)) for k, v in extra))
        self.validate()

    # ---- derived numbers -------------------------------------------------------------------
    @property
    def vit_head_dim(self) -> int:
        return self.vit_hidden_dim // self.vit_n_heads

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

    @property
    def vit_n_patches(self) -> int:
        """N: patches per image (without the optional cls token)."""
        return (self.vit_img_size // self.vit_patch_size) ** 2

    @property
    def projector(self) -> str:
        """The projector variant, `mp_type` with None read as nanoVLM's "pixel_shuffle_linear"."""
        return self.mp_type or "pixel_shuffle_linear"

    @property
    def n_image_tokens(self) -> int:
        """L: language-model tokens per image: the pixel-shuffled grid, (N / s^2), or the
        resampler's number of learned queries."""
        if self.projector == "resampler":
            return self.mp_resampler_queries
        return self.vit_n_patches // self.mp_pixel_shuffle_factor**2

    @property
    def mp_input_dim(self) -> int:
        return self.vit_hidden_dim * self.mp_pixel_shuffle_factor**2

    @property
    def extra_tokens(self) -> dict[str, str]:
        return dict(self.vlm_extra_tokens)

    @property
    def image_token(self) -> str:
        return self.extra_tokens["image_token"]

    @property
    def image_token_id(self) -> int:
        """Id of `vlm_extra_tokens["image_token"]`: `vlm_image_token_id` when set, else the base
        vocabulary size plus its index (nanoVLM's extra tokens follow the base vocabulary in order)."""
        if self.vlm_image_token_id is not None:
            return self.vlm_image_token_id
        names = [name for name, _ in self.vlm_extra_tokens]
        return self.lm_base_vocab_size + names.index("image_token")

    # ---- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Types and ranges of every field first (`VLM_RANGES`), then their consistency."""
        problems = type_problems(self) + range_problems(self, VLM_RANGES)
        if problems:
            raise ValueError("invalid VLMConfig: " + "; ".join(problems))

        def need(ok: bool, msg: str):
            if not ok:
                problems.append(msg)

        need(
            self.vit_hidden_dim % self.vit_n_heads == 0,
            f"vit_hidden_dim {self.vit_hidden_dim} is not divisible by vit_n_heads {self.vit_n_heads}",
        )
        need(
            self.lm_hidden_dim % self.lm_n_heads == 0,
            f"lm_hidden_dim {self.lm_hidden_dim} is not divisible by lm_n_heads {self.lm_n_heads}",
        )
        need(
            self.lm_n_kv_heads > 0 and self.lm_n_heads % self.lm_n_kv_heads == 0,
            f"lm_n_heads {self.lm_n_heads} is not divisible by lm_n_kv_heads {self.lm_n_kv_heads}",
        )
        need((self.lm_hidden_dim // max(self.lm_n_heads, 1)) % 2 == 0, "the language head dim must be even for RoPE")
        need(
            self.vit_img_size % self.vit_patch_size == 0,
            f"vit_img_size {self.vit_img_size} is not divisible by vit_patch_size {self.vit_patch_size}",
        )
        side = self.vit_img_size // self.vit_patch_size
        s = self.mp_pixel_shuffle_factor
        need(s >= 1 and side % s == 0, f"patch grid side {side} is not divisible by mp_pixel_shuffle_factor {s}")
        need(
            self.mp_type is None or self.mp_type in MP_TYPES,
            f"mp_type {self.mp_type!r} is not one of {', '.join(MP_TYPES)} (or null: pixel_shuffle_linear)",
        )
        resampler = self.mp_type == "resampler"
        need(
            not resampler or self.mp_resampler_queries is not None,
            "mp_type 'resampler' needs mp_resampler_queries (its number of learned queries = image tokens per image)",
        )
        need(
            resampler or self.mp_resampler_queries is None,
            f"mp_resampler_queries is only for mp_type 'resampler' (mp_type is {self.mp_type!r})",
        )
        need(
            resampler or self.mp_resampler_layers == VLMConfig.mp_resampler_layers,
            f"mp_resampler_layers is only for mp_type 'resampler' (mp_type is {self.mp_type!r})",
        )
        if resampler and self.mp_resampler_queries is not None:
            need(
                self.mp_image_token_length == self.mp_resampler_queries,
                f"mp_image_token_length {self.mp_image_token_length} != mp_resampler_queries {self.mp_resampler_queries} "
                "(a resampler gives one image token per learned query)",
            )
        elif not resampler and s >= 1 and side % s == 0:
            need(
                self.mp_image_token_length == (side // s) ** 2,
                f"mp_image_token_length {self.mp_image_token_length} != (vit_img_size/vit_patch_size/mp_pixel_shuffle_factor)^2 = {(side // s) ** 2}",
            )
        names = [name for name, _ in self.vlm_extra_tokens]
        need("image_token" in names, "vlm_extra_tokens has no 'image_token'")
        need(len(set(names)) == len(names), "vlm_extra_tokens has duplicate names")
        need(
            self.vlm_family != "nanovlm" or self.lm_vocab_size >= self.lm_base_vocab_size + len(names),
            f"lm_vocab_size {self.lm_vocab_size} < lm_base_vocab_size {self.lm_base_vocab_size} + {len(names)} extra tokens",
        )
        need(self.vlm_family in FAMILIES, f"vlm_family {self.vlm_family!r} is not one of {', '.join(FAMILIES)}")
        for name in ("vlm_image_mean", "vlm_image_std"):
            value = getattr(self, name)
            need(
                value is None
                or (len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)),
                f"{name} {value!r} must be null or 3 numbers (one per RGB channel)",
            )
        need(
            (self.vlm_image_mean is None) == (self.vlm_image_std is None),
            "vlm_image_mean and vlm_image_std go together (both null or both 3 numbers)",
        )
        if self.vlm_image_std is not None and len(self.vlm_image_std) == 3:
            need(
                all(isinstance(v, (int, float)) and v > 0 and v < float("inf") for v in self.vlm_image_std),
                f"vlm_image_std {self.vlm_image_std!r} must be positive and finite",
            )
        if self.vlm_image_token_id is not None:
            need(
                0 <= self.vlm_image_token_id < self.lm_vocab_size,
                f"vlm_image_token_id {self.vlm_image_token_id} is outside the vocabulary (lm_vocab_size {self.lm_vocab_size})",
            )
        need(
            self.vlm_family == "nanovlm" or self.vlm_image_token_id is not None,
            f"vlm_family {self.vlm_family!r} needs vlm_image_token_id (its tokenizer fixes the image token's id)",
        )
        need(not self.vit_cls_flag, "vit_cls_flag=True is not supported (no released checkpoint uses it)")
        need(self.vit_dropout == 0.0 and self.lm_dropout == 0.0, "dropout is not supported (upstream trains with 0)")
        if problems:
            raise ValueError("invalid VLMConfig: " + "; ".join(problems))

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object upstream writes (`asdict(cfg)`), extra tokens as an object."""
        d = dataclasses.asdict(self)
        d["vlm_extra_tokens"] = dict(self.vlm_extra_tokens)
        if d["lm_eos_token_id"] is None:  # upstream's current config has no such field
            del d["lm_eos_token_id"]
        for f in dataclasses.fields(self):  # jaxvlm's own fields, only where they say something
            if f.name in _JAXVLM_FIELDS and d[f.name] == f.default:
                del d[f.name]
        for name in ("vlm_image_mean", "vlm_image_std"):
            if d.get(name) is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True) -> VLMConfig:
        """Load any released nanoVLM config version.

        Older configs lack fields that newer ones have; those are filled as the release that
        wrote them behaved (see `_legacy_defaults`). Unknown fields raise a ValueError naming
        them (`strict=False` logs a warning and ignores them instead).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            msg = f"unknown config field(s): {', '.join(unknown)}"
            if strict:
                raise ValueError(msg)
            log.warning("%s (ignored)", msg)
        values = {k: v for k, v in d.items() if k in known}
        values = {**_legacy_defaults(values), **values}
        if isinstance(values.get("lm_re_base"), float) and float(values["lm_re_base"]).is_integer():
            values["lm_re_base"] = int(values["lm_re_base"])
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path, *, strict: bool = True) -> VLMConfig:
        path = Path(path)
        try:
            d = json.loads(read_utf8(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d, strict=strict)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        atomic.write_text(path, json.dumps(self.to_dict(), indent=4))

    def replace(self, **changes) -> VLMConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> VLMConfig:
        """A few-thousand-parameter-per-layer model for tests (the real 49152-token vocabulary)."""
        base = dict(
            vit_hidden_dim=64,
            vit_inter_dim=128,
            vit_patch_size=8,
            vit_img_size=32,
            vit_n_heads=4,
            vit_n_blocks=2,
            lm_hidden_dim=64,
            lm_inter_dim=160,
            lm_n_heads=4,
            lm_n_kv_heads=2,
            lm_n_blocks=2,
            lm_max_position_embeddings=8192,
            lm_max_length=1024,
            mp_pixel_shuffle_factor=2,
            mp_image_token_length=4,
            max_img_size=64,
            vit_model_type="tiny",
            lm_model_type="tiny",
            lm_tokenizer="HuggingFaceTB/SmolLM2-360M-Instruct",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def nanovlm_222m(cls, **overrides) -> VLMConfig:
        """SigLIP-B/16-224 + SmolLM2-135M, one image token (the nanoVLM-222M/230M release)."""
        base = dict(
            vit_hidden_dim=768,
            vit_inter_dim=3072,
            vit_patch_size=16,
            vit_img_size=224,
            vit_n_heads=12,
            vit_n_blocks=12,
            vit_model_type="google/siglip-base-patch16-224",
            lm_hidden_dim=576,
            lm_inter_dim=1536,
            lm_n_heads=9,
            lm_n_kv_heads=3,
            lm_n_blocks=30,
            lm_re_base=100000,
            lm_max_position_embeddings=8192,
            lm_base_vocab_size=49152,
            extra_token_amount=1,
            lm_vocab_size=49153,
            lm_max_length=1024,
            lm_model_type="HuggingFaceTB/SmolLM2-135M",
            lm_tokenizer="HuggingFaceTB/cosmo2-tokenizer",
            mp_pixel_shuffle_factor=2,
            mp_image_token_length=49,
            max_img_size=224,
            resize_to_max_side_len=False,
            vlm_extra_tokens=LEGACY_EXTRA_TOKENS,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def nanovlm_460m(cls, **overrides) -> VLMConfig:
        """SigLIP2-B/16-512 + SmolLM2-360M-Instruct with image splitting (upstream's current default)."""
        return cls(**overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> VLMConfig:
        presets = {"tiny": cls.tiny, "nanovlm-222m": cls.nanovlm_222m, "nanovlm-460m": cls.nanovlm_460m}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name](**overrides)


# Fields upstream's VLMConfig does not have: written only when not at their defaults, so a
# nanoVLM config saved here loads in upstream (whose VLMConfig(**json) refuses unknown fields).
_JAXVLM_FIELDS = frozenset(
    {
        "vlm_family",
        "vlm_image_mean",
        "vlm_image_std",
        "vlm_image_token_id",
        "vlm_image_splitting",
        "mp_type",
        "mp_resampler_queries",
        "mp_resampler_layers",
    }
)

PRESETS = ("tiny", "nanovlm-222m", "nanovlm-460m")


def _legacy_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fields that older releases did not write, filled the way those releases behaved."""
    out: dict[str, Any] = {}
    if "vlm_extra_tokens" not in values:
        out["vlm_extra_tokens"] = LEGACY_EXTRA_TOKENS  # the placeholder generation began with one token
    n_extra = len(values.get("vlm_extra_tokens", out.get("vlm_extra_tokens")))
    base = values.get("lm_base_vocab_size")
    if base is None:
        base = 49152
        out["lm_base_vocab_size"] = base
    if "extra_token_amount" not in values:
        out["extra_token_amount"] = n_extra
    if (
        "mp_image_token_length" not in values
        and values.get("mp_type") == "resampler"
        and values.get("mp_resampler_queries") is not None
    ):
        out["mp_image_token_length"] = values.get("mp_resampler_queries")
    elif "mp_image_token_length" not in values:
        img = values.get("vit_img_size", VLMConfig.vit_img_size)
        patch = values.get("vit_patch_size", VLMConfig.vit_patch_size)
        s = values.get("mp_pixel_shuffle_factor", VLMConfig.mp_pixel_shuffle_factor)
        out["mp_image_token_length"] = ((img // patch) // s) ** 2 if s else 0
    if "max_img_size" not in values:
        out["max_img_size"] = values.get("vit_img_size", VLMConfig.vit_img_size)  # no image splitting
    if "resize_to_max_side_len" not in values:
        out["resize_to_max_side_len"] = False
    if "lm_vocab_size" not in values:
        out["lm_vocab_size"] = base + n_extra
    return out
