"""The README.md model card that `save_pretrained(directory, model_card=True)` writes beside
config.json and model.safetensors: Hub metadata (YAML front matter, written by huggingface_hub's
`ModelCardData`), the config's key numbers and how to load the directory in each library that can.

A card carries `MARKER` (an HTML comment, invisible on the Hub): a README.md without it is the
user's and is never replaced (house style rule 16); one with it is ours and is rewritten whole,
atomically, by the next save.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCardData

from . import atomic
from .config import _JAXVLM_FIELDS, VLMConfig

CARD_FILE = "README.md"
MARKER = "<!-- model card written by jaxvlm save_pretrained(model_card=True); delete this line to keep your edits -->"
PIPELINE_TAG = "image-text-to-text"
TAGS = ("vision-language-model", "image-text-to-text", "nanovlm", "jaxvlm")


def upstream_loads(cfg: VLMConfig) -> bool:
    """Upstream nanoVLM builds `VLMConfig(**config.json)`: it loads a config with none of jaxvlm's own fields."""
    return cfg.vlm_family == "nanovlm" and not (set(cfg.to_dict()) & _JAXVLM_FIELDS)


def render(cfg: VLMConfig, n_params: int, *, repo_id: str | None = None) -> str:
    """The card's text. `n_params`: the number of values in model.safetensors (the tied head once);
    `repo_id`: the name the loading snippets use (None: a placeholder for the repo or directory).
    No license is written: the weights' licence is not something a config knows."""
    tags = list(TAGS) + (["smolvlm"] if cfg.vlm_family == "smolvlm" else [])
    meta = ModelCardData(library_name="jaxvlm", pipeline_tag=PIPELINE_TAG, tags=tags).to_yaml()
    name = repo_id or "OWNER/NAME"  # or the local directory
    title = repo_id.split("/")[-1] if repo_id else "nanoVLM checkpoint"
    family = "SmolVLM (Idefics3)" if cfg.vlm_family == "smolvlm" else "nanoVLM"
    lines = [
        "---",
        meta.rstrip("\n"),
        "---",
        MARKER,
        "",
        f"# {title}",
        "",
        f"A vision-language model ({family} architecture) in nanoVLM's checkpoint format (`config.json` +",
        "`model.safetensors`),",
        "written by jaxvlm (a JAX / Flax NNX port of nanoVLM, with the PyTorch reference `torch_ref`). It answers",
        "text prompts about images.",
        "",
        "| | |",
        "|---|---|",
        f"| vision backbone | `{cfg.vit_model_type}`: width {cfg.vit_hidden_dim}, {cfg.vit_n_blocks} blocks, "
        f"{cfg.vit_n_heads} heads, {cfg.vit_img_size} px images in {cfg.vit_patch_size} px patches |",
        f"| language backbone | `{cfg.lm_model_type}`: width {cfg.lm_hidden_dim}, {cfg.lm_n_blocks} blocks, "
        f"{cfg.lm_n_heads} heads ({cfg.lm_n_kv_heads} key/value), context {cfg.lm_max_length} tokens |",
        f"| image tokens | {cfg.n_image_tokens} per image tile (pixel shuffle {cfg.mp_pixel_shuffle_factor}"
        + ("" if cfg.mp_type is None else f", projector {cfg.mp_type}")
        + ") |",
        f"| vocabulary | {cfg.lm_vocab_size} tokens (`{cfg.lm_tokenizer}` + {len(cfg.extra_tokens)} extra) |",
        f"| parameters | {n_params:,} ({n_params / 1e6:.1f}M){' (the tied head counted once)' if cfg.lm_tie_weights else ''} |",
        "",
        "## Load it",
        "",
        "jaxvlm:",
        "",
        "```python",
        "import jaxvlm",
        "",
        f'model = jaxvlm.VisionLanguageModel.from_pretrained("{name}")',
        "```",
        "",
        "torch_ref (PyTorch):",
        "",
        "```python",
        "import torch_ref",
        "",
        f'model = torch_ref.VisionLanguageModel.from_pretrained("{name}")',
        "```",
        "",
    ]
    if upstream_loads(cfg):
        lines += [
            "Upstream [nanoVLM](https://github.com/huggingface/nanoVLM), from a clone of its repository:",
            "",
            "```python",
            "from models.vision_language_model import VisionLanguageModel",
            "",
            f'model = VisionLanguageModel.from_pretrained("{name}")',
            "```",
            "",
        ]
    if cfg.vlm_family == "smolvlm":
        lines += [
            "transformers reads SmolVLM's own (Idefics3) layout: export this checkpoint with",
            "`python -m conversion to-smolvlm DIR OUT` (jaxvlm), then:",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            'model = AutoModelForImageTextToText.from_pretrained("OUT")',
            'processor = AutoProcessor.from_pretrained("OUT")',
            "```",
            "",
        ]
    return "\n".join(lines)


def check_writable(directory: str | Path) -> None:
    """Raise FileExistsError if `directory` holds a README.md that no save_pretrained wrote."""
    path = Path(directory) / CARD_FILE
    if path.is_symlink() or path.is_dir() or (path.exists() and not _is_ours(path)):
        raise FileExistsError(
            f"{path} exists and was not written by save_pretrained: move it away, or save with model_card=False"
        )


def write(directory: str | Path, cfg: VLMConfig, n_params: int, *, repo_id: str | None = None) -> Path:
    """Write (atomically) or rewrite our README.md in `directory`; never a user's."""
    check_writable(directory)
    path = Path(directory) / CARD_FILE
    atomic.write_text(path, render(cfg, n_params, repo_id=repo_id))
    return path


def _is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(64 * 1024)
    except OSError:
        return False
    return MARKER in head.splitlines()
