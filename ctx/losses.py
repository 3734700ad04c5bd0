"""Losses: token cross-entropy and the compressor's auxiliary losses (PAPER.md 5).

The auxiliary losses see only stop-gradient-ed queries, memories and attention weights,
so they train the compression network and nothing else.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

KeysValuesFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def token_nll(logits_BNV: jax.Array, targets_BN: jax.Array) -> jax.Array:
    """Negative log-likelihood [B,N] of each target token, in nats (computed in fp32)."""
    logits = logits_BNV.astype(jnp.float32)
    # logsumexp - target logit; the one-hot product keeps the backward free of scatters.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets_BN, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def weighted_mean_nll(logits_BNV: jax.Array, targets_BN: jax.Array, weights_BN: jax.Array) -> jax.Array:
    """Mean NLL over the positions with non-zero weight (0 if there are none)."""
    weights = weights_BN.astype(jnp.float32)
    return (token_nll(logits_BNV, targets_BN) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _content_read(q_BNHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(jnp.einsum("bnhk,bthk->bhnt", q_BNHK, k_BTHK).astype(jnp.float32), axis=-1)
    return jnp.einsum("bhnt,bthk->bhnk", probs, v_BTHK.astype(jnp.float32))


def attention_reconstruction_loss(q_BNHK: jax.Array, old_BND: jax.Array, compressed_BKD: jax.Array,
                                  keys_values: KeysValuesFn) -> jax.Array:
    """MSE between content-only attention reads over the evicted memories and over their
    compression, with the layer's own key/value projections (`keys_values` must apply them
    under stop_gradient). No u/v, no position term, no mask, no output projection (Sonnet).
    """
    q_BNHK = jax.lax.stop_gradient(q_BNHK)
    old_BND = jax.lax.stop_gradient(old_BND)
    read_old = _content_read(q_BNHK, *keys_values(old_BND))
    read_compressed = _content_read(q_BNHK, *keys_values(compressed_BKD))
    return jnp.mean(jnp.square(read_old - read_compressed))


def autoencoder_loss(old_BND: jax.Array, decoded_BND: jax.Array) -> jax.Array:
    """mean((g(f(old)) - old)^2) with the target held constant."""
    diff = decoded_BND.astype(jnp.float32) - jax.lax.stop_gradient(old_BND).astype(jnp.float32)
    return jnp.mean(jnp.square(diff))
