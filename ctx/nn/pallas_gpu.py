"""Flash-style relative attention as a Pallas kernel for NVIDIA GPUs (Pallas' Triton backend),
for `attention_impl="pallas_gpu"`: the probabilities never reach HBM, and attention dropout
happens inside the tile with the TPU kernel's hash and seeds (`ctx.nn.attention_dropout`), so
the masks are the same on every backend.

The position term: XLA computes the band (q + v)·R against the distances, [H,B,N,P], with one
GEMM (`ctx.nn.relative_position.position_band`), and each tile gathers its entries skewed as it
loads them: query i and key j read column vj + N-1-i, where vj is j, or j + N past the
compressed memory (the cmem table's N rows of distances no key has). That is Transformer-XL's
relative shift, one address per weight; a key block that straddles the compressed memory and
the memory needs nothing special. The forward folds each tile into a running softmax (row
maximum, row sum, weighted values) and writes the output, one log-sum-exp per query and the
attention each query gives each key range (cmem, mem, segment); when asked, another kernel
recomputes the probabilities of the evicted keys and sums them over the queries (`most_used`).

The backward is two kernels, each writing what it owns exactly once (no atomics: the
gradients are deterministic): one per key block accumulates the key and value gradients over
the query blocks, one per query block the query gradient over the key blocks, scattering the
logits' gradient back into band coordinates as it goes (the inverse of the gathered load;
each band entry is one key's, or zero, and is written once). XLA turns that band gradient into
the gradients of the queries' position term, the tables and the v biases with the transpose of
the band's GEMM. Key blocks wholly in a query block's future are skipped in every kernel.

Triton has no sequential grid axes, so a program loops over blocks itself (`fori_loop`), as
jax's own Pallas flash attention does. Tiles are square and powers of two; Triton's dot needs
16 or more (`block_size`; `layout_problem` checks a config's lengths).

The operands and their layout are the contract's (`ctx.nn.fused_attention`, which holds the
public `flash_attention`: pass it `KERNELS`).

On a CUDA backend the kernel lowers through Triton; elsewhere it runs in Pallas interpret mode
(same kernel, same numbers, slowly), so CPU tests check the very code a GPU runs, and a CPU
machine can lower the training program for CUDA. This module is the only one that knows the
Triton backend (deprecated in jax 0.11 in favour of Mosaic GPU, which cannot yet express the
gathered skew): a later move stays here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ctx.config import ModelConfig
from ctx.nn.fused_attention import AttentionOperands, FusedKernels, KeyLayout
from ctx.nn.fused_attention import dropped, output_delta, range_masses
from ctx.nn.ops import MASKED_LOGIT
from ctx.nn.pallas_launch import on_platform
from ctx.nn.relative_position import position_band

# Square tiles, powers of two (Triton's blocks), from SMALLEST_BLOCK (Triton's dot needs 16 on a
# side; `layout_problem` checks a config's lengths) to LARGEST_BLOCK.
SMALLEST_BLOCK = 16
LARGEST_BLOCK = 64
# The forward's and the usage kernel's programs: 4 warps hold a 64-wide tile in at most 255
# registers per thread, so two programs share an SM by registers (and by shared memory at 2
# stages on an H100). Both backward kernels: 8 warps, whose accumulators (dk and dv, or dq and
# the band) at 4 warps spilled (ptxas: 464 and 12 bytes at the PG-19 layout on sm_90a); the
# key/value kernel pipelines its query loop 3 deep, the query kernel not at all, the only
# choices with no spill at all three paper layouts on both sm_80 and sm_90a (ptxas, in
# docs/performance.md, with the 128-wide tiles tried and dropped: they spilled).
_KERNEL_PARAMS = {
    "forward": (4, 2),
    "key_usage": (4, 2),
    "key_value_gradient": (8, 3),
    "query_gradient": (8, 1),
}


def block_size(n_queries: int, n_keys: int) -> int:
    """The tile's side: the largest power of two up to LARGEST_BLOCK dividing both the queries
    and the keys (then also the memories, so key blocks line up with the virtual keys' gaps)."""
    size = LARGEST_BLOCK
    while n_queries % size or n_keys % size:
        size //= 2
    return size


def layout_problem(cfg: ModelConfig) -> str:
    """Why Triton cannot compile this kernel at `cfg`'s layout ('' when it can): its square tiles
    are powers of two that divide the segment and the memories, at least SMALLEST_BLOCK wide
    (Triton's dot), and its head dimension a power of two that Triton's dot takes."""
    head = cfg.head_dim
    if not (SMALLEST_BLOCK <= head <= 256 and head & (head - 1) == 0):
        return (
            f"its head dimension (d_model / n_heads = {head}) must be a power of two from 16 to 256"
        )
    memories = cfg.memory_length + cfg.compressed_length
    if cfg.segment_length % SMALLEST_BLOCK or memories % SMALLEST_BLOCK:
        return (
            f"segment_length ({cfg.segment_length}) and memory_length + compressed_length ({memories}) must "
            f"be multiples of {SMALLEST_BLOCK} (its tiles)"
        )
    return ""


@dataclasses.dataclass(frozen=True)
class Tiling(KeyLayout):
    """A call's keys (`KeyLayout`) and its square tile (static)."""

    block: int

    @classmethod
    def of(cls, keys: KeyLayout, n_keys: int) -> "Tiling":
        return cls(
            keys.n_cmem,
            keys.n_mem,
            keys.n_queries,
            keys.dropout,
            block_size(keys.n_queries, n_keys),
        )

    @property
    def band_width(self) -> int:
        """P: the band's columns, the tables' rows."""
        return self.n_keys + self.virtual_key_gap

    @property
    def unread_virtual_keys(self) -> tuple[tuple[int, int], ...]:
        """(first, length) of the virtual keys whose band columns no key reads: those before
        the first key (negative), and the gap's."""
        return (-self.n_queries, self.n_queries), (self.n_cmem, self.virtual_key_gap)

    def key_blocks_seen_by(self, query_block):
        """Key blocks with a key some query of the block sees: all memory blocks and the
        segment's up to the block's last query (the rest are the future)."""
        return (self.n_cmem + self.n_mem) // self.block + query_block + 1

    def first_query_block_seeing(self, key_block):
        """The first query block with a query that sees a key of the block."""
        return jnp.maximum(key_block * self.block - (self.n_cmem + self.n_mem), 0) // self.block


def compiler_params(kernel: str, tiling: Tiling) -> pltriton.CompilerParams:
    """Warps and pipeline stages of one kernel at one layout. Segments whose length is not a
    power of two (enwik8's 768) run the forward on 8 warps: on 4 its tile spilled 64 bytes on
    sm_80 at any depth up to 3 (ptxas), and 8 warps in one program per SM is what two programs
    of 4 give."""
    warps, stages = _KERNEL_PARAMS[kernel]
    if kernel == "forward" and tiling.n_queries & (tiling.n_queries - 1):
        warps = 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


# The range masses are written as 4 lanes (a power of two); the fourth is zero.
_MASS_LANES = 4


class _Inputs(NamedTuple):
    """The attention operands as the kernels take them: as arrays, block specs, batch axes or
    refs. The usage kernel reads no v (None)."""

    content_q: Any  # [H,B,N,K]: q + u
    band: Any  # [H,B,N,P]: (q + v)·R against the distances (`position_band`), compute dtype
    visible: Any  # [B,T] int32
    k: Any  # [H,B,T,K]
    v: Any  # [H,B,T,K]


class _ForwardOutputs(NamedTuple):
    out: Any  # [H,B,N,K]
    lse: Any  # [H,B,N]: the log-sum-exp per query
    masses: Any  # [H,B,N,_MASS_LANES]: the attention each query gives each key range


class _Statistics(NamedTuple):
    """What the gradient kernels read of the forward and the output's gradient."""

    lse: Any  # [H,B,N]
    delta: Any  # [H,B,N]: `output_delta`
    dout: Any  # [H,B,N,K]


class _Tile(NamedTuple):
    """A (query block, key block) tile's operands, loaded."""

    content_q: jax.Array  # [b, K]
    k: jax.Array  # [b, K]
    v: jax.Array  # [b, K]
    visible: jax.Array  # [b]
    lse: jax.Array  # [b]
    delta: jax.Array  # [b]
    dout: jax.Array  # [b, K]


# The batch axis of each operand; every result is [H, B, ...].
_INPUT_BATCH_AXES = _Inputs(content_q=1, band=1, visible=0, k=1, v=1)
_STATISTICS_BATCH_AXES = _Statistics(lse=1, delta=1, dout=1)
_SEEDS_BATCH_AXIS = 0
_USAGE_AXES = (_INPUT_BATCH_AXES._replace(v=None), 1)  # the usage kernel reads no v; lse


def band_columns(query: jax.Array, virtual_key: jax.Array, tiling: Tiling) -> jax.Array:
    """The band column of (query i, virtual key vj): vj + N-1-i. Columns from the band's width on
    are the queries' future; the gap's virtual keys (`KeyLayout.virtual_key`) and those before
    the first (negative vj) hold no key."""
    return virtual_key + (tiling.n_queries - 1) - query


def _wrapped(column, tiling: Tiling):
    """Columns outside the band moved inside it (by P), where the masked loads and stores of
    those entries point. A GPU touches no masked address, but Pallas' interpreter stores a
    masked entry as its old value, so two entries of one store must never share an address:
    a tile row's columns are consecutive and fewer than P, so none lands on another's."""
    return jnp.where(
        column < 0,
        column + tiling.band_width,
        jnp.where(column >= tiling.band_width, column - tiling.band_width, column),
    )


def _tile_indices(first_query, first_key, tiling: Tiling):
    """The tile's query indices [b, 1] and key indices [1, b]."""
    query = first_query + jnp.arange(tiling.block, dtype=jnp.int32)[:, None]
    key = first_key + jnp.arange(tiling.block, dtype=jnp.int32)[None, :]
    return query, key


def _logits(content_q, k, visible, band_ref, first_query, first_key, tiling: Tiling):
    """One tile's logits (q + u)·k + band[i, column(i, j)], the hidden keys at MASKED_LOGIT, in
    float32; and the band columns (`_wrapped`) with whether each is a column of it."""
    query, key = _tile_indices(first_query, first_key, tiling)
    content = pltriton.dot(content_q, k, trans_b=True)
    column = band_columns(query, tiling.virtual_key(key), tiling)
    in_band = column < tiling.band_width
    column = _wrapped(column, tiling)
    rows = jnp.broadcast_to(query, column.shape)
    position = pltriton.load(band_ref.at[rows, column], mask=in_band, other=0.0).astype(jnp.float32)
    return (
        jnp.where(tiling.sees(visible[None, :], query, key), content + position, MASKED_LOGIT),
        column,
        in_band,
    )


def _dropout_stream(seed_ref):
    """The program's dropout stream: its row's seed and its head. Read where a kernel starts:
    Pallas' interpreter reads no program id inside a loop."""
    return seed_ref[...], pl.program_id(2)


def _dropout_scale(stream, first_query, first_key, tiling: Tiling) -> jax.Array | None:
    """[b, b]: dropout's scale of the tile's weights (`KeyLayout.dropout_scale`); None without
    dropout."""
    if not tiling.dropout:
        return None
    query, key = _tile_indices(first_query, first_key, tiling)
    return tiling.dropout_scale(*stream, query, key)


def _rows(index, tiling: Tiling):
    return pl.ds(pl.multiple_of(index * tiling.block, tiling.block), tiling.block)


def _forward_kernel(seed_ref, inputs: _Inputs, outputs: _ForwardOutputs, *, tiling: Tiling):
    query_block, stream = pl.program_id(0), _dropout_stream(seed_ref)
    first_query = query_block * tiling.block
    content_q = inputs.content_q[...]
    lane = jnp.arange(_MASS_LANES, dtype=jnp.int32)[None, :]

    def step(key_block, carry):
        acc, row_max, row_sum, masses = carry
        keys = _rows(key_block, tiling)
        s, _, _ = _logits(
            content_q,
            inputs.k[keys, :],
            inputs.visible[keys],
            inputs.band,
            first_query,
            key_block * tiling.block,
            tiling,
        )
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.exp(s - new_max[:, None])
        rescale = jnp.exp(row_max - new_max)
        weights = dropped(p, _dropout_scale(stream, first_query, key_block * tiling.block, tiling))
        acc = rescale[:, None] * acc + pltriton.dot(
            weights.astype(inputs.v.dtype), inputs.v[keys, :]
        )
        # The range masses from the same unnormalised probabilities, rescaled like the row sum.
        _, key = _tile_indices(first_query, key_block * tiling.block, tiling)
        tile_masses = range_masses(p, key, lane, tiling.ranges)
        return (
            acc,
            new_max,
            rescale * row_sum + jnp.sum(p, axis=1),
            rescale[:, None] * masses + tile_masses,
        )

    b = tiling.block
    start = (
        jnp.zeros((b, content_q.shape[1]), jnp.float32),
        jnp.full((b,), -jnp.inf, jnp.float32),
        jnp.zeros((b,), jnp.float32),
        jnp.zeros((b, _MASS_LANES), jnp.float32),
    )
    acc, row_max, row_sum, masses = jax.lax.fori_loop(
        0, tiling.key_blocks_seen_by(query_block), step, start
    )
    outputs.out[...] = (acc / row_sum[:, None]).astype(outputs.out.dtype)
    outputs.lse[...] = row_max + jnp.log(row_sum)
    outputs.masses[...] = masses / row_sum[:, None]


def _key_usage_kernel(inputs: _Inputs, lse_ref, usage_ref, *, tiling: Tiling):
    """The attention each evicted key (C .. C+N) receives, summed over the queries (all of them
    see it: it is memory)."""
    first_key = tiling.n_cmem + pl.program_id(0) * tiling.block
    keys = pl.ds(first_key, tiling.block)
    k, visible = inputs.k[keys, :], inputs.visible[keys]

    def step(query_block, usage):
        rows = _rows(query_block, tiling)
        s, _, _ = _logits(
            inputs.content_q[rows, :],
            k,
            visible,
            inputs.band,
            query_block * tiling.block,
            first_key,
            tiling,
        )
        return usage + jnp.sum(jnp.exp(s - lse_ref[rows][:, None]), axis=0)

    usage_ref[...] = jax.lax.fori_loop(
        0, tiling.n_queries // tiling.block, step, jnp.zeros((tiling.block,), jnp.float32)
    )


def _tile_gradients(stream, tile: _Tile, band_ref, first_query, first_key, tiling: Tiling):
    """A tile's recomputed probabilities p, dropout scale, the logits' gradient ds and its band
    columns (the softmax's backward with the weights' gradient dp∘z; see `output_delta`)."""
    s, column, in_band = _logits(
        tile.content_q, tile.k, tile.visible, band_ref, first_query, first_key, tiling
    )
    p = jnp.exp(s - tile.lse[:, None])
    scale = _dropout_scale(stream, first_query, first_key, tiling)
    dp = pltriton.dot(tile.dout, tile.v, trans_b=True)
    ds = p * (dropped(dp, scale) - tile.delta[:, None])
    return p, scale, ds, column, in_band


def _key_value_gradient_kernel(
    seed_ref, inputs: _Inputs, statistics: _Statistics, dk_ref, dv_ref, *, tiling: Tiling
):
    key_block, stream = pl.program_id(0), _dropout_stream(seed_ref)
    first_key = key_block * tiling.block
    k, v, visible = inputs.k[...], inputs.v[...], inputs.visible[_rows(key_block, tiling)]

    def step(query_block, carry):
        dk, dv = carry
        rows = _rows(query_block, tiling)
        content_q, dout = inputs.content_q[rows, :], statistics.dout[rows, :]
        tile = _Tile(content_q, k, v, visible, statistics.lse[rows], statistics.delta[rows], dout)
        p, scale, ds, _, _ = _tile_gradients(
            stream, tile, inputs.band, query_block * tiling.block, first_key, tiling
        )
        dv = dv + pltriton.dot(dropped(p, scale).astype(dout.dtype), dout, trans_a=True)
        return dk + pltriton.dot(ds.astype(content_q.dtype), content_q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(
        tiling.first_query_block_seeing(key_block),
        tiling.n_queries // tiling.block,
        step,
        (zeros, zeros),
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_gradient_kernel(
    seed_ref, inputs: _Inputs, statistics: _Statistics, dq_ref, dband_ref, *, tiling: Tiling
):
    query_block, stream = pl.program_id(0), _dropout_stream(seed_ref)
    first_query = query_block * tiling.block
    content_q, lse, delta, dout = (
        inputs.content_q[...],
        statistics.lse[...],
        statistics.delta[...],
        statistics.dout[...],
    )
    query, _ = _tile_indices(first_query, 0, tiling)
    rows = jnp.broadcast_to(query, (tiling.block, tiling.block))

    def step(key_block, dq):
        keys = _rows(key_block, tiling)
        k = inputs.k[keys, :]
        tile = _Tile(content_q, k, inputs.v[keys, :], inputs.visible[keys], lse, delta, dout)
        _, _, ds, column, in_band = _tile_gradients(
            stream, tile, inputs.band, first_query, key_block * tiling.block, tiling
        )
        pltriton.store(dband_ref.at[rows, column], ds.astype(dband_ref.dtype), mask=in_band)
        return dq + pltriton.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(
        0, tiling.key_blocks_seen_by(query_block), step, jnp.zeros(content_q.shape, jnp.float32)
    )
    dq_ref[...] = dq

    # The band columns no key reads get zeros.
    def zeros(first_virtual_key):
        _, virtual = _tile_indices(first_query, first_virtual_key, tiling)
        column = band_columns(query, virtual, tiling)
        inside = (column >= 0) & (column < tiling.band_width)
        pltriton.store(
            dband_ref.at[rows, _wrapped(column, tiling)],
            jnp.zeros(column.shape, dband_ref.dtype),
            mask=inside,
        )

    for first, length in tiling.unread_virtual_keys:

        @pl.loop(0, length // tiling.block)
        def _(t):
            zeros(first + t * tiling.block)


# The blocks' index maps, over the grid (outer block x, batch row, head).
def _owned_rows(x, row, head):  # the program's own block of an [H,B,L,K] operand
    return head, row, x, 0


def _owned_statistics(x, row, head):  # the program's own block of an [H,B,L] operand
    return head, row, x


def _whole_rows(x, row, head):  # the whole (head, row) of an [H,B,L,K] operand
    return head, row, 0, 0


def _whole_statistics(x, row, head):  # the whole (head, row) of an [H,B,L] operand
    return head, row, 0


def _row_seed(x, row, head):
    return (row,)


def _row_validity(x, row, head):
    return row, 0


def _specs(
    q_shape, band_shape, tiling: Tiling, queries_outer: bool
) -> tuple[pl.BlockSpec, _Inputs, _Statistics]:
    """Block specs over the grid (outer block, row, head) of the row seeds, the attention
    operands and the statistics: a program holds its own block of queries (`queries_outer`) or
    keys, and the whole (head, row) of what it loops over."""
    N, K, b = q_shape[2], q_shape[3], tiling.block
    query_length, key_length = (b, tiling.n_keys) if queries_outer else (N, b)
    queries = pl.BlockSpec(
        (None, None, query_length, K), _owned_rows if queries_outer else _whole_rows
    )
    query_statistics = pl.BlockSpec(
        (None, None, query_length), _owned_statistics if queries_outer else _whole_statistics
    )
    keys = pl.BlockSpec((None, None, key_length, K), _whole_rows if queries_outer else _owned_rows)
    inputs = _Inputs(
        content_q=queries,
        band=pl.BlockSpec((None, None, N, band_shape[3]), _whole_rows),
        visible=pl.BlockSpec((None, tiling.n_keys), _row_validity),
        k=keys,
        v=keys,
    )
    return (
        pl.BlockSpec((None,), _row_seed),
        inputs,
        _Statistics(query_statistics, query_statistics, queries),
    )


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret: bool):
    """The pallas_call of `kernel` (its name and warps from `_KERNEL_PARAMS`)."""
    name = kernel.func.__name__.removeprefix("_").removesuffix("_kernel")
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(name, kernel.keywords["tiling"]),
        interpret=interpret,
        name=f"relative_attention_{name}_gpu",
    )


def declared_cost(
    kernel: str, operands: list[tuple[int, tuple[int, ...]]]
) -> tuple[float, float] | None:
    """(FLOPs, HBM bytes) of one call of the named kernel from its operands' (itemsize, shape),
    for the roofline (ctx.roofline; Triton calls carry no cost of their own); None for another
    name. Counted per tile, as the kernels load: the visible (query block, key block) tiles,
    each with its keys' (or queries') blocks and b x b gathered band entries, plus what a
    program reads once and writes; so a wider tile reads the keys fewer times."""
    short = kernel.removeprefix("relative_attention_").removesuffix("_gpu")
    if short not in _KERNEL_PARAMS:
        return None
    first = 0 if short == "key_usage" else 1  # the content queries; the band and keys follow
    (s, (H, B, N, K)), (_, (_, _, _, P)), (_, (_, _, T, _)) = (
        operands[first],
        operands[first + 1],
        operands[first + 3],
    )
    b = block_size(N, T)
    n_blocks, tile = N // b, b * b
    visible_tiles = n_blocks * ((T - N) // b) + n_blocks * (n_blocks + 1) // 2
    tiles, matmuls, per_tile, once = {
        # keys, values and band entries per tile; queries in, output, log-sum-exp and masses out
        "forward": (
            visible_tiles,
            2,
            2 * b * K * s + tile * s,
            2 * N * K * s + 4 * N * (1 + _MASS_LANES),
        ),
        # every query block against each evicted key block: queries, band entries, log-sum-exp
        "key_usage": (n_blocks * n_blocks, 1, b * K * s + tile * s + 4 * b, N * K * s + 4 * N),
        # queries, output gradient, band entries, log-sum-exp and delta per tile; keys and values
        # in, their gradients out
        "key_value_gradient": (visible_tiles, 4, 2 * b * K * s + tile * s + 8 * b, 4 * T * K * s),
        # keys, values and band entries per tile; queries, output gradient and statistics in, the
        # float32 query gradient and the whole band gradient out
        "query_gradient": (
            visible_tiles,
            3,
            2 * b * K * s + tile * s,
            2 * N * K * s + 8 * N + 4 * N * K + N * P * s,
        ),
    }[short]
    return 2.0 * H * B * tiles * matmuls * tile * K, float(H * B * (tiles * per_tile + once))


def _forward_call(seeds, inputs: _Inputs, tiling: Tiling, interpret: bool) -> _ForwardOutputs:
    H, B, N, K = inputs.content_q.shape
    seed_spec, specs, statistics = _specs(
        inputs.content_q.shape, inputs.band.shape, tiling, queries_outer=True
    )
    masses = pl.BlockSpec((None, None, tiling.block, _MASS_LANES), _owned_rows)
    return _call(
        functools.partial(_forward_kernel, tiling=tiling),
        (N // tiling.block, B, H),
        [seed_spec, specs],
        [_ForwardOutputs(specs.content_q, statistics.lse, masses)],
        [
            _ForwardOutputs(
                jax.ShapeDtypeStruct(inputs.content_q.shape, inputs.content_q.dtype),
                jax.ShapeDtypeStruct((H, B, N), jnp.float32),
                jax.ShapeDtypeStruct((H, B, N, _MASS_LANES), jnp.float32),
            )
        ],
        interpret,
    )(seeds, inputs)[0]


def _key_usage_call(inputs: _Inputs, lse, tiling: Tiling, interpret: bool):
    """[H,B,N]: the attention each evicted key receives, summed over the queries."""
    H, B, N, K = inputs.content_q.shape
    _, specs, statistics = _specs(
        inputs.content_q.shape, inputs.band.shape, tiling, queries_outer=False
    )
    whole_keys = pl.BlockSpec((None, None, tiling.n_keys, K), _whole_rows)
    return _call(
        functools.partial(_key_usage_kernel, tiling=tiling),
        (N // tiling.block, B, H),
        [specs._replace(k=whole_keys, v=None), statistics.lse],
        pl.BlockSpec((None, None, tiling.block), _owned_statistics),
        jax.ShapeDtypeStruct((H, B, N), jnp.float32),
        interpret,
    )(inputs, lse)


def _key_value_gradient_call(
    seeds, inputs: _Inputs, statistics: _Statistics, tiling: Tiling, interpret: bool
):
    H, B, N, K = inputs.content_q.shape
    seed_spec, specs, statistics_specs = _specs(
        inputs.content_q.shape, inputs.band.shape, tiling, queries_outer=False
    )
    return _call(
        functools.partial(_key_value_gradient_kernel, tiling=tiling),
        (tiling.n_keys // tiling.block, B, H),
        [seed_spec, specs, statistics_specs],
        [specs.k, specs.v],
        [
            jax.ShapeDtypeStruct(inputs.k.shape, inputs.k.dtype),
            jax.ShapeDtypeStruct(inputs.v.shape, inputs.v.dtype),
        ],
        interpret,
    )(seeds, inputs, statistics)


def _query_gradient_call(
    seeds, inputs: _Inputs, statistics: _Statistics, tiling: Tiling, interpret: bool
):
    H, B, N, K = inputs.content_q.shape
    seed_spec, specs, statistics_specs = _specs(
        inputs.content_q.shape, inputs.band.shape, tiling, queries_outer=True
    )
    return _call(
        functools.partial(_query_gradient_kernel, tiling=tiling),
        (N // tiling.block, B, H),
        [seed_spec, specs, statistics_specs],
        [specs.content_q, specs.band],
        [
            jax.ShapeDtypeStruct(inputs.content_q.shape, jnp.float32),
            jax.ShapeDtypeStruct(inputs.band.shape, inputs.band.dtype),
        ],
        interpret,
    )(seeds, inputs, statistics)


def _kernel_inputs(operands: AttentionOperands, keys: KeyLayout):
    """The kernels' operands (`_Inputs`), and the band's VJP (to q, the v biases and the tables)."""
    q = operands.q
    band, band_vjp = jax.vjp(
        lambda q, vb, r: position_band(q, vb, r, keys.n_cmem).astype(q.dtype),
        q,
        operands.v_biases,
        operands.tables,
    )
    inputs = _Inputs(
        q + operands.u[:, None, None, :].astype(q.dtype),
        band,
        operands.visible.astype(jnp.int32),
        operands.k,
        operands.v,
    )
    return inputs, band_vjp


def _forward(operands: AttentionOperands, seeds, keys: KeyLayout, usage_keys):
    tiling = Tiling.of(keys, operands.k.shape[2])
    inputs, _ = _kernel_inputs(operands, keys)
    outputs = on_platform(
        _forward_call,
        (seeds, inputs),
        (_SEEDS_BATCH_AXIS, _INPUT_BATCH_AXES),
        "cuda",
        tiling=tiling,
    )
    evicted = None
    if usage_keys is not None:
        usage_operands = (inputs._replace(v=None), outputs.lse)
        evicted = on_platform(_key_usage_call, usage_operands, _USAGE_AXES, "cuda", tiling=tiling)
    return (outputs.out, outputs.masses[..., : len(keys.ranges)], evicted), outputs.lse


def _backward(operands: AttentionOperands, seeds, keys: KeyLayout, out, lse, dout):
    tiling = Tiling.of(keys, operands.k.shape[2])
    inputs, band_vjp = _kernel_inputs(operands, keys)
    statistics = _Statistics(lse, output_delta(out, dout), dout)
    batch_axes = (_SEEDS_BATCH_AXIS, _INPUT_BATCH_AXES, _STATISTICS_BATCH_AXES)
    dk, dv = on_platform(
        _key_value_gradient_call, (seeds, inputs, statistics), batch_axes, "cuda", tiling=tiling
    )
    dq_content, dband = on_platform(
        _query_gradient_call, (seeds, inputs, statistics), batch_axes, "cuda", tiling=tiling
    )
    # The band's gradient is the position term's: the transpose of the band's GEMM.
    dq_position, dv_biases, dtables = band_vjp(dband)
    du = jnp.sum(dq_content, axis=(1, 2)).astype(operands.u.dtype)
    dq = (dq_content + dq_position.astype(jnp.float32)).astype(operands.q.dtype)
    return AttentionOperands(
        q=dq, u=du, k=dk, v=dv, v_biases=dv_biases, tables=dtables, visible=None
    )


def _evicted_keys_only(usage_keys: tuple[int, int], keys: KeyLayout) -> None:
    evicted = (keys.n_cmem, keys.n_cmem + keys.n_queries)
    if usage_keys != evicted:
        raise ValueError(
            f"the GPU kernel reports the usage of the evicted keys {evicted} only, not of {usage_keys}"
        )


# The GPU kernels, for `ctx.nn.fused_attention.flash_attention`: the usage of the evicted keys
# (n_cmem, n_cmem + N) only, the one range the model asks for.
KERNELS = FusedKernels(forward=_forward, backward=_backward, check_usage_keys=_evicted_keys_only)
