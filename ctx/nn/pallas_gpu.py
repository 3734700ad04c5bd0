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
16 or more (`block_size`; `ctx.config.pallas_gpu_layout_problem` checks a config's lengths).

Layout is head-major, as the segment path makes it: q [H,B,N,K] (scaled, without biases), k and
v [H,B,T,K] of [cmem; mem; segment], the tables [H,P,K] and their v biases [H,R,K] as
`position_band` takes them.

On a CUDA backend the kernel lowers through Triton; elsewhere it runs in Pallas interpret mode
(same kernel, same numbers, slowly), so CPU tests check the very code a GPU runs, and a CPU
machine can lower the training program for CUDA. This module is the only one that knows the
Triton backend (deprecated in jax 0.11 in favour of Mosaic GPU, which cannot yet express the
gathered skew): a later move stays here.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ctx.nn.attention_dropout import kept_weights, row_seeds
from ctx.nn.ops import MASKED_LOGIT
from ctx.nn.pallas_launch import KERNEL_OUTPUTS, on_platform
from ctx.nn.relative_position import position_band

# Square tiles, powers of two (Triton's blocks); Triton's dot needs at least
# `ctx.config.PALLAS_GPU_SMALLEST_BLOCK` on a side, which the config's layout checks.
LARGEST_BLOCK = 64
# The forward's and the usage kernel's programs: 4 warps hold a 64-wide tile in at most 255
# registers per thread, so two programs share an SM by registers (and by shared memory at 2
# stages on an H100). Both backward kernels: 8 warps, whose accumulators (dk and dv, or dq and
# the band) at 4 warps spilled (ptxas: 464 and 12 bytes at the PG-19 layout on sm_90a); the
# key/value kernel pipelines its query loop 3 deep, the query kernel not at all, the only
# choices with no spill at all three paper layouts on both sm_80 and sm_90a (ptxas, in
# docs/performance.md, with the 128-wide tiles tried and dropped: they spilled).
_KERNEL_PARAMS = {"forward": (4, 2), "key_usage": (4, 2), "key_value_gradient": (8, 3), "query_gradient": (8, 1)}


def compiler_params(kernel: str, lay: "_Layout") -> pltriton.CompilerParams:
    """Warps and pipeline stages of one kernel at one layout. Segments whose length is not a
    power of two (enwik8's 768) run the forward on 8 warps: on 4 its tile spilled 64 bytes on
    sm_80 at any depth up to 3 (ptxas), and 8 warps in one program per SM is what two programs
    of 4 give."""
    warps, stages = _KERNEL_PARAMS[kernel]
    if kernel == "forward" and lay.n_queries & (lay.n_queries - 1):
        warps = 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


# The range masses are written as 4 lanes (a power of two); the fourth is zero.
_MASS_LANES = 4


def block_size(n_queries: int, n_keys: int) -> int:
    """The tile's side: the largest power of two up to LARGEST_BLOCK dividing both the queries
    and the keys (then also the memories, so key blocks line up with the virtual keys' gaps)."""
    size = LARGEST_BLOCK
    while n_queries % size or n_keys % size:
        size //= 2
    return size


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the keys and distances of a call are, and its tile (static)."""

    n_cmem: int
    n_mem: int
    n_queries: int
    block: int
    dropout: float = 0.0  # the rate at which attention weights are dropped

    @classmethod
    def of(cls, q, k, n_cmem: int, n_mem: int, dropout: float = 0.0) -> "_Layout":
        return cls(n_cmem, n_mem, q.shape[2], block_size(q.shape[2], k.shape[2]), dropout)

    @property
    def n_keys(self) -> int:
        return self.n_cmem + self.n_mem + self.n_queries

    @property
    def gap(self) -> int:
        """Band columns between the compressed memory's keys and the memory's: the cmem table's
        N distances below n_cmem, which no key has (none without a compressed memory)."""
        return self.n_queries if self.n_cmem else 0

    @property
    def band_width(self) -> int:
        """P: the band's columns, the tables' rows."""
        return self.n_keys + self.gap

    @property
    def unread_virtual_keys(self) -> tuple[tuple[int, int], ...]:
        """(first, length) of the virtual keys whose band columns no key reads: those before
        the first key (negative), and the gap's."""
        return (-self.n_queries, self.n_queries), (self.n_cmem, self.gap)

    def key_blocks_seen_by(self, query_block):
        """Key blocks with a key some query of the block sees: all memory blocks and the
        segment's up to the block's last query (the rest are the future)."""
        return (self.n_cmem + self.n_mem) // self.block + query_block + 1

    def first_query_block_seeing(self, key_block):
        """The first query block with a query that sees a key of the block."""
        return jnp.maximum(key_block * self.block - (self.n_cmem + self.n_mem), 0) // self.block


def band_columns(query: jax.Array, virtual_key: jax.Array, lay: _Layout) -> jax.Array:
    """The band column of (query i, virtual key vj): vj + N-1-i. Columns from the band's width on
    are the queries' future; the gap's virtual keys (`virtual_keys`) and those before the first
    (negative vj) hold no key."""
    return virtual_key + (lay.n_queries - 1) - query


def virtual_keys(key: jax.Array, lay: _Layout) -> jax.Array:
    """Key j's virtual index: j in the compressed memory, j + gap after it."""
    return key + jnp.where(key >= lay.n_cmem, lay.gap, 0)


def _wrapped(column, lay: _Layout):
    """Columns outside the band moved inside it (by P), where the masked loads and stores of
    those entries point. A GPU touches no masked address, but Pallas' interpreter stores a
    masked entry as its old value, so two entries of one store must never share an address:
    a tile row's columns are consecutive and fewer than P, so none lands on another's."""
    return jnp.where(column < 0, column + lay.band_width,
                     jnp.where(column >= lay.band_width, column - lay.band_width, column))


def _tile(first_query, first_key, lay: _Layout):
    """The tile's query indices [b, 1] and key indices [1, b]."""
    query = first_query + jnp.arange(lay.block, dtype=jnp.int32)[:, None]
    key = first_key + jnp.arange(lay.block, dtype=jnp.int32)[None, :]
    return query, key


def _logits(content_q, k, visible, band_ref, first_query, first_key, lay: _Layout):
    """One tile's logits (q + u)·k + band[i, column(i, j)], the hidden keys at MASKED_LOGIT, in
    float32; and the band columns (`_wrapped`) with whether each is a column of it."""
    query, key = _tile(first_query, first_key, lay)
    content = pltriton.dot(content_q, k, trans_b=True)
    column = band_columns(query, virtual_keys(key, lay), lay)
    in_band = column < lay.band_width
    column = _wrapped(column, lay)
    rows = jnp.broadcast_to(query, column.shape)
    position = pltriton.load(band_ref.at[rows, column], mask=in_band, other=0.0).astype(jnp.float32)
    seen = (visible[None, :] != 0) & (key - (lay.n_cmem + lay.n_mem) <= query)
    return jnp.where(seen, content + position, MASKED_LOGIT), column, in_band


def _stream(seed_ref):
    """The program's dropout stream: its row's seed and its head. Read where a kernel starts:
    Pallas' interpreter reads no program id inside a loop."""
    return seed_ref[...], pl.program_id(2)


def _dropout_scale(stream, first_query, first_key, lay: _Layout) -> jax.Array | None:
    """[b, b]: 0 for the tile's dropped weights, 1/(1-rate) for the kept ones; None without
    dropout. The hash of the TPU kernel and the reference, on global indices."""
    if not lay.dropout:
        return None
    query, key = _tile(first_query, first_key, lay)
    keep = kept_weights(*stream, query, key, lay.dropout)
    return jnp.where(keep, 1.0 / (1.0 - lay.dropout), 0.0)


def _dropped(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    return x if scale is None else x * scale


def _rows(index, lay: _Layout):
    return pl.ds(pl.multiple_of(index * lay.block, lay.block), lay.block)


def _forward_kernel(seed_ref, content_q_ref, band_ref, visible_ref, k_ref, v_ref, out_ref, lse_ref, mass_ref, *,
                    lay: _Layout, ranges: tuple[tuple[int, int], ...]):
    query_block, stream = pl.program_id(0), _stream(seed_ref)
    first_query = query_block * lay.block
    content_q = content_q_ref[...]
    lane = jnp.arange(_MASS_LANES, dtype=jnp.int32)[None, :]

    def step(key_block, carry):
        acc, row_max, row_sum, mass = carry
        keys = _rows(key_block, lay)
        s, _, _ = _logits(content_q, k_ref[keys, :], visible_ref[keys], band_ref, first_query,
                          key_block * lay.block, lay)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.exp(s - new_max[:, None])
        rescale = jnp.exp(row_max - new_max)
        weights = _dropped(p, _dropout_scale(stream, first_query, key_block * lay.block, lay))
        acc = rescale[:, None] * acc + pltriton.dot(weights.astype(v_ref.dtype), v_ref[keys, :])
        # The attention each query gives each key range: row sums of the same unnormalised
        # probabilities, one lane per range, rescaled like the row sum.
        _, key = _tile(first_query, key_block * lay.block, lay)
        tile_mass = jnp.zeros(mass.shape, jnp.float32)
        for r, (lo, hi) in enumerate(ranges):
            in_range = jnp.sum(jnp.where((key >= lo) & (key < hi), p, 0.0), axis=1)
            tile_mass = tile_mass + jnp.where(lane == r, in_range[:, None], 0.0)
        return acc, new_max, rescale * row_sum + jnp.sum(p, axis=1), rescale[:, None] * mass + tile_mass

    b = lay.block
    start = (jnp.zeros((b, content_q.shape[1]), jnp.float32), jnp.full((b,), -jnp.inf, jnp.float32),
             jnp.zeros((b,), jnp.float32), jnp.zeros((b, _MASS_LANES), jnp.float32))
    acc, row_max, row_sum, mass = jax.lax.fori_loop(0, lay.key_blocks_seen_by(query_block), step, start)
    out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
    lse_ref[...] = row_max + jnp.log(row_sum)
    mass_ref[...] = mass / row_sum[:, None]


def _usage_kernel(content_q_ref, band_ref, visible_ref, k_ref, lse_ref, usage_ref, *, lay: _Layout):
    """The attention each evicted key (C .. C+N) receives, summed over the queries (all of them
    see it: it is memory)."""
    first_key = lay.n_cmem + pl.program_id(0) * lay.block
    keys = pl.ds(first_key, lay.block)
    k, visible = k_ref[keys, :], visible_ref[keys]

    def step(query_block, usage):
        rows = _rows(query_block, lay)
        s, _, _ = _logits(content_q_ref[rows, :], k, visible, band_ref, query_block * lay.block, first_key, lay)
        return usage + jnp.sum(jnp.exp(s - lse_ref[rows][:, None]), axis=0)

    usage_ref[...] = jax.lax.fori_loop(0, lay.n_queries // lay.block, step, jnp.zeros((lay.block,), jnp.float32))


def _tile_gradients(stream, content_q, k, v, visible, band_ref, lse, delta, dout, first_query, first_key,
                    lay: _Layout):
    """A tile's recomputed probabilities p, dropout scale, the logits' gradient ds and its band
    columns. With dropout, out = (p∘z)·v: the weights' gradient is dp∘z, and delta =
    rowsum(dout∘out) is still rowsum(p∘dp∘z), so the softmax's backward keeps its form."""
    s, column, in_band = _logits(content_q, k, visible, band_ref, first_query, first_key, lay)
    p = jnp.exp(s - lse[:, None])
    scale = _dropout_scale(stream, first_query, first_key, lay)
    dp = pltriton.dot(dout, v, trans_b=True)
    ds = p * (_dropped(dp, scale) - delta[:, None])
    return p, scale, ds, column, in_band


def _key_value_gradient_kernel(seed_ref, content_q_ref, band_ref, visible_ref, k_ref, v_ref, lse_ref, delta_ref,
                               dout_ref, dk_ref, dv_ref, *, lay: _Layout):
    key_block, stream = pl.program_id(0), _stream(seed_ref)
    first_key = key_block * lay.block
    k, v, visible = k_ref[...], v_ref[...], visible_ref[_rows(key_block, lay)]

    def step(query_block, carry):
        dk, dv = carry
        rows = _rows(query_block, lay)
        content_q, dout = content_q_ref[rows, :], dout_ref[rows, :]
        p, scale, ds, _, _ = _tile_gradients(stream, content_q, k, v, visible, band_ref, lse_ref[rows],
                                             delta_ref[rows], dout, query_block * lay.block, first_key, lay)
        dv = dv + pltriton.dot(_dropped(p, scale).astype(dout.dtype), dout, trans_a=True)
        return dk + pltriton.dot(ds.astype(content_q.dtype), content_q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lay.first_query_block_seeing(key_block), lay.n_queries // lay.block, step,
                               (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_gradient_kernel(seed_ref, content_q_ref, band_ref, visible_ref, k_ref, v_ref, lse_ref, delta_ref,
                           dout_ref, dq_ref, dband_ref, *, lay: _Layout):
    query_block, stream = pl.program_id(0), _stream(seed_ref)
    first_query = query_block * lay.block
    content_q, lse, delta, dout = content_q_ref[...], lse_ref[...], delta_ref[...], dout_ref[...]
    query, _ = _tile(first_query, 0, lay)
    rows = jnp.broadcast_to(query, (lay.block, lay.block))

    def step(key_block, dq):
        keys = _rows(key_block, lay)
        k = k_ref[keys, :]
        _, _, ds, column, in_band = _tile_gradients(stream, content_q, k, v_ref[keys, :], visible_ref[keys],
                                                    band_ref, lse, delta, dout, first_query,
                                                    key_block * lay.block, lay)
        pltriton.store(dband_ref.at[rows, column], ds.astype(dband_ref.dtype), mask=in_band)
        return dq + pltriton.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, lay.key_blocks_seen_by(query_block), step, jnp.zeros(content_q.shape, jnp.float32))
    dq_ref[...] = dq

    # The band columns no key reads get zeros.
    def zeros(first_virtual_key):
        _, virtual = _tile(first_query, first_virtual_key, lay)
        column = band_columns(query, virtual, lay)
        inside = (column >= 0) & (column < lay.band_width)
        pltriton.store(dband_ref.at[rows, _wrapped(column, lay)],
                       jnp.zeros(column.shape, dband_ref.dtype), mask=inside)

    for first, length in lay.unread_virtual_keys:
        @pl.loop(0, length // lay.block)
        def _(t):
            zeros(first + t * lay.block)


def _specs(q, band, lay: _Layout, queries_outer: bool) -> dict[str, pl.BlockSpec]:
    """Block specs over the grid (outer block, row, head): a program holds its own block of
    queries (`queries_outer`) or keys, and the whole (head, row) of what it loops over."""
    N, K, b = q.shape[2], q.shape[3], lay.block
    query_length, key_length = (b, lay.n_keys) if queries_outer else (N, b)

    def per_head_row(length, tail, owned):
        return pl.BlockSpec((None, None, length) + tail,
                            lambda x, row, head: (head, row, x if owned else 0) + (0,) * len(tail))

    return {"seed": pl.BlockSpec((None,), lambda x, row, head: (row,)),
            "query": per_head_row(query_length, (K,), queries_outer),
            "query_row": per_head_row(query_length, (), queries_outer),
            "key": per_head_row(key_length, (K,), not queries_outer),
            "band": pl.BlockSpec((None, None, N, band.shape[3]), lambda x, row, head: (head, row, 0, 0)),
            "visible": pl.BlockSpec((None, lay.n_keys), lambda x, row, head: (row, 0))}


def _call(kernel, grid, in_specs, out_specs, out_shape, name: str, interpret: bool, *operands):
    lay = kernel.keywords["lay"]
    params = compiler_params(name.removeprefix("relative_attention_").removesuffix("_gpu"), lay)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=params, interpret=interpret, name=name)(*operands)


def declared_cost(kernel: str, operands: list[tuple[int, tuple[int, ...]]]) -> tuple[float, float] | None:
    """(FLOPs, HBM bytes) of one call of the named kernel from its operands' (itemsize, shape),
    for the roofline (ctx.roofline; Triton calls carry no cost of their own); None for another
    name. Counted per tile, as the kernels load: the visible (query block, key block) tiles,
    each with its keys' (or queries') blocks and b x b gathered band entries, plus what a
    program reads once and writes; so a wider tile reads the keys fewer times."""
    short = kernel.removeprefix("relative_attention_").removesuffix("_gpu")
    if short not in _KERNEL_PARAMS:
        return None
    first = 0 if short == "key_usage" else 1  # the content queries; the band and keys follow
    (s, (H, B, N, K)), (_, (_, _, _, P)), (_, (_, _, T, _)) = operands[first], operands[first + 1], operands[first + 3]
    b = block_size(N, T)
    n_blocks, tile = N // b, b * b
    visible_tiles = n_blocks * ((T - N) // b) + n_blocks * (n_blocks + 1) // 2
    tiles, matmuls, per_tile, once = {
        # keys, values and band entries per tile; queries in, output, log-sum-exp and masses out
        "forward": (visible_tiles, 2, 2 * b * K * s + tile * s, 2 * N * K * s + 4 * N * (1 + _MASS_LANES)),
        # every query block against each evicted key block: queries, band entries, log-sum-exp
        "key_usage": (n_blocks * n_blocks, 1, b * K * s + tile * s + 4 * b, N * K * s + 4 * N),
        # queries, output gradient, band entries, log-sum-exp and delta per tile; keys and values
        # in, their gradients out
        "key_value_gradient": (visible_tiles, 4, 2 * b * K * s + tile * s + 8 * b, 4 * T * K * s),
        # keys, values and band entries per tile; queries, output gradient and statistics in, the
        # float32 query gradient and the whole band gradient out
        "query_gradient": (visible_tiles, 3, 2 * b * K * s + tile * s, 2 * N * K * s + 8 * N + 4 * N * K + N * P * s),
    }[short]
    return 2.0 * H * B * tiles * matmuls * tile * K, float(H * B * (tiles * per_tile + once))


def _forward_call(seeds, content_q, band, visible, k, v, lay: _Layout, ranges, interpret: bool):
    H, B, N, K = content_q.shape
    spec = _specs(content_q, band, lay, queries_outer=True)
    mass = pl.BlockSpec((None, None, lay.block, _MASS_LANES), lambda i, row, head: (head, row, i, 0))
    return _call(functools.partial(_forward_kernel, lay=lay, ranges=ranges), (N // lay.block, B, H),
                 [spec[n] for n in ("seed", "query", "band", "visible", "key", "key")],
                 [spec["query"], spec["query_row"], mass],
                 [jax.ShapeDtypeStruct(content_q.shape, content_q.dtype),
                  jax.ShapeDtypeStruct((H, B, N), jnp.float32),
                  jax.ShapeDtypeStruct((H, B, N, _MASS_LANES), jnp.float32)],
                 "relative_attention_forward_gpu", interpret, seeds, content_q, band, visible, k, v)


def _usage_call(content_q, band, visible, k, lse, lay: _Layout, interpret: bool):
    """[H,B,N]: the attention each evicted key receives, summed over the queries."""
    H, B, N, K = content_q.shape
    spec = _specs(content_q, band, lay, queries_outer=False)
    whole_keys = pl.BlockSpec((None, None, lay.n_keys, K), lambda t, row, head: (head, row, 0, 0))
    return _call(functools.partial(_usage_kernel, lay=lay), (N // lay.block, B, H),
                 [spec["query"], spec["band"], spec["visible"], whole_keys, spec["query_row"]],
                 pl.BlockSpec((None, None, lay.block), lambda t, row, head: (head, row, t)),
                 jax.ShapeDtypeStruct((H, B, N), jnp.float32), "relative_attention_key_usage_gpu", interpret,
                 content_q, band, visible, k, lse)


def _gradient_inputs(spec) -> list[pl.BlockSpec]:
    return [spec[n] for n in ("seed", "query", "band", "visible", "key", "key", "query_row", "query_row", "query")]


def _key_value_gradient_call(seeds, content_q, band, visible, k, v, lse, delta, dout, lay: _Layout,
                             interpret: bool):
    H, B, N, K = content_q.shape
    spec = _specs(content_q, band, lay, queries_outer=False)
    return _call(functools.partial(_key_value_gradient_kernel, lay=lay), (lay.n_keys // lay.block, B, H),
                 _gradient_inputs(spec), [spec["key"], spec["key"]],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 "relative_attention_key_value_gradient_gpu", interpret,
                 seeds, content_q, band, visible, k, v, lse, delta, dout)


def _query_gradient_call(seeds, content_q, band, visible, k, v, lse, delta, dout, lay: _Layout, interpret: bool):
    H, B, N, K = content_q.shape
    spec = _specs(content_q, band, lay, queries_outer=True)
    return _call(functools.partial(_query_gradient_kernel, lay=lay), (N // lay.block, B, H),
                 _gradient_inputs(spec), [spec["query"], spec["band"]],
                 [jax.ShapeDtypeStruct(content_q.shape, jnp.float32), jax.ShapeDtypeStruct(band.shape, band.dtype)],
                 "relative_attention_query_gradient_gpu", interpret,
                 seeds, content_q, band, visible, k, v, lse, delta, dout)


# The batch axis of each kernel operand (seeds, content q, band, visible, k, v, lse, delta, dout).
_BATCH_AXES = (0, 1, 1, 0, 1, 1, 1, 1, 1)


def flash_attention(q_HBNK: jax.Array, u_HK: jax.Array, k_HBTK: jax.Array, v_HBTK: jax.Array,
                    v_biases_HRK: jax.Array, r_HPK: jax.Array, visible_BT: jax.Array, n_cmem: int,
                    n_mem: int, usage_keys: tuple[int, int] | None = None, dropout: float = 0.0,
                    dropout_seed: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`ctx.nn.pallas_tpu.flash_attention`'s contract on NVIDIA GPUs: softmax((q + u)·kᵀ +
    position_scores(q, v_biases, r) over the visible keys)·v per head and batch row, [H,B,N,K];
    the attention each query gives the compressed memory, the memory and the segment,
    [H,B,N,3]; and for `usage_keys` (the evicted keys, (n_cmem, n_cmem + N), the only range
    asked for) the attention each receives summed over the queries, [H,B,N] (else None). The
    last two are statistics of the undropped weights, with no gradient. `dropout`: the rate at
    which the attention weights are dropped, with the mask `kept_weights` draws from the int32
    `dropout_seed`."""
    if dropout and dropout_seed is None:
        raise ValueError(f"attention dropout at {dropout} needs a dropout_seed")
    N = q_HBNK.shape[2]
    if usage_keys is not None and tuple(usage_keys) != (n_cmem, n_cmem + N):
        raise ValueError(f"the GPU kernel reports the usage of the evicted keys ({n_cmem}, {n_cmem + N}) only, "
                         f"not of {tuple(usage_keys)}")
    seeds = row_seeds(0 if dropout_seed is None else dropout_seed, q_HBNK.shape[1])
    return _attention(q_HBNK, u_HK, k_HBTK, v_HBTK, v_biases_HRK, r_HPK, visible_BT, seeds, n_cmem, n_mem,
                      usage_keys is not None, float(dropout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention(q, u, k, v, v_biases, r, visible, seeds, n_cmem, n_mem, usage, dropout):
    return _forward(q, u, k, v, v_biases, r, visible, seeds, n_cmem, n_mem, usage, dropout)[0]


def _kernel_operands(q, u, v_biases, r, visible, n_cmem: int):
    """The content queries q + u, the band in the compute dtype, validity as int32 [B,T], and
    the band's VJP (to q, the v biases and the tables)."""
    band, band_vjp = jax.vjp(lambda q, vb, r: position_band(q, vb, r, n_cmem).astype(q.dtype), q, v_biases, r)
    return q + u[:, None, None, :].astype(q.dtype), band, visible.astype(jnp.int32), band_vjp


def _forward(q, u, k, v, v_biases, r, visible, seeds, n_cmem, n_mem, usage, dropout):
    lay = _Layout.of(q, k, n_cmem, n_mem, dropout)
    content_q, band, visible_int, _ = _kernel_operands(q, u, v_biases, r, visible, n_cmem)
    ranges = ((0, n_cmem), (n_cmem, n_cmem + n_mem), (n_cmem + n_mem, lay.n_keys))
    out, lse, mass = on_platform(_forward_call, (seeds, content_q, band, visible_int, k, v), _BATCH_AXES[:6],
                                 "cuda", lay=lay, ranges=ranges)
    # Named for the layers' remat policy, which keeps them: the backward needs only these two
    # small arrays, and recomputing them would rerun the whole kernel.
    out, lse = (checkpoint_name(x, KERNEL_OUTPUTS) for x in (out, lse))
    evicted = None
    if usage:
        evicted = on_platform(_usage_call, (content_q, band, visible_int, k, lse), (1, 1, 0, 1, 1), "cuda", lay=lay)
    return (out, mass[..., :len(ranges)], evicted), (q, u, k, v, v_biases, r, visible, seeds, out, lse)


def _backward(n_cmem, n_mem, usage, dropout, residuals, cotangents):
    q, u, k, v, v_biases, r, visible, seeds, out, lse = residuals
    dout = cotangents[0].astype(q.dtype)
    lay = _Layout.of(q, k, n_cmem, n_mem, dropout)
    content_q, band, visible_int, band_vjp = _kernel_operands(q, u, v_biases, r, visible, n_cmem)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    operands = (seeds, content_q, band, visible_int, k, v, lse, delta, dout)
    dk, dv = on_platform(_key_value_gradient_call, operands, _BATCH_AXES, "cuda", lay=lay)
    dq_content, dband = on_platform(_query_gradient_call, operands, _BATCH_AXES, "cuda", lay=lay)
    # The band's gradient is the position term's: the transpose of the band's GEMM.
    dq_position, dv_biases, dr = band_vjp(dband)
    du = jnp.sum(dq_content, axis=(1, 2)).astype(u.dtype)
    return (dq_content + dq_position.astype(jnp.float32)).astype(q.dtype), du, dk, dv, dv_biases, dr, None, None


_attention.defvjp(_forward, _backward)
