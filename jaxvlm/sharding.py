"""Device meshes, logical axis names, and the one table that maps logical names to mesh axes.

The mesh has three named axes, any of them of size 1:

- `data`: plain data parallelism. Batch rows are split; parameters and optimizer state are
  replicated (fast on one host: no all-gathers).
- `fsdp`: fully sharded data parallelism (ZeRO-3). Batch rows are split *and* every parameter
  and its Adam moments are sharded on their `embed` axis; XLA all-gathers a weight where it is
  used and reduce-scatters its gradient. This is the axis that lets a model outgrow one device.
- `tensor`: Megatron-style tensor parallelism of attention heads, MLP width and vocabulary.

Every parameter names its axes in NNX variable metadata (`out_sharding`, Flax 0.12's key, read
back with `nnx.get_partition_spec`), written with `logical(...)` where the layer is created:

    nnx.Linear(H, I, kernel_metadata=logical("embed", "mlp"), ...)   # kernel [H, I]

Key activations are pinned with `constrain(x, "batch", "length", None)`, a no-op unless a mesh is
active (`use_mesh`), so the model code is the same on one device and on many, and generation
(which never sets a mesh) is unaffected. `RULES` is the only place logical names meet mesh axes.

Resolution (`mesh_spec`): a logical name maps to its mesh axes, leaving out axes of size 1, axes
already used by an earlier dimension of the same array, and, from the end, axes whose product
does not divide the dimension (so `batch` over (data, fsdp) falls back to `data` alone, then to
replicated). Nothing is padded to fit a mesh; a dimension that does not divide is simply not
split (logged once per name and shape). The one exception is the batch with several processes,
where replication is impossible (each process holds only its rows): see `Trainer.place_batch`.
Tensor parallelism is efficient when `tensor` divides the head counts (a kernel split that is
not head-aligned is still correct; XLA reshards after the reshape to heads).

Shapes: A accumulation steps, B batch rows, P processes, D devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# The one rules table: logical axis -> mesh axes (in order; () = never split).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # batch rows (and images) of inputs and activations
    "embed": ("fsdp",),  # the model width of every weight: the FSDP shard of params and Adam moments
    "mlp": ("tensor",),  # MLP width (column-parallel up/gate/fc1, row-parallel down/fc2)
    "heads": ("tensor",),  # query heads x head_dim
    "kv_heads": ("tensor",),  # key/value heads x head_dim
    "vocab": ("tensor",),  # embedding rows / LM head columns
    "qkv": (),  # the ViT's fused [q | k | v] output: a tensor split would cut across q, k and v
    "patch": (),  # conv kernel spatial and channel axes
    "length": (),  # sequence / patch positions of activations
    "norm": (),  # norm scales and biases: small, replicated
}


def logical(*names: str | None) -> dict[str, Any]:
    """NNX variable metadata naming each axis of a parameter, e.g. `kernel_metadata=logical("embed", "mlp")`.

    `eager_sharding=False`: the model is built on one device as before (Flax would otherwise want
    a mesh at construction); `Trainer`/`place` put it on a mesh afterwards."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


# ---- the mesh -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) axes. One of them may be -1: all the devices the others
    leave. The default puts every device on `fsdp`: parameters and optimizer state are split
    D ways (memory scales down with devices) and batch rows are split D ways, as with `data`."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def sizes(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        name = f"mesh data={self.data} x fsdp={self.fsdp} x tensor={self.tensor}"
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"{name}: sizes must be positive, with at most one -1 (the rest of the devices)")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"{name}: {n_devices} device(s) are not a multiple of {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                f"devices, but there are {n_devices}"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, every process's).

    Devices are ordered process-major, so the batch axes (data, fsdp) run across processes
    and each process's devices hold one contiguous block of batch rows (what
    `jax.make_array_from_process_local_data` and the per-process data loader need). The
    tensor axis must therefore fit inside one process."""
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    shape = config.sizes(len(devices))
    n_proc = len({d.process_index for d in devices})
    if n_proc > 1 and (len(devices) // n_proc) % shape[2]:
        raise ValueError(
            f"mesh tensor={shape[2]} spans processes ({len(devices) // n_proc} devices each); "
            "keep the tensor axis inside one process"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def use_mesh(mesh: Mesh | None):
    """Context in which `constrain` pins activations to `mesh` (a no-op context for None)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


# ---- logical names -> mesh axes -------------------------------------------------------------------
@functools.cache
def _warn_unsplit(name: str, dim: int, axes: tuple) -> None:
    log.info("logical axis %r of size %d is not split over %s (not divisible)", name, dim, axes)


def mesh_spec(
    names, shape, mesh_shape: Mapping[str, int], rules: Mapping[str, tuple[str, ...]] = RULES
) -> PartitionSpec:
    """PartitionSpec of mesh axes for an array of `shape` whose axes are named `names` (see module doc).

    >>> mesh_spec(("embed", "mlp"), (64, 160), {"data": 2, "fsdp": 2, "tensor": 2})
    PartitionSpec('fsdp', 'tensor')
    >>> mesh_spec(("batch", None), (2, 48), {"data": 2, "fsdp": 4, "tensor": 1})  # 8 does not divide 2
    PartitionSpec('data', None)
    """
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in jaxvlm.sharding.RULES")
        axes = [a for a in rules[name] if a not in used and mesh_shape.get(a, 1) > 1]
        wanted = tuple(axes)
        while axes and dim % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        if len(axes) < len(wanted):
            _warn_unsplit(name, int(dim), wanted)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Pin activation `x` to the sharding its logical axis `names` give on the active mesh
    (`use_mesh`); unchanged when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_spec(names, x.shape, dict(mesh.shape)))


def tree_shardings(tree, mesh: Mesh):
    """A NamedSharding for every array of `tree` (a TrainState, nnx.State, optax state; arrays or
    ShapeDtypeStructs) from the logical names in its Variables' `out_sharding` metadata (what
    `nnx.get_partition_spec` reads; optax's moments inherit it); replicated when none."""
    shape = dict(mesh.shape)

    def one(x):
        if isinstance(x, nnx.Variable):  # its value may be an array or an empty node (optax's MaskedNode)
            names = x.get_metadata().get("out_sharding")
            return jax.tree.map(
                lambda a: NamedSharding(mesh, mesh_spec(names or (None,) * len(a.shape), a.shape, shape)), x
            )
        return NamedSharding(mesh, mesh_spec((None,) * len(x.shape), x.shape, shape))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(tree, shardings):
    """Put the host-identical arrays of `tree` on the mesh with `shardings` (same structure).
    With several processes every process must hold the same values (e.g. the same seeded init)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def gather(tree):
    """Every array of `tree` as a host numpy array holding the global value. With several
    processes this is a collective: every process must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ---- batches --------------------------------------------------------------------------------------
def batch_rows_per_process(mesh: Mesh) -> int:
    """How many batch-axis shards each process holds (data x fsdp / P): local row counts (and
    image counts, with several processes) must be multiples of it."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(n // jax.process_count(), 1)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays [A, B, ...] (this process's rows) -> global arrays on `mesh`, axis 1 ("batch")
    split over (data, fsdp), the accumulation axis and the rest replicated.

    One process: `images` [A, N_max, 3, S, S] are split over the batch axes as far as N_max
    divides (else replicated, see `mesh_spec`), like every other array. Several processes: the
    global arrays are the processes' blocks concatenated on axis 1 (process p's rows, then
    p+1's), built with `jax.make_array_from_process_local_data`; every array's axis 1 must then
    split evenly over the batch axes, so `Trainer.place_batch` pads the images to fit and
    rejects a row count that does not."""
    shape = dict(mesh.shape)
    n_proc = jax.process_count()
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        global_shape = (x.shape[0], x.shape[1] * n_proc) + x.shape[2:]
        spec = mesh_spec((None, "batch") + (None,) * (x.ndim - 2), global_shape, shape)
        sharding = NamedSharding(mesh, spec)
        if n_proc == 1:
            out[key] = jax.device_put(x, sharding)
            continue
        split = spec[1] if isinstance(spec[1], tuple) else (spec[1],) if spec[1] else ()
        if math.prod(shape[a] for a in split) != shape["data"] * shape["fsdp"]:
            raise ValueError(
                f"batch array {key!r}: {x.shape[1]} rows per process x {n_proc} processes do not split "
                f"over data x fsdp = {shape['data'] * shape['fsdp']} devices"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


# ---- processes ------------------------------------------------------------------------------------
def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """`jax.distributed.initialize` from flags, else the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); nothing when neither names more than one process.
    Must run before anything touches the devices. Returns whether it initialised."""
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    n = (
        num_processes
        if num_processes is not None
        else int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_NUM_PROCESSES")
        else None
    )
    pid = process_id if process_id is not None else int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None
    if n == 1 or (n is None and address is None):
        return False
    if address is None or n is None or pid is None:
        raise ValueError(
            "multi-process training needs --coordinator-address, --num-processes and --process-id "
            "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        )
    if not 0 <= pid < n:
        raise ValueError(f"--process-id {pid} is not in 0..{n - 1}")
    # CPU collectives across processes go through gloo (jax's default on recent releases; set
    # explicitly in case it is not). Harmless on GPU/TPU, where the accelerator's own are used.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    return True
