"""Flash-style attention with an additive bias, as a Pallas TPU kernel (Mosaic), for the
relative attention's `attention_impl="pallas_tpu"`.

The probabilities never reach HBM: each (query block, key block) tile computes its logits
q·k + bias in VMEM, folds them into a running softmax (row maximum, row sum, weighted values)
and moves on; the forward writes the output, one log-sum-exp per query and the attention each
query gives each key range (the memory-kind metrics). The backward
recomputes each tile's probabilities from that log-sum-exp and accumulates the key and value
gradients over the query blocks; the query gradient comes out as one partial sum per key block
(summed by XLA: a few query-sized arrays instead of a second pass over the tiles), and the
logits' gradient is the bias's gradient, written once per tile, from which XLA's autodiff
returns the position term's gradient (un-shift, position kernels, v biases).

Layout is head-major, as the segment path makes it: q [H,B,N,K], k and v [H,B,T,K], bias
[H,B,N,T] (the shifted position term with the mask folded in as a large negative value). The
query q is already scaled and carries u (so the kernel's scale is 1).

On a TPU backend the kernel lowers through Mosaic; on any other it runs in Pallas interpret
mode (same kernel, same numbers, slowly), so CPU tests check the very code a TPU runs.
`jax.lax.platform_dependent` picks per lowering platform, so compiling ahead of time for a TPU
topology on a CPU machine lowers the Mosaic kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

# TPU tiles: the last two dimensions of a block are multiples of (8, 128) or the whole axis.
_KEY_BLOCKS = (512, 256, 128)
_QUERY_BLOCKS = (256, 128, 64, 32, 16, 8)


def _block(length: int, choices: tuple[int, ...]) -> int:
    """The largest block size in `choices` that divides `length`, else the whole axis."""
    return next((b for b in choices if b <= length and length % b == 0), length)


def block_sizes(n_queries: int, n_keys: int) -> tuple[int, int]:
    return _block(n_queries, _QUERY_BLOCKS), _block(n_keys, _KEY_BLOCKS)


def _logits(q_ref, k_ref, bias_ref) -> jax.Array:
    """One tile's logits q·k + bias, in float32."""
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s + bias_ref[...].astype(jnp.float32)


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, out_ref, lse_ref, mass_ref, max_ref, sum_ref, acc_ref,
                    mass_acc, *, key_block_size: int, ranges: tuple[tuple[int, int], ...]):
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _start():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        mass_acc[...] = jnp.zeros(mass_acc.shape, jnp.float32)

    s = _logits(q_ref, k_ref, bias_ref)
    previous = max_ref[...]
    new_max = jnp.maximum(previous, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - new_max)
    rescale = jnp.exp(previous - new_max)
    sum_ref[...] = rescale * sum_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
    acc_ref[...] = rescale * acc_ref[...] + jnp.dot(p.astype(v_ref.dtype), v_ref[...],
                                                    preferred_element_type=jnp.float32)
    max_ref[...] = new_max
    # The attention each query gives each key range (cmem, mem, segment): row sums of the same
    # unnormalised probabilities, one lane per range, rescaled like the row sum.
    key = key_block * key_block_size + jax.lax.broadcasted_iota(jnp.int32, p.shape, 1)
    lane = jax.lax.broadcasted_iota(jnp.int32, mass_acc.shape, 1)
    tile_mass = jnp.zeros(mass_acc.shape, jnp.float32)
    for r, (lo, hi) in enumerate(ranges):
        in_range = jnp.sum(jnp.where((key >= lo) & (key < hi), p, 0.0), axis=-1, keepdims=True)
        tile_mass = tile_mass + jnp.where(lane == r, in_range, 0.0)
    mass_acc[...] = rescale * mass_acc[...] + tile_mass

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():
        out_ref[...] = (acc_ref[...] / sum_ref[...]).astype(out_ref.dtype)
        lse_ref[...] = max_ref[...] + jnp.log(sum_ref[...])
        mass_ref[...] = mass_acc[...] / sum_ref[...]


def _backward_kernel(q_ref, k_ref, v_ref, bias_ref, lse_ref, delta_ref, dout_ref,
                     dq_ref, dk_ref, dv_ref, dbias_ref, dk_acc, dv_acc):
    query_block = pl.program_id(3)

    @pl.when(query_block == 0)
    def _start():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    p = jnp.exp(_logits(q_ref, k_ref, bias_ref) - lse_ref[...])
    dout = dout_ref[...]
    dv_acc[...] += jax.lax.dot_general(p.astype(dout.dtype), dout, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(dout, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dbias_ref[...] = ds.astype(dbias_ref.dtype)
    ds_low = ds.astype(q_ref.dtype)
    dk_acc[...] += jax.lax.dot_general(ds_low, q_ref[...], (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    dq_ref[...] = jnp.dot(ds_low, k_ref[...], preferred_element_type=jnp.float32)

    @pl.when(query_block == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _cost(q, k, bias, backward: bool, n_ranges: int = 0) -> pl.CostEstimate:
    """What one call moves between HBM and VMEM and computes, per head and batch row. A block
    whose index does not change along the inner grid axis is fetched once; the others once per
    outer block. Forward: q once, k and v once per query block, the bias once; out, the
    log-sum-exp and the range masses written once; two GEMMs (q·k, p·v). Backward: k, v and the
    bias once, q, dout, the log-sum-exp and delta once per key block; dk, dv and the bias
    gradient written once, the float32 dq partials once per key block; five GEMMs (q·k again,
    pᵀ·dout, dout·vᵀ, dsᵀ·q, ds·k)."""
    H, B, N, K = q.shape
    T = k.shape[2]
    bq, bk = block_sizes(N, T)
    item, rows = q.dtype.itemsize, H * B
    scores = N * T * bias.dtype.itemsize
    if backward:
        per_row = (2 * T * K * item + scores + (T // bk) * (2 * N * K * item + 2 * N * 4)
                   + 2 * T * K * item + scores + (T // bk) * N * K * 4)
        gemms = 5
    else:
        per_row = N * K * item + (N // bq) * 2 * T * K * item + scores + N * K * item + N * 4 * (1 + n_ranges)
        gemms = 2
    return pl.CostEstimate(flops=2 * gemms * rows * N * T * K, transcendentals=rows * N * T,
                           bytes_accessed=int(rows * per_row))


# Heads, batch rows and the outer block axis are independent; the inner one is a reduction.
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _grid(q, k, queries_outer: bool):
    """The grid (h, b, outer block, inner block) and the block specs of its operands: the
    forward streams key blocks past each query block, the backward query blocks past each key
    block. `at` turns an index map of (h, b, query block i, key block j) into the grid's."""
    H, B, N, K = q.shape
    T = k.shape[2]
    bq, bk = block_sizes(N, T)

    def at(index):
        return lambda h, b, x, y: index(h, b, *((x, y) if queries_outer else (y, x)))

    specs = {"query": pl.BlockSpec((None, None, bq, K), at(lambda h, b, i, j: (h, b, i, 0))),
             "key": pl.BlockSpec((None, None, bk, K), at(lambda h, b, i, j: (h, b, j, 0))),
             "tile": pl.BlockSpec((None, None, bq, bk), at(lambda h, b, i, j: (h, b, i, j))),
             "row": pl.BlockSpec((None, None, bq, 1), at(lambda h, b, i, j: (h, b, i, 0)))}
    grid = (H, B, N // bq, T // bk) if queries_outer else (H, B, T // bk, N // bq)
    return grid, specs, at


def _forward_call(q, k, v, bias, ranges, interpret: bool):
    grid, spec, at = _grid(q, k, queries_outer=True)
    bq, K = spec["query"].block_shape[2:]
    mass = pl.BlockSpec((None, None, bq, len(ranges)), at(lambda h, b, i, j: (h, b, i, 0)))
    kernel = functools.partial(_forward_kernel, key_block_size=spec["key"].block_shape[2], ranges=ranges)
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[spec["query"], spec["key"], spec["key"], spec["tile"]], out_specs=[spec["query"], spec["row"], mass],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3] + (1,), jnp.float32),
                   jax.ShapeDtypeStruct(q.shape[:3] + (len(ranges),), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, K), jnp.float32), pltpu.VMEM((bq, len(ranges)), jnp.float32)],
        compiler_params=_SEMANTICS, cost_estimate=_cost(q, k, bias, backward=False, n_ranges=len(ranges)),
        interpret=interpret, name="relative_attention_forward",
    )(q, k, v, bias)


def _backward_call(q, k, v, bias, lse, delta, dout, interpret: bool):
    grid, spec, at = _grid(q, k, queries_outer=False)
    bq, K = spec["query"].block_shape[2:]
    bk = spec["key"].block_shape[2]
    key_blocks = grid[2]
    partial_dq = pl.BlockSpec((None, None, None, bq, K), at(lambda h, b, i, j: (j, h, b, i, 0)))
    dq_parts, dk, dv, dbias = pl.pallas_call(
        _backward_kernel, grid=grid,
        in_specs=[spec["query"], spec["key"], spec["key"], spec["tile"], spec["row"], spec["row"], spec["query"]],
        out_specs=[partial_dq, spec["key"], spec["key"], spec["tile"]],
        out_shape=[jax.ShapeDtypeStruct((key_blocks,) + q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(bias.shape, bias.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, K), jnp.float32), pltpu.VMEM((bk, K), jnp.float32)],
        compiler_params=_SEMANTICS, cost_estimate=_cost(q, k, bias, backward=True), interpret=interpret,
        name="relative_attention_backward",
    )(q, k, v, bias, lse, delta, dout)
    return jnp.sum(dq_parts, axis=0).astype(q.dtype), dk, dv, dbias


def _on_platform(call, *args, **static):
    """`call(*args, **static, interpret=...)`: the Mosaic kernel when lowered for TPU,
    interpreted elsewhere.

    XLA cannot partition a Mosaic call, so under a device mesh (the abstract mesh the trainer
    and evaluation trace in) each device runs the kernel on its own batch rows: every operand
    is [H, B, ...] with the batch sharded over the mesh's axes, heads and rows independent."""
    def run(*local):
        return jax.lax.platform_dependent(*local, tpu=functools.partial(call, **static, interpret=False),
                                          default=functools.partial(call, **static, interpret=True))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(*args)
    rows = P(None, mesh.axis_names)
    return jax.shard_map(run, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def flash_attention(q_HBNK: jax.Array, k_HBTK: jax.Array, v_HBTK: jax.Array, bias_HBNT: jax.Array,
                    key_ranges: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """softmax(q·kᵀ + bias)·v per head and batch row, [H,B,N,K], without the probabilities in
    HBM; and the attention each query gives each range of keys, [H,B,N,R], split at the
    `key_ranges` boundaries (R = len(key_ranges) + 1; a statistic, with no gradient)."""
    return _forward(q_HBNK, k_HBTK, v_HBTK, bias_HBNT, key_ranges)[0]


def _ranges(key_ranges: tuple[int, ...], n_keys: int) -> tuple[tuple[int, int], ...]:
    bounds = (0, *key_ranges, n_keys)
    return tuple(zip(bounds[:-1], bounds[1:]))


def _forward(q, k, v, bias, key_ranges):
    out, lse, mass = _on_platform(_forward_call, q, k, v, bias, ranges=_ranges(key_ranges, k.shape[2]))
    return (out, mass), (q, k, v, bias, out, lse)


def _backward(key_ranges, residuals, cotangents):
    q, k, v, bias, out, lse = residuals
    dout = cotangents[0]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    return _on_platform(_backward_call, q, k, v, bias, lse, delta, dout.astype(q.dtype))


flash_attention.defvjp(_forward, _backward)
