"""The jitted train step: forward, loss, backward, gradient accumulation, clipping and AdamW
with upstream nanoVLM's three parameter groups and per-group warmup + cosine schedules.

Everything but `train_step` is a named helper. Shapes: A accumulation steps, B micro-batch,
T sequence (one of a few bucketed lengths), N_max images per micro-batch (bucketed), S side.

On a mesh (`Trainer(model, ocfg, mesh=...)`, see `jaxvlm.sharding`) the same step runs SPMD:
the state lives sharded as the parameters' logical axes say, `place_batch` makes global batch
arrays split over the batch axes, and XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conversion.recipe import IGNORE_INDEX, OptimConfig

from . import layers, sharding
from .vision_language_model import VisionLanguageModel


def upstream_lr(step, max_lr: float, max_steps: int):
    """`conversion.recipe.upstream_lr` on traced steps (no Python branch on the value)."""
    step = jnp.asarray(step, jnp.float32)
    min_lr, warmup = max_lr * 0.1, max_steps * 0.03
    warm = max_lr * (step + 1) / warmup if warmup > 0 else jnp.float32(max_lr)
    ratio = jnp.clip((step - warmup) / max(max_steps - warmup, 1e-9), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (max_lr - min_lr)
    return jnp.where(step < warmup, warm, jnp.where(step > max_steps, min_lr, cosine))


def _key(path) -> str:
    """An NNX path (of keys or strings) as the dotted name `OptimConfig.param_group` reads."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def trainable_filter(ocfg: OptimConfig):
    """The parameters that train: by `OptimConfig.param_group` (frozen groups, and with LoRA all
    but the adapters and the modules to save, take no gradient and keep no optimizer state)."""
    return lambda path, x: isinstance(x, nnx.Param) and ocfg.param_group(_key(path)) is not None


def make_optimizer(ocfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by the global norm over all trained parameters, then AdamW per group."""
    lrs = ocfg.group_lrs()

    def adamw(max_lr):
        schedule = functools.partial(upstream_lr, max_lr=max_lr, max_steps=ocfg.max_training_steps)
        return optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: ocfg.param_group(_key(path)), params)

    groups = {g: adamw(lr) for g, lr in lrs.items() if lr > 0}
    chain = [optax.multi_transform(groups, labels)]
    if ocfg.max_grad_norm is not None:
        chain.insert(0, optax.clip_by_global_norm(ocfg.max_grad_norm))
    return optax.chain(*chain)


def loss_fn(model: VisionLanguageModel, batch: dict) -> jax.Array:
    """Mean cross-entropy (float32) of one micro-batch; labels are already shifted.

    With `batch["label_positions"]` int[B, K] (from `label_positions`), the head runs only on
    those K positions per row: every labelled position is among them, so the loss is the same
    as over all T positions, without the [B, T, V] logits (the head dominates a small model).
    """
    hidden = model.hidden_states(
        batch["input_ids"],
        batch.get("images"),
        batch["attention_mask"],
        batch.get("image_offsets"),
        segment_ids=batch.get("segment_ids"),  # packed rows (jaxvlm.data.packing)
        position_ids=batch.get("position_ids"),
    )
    labels = batch["labels"]
    if "label_positions" in batch:
        pos = batch["label_positions"]
        hidden = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # (B, K, H)
        labels = jnp.take_along_axis(labels, pos, axis=1)  # (B, K)
    return model.token_loss(model.decoder.logits(hidden), labels)


def label_positions(labels: np.ndarray, minimum: int = 8) -> np.ndarray:
    """Host-side: int32[B, K] positions per row, the labelled ones (label != IGNORE_INDEX) first, K the
    smallest power of two >= max labelled count per row (at least `minimum`, at most T), so
    the step compiles once per (T, N_max, K) bucket."""
    B, T = labels.shape
    valid = labels != IGNORE_INDEX
    need = int(valid.sum(axis=1).max(initial=0))
    K = minimum
    while K < need:
        K *= 2
    K = min(K, T)
    order = np.argsort(~valid, axis=1, kind="stable")  # labelled positions first, in order
    return order[:, :K].astype(np.int32)


def image_offsets(input_ids: np.ndarray, image_token_id: int, n_image_tokens: int, first: int = 0) -> np.ndarray:
    """Host-side: int32[..., B], the index in `images` of each row's first image (rows' images
    consecutive from `first`), counted from the image tokens of input_ids int[..., B, T]."""
    per_row = np.sum(input_ids == image_token_id, axis=-1) // n_image_tokens
    return (first + np.cumsum(per_row, axis=-1) - per_row).astype(np.int32)


@dataclasses.dataclass
class TrainState:
    """What a step reads and writes. `params`: trained parameters; `rest`: frozen parameters and
    buffers; `opt_state`: optax state of `params` only."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "rest", "opt_state"], meta_fields=[])


class Trainer:
    """Owns the graph definition, the optimizer and the compiled step.

    trainer = Trainer(model, OptimConfig(...), mesh=None); state = trainer.init_state(model)
    state, metrics = trainer.step(state, trainer.place_batch(batch))   # batch: host arrays [A, B, ...]

    With a `mesh` (`jaxvlm.sharding.make_mesh`) the state is placed with the shardings its
    logical axes give (`state_sharding`: parameters and Adam moments FSDP-sharded on `embed`,
    heads/MLP/vocab on `tensor`), the step's outputs are pinned to them, and `place_batch`
    splits the batch rows over (data, fsdp). The step itself is the same code on 1 device or N.
    """

    def __init__(self, model: VisionLanguageModel, ocfg: OptimConfig, mesh: jax.sharding.Mesh | None = None):
        self.ocfg, self.cfg, self.mesh = ocfg, model.cfg, mesh
        self.options = model.options  # its matmul precision covers the backward pass too
        self.tx = make_optimizer(ocfg)
        self.graphdef, params, rest = nnx.split(model, trainable_filter(ocfg), ...)
        self.compiles = 0
        self.state_sharding = None
        out_shardings = None
        if mesh is not None:
            abstract = jax.eval_shape(self._new_state, params, rest)
            self.state_sharding = sharding.tree_shardings(abstract, mesh)
            out_shardings = (self.state_sharding, sharding.replicated(mesh))
        self._jit_step = jax.jit(self._step, donate_argnums=(0,), out_shardings=out_shardings)
        self._jit_eval = None

    def _new_state(self, params, rest) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, rest, self.tx.init(params))

    def init_state(self, model: VisionLanguageModel) -> TrainState:
        """The step-0 state; on the mesh when there is one (every process must pass the same model)."""
        _, params, rest = nnx.split(model, trainable_filter(self.ocfg), ...)
        if self.mesh is None:
            return self._new_state(params, rest)
        params, rest = sharding.place((params, rest), (self.state_sharding.params, self.state_sharding.rest))
        return jax.jit(self._new_state, out_shardings=self.state_sharding)(params, rest)

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update (jitted, `state` donated); batch from `place_batch`, or host
        arrays without a mesh."""
        with sharding.use_mesh(self.mesh):
            return self._jit_step(state, batch)

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict:
        """This process's host batch {key: [A, B_local, ...]} -> what `step` takes.

        Adds `image_offsets` [A, B] (where each row's images start in the global `images`) and
        casts `images` to the model's compute dtype (what the ViT's first op does).
        With a mesh: global arrays split over the batch axes (`sharding.shard_batch`). With
        several processes the global batch is the processes' blocks in process order, so the
        offsets of process p start at p * N_max; local images are padded with zero images to
        a multiple of the batch shards per process (never read), and `label_positions` are
        widened to the largest K of any process, so that every process has the same shapes."""
        batch = dict(batch)
        n_proc, pid = jax.process_count(), jax.process_index()
        if n_proc > 1 and "images" in batch:
            # every process must give the same global shape: the most images any process has
            # (a loader that chose its image bucket alone, e.g. StreamLoader); the padding is never read
            from jax.experimental import multihost_utils

            images = batch["images"]
            most = int(np.max(multihost_utils.process_allgather(np.int32(images.shape[1]))))
            if most > images.shape[1]:
                pad = np.zeros((images.shape[0], most - images.shape[1]) + images.shape[2:], images.dtype)
                batch["images"] = np.concatenate([images, pad], 1)
        if n_proc > 1 and self.mesh is not None:
            per_proc = sharding.batch_rows_per_process(self.mesh)
            if batch["input_ids"].shape[1] % per_proc:
                raise ValueError(
                    f"{batch['input_ids'].shape[1]} batch rows per process do not split over this "
                    f"process's {per_proc} batch shards: use a batch size that is a multiple of {per_proc}"
                )
            if "images" in batch and batch["images"].shape[1] % per_proc:
                images = batch["images"]
                pad = per_proc - images.shape[1] % per_proc
                batch["images"] = np.concatenate(
                    [images, np.zeros((images.shape[0], pad) + images.shape[2:], images.dtype)], 1
                )
            if "label_positions" in batch:
                batch["label_positions"] = _agree_label_positions(batch["labels"], batch["label_positions"])
        if "images" in batch and jnp.dtype(self.options.compute_dtype) != batch["images"].dtype:
            # the ViT's first op casts the pixels to the compute dtype: cast before sending them
            # (bf16: half the bytes to the device, the same result)
            batch["images"] = np.asarray(batch["images"]).astype(self.options.compute_dtype)
        if "images" in batch:
            batch["image_offsets"] = image_offsets(
                batch["input_ids"],
                self.cfg.image_token_id,
                self.cfg.n_image_tokens,
                first=pid * batch["images"].shape[1],
            )
        return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh)

    def params_finite(self, state: TrainState) -> bool:
        """Every trained parameter finite (one jitted reduction; on a mesh, over the shards)."""
        with sharding.use_mesh(self.mesh):
            return bool(_all_finite(state.params))

    def eval_sums(self, state: TrainState, batch: dict) -> tuple[float, int]:
        """(summed token loss, labelled tokens) of a `place_batch`ed batch [1, B, ...]: the
        training loss without an update (validation)."""
        if self._jit_eval is None:
            self._jit_eval = jax.jit(self._eval)
        with sharding.use_mesh(self.mesh):
            total, count = self._jit_eval(state.params, state.rest, batch)
        return float(total), int(count)

    def _eval(self, params, rest, batch):
        micro = jax.tree.map(lambda x: x[0], batch)
        with self.options.precision():
            loss = loss_fn(nnx.merge(self.graphdef, params, rest), micro)
        count = jnp.sum(micro["labels"] != IGNORE_INDEX)
        return jnp.where(count > 0, loss * count, 0.0), count  # a batch of blank rows adds nothing

    def model(self, state: TrainState) -> VisionLanguageModel:
        return nnx.merge(self.graphdef, state.params, state.rest)

    def host_model(self, state: TrainState) -> VisionLanguageModel:
        """The model with every array gathered to host memory (a collective: every process calls it)."""
        params, rest = sharding.gather((state.params, state.rest))
        return nnx.merge(self.graphdef, params, rest)

    def _micro_grads(self, params, rest, micro, dropout_key=None):
        def f(p):
            with layers.dropout_key(dropout_key):  # LoRA dropout's masks (None: no dropout)
                return loss_fn(nnx.merge(self.graphdef, p, rest), micro)

        return jax.value_and_grad(f)(params)

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update from A micro-batches (leading axis of every batch array)."""
        self.compiles += 1  # runs only while tracing: counts compilations
        with self.options.precision():
            return self._update(state, batch)

    def _update(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        n_micro = batch["input_ids"].shape[0]

        def accumulate(grads, micro_and_index):
            micro, i = micro_and_index
            key = None  # LoRA dropout: masks a function of (step, micro-batch), so a resumed run repeats them
            if self.ocfg.lora is not None and self.ocfg.lora.dropout > 0:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), state.step), i)
            loss, g = self._micro_grads(state.params, state.rest, micro, key)
            return self._like_params(jax.tree.map(lambda a, b: a + b / n_micro, grads, g)), loss

        zeros = self._like_params(jax.tree.map(jnp.zeros_like, state.params))
        grads, losses = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(n_micro)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": jnp.mean(losses),
            "grad_norm": grad_norm,
            "tokens": jnp.sum(batch["attention_mask"]),
            **{
                f"lr_{g}": upstream_lr(state.step, lr, self.ocfg.max_training_steps)
                for g, lr in self.ocfg.group_lrs().items()
                if lr > 0
            },
        }
        return TrainState(state.step + 1, params, state.rest, opt_state), metrics

    def _like_params(self, tree):
        """Pin a params-shaped tree (gradients) to the parameters' shardings: with FSDP each
        micro-batch's gradients are reduce-scattered onto the parameter shards."""
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self.state_sharding.params)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _agree_label_positions(labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """label_positions [A, B, K] widened to the largest K of any process (a host collective)."""
    from jax.experimental import multihost_utils

    K = int(np.max(multihost_utils.process_allgather(np.int32(positions.shape[-1]))))
    if K == positions.shape[-1]:
        return positions
    A, B, T = labels.shape
    return label_positions(labels.reshape(A * B, T), minimum=K).reshape(A, B, -1)
