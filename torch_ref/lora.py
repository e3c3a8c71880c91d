"""LoRA in torch_ref: PEFT's LoRA layer written out (no peft import), the twin of `jaxvlm/lora.py`.

`add_adapters(model, spec)` replaces each targeted nn.Linear by a `LoRALinear` holding the same
weight and bias Parameters plus `lora_A` [r, in] and `lora_B` [out, r], the attribute names PEFT
uses, so `adapter_tensors` are PEFT's keys less its `base_model.model.` prefix and
`conversion.lora.write_adapter` / `read_adapter` serve both frameworks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from conversion.lora import LoraSpec, check_adapter

from .vision_language_model import VisionLanguageModel, _torch_tensor


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * lora_B(lora_A(dropout(x))), PEFT's LoRA forward."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base layer's own Parameters
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT: U(+-1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_adapters(model: VisionLanguageModel, spec: LoraSpec) -> list[str]:
    """Wrap every linear layer `spec` targets (in place); returns their names."""
    names = spec.modules(model.cfg)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        if type(base) is not nn.Linear:
            raise ValueError(f"{name}: not a linear layer without an adapter")
        setattr(parent, leaf, LoRALinear(base, spec.rank, spec.scaling, spec.dropout))
    return names


def adapter_tensors(model: VisionLanguageModel, spec: LoraSpec) -> dict[str, np.ndarray]:
    """The adapter as `conversion.lora.write_adapter` takes it (lora_A/lora_B and the modules to save)."""
    state = model.state_dict()
    keys = [f"{m}.{ab}.weight" for m in spec.modules(model.cfg) for ab in ("lora_A", "lora_B")]
    keys += [k for k in model.checkpoint_state() if spec.saves(k)]
    return {k: state[k].detach().cpu().float().numpy() for k in keys}


@torch.no_grad()
def load_adapter(model: VisionLanguageModel, spec: LoraSpec, tensors: dict[str, np.ndarray], *, source: str) -> None:
    """Set an adapted model's adapters and modules to save (checked against its shapes)."""
    check_adapter(spec, model.cfg, tensors, source=source)
    state = model.state_dict()
    for k, v in tensors.items():
        state[k].copy_(_torch_tensor(v))
