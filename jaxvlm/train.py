"""The jitted train step: forward, loss, backward, gradient accumulation, clipping and AdamW
with upstream nanoVLM's three parameter groups and per-group warmup + cosine schedules.

Everything but `train_step` is a named helper. Shapes: A accumulation steps, B micro-batch,
T sequence (one of a few bucketed lengths), N_max images per micro-batch (bucketed), S side.
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

from conversion.config import GROUPS, OptimConfig

from .vision_language_model import VisionLanguageModel, cross_entropy




def upstream_lr(step, max_lr: float, max_steps: int):
    """Upstream's `get_lr`: linear warmup over 3% of max_steps (lr = max_lr*(step+1)/warmup, which
    overshoots max_lr when warmup < 1 step, as upstream does), cosine decay to 0.1*max_lr at
    max_steps, then flat. Works on traced steps (no Python branch on the value)."""
    step = jnp.asarray(step, jnp.float32)
    min_lr, warmup = max_lr * 0.1, max_steps * 0.03
    warm = max_lr * (step + 1) / warmup if warmup > 0 else jnp.float32(max_lr)
    ratio = jnp.clip((step - warmup) / max(max_steps - warmup, 1e-9), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (max_lr - min_lr)
    return jnp.where(step < warmup, warm, jnp.where(step > max_steps, min_lr, cosine))


def trained_groups(ocfg: OptimConfig) -> tuple[str, ...]:
    lrs = ocfg.group_lrs()
    return tuple(module for module, group in GROUPS.items() if lrs[group] > 0)


def trainable_filter(ocfg: OptimConfig):
    groups = trained_groups(ocfg)
    return lambda path, x: isinstance(x, nnx.Param) and path[0] in groups


def make_optimizer(ocfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by the global norm over all trained parameters, then AdamW per group."""
    lrs = ocfg.group_lrs()

    def adamw(max_lr):
        schedule = functools.partial(upstream_lr, max_lr=max_lr, max_steps=ocfg.max_training_steps)
        return optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: GROUPS[path[0].key], params)

    groups = {GROUPS[m]: adamw(lrs[GROUPS[m]]) for m in trained_groups(ocfg)}
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
    hidden = model.hidden_states(batch["input_ids"], batch.get("images"), batch["attention_mask"])
    labels = batch["labels"]
    if "label_positions" in batch:
        pos = batch["label_positions"]
        hidden = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # (B, K, H)
        labels = jnp.take_along_axis(labels, pos, axis=1)  # (B, K)
    return cross_entropy(model.decoder.logits(hidden), labels)


def label_positions(labels: np.ndarray, minimum: int = 8) -> np.ndarray:
    """Host-side: int32[B, K] positions per row, the labelled ones (label != -100) first, K the
    smallest power of two >= max labelled count per row (at least `minimum`, at most T), so
    the step compiles once per (T, N_max, K) bucket."""
    B, T = labels.shape
    valid = labels != -100
    need = int(valid.sum(axis=1).max(initial=0))
    K = minimum
    while K < need:
        K *= 2
    K = min(K, T)
    order = np.argsort(~valid, axis=1, kind="stable")  # labelled positions first, in order
    return order[:, :K].astype(np.int32)


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

    trainer = Trainer(model, OptimConfig(...)); state = trainer.init_state(model)
    state, metrics = trainer.step(state, batch)   # batch arrays carry a leading accumulation axis
    """

    def __init__(self, model: VisionLanguageModel, ocfg: OptimConfig):
        self.ocfg = ocfg
        self.tx = make_optimizer(ocfg)
        self.graphdef, _, _ = nnx.split(model, trainable_filter(ocfg), ...)
        self.compiles = 0
        self.step = jax.jit(self._step, donate_argnums=(0,))

    def init_state(self, model: VisionLanguageModel) -> TrainState:
        _, params, rest = nnx.split(model, trainable_filter(self.ocfg), ...)
        return TrainState(jnp.zeros((), jnp.int32), params, rest, self.tx.init(params))

    def model(self, state: TrainState) -> VisionLanguageModel:
        return nnx.merge(self.graphdef, state.params, state.rest)

    def _micro_grads(self, params, rest, micro):
        def f(p):
            return loss_fn(nnx.merge(self.graphdef, p, rest), micro)

        return jax.value_and_grad(f)(params)

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update from A micro-batches (leading axis of every batch array)."""
        self.compiles += 1  # runs only while tracing: counts compilations
        n_micro = batch["input_ids"].shape[0]

        def accumulate(grads, micro):
            loss, g = self._micro_grads(state.params, state.rest, micro)
            return jax.tree.map(lambda a, b: a + b / n_micro, grads, g), loss

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(accumulate, zeros, batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.mean(losses), "grad_norm": grad_norm,
                   "tokens": jnp.sum(batch["attention_mask"]),
                   **{f"lr_{g}": upstream_lr(state.step, lr, self.ocfg.max_training_steps)
                      for g, lr in self.ocfg.group_lrs().items() if lr > 0}}
        return TrainState(state.step + 1, params, state.rest, opt_state), metrics


def stack_micro_batches(micro_batches: list[dict]) -> dict:
    """[{k: [B, ...]}] * A -> {k: [A, B, ...]} (all micro-batches must share a bucket shape)."""
    keys = [k for k in micro_batches[0] if isinstance(micro_batches[0][k], np.ndarray)]
    return {k: np.stack([mb[k] for mb in micro_batches]) for k in keys}
