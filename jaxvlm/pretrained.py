"""jaxvlm models <-> pretrained directories (nanoVLM safetensors, or config.json + an orbax tree), through `conversion`.

`flat_state` / `load_flat_state` are the only places that touch NNX paths; the mapping table
in `conversion.mapping` does the rest, in both directions.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import hub
from conversion import model_card as cards
from conversion.config import VLMConfig
from conversion.mapping import check_keys, jax_to_torch, torch_to_jax
from conversion.pretrained import CONFIG_FILE, check_values, read_checkpoint, read_config, write_checkpoint
from conversion.safetensors_io import CheckpointError

from .options import ModelOptions

ORBAX_STATE_DIR = "state"


def flat_state(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """{path: host array} for every variable of the model (params and buffers)."""
    return {tuple(path): np.asarray(jax.device_get(var[...])) for path, var in nnx.to_flat_state(nnx.state(model))}


def load_flat_state(model: nnx.Module, flat: dict[tuple, np.ndarray], *, source: str) -> None:
    """Set every variable of `model` from `flat` (strict: same paths, same shapes); each value is
    cast to the variable's dtype."""
    state = nnx.state(model)
    variables = dict(nnx.to_flat_state(state))
    check_keys({p: tuple(v.shape) for p, v in variables.items()}, flat, source=source)
    for path, var in variables.items():
        var.set_value(jnp.asarray(flat[path], dtype=var.dtype))
    nnx.update(model, state)


def abstract_model(cfg: VLMConfig, options: ModelOptions = ModelOptions()):
    from .vision_language_model import VisionLanguageModel

    return nnx.eval_shape(lambda: VisionLanguageModel(cfg, options=options, rngs=nnx.Rngs(0)))


def model_from_torch_tensors(
    cfg: VLMConfig,
    tensors: dict[str, np.ndarray],
    *,
    options: ModelOptions = ModelOptions(),
    source: str = "checkpoint",
):
    """Build a jaxvlm model from checkpoint tensors (torch layout, file keys) without random init."""
    flat = torch_to_jax(cfg, tensors, source=source)
    model = abstract_model(cfg, options)
    _materialise(model)
    load_flat_state(model, flat, source=source)
    return model


def _materialise(model: nnx.Module) -> None:
    # eval_shape leaves ShapeDtypeStructs; give every variable a real (zero) buffer to overwrite.
    state = nnx.state(model)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jnp.zeros(var.shape, var.dtype))
    nnx.update(model, state)


def load_nanovlm(directory, *, options: ModelOptions = ModelOptions(), strict_config: bool = True):
    """A nanoVLM directory, or a Hugging Face Hub repo id ("owner/name", `conversion.hub.resolve`)."""
    directory = hub.resolve(directory)
    cfg, tensors = read_checkpoint(directory, strict_config=strict_config)
    return model_from_torch_tensors(cfg, tensors, options=options, source=str(directory))


def save_nanovlm(model, directory, *, model_card: bool = False, repo_id: str | None = None) -> None:
    """config.json + model.safetensors (+ README.md, `conversion.model_card`, never over a user's)."""
    tensors = jax_to_torch(model.cfg, flat_state(model))
    if model_card:
        cards.check_writable(directory)  # before anything is written
    write_checkpoint(directory, model.cfg, tensors)
    if model_card:
        cards.write(directory, model.cfg, sum(t.size for t in tensors.values()), repo_id=repo_id)


# ---- orbax (the native jaxvlm format: config.json + an orbax tree of the NNX state) --------
def save_orbax(model, directory: str | Path) -> None:
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    state_dir = directory / ORBAX_STATE_DIR
    if state_dir.exists():
        raise CheckpointError(f"{state_dir} already exists; choose an empty output directory")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_dir, nnx.state(model))
    model.cfg.to_json(directory / CONFIG_FILE)


def load_orbax(directory: str | Path, *, options: ModelOptions = ModelOptions()):
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    cfg = read_config(directory)
    state_dir = directory / ORBAX_STATE_DIR
    if not state_dir.is_dir():
        raise CheckpointError(f"{directory} has no orbax state directory '{ORBAX_STATE_DIR}/'")
    model = abstract_model(cfg, options)
    graphdef, abstract_state = nnx.split(model)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(state_dir, abstract_state)
    except Exception as e:  # orbax raises many types, often with pages of detail: name the checkpoint and the cause
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
            f"cannot restore {state_dir} for config {directory / CONFIG_FILE}: {type(e).__name__}: {cause}"
        ) from None
    model = nnx.merge(graphdef, state)
    check_values({"/".join(map(str, k)): v for k, v in flat_state(model).items()}, source=str(state_dir))
    return model
