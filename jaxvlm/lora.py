"""LoRA in jaxvlm: adapters put on a built model's linear layers, and the model's adapter and
merged weights as `conversion.lora` writes them (PEFT's adapter directory, the nanoVLM format).

    model = VisionLanguageModel.from_pretrained(DIR)
    add_adapters(model, LoraSpec(rank=8), seed=0)     # decoder attention + MLP by default
    ... Trainer(model, OptimConfig(lora=spec, ...)) trains the adapters only ...
    save_adapter(model, spec, "adapter/"); save_merged(model, spec, "model/")

The adapter of layer `decoder.blocks.0.attn.q_proj` is `q_proj.lora_A` / `q_proj.lora_B` (Linear
modules without bias, kernels [in, r] / [r, out]), the same attribute names as torch_ref's
`LoRALinear` and PEFT's, so the checkpoint mapping is the linear layer's (`LINEAR`).
Shapes: r rank, in / out the adapted layer's widths.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import lora as spec_lib
from conversion.lora import LoraSpec
from conversion.mapping import LINEAR, jax_to_torch, torch_to_jax
from conversion.pretrained import write_checkpoint

from .layers import Linear
from .pretrained import flat_state, load_flat_state
from .sharding import logical


def _module(model: nnx.Module, name: str) -> nnx.Module:
    m = model
    for part in name.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def kaiming_uniform_a_sqrt5(key, shape, dtype=jnp.float32):
    """PEFT's (torch's nn.Linear) init of lora_A: U(+-1/sqrt(in)) for a kernel [in, r]."""
    bound = 1.0 / shape[0] ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def add_adapters(model: nnx.Module, spec: LoraSpec, *, seed: int = 0) -> list[str]:
    """Put a LoRA adapter on every linear layer of `model` that `spec` targets (in place: the
    base weights are untouched; A ~ U(+-1/sqrt(in)), B = 0, so the model computes what it did).
    Returns the adapted layers' names. The adapter's kernels take the base kernel's logical
    axes on the side they share with it (a mesh shards them alike), the rank axis replicated."""
    rngs = nnx.Rngs(seed)
    names = spec.modules(model.cfg)
    for i, name in enumerate(names):
        base = _module(model, name)
        if not isinstance(base, Linear) or base.lora_A is not None:
            raise ValueError(f"{name}: not a linear layer without an adapter")
        axes = base.kernel.get_metadata().get("out_sharding") or (None, None)
        common = dict(use_bias=False, dtype=base.dtype, param_dtype=base.param_dtype, kernels=base.kernels, rngs=rngs)
        base.lora_A = Linear(base.in_features, spec.rank, kernel_init=kaiming_uniform_a_sqrt5,
                             kernel_metadata=logical(axes[0], None), **common)  # fmt: skip
        base.lora_B = Linear(spec.rank, base.out_features, kernel_init=nnx.initializers.zeros_init(),
                             kernel_metadata=logical(None, axes[1]), **common)  # fmt: skip
        base.lora_scaling = spec.scaling
        base.lora_dropout = spec.dropout
        base.lora_index = i
    return names


def is_adapter(path: tuple) -> bool:
    """Whether an NNX path is an adapter's (`...q_proj.lora_A.kernel`)."""
    return any(p in ("lora_A", "lora_B") for p in path)


def _adapter_entries(spec: LoraSpec, cfg) -> list[tuple[str, tuple]]:
    """(torch key, NNX path) of every adapter kernel; both layouts are the linear layer's (LINEAR)."""
    out = []
    for module in spec.modules(cfg):
        path = tuple(int(p) if p.isdigit() else p for p in module.split("."))
        for ab in ("lora_A", "lora_B"):
            out.append((f"{module}.{ab}.weight", path + (ab, "kernel")))
    return out


def split_tensors(model: nnx.Module, spec: LoraSpec) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(base checkpoint tensors, adapter tensors), both torch layout with checkpoint keys; the
    adapter holds lora_A [r, in] / lora_B [out, r] and the modules to save's tensors."""
    flat = flat_state(model)
    base = jax_to_torch(model.cfg, {p: v for p, v in flat.items() if not is_adapter(p)})
    adapter = {
        key: np.ascontiguousarray(LINEAR.to_torch(flat[path])) for key, path in _adapter_entries(spec, model.cfg)
    }
    adapter.update({k: v for k, v in base.items() if spec.saves(k)})
    return base, adapter


def load_adapter(model: nnx.Module, spec: LoraSpec, tensors: dict[str, np.ndarray], *, source: str) -> None:
    """Set the adapters (and modules to save) of an adapted `model` from adapter tensors
    (`conversion.lora.read_adapter`; checked against the model's shapes there)."""
    spec_lib.check_adapter(spec, model.cfg, tensors, source=source)
    flat = flat_state(model)
    for key, path in _adapter_entries(spec, model.cfg):
        flat[path] = LINEAR.to_jax(tensors[key])
    base, _ = split_tensors(model, spec)
    saved = {k: tensors[k] for k in base if spec.saves(k)}
    if saved:
        flat.update(torch_to_jax(model.cfg, {**base, **saved}, source=source))
    load_flat_state(model, flat, source=source)


def save_adapter(model: nnx.Module, spec: LoraSpec, directory: str | Path) -> None:
    """PEFT's adapter directory (adapter_config.json + adapter_model.safetensors), atomically."""
    _, adapter = split_tensors(model, spec)
    spec_lib.write_adapter(directory, spec, model.cfg, adapter)


def merged_tensors(model: nnx.Module, spec: LoraSpec) -> dict[str, np.ndarray]:
    """The nanoVLM checkpoint tensors with the adapters merged (`conversion.lora.merge`)."""
    base, adapter = split_tensors(model, spec)
    return spec_lib.merge(spec, model.cfg, base, adapter)


def save_merged(model: nnx.Module, spec: LoraSpec, directory: str | Path) -> None:
    """config.json + model.safetensors of the merged model: what every nanoVLM loader reads."""
    write_checkpoint(directory, model.cfg, merged_tensors(model, spec))
