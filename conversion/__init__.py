"""The framework-free core: config, pretrained-directory format, one mapping table, strict I/O, recipe. Imports no framework."""

from .config import PRESETS, VLMConfig
from .mapping import Entry, expected_shapes, jax_to_torch, mapping, torch_to_jax
from .pretrained import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_checkpoint, read_config, write_checkpoint
from .recipe import GROUPS, OptimConfig, upstream_lr
from .safetensors_io import CheckpointError, load_safetensors, save_safetensors

__all__ = [
    "CONFIG_FILE",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "GROUPS",
    "OptimConfig",
    "PRESETS",
    "CheckpointError",
    "Entry",
    "VLMConfig",
    "expected_shapes",
    "jax_to_torch",
    "load_safetensors",
    "mapping",
    "read_checkpoint",
    "read_config",
    "save_safetensors",
    "torch_to_jax",
    "upstream_lr",
    "write_checkpoint",
]
