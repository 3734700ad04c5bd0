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

Layout is head-major, as the segment path makes it: q [H,B,N,K] (scaled, without biases), k and
v [H,B,T,K] of [cmem; mem; segment], the tables [H,P,K] and their v biases [H,R,K] as
`position_scores` takes them.

On a TPU backend the kernel lowers through Mosaic; on any other it runs in Pallas interpret
mode (same kernel, same numbers, slowly), so CPU tests check the very code a TPU runs.
`jax.lax.platform_dependent` picks per lowering platform, so compiling ahead of time for a TPU
topology on a CPU machine lowers the Mosaic kernel. XLA cannot partition a Mosaic call, so under
a mesh (the trainer and evaluation trace with their abstract mesh) it runs in a `shard_map` over
the batch rows.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ctx.nn.attention_dropout import kept_weights, row_seeds
from ctx.nn.ops import MASKED_LOGIT
from ctx.nn.pallas_launch import KERNEL_OUTPUTS, on_platform

# TPU tiles: the last two dimensions of a block are multiples of (8, 128) or the whole axis.
_KEY_BLOCKS = (512, 384, 256, 128)  # 384: enwik8's lengths (1,152, 768) take no 256 or 512
_QUERY_BLOCKS = (256, 128, 64, 32, 16, 8)
_LANES = 128


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
class _Layout:
    """Where the keys and distances of a call are, and its tiles (static)."""

    n_cmem: int
    n_mem: int
    n_queries: int
    query_block: int
    key_block: int
    dropout: float = 0.0  # the rate at which attention weights are dropped
    interpret: bool = False  # run by Pallas' interpreter, not Mosaic (see _skew)

    @classmethod
    def of(cls, q, k, n_cmem: int, n_mem: int, dropout: float = 0.0) -> "_Layout":
        return cls(n_cmem, n_mem, q.shape[2], *block_sizes(q.shape[2], k.shape[2], n_cmem), dropout)

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
        return all(x % 8 == 0 for x in (self.n_queries, self.query_block, self.key_block, self.n_cmem))

    def padded_rows(self, rows: int) -> int:
        """Table rows with zeros after the last, so the windows of the future keys (masked)
        stay inside it."""
        return -(-(rows + self.n_queries + self.window) // 8) * 8


def _dropout_scale(seed_ref, first_query, first_key, lay: _Layout) -> jax.Array | None:
    """[bq, bk]: 0 for the tile's dropped weights, 1/(1-rate) for the kept ones; None without
    dropout. The backward hashes once and scales both the weights and their gradient."""
    if not lay.dropout:
        return None
    query = first_query + jax.lax.broadcasted_iota(jnp.int32, (lay.query_block, 1), 0)
    key = first_key + jax.lax.broadcasted_iota(jnp.int32, (1, lay.key_block), 1)
    keep = kept_weights(seed_ref[pl.program_id(1)], pl.program_id(0), query, key, lay.dropout)
    return jnp.where(keep, 1.0 / (1.0 - lay.dropout), 0.0)


def _dropped(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    return x if scale is None else x * scale


def _skew(band, lay: _Layout):
    """Row i of the tile's band [bq, window] moved left by bq-1-i, keeping the key block's
    columns: out[i, j] = band[i, j + bq-1-i]. On TPU one row-strided rotation
    (`pltpu.roll(stride=1)`: row i by i more than row i-1). Interpreted, the same values by one
    gather: JAX's interpreter splits a strided roll into one roll per row, and a program of
    hundreds of rolls per tile is so large that XLA:CPU's loader of a cached executable
    overflows its stack (a segfault on the second run of the same program)."""
    if not lay.interpret:
        return pltpu.roll(band, lay.window - lay.query_block + 1, 1, stride=1, stride_axis=0)[:, :lay.key_block]
    rows = jax.lax.broadcasted_iota(jnp.int32, (lay.query_block, lay.key_block), 0)
    columns = jax.lax.broadcasted_iota(jnp.int32, (lay.query_block, lay.key_block), 1)
    return jnp.take_along_axis(band, columns + lay.query_block - 1 - rows, axis=1)


def _window_rows(first_query, first_virtual_key, lay: _Layout):
    """The table rows of the distances a tile spans (see `_skewed_window`)."""
    start = first_virtual_key + lay.n_queries - first_query - lay.query_block
    if lay.aligned:
        start = pl.multiple_of(start, 8)
    return pl.ds(start, lay.window)


def _reverse_rows(x: jax.Array, lay: _Layout, dtype) -> jax.Array:
    """x [n, m] with its rows in reverse order, in `dtype`. Mosaic lowers no `rev`, so on TPU a
    product with the exchange matrix (exact: each entry is one entry of x times 1);
    interpreted, a flip."""
    if lay.interpret:
        return jnp.flip(x, 0).astype(dtype)
    n = x.shape[0]
    exchange = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) + jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
                == n - 1).astype(x.dtype)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(exchange, x, precision=precision, preferred_element_type=jnp.float32).astype(dtype)


def _unskew_reversed(grad, lay: _Layout):
    """The inverse of `_skew`, with the rows in reverse order: a tile's logits' gradient
    [bq, bk] laid back onto its band window [bq, window] (row i moved right by bq-1-i, zeros
    around), row i landing in row bq-1-i. Unreversed, the inverse rotation has stride -1, which
    Mosaic does not lower; with the rows reversed, row bq-1-i moves right by bq-1-i, which is
    the forward's row-strided rotation (stride 1; Mosaic rotates 32-bit values only, so in
    float32). Interpreted, the same values by a gather."""
    bq, bk, window = lay.query_block, lay.key_block, lay.window
    padded = jnp.concatenate([_reverse_rows(grad, lay, jnp.float32), jnp.zeros((bq, window - bk), jnp.float32)],
                             axis=1)
    if not lay.interpret:
        return pltpu.roll(padded, 0, 1, stride=1, stride_axis=0)
    rows = jax.lax.broadcasted_iota(jnp.int32, (bq, window), 0)
    source = jax.lax.broadcasted_iota(jnp.int32, (bq, window), 1) - rows
    gathered = jnp.take_along_axis(padded, jnp.clip(source, 0, window - 1), axis=1)
    return jnp.where((source >= 0) & (source < bk), gathered, jnp.zeros_like(gathered))


def _position_gradient(grad, q, vb_ref, r_ref, dq_position_ref, dr_ref, dvb_ref, rows, first_query,
                       first_virtual_key, table, lay: _Layout):
    """Accumulate the gradients of one table's part of a tile's position term, (q + v)·R[window]
    skewed, from its logits' gradient `grad` [bq, bk] (compute dtype): the queries' (rows
    reversed within the query block, as `_unskew_reversed` leaves them), the window's table rows,
    and the table's v bias (row `table` of dvb). Nothing score-sized leaves the kernel."""
    window_rows = _window_rows(first_query, first_virtual_key, lay)
    band_grad = _unskew_reversed(grad, lay).astype(q.dtype)  # [bq, window], rows reversed
    window = r_ref[window_rows, :].astype(q.dtype)
    dq = jnp.dot(band_grad, window, preferred_element_type=jnp.float32)
    dq_position_ref[rows, :] += dq
    v_row = jnp.where(table == 0, vb_ref[0:1, :], vb_ref[1:2, :])
    dr_ref[window_rows, :] += jax.lax.dot_general(band_grad, _reverse_rows(q + v_row, lay, q.dtype),
                                                  (((0,), (0,)), ((), ())),
                                                  preferred_element_type=jnp.float32)
    which = jax.lax.broadcasted_iota(jnp.int32, dvb_ref.shape, 0) == table
    dvb_ref[...] += jnp.where(which, jnp.sum(dq, axis=0, keepdims=True), 0.0)


def _skewed_window(q, v_row, r_ref, first_query, first_virtual_key, lay: _Layout):
    """The position term [bq, bk] of the tile's queries against its keys, from the table's
    window of the distances they span. With the tables laid as `position_scores` lays them
    (distances descending, the compressed memory's first, then N unused rows), key j of
    virtual index vj = j (cmem) or j + N (memory, segment) is column vj + N-1-i of the table
    for query i, so the window starts at vj0 + N - q0 - bq and row i of the tile needs its
    columns from bq-1-i on: a rotation by i more per row."""
    window = r_ref[_window_rows(first_query, first_virtual_key, lay), :].astype(q.dtype)
    band = jax.lax.dot_general(q + v_row, window, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return _skew(band, lay)


def _logits(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, query_block, key_block, lay: _Layout):
    """One tile's logits (q + u)·k + (q + v)·R, with the hidden keys at MASKED_LOGIT, in float32;
    and the content queries q + u."""
    q = q_ref[...]
    content_q = q + u_ref[...]
    s = jax.lax.dot_general(content_q, k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    first_query, first_key = query_block * lay.query_block, key_block * lay.key_block
    shape = (lay.query_block, lay.key_block)
    key = first_key + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    C, N = lay.n_cmem, lay.n_queries
    if not C:
        position = _skewed_window(q, vb_ref[0:1, :], r_ref, first_query, first_key, lay)
    elif lay.straddles:
        position = jnp.where(key < C, _skewed_window(q, vb_ref[0:1, :], r_ref, first_query, first_key, lay),
                             _skewed_window(q, vb_ref[1:2, :], r_ref, first_query, first_key + N, lay))
    else:
        in_memory = first_key >= C
        position = _skewed_window(q, jnp.where(in_memory, vb_ref[1:2, :], vb_ref[0:1, :]), r_ref, first_query,
                                  first_key + jnp.where(in_memory, N, 0), lay)
    query = first_query + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    segment_key = key - (C + lay.n_mem)
    seen = (visible_ref[...] != 0) & (segment_key <= query)
    return jnp.where(seen, s + position, MASKED_LOGIT), content_q


def _forward_kernel(seed_ref, q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, v_ref, out_ref, lse_ref, mass_ref,
                    max_ref, sum_ref, acc_ref, mass_acc, *, lay: _Layout, ranges: tuple[tuple[int, int], ...]):
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _start():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        mass_acc[...] = jnp.zeros(mass_acc.shape, jnp.float32)

    s, _ = _logits(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, pl.program_id(2), key_block, lay)
    previous = max_ref[...]
    new_max = jnp.maximum(previous, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - new_max)
    rescale = jnp.exp(previous - new_max)
    sum_ref[...] = rescale * sum_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
    weights = _dropped(p, _dropout_scale(seed_ref, pl.program_id(2) * lay.query_block, key_block * lay.key_block, lay))
    acc_ref[...] = rescale * acc_ref[...] + jnp.dot(weights.astype(v_ref.dtype), v_ref[...],
                                                    preferred_element_type=jnp.float32)
    max_ref[...] = new_max
    # The attention each query gives each key range (cmem, mem, segment): row sums of the same
    # unnormalised probabilities, one lane per range, rescaled like the row sum.
    key = key_block * lay.key_block + jax.lax.broadcasted_iota(jnp.int32, p.shape, 1)
    lane = jax.lax.broadcasted_iota(jnp.int32, mass_acc.shape, 1)
    tile_mass = jnp.zeros(mass_acc.shape, jnp.float32)
    for r, (lo, hi) in enumerate(ranges):
        in_range = jnp.sum(jnp.where((key >= lo) & (key < hi), p, 0.0), axis=-1, keepdims=True)
        tile_mass = tile_mass + jnp.where(lane == r, in_range, 0.0)
    mass_acc[...] = rescale * mass_acc[...] + tile_mass

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():  # the statistics leave as rows, lane-dense (see `_columns`)
        out_ref[...] = (acc_ref[...] / sum_ref[...]).astype(out_ref.dtype)
        lse_ref[...] = (max_ref[...] + jnp.log(sum_ref[...])).T
        mass_ref[...] = (mass_acc[...] / sum_ref[...]).T


def _columns(rows_ref) -> jax.Array:
    """A block of per-query statistics [n, bq], stored as rows, as columns [bq, n]. In HBM a
    column array [..., N, 1] takes a 128-lane tile per query (128 times its size, and as much
    DMA per block); rows take whole lanes, and one in-VMEM transpose per grid step puts them
    back where the tile's rows are the queries."""
    return rows_ref[...].T


def _probabilities(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, lse, query_block, key_block, lay: _Layout):
    """One tile's attention probabilities, recomputed from the forward's log-sum-exp [bq, 1];
    and the content queries."""
    s, content_q = _logits(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, query_block, key_block, lay)
    return jnp.exp(s - lse), content_q


def _usage_kernel(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, lse_ref, usage_ref, *, lay: _Layout,
                  first_key_block: int):
    """The attention each key of a key block receives, summed over the query blocks."""
    query_block = pl.program_id(3)

    @pl.when(query_block == 0)
    def _start():
        usage_ref[...] = jnp.zeros(usage_ref.shape, jnp.float32)

    p, _ = _probabilities(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, _columns(lse_ref), query_block,
                          pl.program_id(2) + first_key_block, lay)
    usage_ref[...] += jnp.sum(p, axis=0, keepdims=True)


def _backward_kernel(seed_ref, q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, v_ref, stats_ref, dout_ref,
                     dq_ref, du_ref, dr_ref, dvb_ref, dk_ref, dv_ref, dk_acc, dv_acc, dq_acc, dq_position_acc, *,
                     lay: _Layout):
    query_block, key_block = pl.program_id(3), pl.program_id(2)
    first_of_row = (query_block == 0) & (key_block == 0)

    @pl.when(first_of_row)
    def _start_row():  # the (head, row)'s query gradients stay in VMEM across its key blocks
        for ref in (dq_acc, dq_position_acc):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(first_of_row & (pl.program_id(1) == 0))
    def _start_head():  # the u, table and bias gradients, over all the head's rows
        for ref in (du_ref, dr_ref, dvb_ref):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(query_block == 0)
    def _start():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    stats = _columns(stats_ref)  # [bq, 2]: the log-sum-exp and delta = rowsum(dout∘out)
    p, content_q = _probabilities(q_ref, u_ref, vb_ref, r_ref, visible_ref, k_ref, stats[:, 0:1], query_block,
                                  key_block, lay)
    dout = dout_ref[...]
    first_query, first_key = query_block * lay.query_block, key_block * lay.key_block
    scale = _dropout_scale(seed_ref, first_query, first_key, lay)
    dv_acc[...] += jax.lax.dot_general(_dropped(p, scale).astype(dout.dtype), dout,
                                       (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(dout, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    # With dropout, out = (p∘z)·v: the weights' gradient is dp∘z, and delta = rowsum(dout∘out)
    # is still rowsum(p∘dp∘z), so the softmax's backward keeps its form.
    ds = p * (_dropped(dp, scale) - stats[:, 1:2])
    ds_low = ds.astype(content_q.dtype)
    dk_acc[...] += jax.lax.dot_general(ds_low, content_q, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    rows = pl.ds(pl.multiple_of(first_query, lay.query_block), lay.query_block)
    dq_content = jnp.dot(ds_low, k_ref[...], preferred_element_type=jnp.float32)
    dq_acc[rows, :] += dq_content
    du_ref[...] += jnp.sum(dq_content, axis=0, keepdims=True)  # u is in the content term only
    # The same gradient is the position term's: back through the skew to the table's window.
    position = functools.partial(_position_gradient, q=q_ref[...], vb_ref=vb_ref, r_ref=r_ref,
                                 dq_position_ref=dq_position_acc, dr_ref=dr_ref, dvb_ref=dvb_ref, rows=rows,
                                 first_query=first_query, lay=lay)
    C, N = lay.n_cmem, lay.n_queries
    if not C:
        position(ds_low, first_virtual_key=first_key, table=0)
    elif lay.straddles:
        key = first_key + jax.lax.broadcasted_iota(jnp.int32, ds_low.shape, 1)
        zero = jnp.zeros_like(ds_low)
        position(jnp.where(key < C, ds_low, zero), first_virtual_key=first_key, table=0)
        position(jnp.where(key < C, zero, ds_low), first_virtual_key=first_key + N, table=1)
    else:
        in_memory = first_key >= C
        position(ds_low, first_virtual_key=first_key + jnp.where(in_memory, N, 0), table=in_memory.astype(jnp.int32))

    @pl.when(query_block == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    @pl.when((query_block == pl.num_programs(3) - 1) & (key_block == pl.num_programs(2) - 1))
    def _finish_row():  # the position gradient's query blocks come with their rows reversed
        for block in range(lay.n_queries // lay.query_block):
            rows = pl.ds(block * lay.query_block, lay.query_block)
            dq_acc[rows, :] += _reverse_rows(dq_position_acc[rows, :], lay, jnp.float32)
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _cost(q, lay: _Layout, table_rows: int, kind: str, n_keys: int, n_ranges: int = 0) -> pl.CostEstimate:
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
    T, bq, bk = n_keys, lay.query_block, lay.key_block
    item, rows = q.dtype.itemsize, H * B
    tables = H * (table_rows * K * 4 + 2 * K * item)
    position = (lay.window / bk) * (2 if lay.straddles else 1)
    per_row, gemms = {
        "forward": (N * K * item + (N // bq) * (2 * T * K * item + T * 4) + N * K * item + N * 4 * (1 + n_ranges),
                    2 + position),
        "backward": ((T // bk) * (2 * N * K * item + 2 * N * 4) + N * K * item + T * 4 + 4 * T * K * item,
                     5 + 3 * position + (2 if lay.straddles else 1) * (bq / K + bq / bk)),
        "usage": ((T // bk) * (N * K * item + N * 4) + T * K * item + 2 * T * 4, 1 + position),
    }[kind]
    if kind == "backward":  # the u, table and bias gradients, written once per head
        tables += H * (table_rows + 3) * K * 4
    return pl.CostEstimate(flops=int(2 * gemms * rows * N * T * K), transcendentals=rows * N * T,
                           bytes_accessed=int(rows * per_row + tables))


# Heads, batch rows and the outer block axis are independent; the inner one is a reduction.
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
# The backward's query gradients accumulate over both block axes of a (head, row), the table
# and bias gradients over the head's rows too, each in one resident block.
_BACKWARD_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary", "arbitrary"))


def _grid(q, k, r, lay: _Layout, queries_outer: bool, key_blocks: tuple[int, int] | None = None):
    """The grid (h, b, outer block, inner block) and the block specs of its operands: the
    forward streams key blocks past each query block, the backward and the usage query blocks
    past each key block; `key_blocks` (first, end) limits the grid to those (default all). `at`
    turns an index map of (h, b, query block i, key block j) into the grid's."""
    H, B, N, K = q.shape
    bq, bk = lay.query_block, lay.key_block
    first, end = key_blocks or (0, k.shape[2] // bk)

    def at(index):
        def grid_index(h, b, x, y, *scalars):  # scalars: the prefetched row seeds, not used here
            i, j = (x, y) if queries_outer else (y, x)
            return index(h, b, i, j + first)
        return grid_index

    specs = {"query": pl.BlockSpec((None, None, bq, K), at(lambda h, b, i, j: (h, b, i, 0))),
             "key": pl.BlockSpec((None, None, bk, K), at(lambda h, b, i, j: (h, b, j, 0))),
             "u": pl.BlockSpec((None, 1, K), at(lambda h, b, i, j: (h, 0, 0))),
             "v_biases": pl.BlockSpec((None, 2, K), at(lambda h, b, i, j: (h, 0, 0))),
             "table": pl.BlockSpec((None,) + r.shape[1:], at(lambda h, b, i, j: (h, 0, 0))),
             "visible": pl.BlockSpec((None, 1, bk), at(lambda h, b, i, j: (b, 0, j)))}
    grid = (H, B, N // bq, end - first) if queries_outer else (H, B, end - first, N // bq)
    return grid, specs, at


def _statistics(n: int, lay: _Layout, at) -> pl.BlockSpec:
    """n per-query statistics of a query block, as rows [n, bq] of an [H,B,n,N] array (see
    `_columns`)."""
    return pl.BlockSpec((None, None, n, lay.query_block), at(lambda h, b, i, j: (h, b, 0, i)))


def _with_seeds(kernel, seeds: jax.Array, lay: _Layout) -> tuple[Callable, tuple[jax.Array, ...]]:
    """The kernel and its scalar-prefetched operands: with dropout the [B] row seeds, which land in
    scalar memory (SMEM) once per call rather than as a small block copied at every grid step;
    without dropout none, and the kernel's seed argument is None (nothing passed and left unread)."""
    if lay.dropout:
        return kernel, (seeds,)
    return functools.partial(kernel, None), ()


def _kernel_inputs(specs) -> list[pl.BlockSpec]:
    return [specs[name] for name in ("query", "u", "v_biases", "table", "visible", "key", "key")]


def _forward_call(q, u, vb, r, visible, k, v, seeds, lay: _Layout, ranges, interpret: bool):
    lay = dataclasses.replace(lay, interpret=interpret)
    grid, spec, at = _grid(q, k, r, lay, queries_outer=True)
    bq, K = lay.query_block, q.shape[3]
    kernel, seeded = _with_seeds(functools.partial(_forward_kernel, lay=lay, ranges=ranges), seeds, lay)
    return pl.pallas_call(
        kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(seeded), grid=grid, in_specs=_kernel_inputs(spec),
            out_specs=[spec["query"], _statistics(1, lay, at), _statistics(len(ranges), lay, at)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, K), jnp.float32), pltpu.VMEM((bq, len(ranges)), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [
            jax.ShapeDtypeStruct(q.shape[:2] + (n, q.shape[2]), jnp.float32) for n in (1, len(ranges))],
        compiler_params=_SEMANTICS, cost_estimate=_cost(q, lay, r.shape[1], "forward", k.shape[2], len(ranges)),
        interpret=interpret, name="relative_attention_forward",
    )(*seeded, q, u, vb, r, visible, k, v)


def _backward_call(q, u, vb, r, visible, k, v, seeds, stats, dout, lay: _Layout, interpret: bool):
    lay = dataclasses.replace(lay, interpret=interpret)
    grid, spec, at = _grid(q, k, r, lay, queries_outer=False)
    bk, K, H = lay.key_block, q.shape[3], q.shape[0]

    def per_row(*shape):  # one block per (head, row), in VMEM across the row's key and query blocks
        return pl.BlockSpec((None, None) + shape, at(lambda h, b, i, j: (h, b) + (0,) * len(shape)))

    def per_head(*shape):  # one block per head, over all its rows (of this device)
        return pl.BlockSpec((None, None) + shape, at(lambda h, b, i, j: (h, 0) + (0,) * len(shape)))

    kernel, seeded = _with_seeds(functools.partial(_backward_kernel, lay=lay), seeds, lay)
    dq, du, dr, dvb, dk, dv = pl.pallas_call(
        kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(seeded), grid=grid,
            in_specs=_kernel_inputs(spec) + [_statistics(2, lay, at), spec["query"]],
            out_specs=[per_row(q.shape[2], K), per_head(1, K), per_head(r.shape[1], K), per_head(2, K),
                       spec["key"], spec["key"]],
            scratch_shapes=[pltpu.VMEM((bk, K), jnp.float32), pltpu.VMEM((bk, K), jnp.float32),
                            pltpu.VMEM(q.shape[2:], jnp.float32), pltpu.VMEM(q.shape[2:], jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((H, 1, 1, K), jnp.float32),
                   jax.ShapeDtypeStruct((H, 1) + r.shape[1:], jnp.float32),
                   jax.ShapeDtypeStruct((H, 1, 2, K), jnp.float32),
                   jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_BACKWARD_SEMANTICS, cost_estimate=_cost(q, lay, r.shape[1], "backward", k.shape[2]),
        interpret=interpret, name="relative_attention_backward",
    )(*seeded, q, u, vb, r, visible, k, v, stats, dout)
    return dq, du, dr, dvb, dk, dv


def _usage_call(q, u, vb, r, visible, k, lse, lay: _Layout, key_blocks: tuple[int, int], interpret: bool):
    """[H,B,1,keys]: the attention each key of the key blocks (first, end) receives, summed
    over the queries."""
    lay = dataclasses.replace(lay, interpret=interpret)
    grid, spec, at = _grid(q, k, r, lay, queries_outer=False, key_blocks=key_blocks)
    n_keys = (key_blocks[1] - key_blocks[0]) * lay.key_block
    return pl.pallas_call(
        functools.partial(_usage_kernel, lay=lay, first_key_block=key_blocks[0]), grid=grid,
        in_specs=_kernel_inputs(spec)[:-1] + [_statistics(1, lay, at)],
        out_specs=pl.BlockSpec((None, None, 1, lay.key_block), lambda h, b, j, i: (h, b, 0, j)),
        out_shape=jax.ShapeDtypeStruct(q.shape[:2] + (1, n_keys), jnp.float32),
        compiler_params=_SEMANTICS, cost_estimate=_cost(q, lay, r.shape[1], "usage", n_keys), interpret=interpret,
        name="relative_attention_key_usage",
    )(q, u, vb, r, visible, k, lse)


# The batch axis of each kernel operand (None: the same on every device); every result is
# [H, B, ...].
_BATCH_AXES = {"forward": (1, None, None, None, 0, 1, 1, 0), "backward": (1, None, None, None, 0, 1, 1, 0, 1, 1),
               "usage": (1, None, None, None, 0, 1, 1)}


def _kernel_operands(q, u, v_biases, r, visible, lay: _Layout):
    """u as [H,1,K], two v-bias rows (the memory's twice without a compressed memory), the
    table in float32 with zero rows after it (`_Layout.padded_rows`), validity as int32 [B,1,T]."""
    rows = r.shape[1]
    vb = v_biases if v_biases.shape[1] == 2 else jnp.concatenate([v_biases, v_biases], axis=1)
    table = jnp.pad(r.astype(jnp.float32), ((0, 0), (0, lay.padded_rows(rows) - rows), (0, 0)))
    return u[:, None, :].astype(q.dtype), vb.astype(q.dtype), table, visible.astype(jnp.int32)[:, None, :]


def flash_attention(q_HBNK: jax.Array, u_HK: jax.Array, k_HBTK: jax.Array, v_HBTK: jax.Array,
                    v_biases_HRK: jax.Array, r_HPK: jax.Array, visible_BT: jax.Array, n_cmem: int,
                    n_mem: int, usage_keys: tuple[int, int] | None = None, dropout: float = 0.0,
                    dropout_seed: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """softmax((q + u)·kᵀ + position_scores(q, v_biases, r) over the visible keys)·v per head
    and batch row, [H,B,N,K], with neither the probabilities nor the position term in HBM;
    the attention each query gives the compressed memory, the memory and the segment,
    [H,B,N,3]; and, for keys `usage_keys` = (first, end) when given, the attention each of
    them receives summed over the queries, [H,B,end-first] (else None). The last two are
    statistics of the undropped weights, with no gradient. `visible_BT`: whether each key of
    [cmem; mem; segment] holds a valid slot; the segment's keys are also hidden from the
    queries before them. `dropout`: the rate at which the attention weights are dropped, with
    the mask `kept_weights` draws from the int32 `dropout_seed`."""
    if dropout and dropout_seed is None:
        raise ValueError(f"attention dropout at {dropout} needs a dropout_seed")
    seeds = row_seeds(0 if dropout_seed is None else dropout_seed, q_HBNK.shape[1])
    return _attention(q_HBNK, u_HK, k_HBTK, v_HBTK, v_biases_HRK, r_HPK, visible_BT, seeds, n_cmem, n_mem,
                      usage_keys, float(dropout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention(q, u, k, v, v_biases, r, visible, seeds, n_cmem, n_mem, usage_keys, dropout):
    return _forward(q, u, k, v, v_biases, r, visible, seeds, n_cmem, n_mem, usage_keys, dropout)[0]


def _forward(q, u, k, v, v_biases, r, visible, seeds, n_cmem, n_mem, usage_keys, dropout):
    lay = _Layout.of(q, k, n_cmem, n_mem, dropout)
    operands = _kernel_operands(q, u, v_biases, r, visible, lay)
    ranges = ((0, n_cmem), (n_cmem, n_cmem + n_mem), (n_cmem + n_mem, k.shape[2]))
    out, lse, mass = on_platform(_forward_call, (q, *operands, k, v, seeds), _BATCH_AXES["forward"], "tpu", lay=lay,
                                 ranges=ranges)
    # Named for the layers' remat policy, which keeps them: the backward needs only these two
    # small arrays ([H,B,N,K] and [H,B,1,N]), and recomputing them would rerun the whole kernel.
    out, lse = (checkpoint_name(x, KERNEL_OUTPUTS) for x in (out, lse))
    mass = jnp.swapaxes(mass, 2, 3)
    usage = None
    if usage_keys is not None:
        first, end = usage_keys
        blocks = (first // lay.key_block, -(-end // lay.key_block))
        covered = on_platform(_usage_call, (q, *operands, k, lse), _BATCH_AXES["usage"], "tpu", lay=lay,
                              key_blocks=blocks)
        offset = blocks[0] * lay.key_block
        usage = covered[:, :, 0, first - offset:end - offset]
    return (out, mass, usage), (q, u, k, v, v_biases, r, visible, seeds, out, lse)


def _backward(n_cmem, n_mem, usage_keys, dropout, residuals, cotangents):
    q, u, k, v, v_biases, r, visible, seeds, out, lse = residuals
    dout = cotangents[0]
    lay = _Layout.of(q, k, n_cmem, n_mem, dropout)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    stats = jnp.concatenate([lse, delta], axis=2)  # [H,B,2,N], rows as the kernel reads them
    operands = (q, *_kernel_operands(q, u, v_biases, r, visible, lay), k, v, seeds, stats, dout.astype(q.dtype))
    dq, du, dr, dvb, dk, dv = on_platform(_backward_call, operands, _BATCH_AXES["backward"], "tpu", lay=lay)
    # The u, table and bias gradients come summed over each device's rows: [H, devices, ...].
    du = jnp.sum(du, axis=(1, 2)).astype(u.dtype)
    dr = jnp.sum(dr, axis=1)[:, :r.shape[1]].astype(r.dtype)
    dv_biases = jnp.sum(dvb, axis=1)[:, :v_biases.shape[1]].astype(v_biases.dtype)
    return dq, du, dk, dv, dv_biases, dr, None, None


_attention.defvjp(_forward, _backward)
