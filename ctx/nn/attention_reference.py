"""What the fused attention kernels compute, written as plain XLA ops: the contract that
`ctx.selfcheck` and the tests hold every kernel to, at the kernels' own calling convention.

Head-major like the kernels: scaled queries q [H,B,N,K] (without biases), u [H,K], keys and
values [H,B,T,K] of [cmem; mem; segment], the v biases [H,R,K] and projected tables [H,P,K] as
`position_scores` takes them, and `visible` [B,T] (whether each key holds a valid slot; the
segment's keys are also hidden from the queries before them). Attention dropout uses the
kernels' own mask (`ctx.nn.attention_dropout.kept_weights`), so a kernel and this reference agree weight for
weight. `draw_operands` draws the inputs both the tests and the self-check hold them to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ctx.nn.attention_dropout import kept_weights, row_seeds
from ctx.nn.fused_attention import AttentionOperands
from ctx.nn.relative_position import position_scores


def dropout_mask(seed: jax.Array, H: int, B: int, N: int, T: int, rate: float) -> jax.Array:
    """[H,B,N,T]: which weights the kernels keep, by their hash over the whole score array."""
    return kept_weights(
        row_seeds(seed, B)[None, :, None, None],
        jnp.arange(H)[:, None, None, None],
        jnp.arange(N)[None, None, :, None],
        jnp.arange(T)[None, None, None, :],
        rate,
    )


def visibility(visible_BT: jax.Array, n_queries: int, n_cmem: int, n_mem: int) -> jax.Array:
    """[B,N,T]: valid memory slots for every query, and the segment's keys up to the query's own."""
    T = visible_BT.shape[1]
    causal_NT = np.arange(T)[None] - (n_cmem + n_mem) <= np.arange(n_queries)[:, None]
    return visible_BT[:, None, :] & causal_NT[None]


def reference_attention(
    q,
    u,
    k,
    v,
    v_biases,
    r,
    visible,
    *,
    n_cmem: int,
    n_mem: int,
    dropout: float = 0.0,
    seed: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(output [H,B,N,K], undropped probabilities [H,B,N,T] in float32): softmax((q + u)·k +
    position_scores(q, v_biases, r) over the visible keys), the weights dropped with the kernels'
    mask at rate `dropout` (seed: the int32 dropout seed), times v. float32 accumulation."""
    (H, B, N, _), T = q.shape, k.shape[2]
    logits = jnp.einsum(
        "hbnk,hbtk->hbnt", q + u[:, None, None, :], k, preferred_element_type=jnp.float32
    ) + position_scores(q, v_biases, r, n_cmem).astype(jnp.float32)
    seen = visibility(visible, N, n_cmem, n_mem)[None]
    probs = jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), axis=-1)
    weights = probs
    if dropout:
        weights = jnp.where(dropout_mask(seed, H, B, N, T, dropout), probs / (1 - dropout), 0.0)
    return jnp.einsum("hbnt,hbtk->hbnk", weights.astype(v.dtype), v), probs


def range_masses(probs_HBNT: jax.Array, n_cmem: int, n_mem: int) -> jax.Array:
    """[H,B,N,3]: the attention each query gives the compressed memory, the memory, the segment."""
    bounds = (0, n_cmem, n_cmem + n_mem, probs_HBNT.shape[-1])
    return jnp.stack(
        [probs_HBNT[..., lo:hi].sum(-1) for lo, hi in zip(bounds[:-1], bounds[1:])], axis=-1
    )


def draw_operands(
    n_cmem: int,
    n_mem: int,
    n_queries: int,
    head_dim: int,
    dtype,
    seed: int,
    *,
    position_dominant: bool = True,
    heads: int = 2,
    rows: int = 2,
) -> AttentionOperands:
    """Random operands of one layout, as the tests and `ctx.selfcheck` draw them: the dominant
    term's factors (the position term's q and tables, or the content term's q and k) of unit
    scale per logit, the other's a tenth of that, unit values; row 0 with its oldest quarter of
    memory slots empty, row 1 with no valid memory (as after a reset), the other rows full."""
    T = n_cmem + n_mem + n_queries
    P = (n_cmem + n_queries if n_cmem else 0) + n_mem + n_queries
    keys = jax.random.split(jax.random.key(seed), 6)
    unit = head_dim**-0.25  # q·r (or q·k) of two such vectors has unit variance
    big, small = (unit, 0.1 * unit) if position_dominant else (0.1 * unit, unit)
    shapes = [
        (heads, rows, n_queries, head_dim),
        (heads, head_dim),
        (heads, rows, T, head_dim),
        (heads, rows, T, head_dim),
        (heads, 2 if n_cmem else 1, head_dim),
        (heads, P, head_dim),
    ]
    scales = [unit, 0.1 * unit, small, 1.0, 0.1 * unit, big]
    arrays = [
        (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        for key, shape, scale in zip(keys, shapes, scales)
    ]
    visible = np.ones((rows, T), bool)
    memory = n_cmem + n_mem
    visible[0, : memory // 4] = False
    visible[1, :memory] = False
    return AttentionOperands(*arrays, jnp.asarray(visible))
