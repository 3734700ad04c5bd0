"""The device mesh and how arrays lie on it: pmap's data-parallel semantics as one jit.

Axis `data` splits batch rows (and their memory); axis `fsdp` splits batch rows too and,
for models too big to replicate, each parameter's largest divisible dimension.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ctx.errors import InputError
from ctx.nn.memory import Memory

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh with Auto axis types; mesh.data = -1 takes all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(mesh_cfg.fsdp)
    data = len(devices) // fsdp if mesh_cfg.data == -1 else int(mesh_cfg.data)
    if data < 1 or data * fsdp != len(devices):
        raise InputError(
            f"mesh.data={mesh_cfg.data} x mesh.fsdp={fsdp} does not fit the {len(devices)} "
            "available devices; set mesh.data=-1 or sizes whose product is the device count"
        )
    return Mesh(
        np.asarray(devices).reshape(data, fsdp),
        BATCH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def batch_sharding(mesh: Mesh, batch_axis: int, ndim: int) -> NamedSharding:
    """Shard axis `batch_axis` of an ndim-array over both mesh axes; replicate the rest."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def memory_shardings(mesh: Mesh):
    """Memory rows (axis 1 of mem/cmem, axis 0 of the masks) follow the batch."""
    return Memory(
        mem=batch_sharding(mesh, 1, 4),
        cmem=batch_sharding(mesh, 1, 4),
        mem_mask=batch_sharding(mesh, 0, 2),
        cmem_mask=batch_sharding(mesh, 0, 2),
    )


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """FSDP rule: split the largest dimension divisible by the fsdp size; else replicate."""
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or not shape:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_param_sharding(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape)), tree)


def global_batch_array(mesh: Mesh, local: np.ndarray, batch_axis: int) -> jax.Array:
    """Assemble the global array from this process's rows (all rows on one host)."""
    sharding = batch_sharding(mesh, batch_axis, local.ndim)
    global_shape = list(local.shape)
    global_shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def device_chunk(mesh: Mesh, chunk: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host chunk ([G, B_local, ...] arrays of this process's rows) as global arrays on the mesh."""
    return {k: global_batch_array(mesh, local, batch_axis=1) for k, local in chunk.items()}


def process_rows(batch_size: int) -> range:
    """The global batch rows this process loads (its devices hold exactly these)."""
    per_process = batch_size // jax.process_count()
    return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole (global) value of a batch-sharded array on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def check_batch_fits(batch_size: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise InputError(
            f"train.batch_size={batch_size} must be a multiple of the {shards} batch shards "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )


def tracing_on(mesh: Mesh | None):
    """Context in which a jitted function traces with `mesh` as its abstract mesh, so that code
    XLA cannot partition itself (the Pallas attention kernel) can shard_map over its axes."""
    return (
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
        if mesh is not None
        else contextlib.nullcontext()
    )
