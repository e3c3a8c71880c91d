"""torch_ref's training recipe, the twin of `jaxvlm/train.py` (upstream nanoVLM's train.py):
AdamW over three parameter groups, global-norm clipping over all trained parameters, per-group
warmup + cosine learning rates, gradient accumulation with the loss divided by A."""

from __future__ import annotations

import torch

from conversion.recipe import OptimConfig, upstream_lr

from .vision_language_model import VisionLanguageModel


def make_optimizer(model: VisionLanguageModel, ocfg: OptimConfig) -> torch.optim.AdamW:
    """One AdamW group per trained group (`OptimConfig.param_group`: lr > 0; with LoRA the
    adapters and the modules to save); every other parameter gets requires_grad=False."""
    by_group: dict[str, list] = {}
    for name, p in model.named_parameters():
        group = ocfg.param_group(name)
        if group is None:
            p.requires_grad_(False)
        else:
            by_group.setdefault(group, []).append(p)
    lrs = ocfg.group_lrs()
    groups = [{"params": by_group[g], "lr": lr, "name": g} for g, lr in lrs.items() if g in by_group]
    return torch.optim.AdamW(groups, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps, weight_decay=ocfg.weight_decay)


def train_step(
    model: VisionLanguageModel,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    step: int,
    ocfg: OptimConfig,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """One optimizer update from A micro-batches (dicts of int/float arrays), as upstream.

    `autocast_dtype` (e.g. torch.bfloat16): the forward and loss under `torch.autocast` on the
    batch's device, as upstream trains on a GPU; the backward and the update stay outside it."""
    n_micro = len(micro_batches)
    losses = []
    for mb in micro_batches:
        device = mb["input_ids"].device.type
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            _, loss = model(
                mb["input_ids"],
                mb.get("images"),
                mb["attention_mask"],
                targets=mb["labels"],
                segment_ids=mb.get("segment_ids"),  # packed rows
                position_ids=mb.get("position_ids"),
            )
        (loss / n_micro).backward()
        losses.append(loss.item())
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = None
    if ocfg.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, max_norm=ocfg.max_grad_norm))
    for g in optimizer.param_groups:
        g["lr"] = upstream_lr(step, ocfg.group_lrs()[g["name"]], ocfg.max_training_steps)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": sum(losses) / n_micro, "grad_norm": grad_norm}
