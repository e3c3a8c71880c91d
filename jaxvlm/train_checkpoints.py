"""Training checkpoints with orbax: the whole TrainState (trained params, frozen params and
buffers, optimizer state, step) plus a JSON record (data-loader position, RNG, run config).

Orbax writes each step into a temporary directory and renames it into place only when it is
complete, so a crash (even SIGKILL) mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .train import TrainState

log = logging.getLogger(__name__)


class TrainCheckpoints:
    """save(step, state, meta) every N steps, keep the last k; restore the latest."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        # A partial `<step>.orbax-checkpoint-tmp` left by a failed save is ignored by latest_step() and
        # replaced when that step is saved again. (cleanup_tmp_directories=True races the aborted
        # save's still-running writer threads when a manager is reopened in the same process.)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore into the shapes/dtypes/shardings of `abstract_state` (e.g. the fresh state).

        The shardings are the target's, not the saver's: a checkpoint written on one mesh (or
        number of processes) restores onto another, every process reading just its shards."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()
