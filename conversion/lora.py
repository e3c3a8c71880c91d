"""LoRA adapters, framework-free: the spec, PEFT's adapter directory and the merge.

A LoRA adapter on a linear layer W [out, in] (torch layout) adds two matrices, A [r, in] and
B [out, r], and computes, as PEFT does,

    y = W x + b + (alpha / r) * B (A (dropout(x)))

with A drawn as PEFT draws it (kaiming-uniform with a = sqrt(5): U(+-1/sqrt(in))) and B zero, so
a fresh adapter changes nothing. Targets are chosen by module-name suffix, as PEFT's
`target_modules` list matches them (`q_proj` adapts every `...q_proj`); a suffix qualified by its
tower (`decoder.out_proj`) adapts that tower's only (the ViT and the decoder both have `out_proj`).
`modules_to_save` are modules trained in full beside the adapters (PEFT's name).

The adapter directory is PEFT's: `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r] and, for each
module to save, its checkpoint keys under the same prefix, so
`peft.PeftModel.from_pretrained(torch_ref_model, DIR)` loads it.

This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from . import atomic
from .config import VLMConfig
from .mapping import _module_table, expected_shapes
from .safetensors_io import CheckpointError, load_safetensors, save_safetensors

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names

# The linear layers an adapter can go on, by their last name (conversion.mapping's module table).
LAYER_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
               "qkv_proj", "fc1", "fc2", "proj")  # fmt: skip
TOWERS = ("decoder", "vision_encoder", "MP")
# The decoder's attention and MLP projections, tower-qualified: the ViT has an `out_proj` and the
# resampler projector (mp_type "resampler") q/k/v/out projections of its own.
DEFAULT_TARGETS = tuple(
    f"decoder.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj")
)
MODULES_TO_SAVE = ("MP", "vision_encoder")
VALID_TARGETS = (*LAYER_NAMES[:-1], "decoder.out_proj", "vision_encoder.out_proj", "MP.proj")


def _target_problem(target: str) -> str | None:
    leaf = target.rsplit(".", 1)[-1]
    if not target or leaf not in LAYER_NAMES or target == "proj":
        return (
            f"unknown LoRA target {target!r}: choose from {', '.join(VALID_TARGETS)} "
            "(module-name suffixes, as PEFT's target_modules, e.g. decoder.blocks.0.attn.q_proj)"
        )
    return None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which linear layers get adapters and how: rank r, alpha (scaling alpha / r, PEFT's
    convention; default alpha = r, scaling 1), dropout on the adapter's input (0: none), the
    targets (module-name suffixes) and the modules trained in full beside them."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        if isinstance(self.modules_to_save, str):
            names = tuple(t.strip() for t in self.modules_to_save.split(",") if t.strip())
            object.__setattr__(self, "modules_to_save", names)
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank) if _is_int(self.rank) else self.rank)
        problems = []
        if not _is_int(self.rank) or self.rank <= 0:
            problems.append(f"rank {self.rank!r}: must be an integer > 0")
        if not _is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha {self.alpha!r}: must be > 0")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout {self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            problems.append("no targets: name at least one linear layer")
        problems += [p for p in map(_target_problem, self.targets) if p]
        for m in self.modules_to_save:
            if m not in MODULES_TO_SAVE:
                problems.append(f"unknown module to save {m!r}: choose from {', '.join(MODULES_TO_SAVE)}")
        if problems:
            raise ValueError("invalid LoRA settings: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def modules(self, cfg: VLMConfig) -> list[str]:
        """The full names of the adapted linear layers of a model of `cfg`, in checkpoint order.
        Raises when a target matches no layer, or one inside a module to save (PEFT refuses both)."""
        linears = [m for m, kind, _ in _module_table(cfg) if kind.startswith("linear") and m != "decoder.head"]
        chosen = [m for m in linears if any(matches(m, t) for t in self.targets)]
        for t in self.targets:
            if not any(matches(m, t) for m in linears):
                raise ValueError(f"LoRA target {t!r} matches no linear layer of this model")
        for m in chosen:
            for s in self.modules_to_save:
                if m.startswith(s + "."):
                    raise ValueError(f"LoRA target {m} is inside module to save {s!r}: choose one")
        return chosen

    def saves(self, key: str) -> bool:
        """Whether checkpoint key / module path `key` belongs to a module to save."""
        return any(key == s or key.startswith(s + ".") for s in self.modules_to_save)

    # ---- PEFT's adapter_config.json --------------------------------------------------------------
    def to_peft_config(self, cfg: VLMConfig) -> dict:
        """The adapter_config.json PEFT reads: target_modules are the adapted layers' full names
        (PEFT matches a full name exactly, so it adapts the same layers)."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.modules(cfg),
            "modules_to_save": list(self.modules_to_save) or None,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }

    @classmethod
    def from_peft_config(cls, data: dict, cfg: VLMConfig, *, source: str = ADAPTER_CONFIG_FILE) -> LoraSpec:
        """A spec from a PEFT LoRA adapter_config.json (target_modules a list of suffixes, or a
        regex string, which PEFT full-matches); what this port cannot apply is an error."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type {data.get('peft_type')!r}, only LORA adapters are supported")
        unsupported = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                       "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                       "target_parameters": None, "exclude_modules": None, "trainable_token_indices": None}  # fmt: skip
        for key, plain in unsupported.items():
            value = data.get(key)
            if value is not None and value != plain:
                raise ValueError(f"{source}: {key} {value!r} is not supported (only {plain!r})")
        targets = data.get("target_modules")
        if isinstance(targets, str):
            linears = [m for m, kind, _ in _module_table(cfg) if kind.startswith("linear") and m != "decoder.head"]
            targets = [m for m in linears if re.fullmatch(targets, m)]
        if not isinstance(targets, list) or not targets:
            raise ValueError(f"{source}: target_modules {data.get('target_modules')!r} matches no linear layer")
        try:
            return cls(
                rank=data.get("r"),
                alpha=data.get("lora_alpha"),
                dropout=data.get("lora_dropout", 0.0),
                targets=tuple(targets),
                modules_to_save=tuple(data.get("modules_to_save") or ()),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def matches(module: str, target: str) -> bool:
    """PEFT's suffix rule (the name itself, or ending in `.target`), or a tower-qualified suffix:
    `decoder.out_proj` matches `decoder.<...>.out_proj`."""
    if module == target or module.endswith("." + target):
        return True
    tower, _, name = target.partition(".")
    return tower in TOWERS and "." not in name and module.startswith(tower + ".") and module.endswith("." + name)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- adapter tensors -------------------------------------------------------------------------------
def adapter_shapes(spec: LoraSpec, cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """{key: torch-layout shape} of an adapter for `cfg`, keys as the wrapped model names them
    (`decoder.blocks.0.attn.q_proj.lora_A.weight`, and each module to save's checkpoint keys)."""
    base = expected_shapes(cfg)
    shapes = {}
    for module in spec.modules(cfg):
        out, d_in = base[f"{module}.weight"]
        shapes[f"{module}.lora_A.weight"] = (spec.rank, d_in)
        shapes[f"{module}.lora_B.weight"] = (out, spec.rank)
    shapes.update({k: s for k, s in base.items() if spec.saves(k)})
    return shapes


def check_adapter(spec: LoraSpec, cfg: VLMConfig, tensors: dict[str, np.ndarray], *, source: str) -> None:
    """One clear error for an adapter that does not fit the model: missing or unexpected
    tensors, or a tensor whose shape is not the model's (both shapes named)."""
    want = adapter_shapes(spec, cfg)
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: not an adapter for this model: "
            + "; ".join(
                p
                for p in (
                    missing and f"missing {', '.join(PEFT_PREFIX + k for k in missing[:5])}",
                    unexpected and f"unexpected {', '.join(PEFT_PREFIX + k for k in unexpected[:5])}",
                )
                if p
            )
        )
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {PEFT_PREFIX + k} has shape {tuple(tensors[k].shape)}, this model needs {shape} "
                "(an adapter for another model shape)"
            )


def write_adapter(directory: str | Path, spec: LoraSpec, cfg: VLMConfig, tensors: dict[str, np.ndarray]) -> None:
    """PEFT's adapter directory, written whole under a temporary name and moved into place
    (`atomic_directory`; an existing directory is replaced only when `directory` is one)."""
    check_adapter(spec, cfg, tensors, source="adapter to save")
    config = json.dumps(spec.to_peft_config(cfg), indent=2)
    with atomic.atomic_directory(directory, replace=Path(directory).is_dir()) as tmp:
        save_safetensors(
            tmp / ADAPTER_WEIGHTS_FILE,
            {PEFT_PREFIX + k: np.ascontiguousarray(v) for k, v in tensors.items()},
            metadata={"format": "pt"},
        )
        atomic.write_text(tmp / ADAPTER_CONFIG_FILE, config)


def read_adapter(directory: str | Path, cfg: VLMConfig) -> tuple[LoraSpec, dict[str, np.ndarray]]:
    """(spec, {key: torch-layout array}) of a PEFT LoRA adapter directory, checked against `cfg`."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG_FILE}: not a LoRA adapter directory")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    try:
        spec = LoraSpec.from_peft_config(data, cfg, source=str(config_path))
        spec.modules(cfg)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}" if str(config_path) not in str(e) else str(e)) from None
    raw, _ = load_safetensors(directory / ADAPTER_WEIGHTS_FILE)
    tensors = {}
    for k, v in raw.items():
        if not k.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_FILE}: key {k!r} does not start with {PEFT_PREFIX!r}")
        name = k[len(PEFT_PREFIX) :]
        # modules to save as PEFT holds them in memory (`MP.modules_to_save.default.proj.weight`)
        name = re.sub(r"\.modules_to_save\.default\.", ".", name)
        tensors[name.replace(".default.weight", ".weight")] = v
    check_adapter(spec, cfg, tensors, source=str(directory / ADAPTER_WEIGHTS_FILE))
    return spec, tensors


# ---- merging -----------------------------------------------------------------------------------------
def merge(
    spec: LoraSpec, cfg: VLMConfig, base: dict[str, np.ndarray], adapter: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Checkpoint tensors with the adapter folded in: W + (alpha / r) * B @ A computed in
    float32 and cast to W's dtype; modules to save replaced by the adapter's. Deterministic:
    the same inputs give the same bytes (numpy, float32)."""
    check_adapter(spec, cfg, adapter, source="adapter")
    out = dict(base)
    scaling = np.float32(spec.scaling)
    for module in spec.modules(cfg):
        w = base[f"{module}.weight"]
        a = np.asarray(adapter[f"{module}.lora_A.weight"], np.float32)
        b = np.asarray(adapter[f"{module}.lora_B.weight"], np.float32)
        out[f"{module}.weight"] = (np.asarray(w, np.float32) + (b @ a) * scaling).astype(w.dtype)
    for k in base:
        if spec.saves(k):
            out[k] = np.asarray(adapter[k]).astype(base[k].dtype)
    return out
