"""Attention dropout as a counter-based hash: whether a weight survives is a function of (the
batch row's seed, head, query, key) alone, so a kernel's backward regenerates its forward's
mask from indices, nothing of the mask reaches HBM, and every implementation that drops
weights (the TPU and GPU kernels, and the XLA reference of `ctx.nn.attention_reference`)
draws the very same mask on every backend. Integer hashing is ordinary vector code that Mosaic,
Triton and Pallas' interpreter all run alike (the TPU's hardware PRNG has no interpreter here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
    """A bijective scramble of int32 bits (MurmurHash3's finaliser), in operations Mosaic lowers."""
    x = x ^ jax.lax.shift_right_logical(x, 16)
    x = x * jnp.int32(-2048144789)  # 0x85ebca6b
    x = x ^ jax.lax.shift_right_logical(x, 13)
    x = x * jnp.int32(-1028477387)  # 0xc2b2ae35
    return x ^ jax.lax.shift_right_logical(x, 16)


def kept_weights(
    row_seed: jax.Array, head: jax.Array, query: jax.Array, key: jax.Array, rate: float
) -> jax.Array:
    """Whether the attention weight of (row, head, query, key) survives dropout at `rate`: a
    counter-based hash of the four, so the backward (and a reference in XLA ops) regenerates
    the forward's mask from indices alone. `row_seed` is per batch row (`row_seeds`); the
    arguments broadcast against each other. Each query's stream is mixed on its own (a column
    of the tile), then with the key: one full mix per weight."""
    stream = _mix(_mix(row_seed + head * jnp.int32(0x27D4EB2F)) ^ (query * jnp.int32(0x165667B1)))
    bits = _mix(stream ^ (key * jnp.int32(-1640531535)))  # 0x9e3779b1
    return (bits & 0xFFFFFF) >= int(round(rate * (1 << 24)))


def row_seeds(seed: jax.Array, batch: int) -> jax.Array:
    """[B] int32 seeds of the batch rows from one dropout seed, made before the kernel is split
    across devices, so a row's mask does not depend on which device holds it."""
    return _mix(
        jnp.asarray(seed, jnp.int32)
        ^ _mix(jnp.arange(batch, dtype=jnp.int32) + jnp.int32(0x3C6EF372))
    )
