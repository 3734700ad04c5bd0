"""The contract every fused attention kernel keeps, written once: its operands, the static layout
of its keys, attention dropout's scale, the attention each query gives each key range, and the
public `flash_attention` with its custom VJP. A backend (`ctx.nn.pallas_tpu`: Mosaic on TPUs;
`ctx.nn.pallas_gpu`: Triton on NVIDIA GPUs) supplies a forward and a backward, `FusedKernels`,
and keeps only its tiles, grids and kernel bodies; `ctx.nn.attention_reference` states the same
contract as plain XLA ops, and the tests and `ctx.selfcheck` hold each kernel to it.

What a kernel computes: softmax((q + u)·kᵀ + position_scores(q, v_biases, tables) over the
visible keys)·v per head and batch row, with neither the probabilities nor the position term in
HBM. Layout is head-major, as the segment path makes it: q [H,B,N,K] (scaled, without biases),
k and v [H,B,T,K] of [cmem; mem; segment], the projected tables [H,P,K] and their v biases
[H,R,K] as `ctx.nn.relative_position.position_scores` takes them, and `visible` [B,T] (whether
each key holds a valid slot).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ctx.nn.attention_dropout import kept_weights, row_seeds
from ctx.nn.pallas_launch import KERNEL_OUTPUTS


class AttentionOperands(NamedTuple):
    """The fused attention's array operands (the first six differentiable)."""

    q: jax.Array  # [H,B,N,K]: the scaled queries, without biases
    u: jax.Array  # [H,K]: the content bias
    k: jax.Array  # [H,B,T,K] of [cmem; mem; segment]
    v: jax.Array  # [H,B,T,K]
    v_biases: jax.Array  # [H,R,K]: the position bias of each table (R = 2 with a compressed memory)
    tables: jax.Array  # [H,P,K]: the projected sinusoid tables, distances descending
    visible: jax.Array  # [B,T] bool: whether each key holds a valid slot


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Where the keys of a call are (static): T = n_cmem + n_mem + n_queries keys, the compressed
    memory's first, then the memory's, then the segment's; and the attention dropout rate."""

    n_cmem: int
    n_mem: int
    n_queries: int
    dropout: float  # the rate at which attention weights are dropped

    @property
    def n_keys(self) -> int:
        return self.n_cmem + self.n_mem + self.n_queries

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """(first, end) of the compressed memory's, the memory's and the segment's keys."""
        C, M = self.n_cmem, self.n_mem
        return (0, C), (C, C + M), (C + M, self.n_keys)

    @property
    def virtual_key_gap(self) -> int:
        """Distances between the compressed memory's keys and the memory's that no key has: the
        cmem table's last N rows (n_cmem < distance <= n_cmem + N would put a compressed key in
        the segment), none without a compressed memory. Key j's virtual index, its row in the
        tables laid end to end, is j in the compressed memory and j + gap after it."""
        return self.n_queries if self.n_cmem else 0

    def virtual_key(self, key: jax.Array) -> jax.Array:
        """Key j's virtual index (see `virtual_key_gap`)."""
        return key + jnp.where(key >= self.n_cmem, self.virtual_key_gap, 0)

    def sees(self, visible: jax.Array, query: jax.Array, key: jax.Array) -> jax.Array:
        """Whether `query` attends to `key` (global indices, broadcasting): a valid slot
        (`visible`, nonzero), and in the segment no key after the query's own."""
        return (visible != 0) & (key - (self.n_cmem + self.n_mem) <= query)

    def dropout_scale(
        self, row_seed: jax.Array, head: jax.Array, query: jax.Array, key: jax.Array
    ) -> jax.Array | None:
        """0 for the dropped weights of (row, head, query, key), 1/(1-rate) for the kept ones,
        broadcast over the indices; None without dropout. A backward hashes once and scales both
        the weights and their gradient."""
        if not self.dropout:
            return None
        keep = kept_weights(row_seed, head, query, key, self.dropout)
        return jnp.where(keep, 1.0 / (1.0 - self.dropout), 0.0)


def dropped(weights: jax.Array, scale: jax.Array | None) -> jax.Array:
    """The weights with dropout's scale applied (unchanged without dropout)."""
    return weights if scale is None else weights * scale


def range_masses(
    p: jax.Array, key: jax.Array, lane: jax.Array, ranges: tuple[tuple[int, int], ...]
) -> jax.Array:
    """[queries, lanes]: row sums of a tile's (unnormalised) probabilities p over the keys of
    each range, range r in the lanes where `lane` == r: the attention each query gives the
    compressed memory, the memory and the segment, as a running softmax accumulates it."""
    masses = jnp.zeros((p.shape[0], lane.shape[1]), jnp.float32)
    for r, (lo, hi) in enumerate(ranges):
        in_range = jnp.sum(jnp.where((key >= lo) & (key < hi), p, 0.0), axis=1, keepdims=True)
        masses = masses + jnp.where(lane == r, in_range, 0.0)
    return masses


class FusedKernels(NamedTuple):
    """A backend's half of the contract.

    forward(operands, seeds, layout, usage_keys) -> ((out [H,B,N,K], masses [H,B,N,3], usage
    [H,B,end-first] or None), lse): `seeds` the [B] int32 row seeds of dropout, `lse` the
    log-sum-exp per query in the backend's own layout (the backward's only statistic).
    backward(operands, seeds, layout, out, lse, dout) -> the gradients of q, u, k, v, v_biases
    and tables as `AttentionOperands` (visible None); dout in the queries' dtype, and
    `output_delta(out, dout)` the softmax backward's row statistic.
    check_usage_keys(usage_keys, layout), where given, raises ValueError for a range of keys
    whose usage the backend cannot report (default: any range).
    """

    forward: Callable
    backward: Callable
    check_usage_keys: Callable[[tuple[int, int], KeyLayout], None] | None = None


def flash_attention(
    kernels: FusedKernels,
    operands: AttentionOperands,
    n_cmem: int,
    n_mem: int,
    usage_keys: tuple[int, int] | None = None,
    dropout: float = 0.0,
    dropout_seed: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The fused attention of `operands` by `kernels`: the output [H,B,N,K]; the attention each
    query gives the compressed memory, the memory and the segment, [H,B,N,3]; and, for keys
    `usage_keys` = (first, end) when given, the attention each of them receives summed over the
    queries, [H,B,end-first] (else None). The last two are statistics of the undropped weights,
    with no gradient. `dropout`: the rate at which the attention weights are dropped, with the
    mask `kept_weights` draws from the int32 `dropout_seed`."""
    if dropout and dropout_seed is None:
        raise ValueError(f"attention dropout at {dropout} needs a dropout_seed")
    layout = KeyLayout(n_cmem, n_mem, operands.q.shape[2], float(dropout))
    if usage_keys is not None:
        usage_keys = tuple(usage_keys)
        if kernels.check_usage_keys is not None:
            kernels.check_usage_keys(usage_keys, layout)
    seeds = row_seeds(0 if dropout_seed is None else dropout_seed, operands.q.shape[1])
    return _attention(operands, seeds, kernels, layout, usage_keys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _attention(operands, seeds, kernels, layout, usage_keys):
    return _forward(operands, seeds, kernels, layout, usage_keys)[0]


def _forward(operands, seeds, kernels, layout, usage_keys):
    (out, masses, usage), lse = kernels.forward(operands, seeds, layout, usage_keys)
    # Named for the layers' remat policy, which keeps them: the backward needs only these two
    # small arrays, and recomputing them would rerun the whole kernel.
    out, lse = (checkpoint_name(x, KERNEL_OUTPUTS) for x in (out, lse))
    return (out, masses, usage), (operands, seeds, out, lse)


def _backward(kernels, layout, usage_keys, residuals, cotangents):
    del usage_keys
    operands, seeds, out, lse = residuals
    dout = cotangents[0].astype(operands.q.dtype)
    return kernels.backward(operands, seeds, layout, out, lse, dout), None


def output_delta(out: jax.Array, dout: jax.Array) -> jax.Array:
    """[H,B,N] float32: rowsum(dout∘out), which the softmax's backward subtracts from each
    weight's gradient. With dropout, out = (p∘z)·v and this is still rowsum(p∘dp∘z), so the
    backward keeps its form with the weights' gradient dp∘z."""
    return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


_attention.defvjp(_forward, _backward)
