"""Upstream nanoVLM's training recipe, framework-free: the parameter groups, the optimizer
settings and the learning-rate schedule. `jaxvlm.train` and `torch_ref.train` both read it.

This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
import math

from .lora import LoraSpec

# Labels equal to this take no part in the loss (torch's `cross_entropy` default, which upstream uses).
IGNORE_INDEX = -100

# Parameter groups of the training recipe: upstream's order (train.py: MP, vision, language).
GROUPS = {"MP": "mp", "vision_encoder": "vision", "decoder": "language"}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Upstream's recipe (docs/conventions.md, "Training recipe"). A group whose lr is 0 is frozen: it gets no
    gradient, takes no part in clipping and keeps no optimizer state."""

    lr_mp: float = 5.12e-3
    lr_vision_backbone: float = 5e-5
    lr_language_backbone: float = 5e-5
    max_training_steps: int = 40000
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which upstream uses
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    # LoRA (conversion.lora): only the adapters (group "lora", lr_lora) and the spec's modules to
    # save (their own group's lr) train; every other weight is frozen. 1e-4: PEFT's examples' and
    # the LoRA paper's order for fine-tuning, 2x upstream's backbone lr (a rank-r update needs more).
    lora: LoraSpec | None = None
    lr_lora: float = 1e-4

    def group_lrs(self) -> dict[str, float]:
        """{group: peak lr} of every group that may train (lr 0: frozen)."""
        lrs = {"mp": self.lr_mp, "vision": self.lr_vision_backbone, "language": self.lr_language_backbone}
        if self.lora is None:
            return lrs
        saved = {GROUPS[m.split(".")[0]] for m in self.lora.modules_to_save}
        return {"lora": self.lr_lora, **{g: lr for g, lr in lrs.items() if g in saved}}

    def param_group(self, key: str) -> str | None:
        """The group of the parameter at dotted path `key` (`decoder.blocks.0.attn.q_proj.lora_A.weight`),
        None when it is frozen: the one rule both frameworks' optimizers split parameters by."""
        if self.lora is not None and (".lora_A." in key or ".lora_B." in key):
            return "lora"
        if self.lora is not None and not self.lora.saves(key):
            return None
        group = GROUPS[key.split(".")[0]]
        return group if self.group_lrs().get(group, 0) > 0 else None


def upstream_lr(step: int, max_lr: float, max_steps: int) -> float:
    """Upstream's `get_lr`: linear warmup over 3% of max_steps (lr = max_lr*(step+1)/warmup, which
    overshoots max_lr when warmup < 1 step, as upstream does), cosine decay to 0.1*max_lr at
    max_steps, then flat. `jaxvlm.train.upstream_lr` is the same formula on traced steps."""
    min_lr, warmup = max_lr * 0.1, max_steps * 0.03
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step > max_steps:
        return min_lr
    ratio = (step - warmup) / (max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
