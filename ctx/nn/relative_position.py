"""Transformer-XL's relative position term over [compressed memory; memory; segment], as XLA
ops: the reference the attention's `xla` and `cudnn` paths use, and the band the GPU kernel
gathers its tiles from (returning the band's gradient through `jax.vjp`); the TPU kernel
computes the same term, and its gradient, tile by tile.

Positions follow DeepMind's Sonnet CompressiveTransformer (docs/paper-notes.md §2): one
sinusoid table, projection and bias `v` for memory + segment, and a separate set for the
compressed memory, as if it came directly before the segment. The projected tables list
distances in descending order and the compressed memory's is laid before the memory's, so one
GEMM and one relative shift serve both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sinusoid_table(distances: jax.Array, d: int) -> jax.Array:
    """R_delta = [sin(delta * w), cos(delta * w)], w_k = 10000^(-2k/d); shape [P, d]."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    angles = distances.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def relative_shift(x_NP: jax.Array) -> jax.Array:
    """Turn scores against distances into scores against keys with one pad and reshapes.

    Input column k holds distance P-1-k; output [i, j] = input[i, j + N-1-i], i.e. the
    score of query i against key j at distance (P-N) + i - j. Entries with j > (P-N) + i
    (the future) are garbage and must be masked by the caller.
    """
    *lead, N, P = x_NP.shape
    padded = jnp.pad(x_NP, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
    shifted = padded.reshape(*lead, P + 1, N)[..., 1:, :]
    return shifted.reshape(*lead, N, P)


def position_band(
    q_HBNK: jax.Array,
    v_biases_HRK: jax.Array,
    r_HPK: jax.Array,
    n_cmem: int,
    batch_major: bool = False,
) -> jax.Array:
    """(q + v)·R against the distances, before the relative shift: [H,B,N,P] (batch_major:
    [B,H,N,P]), column p holding the tables' row p.

    `r_HPK`: the projected tables, the cmem's (n_cmem + N rows) first when n_cmem > 0, then
    the memory's (n_mem + N rows), distances descending; `v_biases_HRK`: the bias v of each.
    (q + v)·R is computed as q·R + v·R: q is then shared with the content term (one tensor
    kept for the backward pass instead of one per bias) and v·R is a [H,P] row."""
    N = q_HBNK.shape[2]
    bounds = (0, n_cmem + N, r_HPK.shape[1]) if n_cmem else (0, r_HPK.shape[1])
    bias_HP = jnp.concatenate(
        [
            jnp.einsum("hk,hpk->hp", v_biases_HRK[:, t], r_HPK[:, lo:hi])
            for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
        ],
        axis=-1,
    )
    spec, bias_rows = (
        ("hbnk,hpk->bhnp", bias_HP[None, :, None, :])
        if batch_major
        else ("hbnk,hpk->hbnp", bias_HP[:, None, None, :])
    )
    return jnp.einsum(spec, q_HBNK, r_HPK) + bias_rows


def position_scores(
    q_HBNK: jax.Array,
    v_biases_HRK: jax.Array,
    r_HPK: jax.Array,
    n_cmem: int,
    batch_major: bool = False,
) -> jax.Array:
    """(q + v)·R shifted onto the keys: [H,B,N,C+M+N] (batch_major: [B,H,N,C+M+N]), from
    `position_band`. The shifted columns C .. C+N (the cmem table's distances below n_cmem,
    which no key has) are dropped."""
    N = q_HBNK.shape[2]
    shifted = relative_shift(position_band(q_HBNK, v_biases_HRK, r_HPK, n_cmem, batch_major))
    if n_cmem:
        shifted = jnp.concatenate([shifted[..., :n_cmem], shifted[..., n_cmem + N :]], axis=-1)
    return shifted
