"""Running a Pallas kernel where it belongs: compiled for its own platform, interpreted on any
other (the same kernel and numbers, slowly, so CPU tests check the code an accelerator runs),
and once per device under a mesh."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

# The name under which the layers' remat policy finds a kernel's forward outputs (out and its
# log-sum-exp), which it keeps: the backward needs only those, and recomputing them would rerun
# the whole forward kernel.
KERNEL_OUTPUTS = "pallas_attention_outputs"
# The name of a fused attention's head-major queries, keys and values, which the policy keeps
# too: rebuilding them in the backward repeats the head-major copies of the projections and the
# concatenation of memory and segment, passes over [H,B,T,K] that cost more than keeping them.
KERNEL_INPUTS = "fused_attention_inputs"


def on_platform(
    call: Callable, args: Sequence[Any], batch_axes: Sequence[Any], platform: str, **static
) -> Any:
    """`call(*args, **static, interpret=...)`: compiled when lowered for `platform` ('tpu',
    'cuda'), interpreted elsewhere. `jax.lax.platform_dependent` picks per lowering platform, so
    compiling ahead of time for a TPU or GPU on a CPU machine lowers the real kernel.

    XLA cannot partition a Pallas call, so under a device mesh (the abstract mesh the trainer
    and evaluation trace in) each device runs the kernel on its own batch rows: heads and rows
    are independent, the tables and biases are the same for all. `batch_axes` mirrors `args`
    (an arg may be a pytree, such as a NamedTuple of operands): the batch axis of each operand,
    None where it is the same on every device; every result is [H, B, ...]."""

    def run(*local):
        return jax.lax.platform_dependent(
            *local,
            **{platform: functools.partial(call, **static, interpret=False)},
            default=functools.partial(call, **static, interpret=True),
        )

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(*args)
    in_specs = jax.tree.map(
        lambda axis: P() if axis is None else P(*([None] * axis), mesh.axis_names),
        tuple(batch_axes),
        is_leaf=lambda axis: axis is None,
    )
    return jax.shard_map(
        run, mesh=mesh, in_specs=in_specs, out_specs=P(None, mesh.axis_names), check_vma=False
    )(*args)
