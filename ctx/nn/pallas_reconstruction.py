"""The attention-reconstruction loss's two attention reads as a Pallas TPU kernel (Mosaic),
for layers whose attention runs `attention_impl="pallas_tpu"`: neither read's probabilities
reach HBM.

The loss (Rae et al. 2019, section 3.2; Sonnet's `CompressiveTransformer`) compares a layer's
content-only attention over the memories a segment evicts with its attention over their
compression, under the layer's own projections held constant. In XLA it is two score-sized
softmaxes per layer in the forward, recomputed under remat, and the backward of one of them: in
the TPU estimate of the PG-19 step, nearly as much HBM traffic as the attention kernels
(docs/performance.md). Here each (head, row, query block) tile reads its
queries once, attends over the evicted keys and over the compressed keys in VMEM, and writes
the difference of the two reads, [H,B,N,K] float32 (what the backward needs), and its sum of
squares (the loss, summed by XLA over the tiles). The backward needs the gradient of the
compressed read alone (the queries and the evicted keys and values are constants of the loss):
per (head, row) it recomputes the compressed keys' probabilities, whole rows at a time (the
compressed keys of one segment fit a tile), and accumulates their keys' and values' gradients
over the query blocks in VMEM.

Products take the compute dtype with float32 accumulation and the softmax is float32, as in
the attention kernel. On a TPU backend the kernel lowers through Mosaic; on any other it runs
in Pallas interpret mode (same kernel, same numbers), so CPU tests check the code a TPU runs.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ctx.nn.pallas_launch import KERNEL_OUTPUTS, on_platform
from ctx.nn.pallas_tpu import block_sizes

_LANES = 128


class _Reads(NamedTuple):
    """The forward's operands (arrays, block specs or batch axes): the queries, the layer's keys
    and values (the evicted ones among them) and the compressed keys and values."""

    q: Any  # [H,B,N,K]
    k: Any  # [H,B,T,K]
    v: Any
    kc: Any  # [H,B,E,K]
    vc: Any


class _CompressedGradient(NamedTuple):
    """The backward's operands: the queries, the compressed keys and values, the reads'
    difference and the loss's scale."""

    q: Any
    kc: Any
    vc: Any
    difference: Any  # [H,B,N,K] float32
    scale: Any  # [1, lanes]: -2 / size x the loss's cotangent, the same on every device


_READS_BATCH_AXES = _Reads(q=1, k=1, v=1, kc=1, vc=1)
_GRADIENT_BATCH_AXES = _CompressedGradient(q=1, kc=1, vc=1, difference=1, scale=None)


def _read(q, k, v):
    """softmax(q·kᵀ)·v of a tile's queries over whole key rows, float32; and the probabilities."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    return jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32), p


def _forward_kernel(reads: _Reads, difference_ref, squares_ref, *, evicted: slice):
    q = reads.q[...]
    read_old, _ = _read(q, reads.k[evicted, :], reads.v[evicted, :])
    read_compressed, _ = _read(q, reads.kc[...], reads.vc[...])
    difference = read_old - read_compressed
    difference_ref[...] = difference
    # The tile's sum of squares in lane 0 of its own lane-dense block (the rest zero).
    lane = jax.lax.broadcasted_iota(jnp.int32, squares_ref.shape, 1)
    squares_ref[...] = jnp.where(lane == 0, jnp.sum(difference * difference), 0.0)


def _backward_kernel(operands: _CompressedGradient, dkc_ref, dvc_ref):
    @pl.when(pl.program_id(2) == 0)
    def _start():
        dkc_ref[...] = jnp.zeros(dkc_ref.shape, jnp.float32)
        dvc_ref[...] = jnp.zeros(dvc_ref.shape, jnp.float32)

    q, k, v = operands.q[...], operands.kc[...], operands.vc[...]
    read, p = _read(q, k, v)
    d_read = operands.difference[...] * operands.scale[0:1, 0:1]  # the compressed read's gradient
    d_low = d_read.astype(v.dtype)
    dvc_ref[...] += jax.lax.dot_general(
        p.astype(v.dtype), d_low, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    dp = jax.lax.dot_general(d_low, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.sum(d_read * read, axis=-1, keepdims=True))
    dkc_ref[...] += jax.lax.dot_general(
        ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def _evicted_keys(n_keys: int, first: int, count: int, K: int) -> tuple[pl.BlockSpec, slice]:
    """The block of the keys (and values) a tile reads, and where the evicted ones lie in it:
    exactly them where they start on a multiple of their count, else all keys (the evicted
    rows then taken in VMEM)."""
    if first % count == 0:
        return pl.BlockSpec(
            (None, None, count, K), lambda h, b, i: (h, b, first // count, 0)
        ), slice(0, count)
    return pl.BlockSpec((None, None, n_keys, K), lambda h, b, i: (h, b, 0, 0)), slice(
        first, first + count
    )


def _forward_call(reads: _Reads, first: int, count: int, interpret: bool):
    q, k, kc = reads.q, reads.k, reads.kc
    H, B, N, K = q.shape
    bq = block_sizes(N, count)[0]
    E, item = kc.shape[2], q.dtype.itemsize
    keys, evicted = _evicted_keys(k.shape[2], first, count, K)
    queries = pl.BlockSpec((None, None, bq, K), lambda h, b, i: (h, b, i, 0))
    compressed = pl.BlockSpec((None, None, E, K), lambda h, b, i: (h, b, 0, 0))
    rows = H * B
    cost = pl.CostEstimate(
        flops=4 * rows * N * K * (count + E),
        transcendentals=rows * N * (count + E),
        bytes_accessed=rows * (N * K * (item + 4) + 2 * K * item * (keys.block_shape[2] + E)),
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, evicted=evicted),
        grid=(H, B, N // bq),
        in_specs=[_Reads(queries, keys, keys, compressed, compressed)],
        out_specs=[queries, pl.BlockSpec((None, None, 1, _LANES), lambda h, b, i: (h, b, 0, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct((H, B, 1, _LANES * (N // bq)), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="reconstruction_reads_forward",
    )(reads)


def _backward_call(operands: _CompressedGradient, interpret: bool):
    q, kc = operands.q, operands.kc
    H, B, N, K = q.shape
    E, item = kc.shape[2], q.dtype.itemsize
    bq = block_sizes(N, E)[0]
    queries = pl.BlockSpec((None, None, bq, K), lambda h, b, i: (h, b, i, 0))
    compressed = pl.BlockSpec((None, None, E, K), lambda h, b, i: (h, b, 0, 0))
    rows = H * B
    cost = pl.CostEstimate(
        flops=10 * rows * N * K * E,
        transcendentals=rows * N * E,
        bytes_accessed=rows * (N * K * (item + 4) + E * K * (2 * item + 8)),
    )
    shape = jax.ShapeDtypeStruct(kc.shape, jnp.float32)
    return pl.pallas_call(
        _backward_kernel,
        grid=(H, B, N // bq),
        in_specs=[
            _CompressedGradient(
                queries,
                compressed,
                compressed,
                queries,
                pl.BlockSpec((1, _LANES), lambda h, b, i: (0, 0)),
            )
        ],
        out_specs=[compressed, compressed],
        out_shape=[shape, shape],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="reconstruction_reads_backward",
    )(operands)


def _constants(q, k, v, kc, vc):
    """The queries and evicted keys and values held constant; all five in the queries' dtype."""
    q, k, v = (jax.lax.stop_gradient(x) for x in (q, k, v))
    return q, k, v, kc.astype(q.dtype), vc.astype(q.dtype)


def _reads(q, k, v, kc, vc, first, count):
    """The forward kernel, once per device: (difference [H,B,N,K], per-tile sums of squares)."""
    return on_platform(
        _forward_call,
        (_Reads(q, k, v, kc, vc),),
        (_READS_BATCH_AXES,),
        "tpu",
        first=first,
        count=count,
    )


def reconstruction_difference(
    q_HBNK: jax.Array,
    k_HBTK: jax.Array,
    v_HBTK: jax.Array,
    first_evicted: int,
    n_evicted: int,
    compressed_k_HBEK: jax.Array,
    compressed_v_HBEK: jax.Array,
) -> jax.Array:
    """softmax(q·kᵀ)·v over the evicted keys k[first_evicted : first_evicted + n_evicted] minus
    the same over the compressed keys, per head, row and query: [H,B,N,K] float32 (the kernel's
    forward, for inspection: `reconstruction_loss` is what trains)."""
    args = _constants(q_HBNK, k_HBTK, v_HBTK, compressed_k_HBEK, compressed_v_HBEK)
    return _reads(*args, first_evicted, n_evicted)[0]


def reconstruction_loss(
    q_HBNK: jax.Array,
    k_HBTK: jax.Array,
    v_HBTK: jax.Array,
    first_evicted: int,
    n_evicted: int,
    compressed_k_HBEK: jax.Array,
    compressed_v_HBEK: jax.Array,
) -> jax.Array:
    """The attention-reconstruction loss, the mean square of `reconstruction_difference`, as
    `ctx.nn.losses` computes it in XLA. The queries and the evicted keys and values are held
    constant (stop_gradient): only the compressed keys and values get a gradient."""
    args = _constants(q_HBNK, k_HBTK, v_HBTK, compressed_k_HBEK, compressed_v_HBEK)
    return _loss(*args, first_evicted, n_evicted)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _loss(q, k, v, kc, vc, first, count):
    return _forward(q, k, v, kc, vc, first, count)[0]


def _forward(q, k, v, kc, vc, first, count):
    difference, squares = _reads(q, k, v, kc, vc, first, count)
    return jnp.sum(squares) / difference.size, (
        q,
        kc,
        vc,
        checkpoint_name(difference, KERNEL_OUTPUTS),
    )


def _backward(first, count, residuals, d_loss):
    q, kc, vc, difference = residuals
    # loss = mean((read_old - read_compressed)^2): the compressed read's gradient is
    # -2 (read_old - read_compressed) / size, times the loss's cotangent.
    scale = jnp.full((1, _LANES), -2.0 / difference.size, jnp.float32) * d_loss
    dkc, dvc = on_platform(
        _backward_call,
        (_CompressedGradient(q, kc, vc, difference, scale),),
        (_GRADIENT_BATCH_AXES,),
        "tpu",
    )
    return None, None, None, dkc.astype(kc.dtype), dvc.astype(vc.dtype)


_loss.defvjp(_forward, _backward)
