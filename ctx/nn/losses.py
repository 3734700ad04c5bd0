"""Losses: token cross-entropy and the compressor's auxiliary losses (docs/paper-notes.md §5).

The auxiliary losses see only stop-gradient-ed queries, memories and attention weights,
so they train the compression network and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ctx.nn.ops import softmax


def token_nll(logits_BNV: jax.Array, targets_BN: jax.Array) -> jax.Array:
    """Negative log-likelihood [B,N] of each target token, in nats (computed in fp32)."""
    logits = logits_BNV.astype(jnp.float32)
    # logsumexp - target logit; the one-hot product keeps the backward free of scatters.
    target_logit = jnp.sum(
        logits * jax.nn.one_hot(targets_BN, logits.shape[-1], dtype=logits.dtype), axis=-1
    )
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def weighted_mean_nll(
    logits_BNV: jax.Array, targets_BN: jax.Array, weights_BN: jax.Array
) -> jax.Array:
    """Mean NLL over the positions with non-zero weight (0 if there are none)."""
    weights = weights_BN.astype(jnp.float32)
    return (token_nll(logits_BNV, targets_BN) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _content_read(q_HBNK: jax.Array, k_HBTK: jax.Array, v_HBTK: jax.Array) -> jax.Array:
    probs = softmax(jnp.einsum("hbnk,hbtk->hbnt", q_HBNK, k_HBTK).astype(jnp.float32))
    return jnp.einsum("hbnt,hbtk->hbnk", probs, v_HBTK.astype(jnp.float32))


def reconstruction_difference(
    q_HBNK: jax.Array,
    k_HBTK: jax.Array,
    v_HBTK: jax.Array,
    first_evicted: int,
    n_evicted: int,
    compressed_k_HBEK: jax.Array,
    compressed_v_HBEK: jax.Array,
) -> jax.Array:
    """Content-only attention read over the evicted memories (keys and values
    [first_evicted : first_evicted + n_evicted] of the layer's) minus the read over their
    compression, [H,B,N,K] float32, all head-major ([H,B,T,K]). Both sets must come from the
    layer's own key/value projections held constant (stop_gradient on the weights), so the loss
    trains only the compression network. No u/v, no position term, no mask, no output
    projection (Sonnet). `ctx.nn.pallas_reconstruction` computes the same in one TPU kernel.
    """
    evicted = slice(first_evicted, first_evicted + n_evicted)
    q_HBNK, k_HBSK, v_HBSK = jax.lax.stop_gradient(
        (q_HBNK, k_HBTK[:, :, evicted], v_HBTK[:, :, evicted])
    )
    return _content_read(q_HBNK, k_HBSK, v_HBSK) - _content_read(
        q_HBNK, compressed_k_HBEK, compressed_v_HBEK
    )


def attention_reconstruction_loss(difference_HBNK: jax.Array) -> jax.Array:
    """The mean square of the two reads' difference (`reconstruction_difference`)."""
    return jnp.mean(jnp.square(difference_HBNK))


def autoencoder_loss(old_BND: jax.Array, decoded_BND: jax.Array) -> jax.Array:
    """mean((g(f(old)) - old)^2) with the target held constant."""
    diff = decoded_BND.astype(jnp.float32) - jax.lax.stop_gradient(old_BND).astype(jnp.float32)
    return jnp.mean(jnp.square(diff))
