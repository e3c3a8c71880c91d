"""Read and write safetensors files as numpy arrays, bfloat16 included.

`safetensors.numpy` does not understand bfloat16, which real checkpoints use, so arrays go
through safetensors' byte-level `deserialize` with an explicit dtype table (bfloat16 from
`ml_dtypes`, which jax already depends on); writing uses `safetensors.numpy` (>= 0.8 handles
ml_dtypes' bfloat16). No torch, no jax.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes  # numpy's bfloat16 (a dependency of jax, and of this package)
import numpy as np
import safetensors
import safetensors.numpy

BF16 = np.dtype(ml_dtypes.bfloat16)

_FROM_ST = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_FROM_ST["BF16"] = BF16
_TO_ST = {v: k for k, v in _FROM_ST.items()}


class CheckpointError(ValueError):
    """A checkpoint file or directory is unusable; the message names the file and the problem."""


def load_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return ({name: array}, metadata) from a safetensors file, raising CheckpointError if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    data = path.read_bytes()
    try:
        entries = safetensors.deserialize(data)
    except Exception as e:  # SafetensorError: truncated, bad header, overlapping offsets, ...
        raise CheckpointError(f"{path} is not a valid safetensors file ({len(data)} bytes): {e}") from None
    tensors = {}
    for name, info in entries:
        dtype = _FROM_ST.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        tensors[name] = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
    return tensors, _read_metadata(data)


def _read_metadata(data: bytes) -> dict[str, str]:
    import json

    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def save_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write arrays to `path` atomically (a temp file renamed into place)."""
    path = Path(path)
    arrays = {name: np.require(arr, requirements="C") for name, arr in tensors.items()}  # 0-d stays 0-d
    for name, arr in arrays.items():
        if arr.dtype not in _TO_ST:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {arr.dtype} in safetensors")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        safetensors.numpy.save_file(arrays, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
