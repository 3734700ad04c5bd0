"""Flash-style relative attention as a Pallas TPU kernel (Mosaic), for the relative
attention's `attention_impl="pallas_tpu"`: neither the probabilities nor the position term
reach HBM.

Each (query block, key block) tile computes in VMEM the content logits (q + u)·k, the position
term (q + v)·R of its queries against the window of distances its keys span (one GEMM against
the projected sinusoid table, which stays in VMEM for the head, then skewed onto the keys by a
row-strided rotation, `pltpu.roll(stride=1)`: row i moves by i more than row i-1, which is
exactly Transformer-XL's relative shift inside a tile) and the mask (the memory-validity row
and the causal offset), folds them into a running softmax (row maximum, row sum, weighted
values) and moves on. The forward writes the output, one log-sum-exp per query and the
attention each query gives each key range (cmem, mem, segment: the memory-kind metrics), the
statistics as rows (lane-dense; the kernels transpose them in VMEM, see `_columns`); when
asked, a third kernel recomputes the probabilities of a range of keys from that log-sum-exp and
sums them over the queries (the attention each key receives: `most_used` compression). The
backward recomputes each tile's probabilities from that log-sum-exp, accumulates the key and
value gradients over the query blocks, and keeps in VMEM across the key blocks what a whole
(head, row) accumulates: the query gradient and the position term's gradients. Those come from
the logits' gradient laid back onto the tile's window of the table (the inverse of the skew:
stride -1, which Mosaic does not lower, so the tile's rows are reversed first, by a product with
the exchange matrix, and the forward's stride-1 rotation undoes the skew of reversed rows), then
two GEMMs against the window: the queries' gradient and the window rows' of the table. Nothing
score-sized leaves the kernel in either direction.

Attention dropout happens in the tile too: whether a weight survives is a hash of (the batch
row's seed, head, query, key), `kept_weights`, so the backward regenerates the forward's mask
from indices alone and nothing of it reaches HBM. Integer hashing is ordinary vector code that
runs alike in Mosaic and in interpret mode (the TPU's hardware PRNG has no interpreter here), and
the row seeds are made from the global row index before the kernel is split across devices, so
a row's mask does not depend on the mesh. They reach the kernel by scalar prefetch (SMEM, once
per call), not as a 4-byte block copied at every grid step (small HBM-to-VMEM copies have read
back zeros on some libtpu versions, which would repeat one mask everywhere unnoticed), and
without dropout no seed is passed at all. `ctx.selfcheck` proves the masks on the device. The
softmax statistics (log-sum-exp, range masses, key usage) are those of the undropped weights, as
in the XLA path.

The operands and their layout are the contract's (`ctx.nn.fused_attention`, which holds the
public `flash_attention`: pass it `KERNELS`).

On a TPU backend the kernel lowers through Mosaic; on any other it runs in Pallas interpret
mode (slowly), so CPU tests check the code a TPU runs: the same kernel but for three helpers
(`_skew`, `_reverse_rows`, `_unskew_reversed`) that take, interpreted, XLA ops equal to the
Mosaic ones the interpreter cannot run (tests/test_pallas_tpu.py pins each equivalence).
`jax.lax.platform_dependent` picks per lowering platform, so compiling ahead of time for a TPU
topology on a CPU machine lowers the Mosaic kernel. XLA cannot partition a Mosaic call, so under
a mesh (the trainer and evaluation trace with their abstract mesh) it runs in a `shard_map` over
the batch rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ctx.nn.fused_attention import AttentionOperands, FusedKernels, KeyLayout
from ctx.nn.fused_attention import dropped, output_delta, range_masses
from ctx.nn.ops import MASKED_LOGIT
from ctx.nn.pallas_launch import on_platform

# TPU tiles: the last two dimensions of a block are multiples of (8, 128) or the whole axis.
_KEY_BLOCKS = (512, 384, 256, 128)  # 384: enwik8's lengths (1,152, 768) take no 256 or 512
_QUERY_BLOCKS = (256, 128, 64, 32, 16, 8)
_LANES = 128

# The kernel skews its position band with a row-strided lane rotation, which Mosaic lowers on
# TPU v5 and later only (`ctx.nn.attention_policy` keeps 'auto' off older chips).
FIRST_TPU_GENERATION = 5


def _block(length: int, choices: tuple[int, ...]) -> int:
    """The largest block size in `choices` that divides `length`, else the whole axis."""
    return next((b for b in choices if b <= length and length % b == 0), length)


def block_sizes(n_queries: int, n_keys: int, n_cmem: int = 0) -> tuple[int, int]:
    """Query and key blocks; key blocks that end where the compressed memory does are preferred
    (a tile that holds both kinds of key computes the position term against two tables)."""
    key_block = _block(n_keys, _KEY_BLOCKS)
    whole = _block(n_keys, tuple(b for b in _KEY_BLOCKS if n_cmem % b == 0))
    return _block(n_queries, _QUERY_BLOCKS), whole if whole < n_keys else key_block


@dataclasses.dataclass(frozen=True)
class Tiling(KeyLayout):
    """A call's keys (`KeyLayout`) and its tiles (static)."""

    query_block: int
    key_block: int
    interpret: bool = False  # run by Pallas' interpreter, not Mosaic (see _skew)

    @classmethod
    def of(cls, keys: KeyLayout, n_keys: int, interpret: bool = False) -> "Tiling":
        blocks = block_sizes(keys.n_queries, n_keys, keys.n_cmem)
        return cls(keys.n_cmem, keys.n_mem, keys.n_queries, keys.dropout, *blocks, interpret)

    @property
    def window(self) -> int:
        """Distances one tile spans (query_block + key_block - 1), in whole lane groups."""
        return -(-(self.query_block + self.key_block - 1) // _LANES) * _LANES

    @property
    def straddles(self) -> bool:
        """Whether a key block can hold both compressed-memory and memory keys, whose
        distances come from different tables (then a tile computes both and picks per key)."""
        return self.n_cmem % self.key_block != 0

    @property
    def aligned(self) -> bool:
        """Whether every window starts on a sublane group (the tiles are TPU-sized)."""
        return all(
            x % 8 == 0 for x in (self.n_queries, self.query_block, self.key_block, self.n_cmem)
        )

    def padded_rows(self, rows: int) -> int:
        """Table rows with zeros after the last, so the windows of the future keys (masked)
        stay inside it."""
        return -(-(rows + self.n_queries + self.window) // 8) * 8


class _Inputs(NamedTuple):
    """The attention operands in the order the kernels take them: as arrays (u [H,1,K], two v
    bias rows, the float32 table with zero rows after it, validity int32 [B,1,T]), as their
    block specs, as batch axes, or as refs in a kernel. The usage kernel reads no v (None)."""

    q: Any
    u: Any
    v_biases: Any
    tables: Any
    visible: Any
    k: Any
    v: Any


class _ForwardOutputs(NamedTuple):
    out: Any  # [H,B,N,K]
    lse: Any  # [H,B,1,N]: the log-sum-exp per query, as a row
    masses: Any  # [H,B,3,N]: the attention each query gives each key range, as rows


class _ForwardScratch(NamedTuple):
    row_max: Any  # [bq, 1]
    row_sum: Any  # [bq, 1]
    acc: Any  # [bq, K]: the weighted values
    masses: Any  # [bq, 3]


class _Statistics(NamedTuple):
    lse_and_delta: Any  # [H,B,2,N]: the log-sum-exp and rowsum(dout∘out), as rows
    dout: Any  # [H,B,N,K]


class _Gradients(NamedTuple):
    dq: Any  # [H,B,N,K]
    du: Any  # [H,devices,1,K] float32, each device's rows summed
    dtables: Any  # [H,devices,P',K] float32
    dv_biases: Any  # [H,devices,2,K] float32
    dk: Any  # [H,B,T,K]
    dv: Any  # [H,B,T,K]


class _BackwardScratch(NamedTuple):
    dk: Any  # [bk, K]: over the query blocks
    dv: Any  # [bk, K]
    dq: Any  # [N, K]: over the (head, row)'s key and query blocks
    dq_position: Any  # [N, K]: the position term's, each query block's rows reversed


class _PositionGradients(NamedTuple):
    """What a tile adds the position term's gradient to (refs)."""

    dq: Any  # the (head, row)'s dq_position scratch
    dtables: Any
    dv_biases: Any


# The batch axis of each operand (None: the same on every device); every result is [H, B, ...].
_INPUT_BATCH_AXES = _Inputs(q=1, u=None, v_biases=None, tables=None, visible=0, k=1, v=1)
_STATISTICS_BATCH_AXES = _Statistics(lse_and_delta=1, dout=1)
_SEEDS_BATCH_AXIS = 0
_USAGE_AXES = (_INPUT_BATCH_AXES._replace(v=None), 1)  # the usage kernel reads no v; lse


def _dropout_scale(seed_ref, first_query, first_key, tiling: Tiling) -> jax.Array | None:
    """[bq, bk]: dropout's scale of the tile's weights (`KeyLayout.dropout_scale`); None without
    dropout. The row seeds are prefetched; the grid is (head, row, ...)."""
    if not tiling.dropout:
        return None
    query = first_query + jax.lax.broadcasted_iota(jnp.int32, (tiling.query_block, 1), 0)
    key = first_key + jax.lax.broadcasted_iota(jnp.int32, (1, tiling.key_block), 1)
    return tiling.dropout_scale(seed_ref[pl.program_id(1)], pl.program_id(0), query, key)


def _skew(band, tiling: Tiling):
    """Row i of the tile's band [bq, window] moved left by bq-1-i, keeping the key block's
    columns: out[i, j] = band[i, j + bq-1-i]. On TPU one row-strided rotation
    (`pltpu.roll(stride=1)`: row i by i more than row i-1). Interpreted, the same values by one
    gather: JAX's interpreter splits a strided roll into one roll per row, and a program of
    hundreds of rolls per tile is so large that XLA:CPU's loader of a cached executable
    overflows its stack (a segfault on the second run of the same program)."""
    if not tiling.interpret:
        return pltpu.roll(band, tiling.window - tiling.query_block + 1, 1, stride=1, stride_axis=0)[
            :, : tiling.key_block
        ]
    rows = jax.lax.broadcasted_iota(jnp.int32, (tiling.query_block, tiling.key_block), 0)
    columns = jax.lax.broadcasted_iota(jnp.int32, (tiling.query_block, tiling.key_block), 1)
    return jnp.take_along_axis(band, columns + tiling.query_block - 1 - rows, axis=1)


def _window_rows(first_query, first_virtual_key, tiling: Tiling):
    """The table rows of the distances a tile spans (see `_skewed_window`)."""
    start = first_virtual_key + tiling.n_queries - first_query - tiling.query_block
    if tiling.aligned:
        start = pl.multiple_of(start, 8)
    return pl.ds(start, tiling.window)


def _reverse_rows(x: jax.Array, tiling: Tiling, dtype) -> jax.Array:
    """x [n, m] with its rows in reverse order, in `dtype`. Mosaic lowers no `rev`, so on TPU a
    product with the exchange matrix (exact: each entry is one entry of x times 1);
    interpreted, a flip."""
    if tiling.interpret:
        return jnp.flip(x, 0).astype(dtype)
    n = x.shape[0]
    exchange = (
        jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
        + jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
        == n - 1
    ).astype(x.dtype)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(exchange, x, precision=precision, preferred_element_type=jnp.float32).astype(
        dtype
    )


def _unskew_reversed(grad, tiling: Tiling):
    """The inverse of `_skew`, with the rows in reverse order: a tile's logits' gradient
    [bq, bk] laid back onto its band window [bq, window] (row i moved right by bq-1-i, zeros
    around), row i landing in row bq-1-i. Unreversed, the inverse rotation has stride -1, which
    Mosaic does not lower; with the rows reversed, row bq-1-i moves right by bq-1-i, which is
    the forward's row-strided rotation (stride 1; Mosaic rotates 32-bit values only, so in
    float32). Interpreted, the same values by a gather."""
    bq, bk, window = tiling.query_block, tiling.key_block, tiling.window
    padded = jnp.concatenate(
        [_reverse_rows(grad, tiling, jnp.float32), jnp.zeros((bq, window - bk), jnp.float32)],
        axis=1,
    )
    if not tiling.interpret:
        return pltpu.roll(padded, 0, 1, stride=1, stride_axis=0)
    rows = jax.lax.broadcasted_iota(jnp.int32, (bq, window), 0)
    source = jax.lax.broadcasted_iota(jnp.int32, (bq, window), 1) - rows
    gathered = jnp.take_along_axis(padded, jnp.clip(source, 0, window - 1), axis=1)
    return jnp.where((source >= 0) & (source < bk), gathered, jnp.zeros_like(gathered))


def _position_gradient(
    grad,
    q,
    inputs: _Inputs,
    into: _PositionGradients,
    *,
    rows,
    first_query,
    first_virtual_key,
    table,
    tiling: Tiling,
):
    """Accumulate the gradients of one table's part of a tile's position term, (q + v)·R[window]
    skewed, from its logits' gradient `grad` [bq, bk] (compute dtype): the queries' (rows
    reversed within the query block, as `_unskew_reversed` leaves them), the window's table rows,
    and the table's v bias (row `table` of dv_biases). Nothing score-sized leaves the kernel."""
    window_rows = _window_rows(first_query, first_virtual_key, tiling)
    band_grad = _unskew_reversed(grad, tiling).astype(q.dtype)  # [bq, window], rows reversed
    window = inputs.tables[window_rows, :].astype(q.dtype)
    dq = jnp.dot(band_grad, window, preferred_element_type=jnp.float32)
    into.dq[rows, :] += dq
    v_row = jnp.where(table == 0, inputs.v_biases[0:1, :], inputs.v_biases[1:2, :])
    into.dtables[window_rows, :] += jax.lax.dot_general(
        band_grad,
        _reverse_rows(q + v_row, tiling, q.dtype),
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    which = jax.lax.broadcasted_iota(jnp.int32, into.dv_biases.shape, 0) == table
    into.dv_biases[...] += jnp.where(which, jnp.sum(dq, axis=0, keepdims=True), 0.0)


def _skewed_window(q, v_row, tables_ref, first_query, first_virtual_key, tiling: Tiling):
    """The position term [bq, bk] of the tile's queries against its keys, from the table's
    window of the distances they span. With the tables laid as `position_scores` lays them
    (distances descending, the compressed memory's first, then N unused rows), key j of
    virtual index vj (`KeyLayout.virtual_key_gap`) is column vj + N-1-i of the table for
    query i, so the window starts at vj0 + N - q0 - bq and row i of the tile needs its
    columns from bq-1-i on: a rotation by i more per row."""
    window = tables_ref[_window_rows(first_query, first_virtual_key, tiling), :].astype(q.dtype)
    band = jax.lax.dot_general(
        q + v_row, window, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return _skew(band, tiling)


def _logits(inputs: _Inputs, query_block, key_block, tiling: Tiling):
    """One tile's logits (q + u)·k + (q + v)·R, with the hidden keys at MASKED_LOGIT, in float32;
    and the content queries q + u."""
    q = inputs.q[...]
    content_q = q + inputs.u[...]
    s = jax.lax.dot_general(
        content_q, inputs.k[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    first_query, first_key = query_block * tiling.query_block, key_block * tiling.key_block
    shape = (tiling.query_block, tiling.key_block)
    key = first_key + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    C, gap, v_biases = tiling.n_cmem, tiling.virtual_key_gap, inputs.v_biases
    if not C:
        position = _skewed_window(
            q, v_biases[0:1, :], inputs.tables, first_query, first_key, tiling
        )
    elif tiling.straddles:
        position = jnp.where(
            key < C,
            _skewed_window(q, v_biases[0:1, :], inputs.tables, first_query, first_key, tiling),
            _skewed_window(
                q, v_biases[1:2, :], inputs.tables, first_query, first_key + gap, tiling
            ),
        )
    else:
        in_memory = first_key >= C
        position = _skewed_window(
            q,
            jnp.where(in_memory, v_biases[1:2, :], v_biases[0:1, :]),
            inputs.tables,
            first_query,
            first_key + jnp.where(in_memory, gap, 0),
            tiling,
        )
    query = first_query + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return jnp.where(
        tiling.sees(inputs.visible[...], query, key), s + position, MASKED_LOGIT
    ), content_q


def _forward_kernel(
    seed_ref, inputs: _Inputs, outputs: _ForwardOutputs, scratch: _ForwardScratch, *, tiling: Tiling
):
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _start():
        scratch.row_max[...] = jnp.full(scratch.row_max.shape, -jnp.inf, jnp.float32)
        scratch.row_sum[...] = jnp.zeros(scratch.row_sum.shape, jnp.float32)
        scratch.acc[...] = jnp.zeros(scratch.acc.shape, jnp.float32)
        scratch.masses[...] = jnp.zeros(scratch.masses.shape, jnp.float32)

    s, _ = _logits(inputs, pl.program_id(2), key_block, tiling)
    previous = scratch.row_max[...]
    new_max = jnp.maximum(previous, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - new_max)
    rescale = jnp.exp(previous - new_max)
    scratch.row_sum[...] = rescale * scratch.row_sum[...] + jnp.sum(p, axis=-1, keepdims=True)
    weights = dropped(
        p,
        _dropout_scale(
            seed_ref, pl.program_id(2) * tiling.query_block, key_block * tiling.key_block, tiling
        ),
    )
    scratch.acc[...] = rescale * scratch.acc[...] + jnp.dot(
        weights.astype(inputs.v.dtype), inputs.v[...], preferred_element_type=jnp.float32
    )
    scratch.row_max[...] = new_max
    # The range masses from the same unnormalised probabilities, rescaled like the row sum.
    key = key_block * tiling.key_block + jax.lax.broadcasted_iota(jnp.int32, p.shape, 1)
    lane = jax.lax.broadcasted_iota(jnp.int32, scratch.masses.shape, 1)
    tile_masses = range_masses(p, key, lane, tiling.ranges)
    scratch.masses[...] = rescale * scratch.masses[...] + tile_masses

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():  # the statistics leave as rows, lane-dense (see `_columns`)
        outputs.out[...] = (scratch.acc[...] / scratch.row_sum[...]).astype(outputs.out.dtype)
        outputs.lse[...] = (scratch.row_max[...] + jnp.log(scratch.row_sum[...])).T
        outputs.masses[...] = (scratch.masses[...] / scratch.row_sum[...]).T


def _columns(rows_ref) -> jax.Array:
    """A block of per-query statistics [n, bq], stored as rows, as columns [bq, n]. In HBM a
    column array [..., N, 1] takes a 128-lane tile per query (128 times its size, and as much
    DMA per block); rows take whole lanes, and one in-VMEM transpose per grid step puts them
    back where the tile's rows are the queries."""
    return rows_ref[...].T


def _probabilities(inputs: _Inputs, lse, query_block, key_block, tiling: Tiling):
    """One tile's attention probabilities, recomputed from the forward's log-sum-exp [bq, 1];
    and the content queries."""
    s, content_q = _logits(inputs, query_block, key_block, tiling)
    return jnp.exp(s - lse), content_q


def _usage_kernel(inputs: _Inputs, lse_ref, usage_ref, *, tiling: Tiling, first_key_block: int):
    """The attention each key of a key block receives, summed over the query blocks."""
    query_block = pl.program_id(3)

    @pl.when(query_block == 0)
    def _start():
        usage_ref[...] = jnp.zeros(usage_ref.shape, jnp.float32)

    p, _ = _probabilities(
        inputs, _columns(lse_ref), query_block, pl.program_id(2) + first_key_block, tiling
    )
    usage_ref[...] += jnp.sum(p, axis=0, keepdims=True)


def _backward_kernel(
    seed_ref,
    inputs: _Inputs,
    statistics: _Statistics,
    grads: _Gradients,
    scratch: _BackwardScratch,
    *,
    tiling: Tiling,
):
    query_block, key_block = pl.program_id(3), pl.program_id(2)
    first_of_row = (query_block == 0) & (key_block == 0)

    @pl.when(first_of_row)
    def _start_row():  # the (head, row)'s query gradients stay in VMEM across its key blocks
        for ref in (scratch.dq, scratch.dq_position):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(first_of_row & (pl.program_id(1) == 0))
    def _start_head():  # the u, table and bias gradients, over all the head's rows
        for ref in (grads.du, grads.dtables, grads.dv_biases):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(query_block == 0)
    def _start():
        scratch.dk[...] = jnp.zeros(scratch.dk.shape, jnp.float32)
        scratch.dv[...] = jnp.zeros(scratch.dv.shape, jnp.float32)

    lse_and_delta = _columns(statistics.lse_and_delta)  # [bq, 2]
    p, content_q = _probabilities(inputs, lse_and_delta[:, 0:1], query_block, key_block, tiling)
    dout = statistics.dout[...]
    first_query, first_key = query_block * tiling.query_block, key_block * tiling.key_block
    scale = _dropout_scale(seed_ref, first_query, first_key, tiling)
    scratch.dv[...] += jax.lax.dot_general(
        dropped(p, scale).astype(dout.dtype),
        dout,
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    dp = jax.lax.dot_general(
        dout, inputs.v[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    ds = p * (dropped(dp, scale) - lse_and_delta[:, 1:2])
    ds_low = ds.astype(content_q.dtype)
    scratch.dk[...] += jax.lax.dot_general(
        ds_low, content_q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    rows = pl.ds(pl.multiple_of(first_query, tiling.query_block), tiling.query_block)
    dq_content = jnp.dot(ds_low, inputs.k[...], preferred_element_type=jnp.float32)
    scratch.dq[rows, :] += dq_content
    grads.du[...] += jnp.sum(dq_content, axis=0, keepdims=True)  # u is in the content term only
    # The same gradient is the position term's: back through the skew to the table's window.
    position = functools.partial(
        _position_gradient,
        q=inputs.q[...],
        inputs=inputs,
        into=_PositionGradients(scratch.dq_position, grads.dtables, grads.dv_biases),
        rows=rows,
        first_query=first_query,
        tiling=tiling,
    )
    C, gap = tiling.n_cmem, tiling.virtual_key_gap
    if not C:
        position(ds_low, first_virtual_key=first_key, table=0)
    elif tiling.straddles:
        key = first_key + jax.lax.broadcasted_iota(jnp.int32, ds_low.shape, 1)
        zero = jnp.zeros_like(ds_low)
        position(jnp.where(key < C, ds_low, zero), first_virtual_key=first_key, table=0)
        position(jnp.where(key < C, zero, ds_low), first_virtual_key=first_key + gap, table=1)
    else:
        in_memory = first_key >= C
        position(
            ds_low,
            first_virtual_key=first_key + jnp.where(in_memory, gap, 0),
            table=in_memory.astype(jnp.int32),
        )

    @pl.when(query_block == pl.num_programs(3) - 1)
    def _finish():
        grads.dk[...] = scratch.dk[...].astype(grads.dk.dtype)
        grads.dv[...] = scratch.dv[...].astype(grads.dv.dtype)

    @pl.when((query_block == pl.num_programs(3) - 1) & (key_block == pl.num_programs(2) - 1))
    def _finish_row():  # the position gradient's query blocks come with their rows reversed
        for block in range(tiling.n_queries // tiling.query_block):
            rows = pl.ds(block * tiling.query_block, tiling.query_block)
            scratch.dq[rows, :] += _reverse_rows(scratch.dq_position[rows, :], tiling, jnp.float32)
        grads.dq[...] = scratch.dq[...].astype(grads.dq.dtype)


def _cost(
    q, tiling: Tiling, table_rows: int, kind: str, n_keys: int, n_ranges: int = 0
) -> pl.CostEstimate:
    """What one call over `n_keys` keys moves between HBM and VMEM and computes. A block whose
    index does not change along the inner grid axis is fetched once; the others once per outer
    block. The table (float32) and biases are fetched once per head. Forward: q once, k, v and
    the validity row once per query block; out, the log-sum-exp and the range masses written
    once; per tile q·k, p·v and the window's q·R, which spans `window / key_block` times the
    keys (twice that where a tile uses both tables). Backward: k, v and the validity row once,
    q, dout, the log-sum-exp and delta once per key block; dk, dv and the query gradient
    written once (it stays in VMEM for the row), and per head the float32 u, table and bias
    gradients; the forward's q·k and q·R again, pᵀ·dout,
    dout·vᵀ, dsᵀ·q, ds·k, and per table a tile uses: the exchange products reversing ds and q + v, the
    un-skewed gradient times the window and its transpose times q + v. Usage: k and the
    validity row once, q and the log-sum-exp once per key block, the usage written once; q·k
    and q·R."""
    H, B, N, K = q.shape
    T, bq, bk = n_keys, tiling.query_block, tiling.key_block
    item, rows = q.dtype.itemsize, H * B
    tables = H * (table_rows * K * 4 + 2 * K * item)
    position = (tiling.window / bk) * (2 if tiling.straddles else 1)
    per_row, gemms = {
        "forward": (
            N * K * item
            + (N // bq) * (2 * T * K * item + T * 4)
            + N * K * item
            + N * 4 * (1 + n_ranges),
            2 + position,
        ),
        "backward": (
            (T // bk) * (2 * N * K * item + 2 * N * 4) + N * K * item + T * 4 + 4 * T * K * item,
            5 + 3 * position + (2 if tiling.straddles else 1) * (bq / K + bq / bk),
        ),
        "usage": ((T // bk) * (N * K * item + N * 4) + T * K * item + 2 * T * 4, 1 + position),
    }[kind]
    if kind == "backward":  # the u, table and bias gradients, written once per head
        tables += H * (table_rows + 3) * K * 4
    return pl.CostEstimate(
        flops=int(2 * gemms * rows * N * T * K),
        transcendentals=rows * N * T,
        bytes_accessed=int(rows * per_row + tables),
    )


# Heads, batch rows and the outer block axis are independent; the inner one is a reduction.
_SEMANTICS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
)
# The backward's query gradients accumulate over both block axes of a (head, row), the table
# and bias gradients over the head's rows too, each in one resident block.
_BACKWARD_SEMANTICS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "arbitrary", "arbitrary", "arbitrary")
)


# The blocks' index maps, over (head h, row b, query block i, key block j).
def _query_rows(h, b, i, j):  # q, out, dout: the query block's rows
    return h, b, i, 0


def _key_rows(h, b, i, j):  # k, v and their gradients: the key block's rows
    return h, b, j, 0


def _whole_head(h, b, i, j):  # u, the v biases, the tables: the head's, whole
    return h, 0, 0


def _key_validity(h, b, i, j):  # the row's validity of the key block's keys
    return b, 0, j


def _query_statistics(h, b, i, j):  # the query block's statistics, as rows
    return h, b, 0, i


def _grid(
    q, k, tables, tiling: Tiling, queries_outer: bool, key_blocks: tuple[int, int] | None = None
):
    """The grid (h, b, outer block, inner block), the block specs of the attention operands
    (`_Inputs`), and `on_grid`, which turns an index map of (h, b, query block i, key block j)
    into the grid's. The forward streams key blocks past each query block, the backward and the
    usage query blocks past each key block; `key_blocks` (first, end) limits the grid to those
    (default all)."""
    H, B, N, K = q.shape
    bq, bk = tiling.query_block, tiling.key_block
    first, end = key_blocks or (0, k.shape[2] // bk)

    def on_grid(index):
        def grid_index(h, b, x, y, *prefetched):  # prefetched: the row seeds, not used here
            i, j = (x, y) if queries_outer else (y, x)
            return index(h, b, i, j + first)

        return grid_index

    keys = pl.BlockSpec((None, None, bk, K), on_grid(_key_rows))
    specs = _Inputs(
        q=pl.BlockSpec((None, None, bq, K), on_grid(_query_rows)),
        u=pl.BlockSpec((None, 1, K), on_grid(_whole_head)),
        v_biases=pl.BlockSpec((None, 2, K), on_grid(_whole_head)),
        tables=pl.BlockSpec((None,) + tables.shape[1:], on_grid(_whole_head)),
        visible=pl.BlockSpec((None, 1, bk), on_grid(_key_validity)),
        k=keys,
        v=keys,
    )
    grid = (H, B, N // bq, end - first) if queries_outer else (H, B, end - first, N // bq)
    return grid, specs, on_grid


def _statistics(n: int, tiling: Tiling, on_grid) -> pl.BlockSpec:
    """n per-query statistics of a query block, as rows [n, bq] of an [H,B,n,N] array (see
    `_columns`)."""
    return pl.BlockSpec((None, None, n, tiling.query_block), on_grid(_query_statistics))


def _with_seeds(kernel, seeds: jax.Array, tiling: Tiling) -> tuple[Callable, tuple[jax.Array, ...]]:
    """The kernel and its scalar-prefetched operands: with dropout the [B] row seeds, which land in
    scalar memory (SMEM) once per call rather than as a small block copied at every grid step;
    without dropout none, and the kernel's seed argument is None (nothing passed and left unread)."""
    if tiling.dropout:
        return kernel, (seeds,)
    return functools.partial(kernel, None), ()


def _forward_call(inputs: _Inputs, seeds, tiling: Tiling, interpret: bool) -> _ForwardOutputs:
    tiling = dataclasses.replace(tiling, interpret=interpret)
    q, n_ranges = inputs.q, len(tiling.ranges)
    grid, specs, on_grid = _grid(q, inputs.k, inputs.tables, tiling, queries_outer=True)
    bq, K = tiling.query_block, q.shape[3]
    kernel, prefetched = _with_seeds(
        functools.partial(_forward_kernel, tiling=tiling), seeds, tiling
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetched),
            grid=grid,
            in_specs=[specs],
            out_specs=[
                _ForwardOutputs(
                    specs.q, _statistics(1, tiling, on_grid), _statistics(n_ranges, tiling, on_grid)
                )
            ],
            scratch_shapes=[
                _ForwardScratch(
                    pltpu.VMEM((bq, 1), jnp.float32),
                    pltpu.VMEM((bq, 1), jnp.float32),
                    pltpu.VMEM((bq, K), jnp.float32),
                    pltpu.VMEM((bq, n_ranges), jnp.float32),
                )
            ],
        ),
        out_shape=[
            _ForwardOutputs(
                jax.ShapeDtypeStruct(q.shape, q.dtype),
                *(
                    jax.ShapeDtypeStruct(q.shape[:2] + (n, q.shape[2]), jnp.float32)
                    for n in (1, n_ranges)
                ),
            )
        ],
        compiler_params=_SEMANTICS,
        cost_estimate=_cost(
            q, tiling, inputs.tables.shape[1], "forward", inputs.k.shape[2], n_ranges
        ),
        interpret=interpret,
        name="relative_attention_forward",
    )(*prefetched, inputs)[0]


def _backward_call(
    inputs: _Inputs, seeds, statistics: _Statistics, tiling: Tiling, interpret: bool
) -> _Gradients:
    tiling = dataclasses.replace(tiling, interpret=interpret)
    q, k, v, tables = inputs.q, inputs.k, inputs.v, inputs.tables
    grid, specs, on_grid = _grid(q, k, tables, tiling, queries_outer=False)
    bk, K, H = tiling.key_block, q.shape[3], q.shape[0]

    def per_row(*shape):  # one block per (head, row), in VMEM across the row's key and query blocks
        return pl.BlockSpec(
            (None, None) + shape, on_grid(lambda h, b, i, j: (h, b) + (0,) * len(shape))
        )

    def per_head(*shape):  # one block per head, over all its rows (of this device)
        return pl.BlockSpec(
            (None, None) + shape, on_grid(lambda h, b, i, j: (h, 0) + (0,) * len(shape))
        )

    kernel, prefetched = _with_seeds(
        functools.partial(_backward_kernel, tiling=tiling), seeds, tiling
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetched),
            grid=grid,
            in_specs=[specs, _Statistics(_statistics(2, tiling, on_grid), specs.q)],
            out_specs=[
                _Gradients(
                    per_row(q.shape[2], K),
                    per_head(1, K),
                    per_head(tables.shape[1], K),
                    per_head(2, K),
                    specs.k,
                    specs.v,
                )
            ],
            scratch_shapes=[
                _BackwardScratch(
                    pltpu.VMEM((bk, K), jnp.float32),
                    pltpu.VMEM((bk, K), jnp.float32),
                    pltpu.VMEM(q.shape[2:], jnp.float32),
                    pltpu.VMEM(q.shape[2:], jnp.float32),
                )
            ],
        ),
        out_shape=[
            _Gradients(
                jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((H, 1, 1, K), jnp.float32),
                jax.ShapeDtypeStruct((H, 1) + tables.shape[1:], jnp.float32),
                jax.ShapeDtypeStruct((H, 1, 2, K), jnp.float32),
                jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype),
            )
        ],
        compiler_params=_BACKWARD_SEMANTICS,
        cost_estimate=_cost(q, tiling, tables.shape[1], "backward", k.shape[2]),
        interpret=interpret,
        name="relative_attention_backward",
    )(*prefetched, inputs, statistics)[0]


def _key_usage_block(h, b, j, i):  # the usage kernel's grid is (head, row, key block, query block)
    return h, b, 0, j


def _usage_call(inputs: _Inputs, lse, tiling: Tiling, key_blocks: tuple[int, int], interpret: bool):
    """[H,B,1,keys]: the attention each key of the key blocks (first, end) receives, summed
    over the queries."""
    tiling = dataclasses.replace(tiling, interpret=interpret)
    q = inputs.q
    grid, specs, on_grid = _grid(
        q, inputs.k, inputs.tables, tiling, queries_outer=False, key_blocks=key_blocks
    )
    n_keys = (key_blocks[1] - key_blocks[0]) * tiling.key_block
    return pl.pallas_call(
        functools.partial(_usage_kernel, tiling=tiling, first_key_block=key_blocks[0]),
        grid=grid,
        in_specs=[specs._replace(v=None), _statistics(1, tiling, on_grid)],
        out_specs=pl.BlockSpec((None, None, 1, tiling.key_block), _key_usage_block),
        out_shape=jax.ShapeDtypeStruct(q.shape[:2] + (1, n_keys), jnp.float32),
        compiler_params=_SEMANTICS,
        cost_estimate=_cost(q, tiling, inputs.tables.shape[1], "usage", n_keys),
        interpret=interpret,
        name="relative_attention_key_usage",
    )(inputs, lse)


def _kernel_inputs(operands: AttentionOperands, tiling: Tiling) -> _Inputs:
    """The operands as the kernels take them: u as [H,1,K], two v-bias rows (the memory's twice
    without a compressed memory), the table in float32 with zero rows after it
    (`Tiling.padded_rows`), validity as int32 [B,1,T]."""
    q, r = operands.q, operands.tables
    rows = r.shape[1]
    v_biases = operands.v_biases
    vb = v_biases if v_biases.shape[1] == 2 else jnp.concatenate([v_biases, v_biases], axis=1)
    table = jnp.pad(r.astype(jnp.float32), ((0, 0), (0, tiling.padded_rows(rows) - rows), (0, 0)))
    return _Inputs(
        q,
        operands.u[:, None, :].astype(q.dtype),
        vb.astype(q.dtype),
        table,
        operands.visible.astype(jnp.int32)[:, None, :],
        operands.k,
        operands.v,
    )


def _forward(operands: AttentionOperands, seeds, keys: KeyLayout, usage_keys):
    tiling = Tiling.of(keys, operands.k.shape[2])
    inputs = _kernel_inputs(operands, tiling)
    outputs = on_platform(
        _forward_call, (inputs, seeds), (_INPUT_BATCH_AXES, _SEEDS_BATCH_AXIS), "tpu", tiling=tiling
    )
    masses = jnp.swapaxes(outputs.masses, 2, 3)
    usage = None
    if usage_keys is not None:
        first, end = usage_keys
        blocks = (first // tiling.key_block, -(-end // tiling.key_block))
        usage_operands = (inputs._replace(v=None), outputs.lse)
        covered = on_platform(
            _usage_call, usage_operands, _USAGE_AXES, "tpu", tiling=tiling, key_blocks=blocks
        )
        offset = blocks[0] * tiling.key_block
        usage = covered[:, :, 0, first - offset : end - offset]
    return (outputs.out, masses, usage), outputs.lse


def _backward(operands: AttentionOperands, seeds, keys: KeyLayout, out, lse, dout):
    tiling = Tiling.of(keys, operands.k.shape[2])
    statistics = _Statistics(
        jnp.concatenate([lse, output_delta(out, dout)[:, :, None, :]], axis=2), dout
    )
    inputs = _kernel_inputs(operands, tiling)
    grads = on_platform(
        _backward_call,
        (inputs, seeds, statistics),
        (_INPUT_BATCH_AXES, _SEEDS_BATCH_AXIS, _STATISTICS_BATCH_AXES),
        "tpu",
        tiling=tiling,
    )
    # The u, table and bias gradients come summed over each device's rows: [H, devices, ...].
    du = jnp.sum(grads.du, axis=(1, 2)).astype(operands.u.dtype)
    dtables = jnp.sum(grads.dtables, axis=1)[:, : operands.tables.shape[1]].astype(
        operands.tables.dtype
    )
    dv_biases = jnp.sum(grads.dv_biases, axis=1)[:, : operands.v_biases.shape[1]].astype(
        operands.v_biases.dtype
    )
    return AttentionOperands(
        q=grads.dq, u=du, k=grads.dk, v=grads.dv, v_biases=dv_biases, tables=dtables, visible=None
    )


# The TPU kernels, for `ctx.nn.fused_attention.flash_attention`: any range of keys reports its usage.
KERNELS = FusedKernels(forward=_forward, backward=_backward)
