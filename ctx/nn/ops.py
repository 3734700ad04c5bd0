"""Softmax, ReLU and LayerNorm with hand-written backward passes that keep one tensor each.

JAX's own rules keep more for the backward pass: jax.nn.softmax (by default) differentiates
exp(x - max) / sum as written and keeps the logits, the exponentials and the probabilities
(three score-sized [B,H,N,T] tensors per layer); jax.nn.relu keeps a mask and a materialised
zeros tensor; flax's LayerNorm keeps four activation-sized intermediates. Under the layer
scan every kept tensor is written to a stacked buffer in the forward pass and read back in
the backward, so on CPUs these copies cost as much as the arithmetic. Each op here keeps
what its backward formula needs and nothing else: the probabilities, the ReLU output
(which the next matmul's weight gradient keeps anyway), the normalised input (fp32) and 1/σ.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The logit of a hidden key in every attention implementation: its exp (less any row maximum)
# underflows to exactly 0, adding a position term to it cannot reach -inf, a row with every key
# hidden has no inf - inf, and bfloat16 represents it too (half of float32's largest value).
MASKED_LOGIT = -0.5 * float(jnp.finfo(jnp.float32).max)


@jax.custom_vjp
def softmax(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax over the last axis, over the entries where `mask` (broadcastable to x) is True;
    every row must keep at least one. The backward is y·(g - Σ g·y), which is 0 where masked
    because y is, so no mask and no filler tensor are kept for it."""
    return _softmax_forward(x, mask)[0]


def _softmax_forward(x, mask):
    y = jax.nn.softmax(x if mask is None else jnp.where(mask, x, MASKED_LOGIT), axis=-1)
    return y, y


def _softmax_backward(y, g):
    return y * (g - jnp.sum(g * y, axis=-1, keepdims=True)), None


softmax.defvjp(_softmax_forward, _softmax_backward)


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0); the backward passes g where the output is positive (0 at x = 0, as jax.nn.relu)."""
    return jnp.maximum(x, 0)


def _relu_forward(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_backward(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_forward, _relu_backward)


def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any
) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) · scale + bias over the last axis, computed in fp32 and
    returned in `dtype`."""
    return _layer_norm(x, scale, bias, epsilon, jnp.dtype(dtype), x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm(x, scale, bias, epsilon, dtype, x_dtype):
    return _layer_norm_forward(x, scale, bias, epsilon, dtype, x_dtype)[0]


def _layer_norm_forward(x, scale, bias, epsilon, dtype, x_dtype):
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
    normalised = centred * inv_std
    y = (normalised * _last_axis(scale, x.ndim) + _last_axis(bias, x.ndim)).astype(dtype)
    return y, (normalised, inv_std, scale)


def _layer_norm_backward(epsilon, dtype, x_dtype, residuals, g):
    normalised, inv_std, scale = residuals
    g32 = g.astype(jnp.float32)
    batch_axes = tuple(range(g.ndim - 1))
    d_scale = jnp.sum(g32 * normalised, axis=batch_axes).astype(scale.dtype)
    d_bias = jnp.sum(g32, axis=batch_axes).astype(scale.dtype)
    g_hat = g32 * _last_axis(scale, g.ndim)
    d_x = inv_std * (
        g_hat
        - jnp.mean(g_hat, axis=-1, keepdims=True)
        - normalised * jnp.mean(g_hat * normalised, axis=-1, keepdims=True)
    )
    return d_x.astype(x_dtype), d_scale, d_bias


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def _last_axis(v: jax.Array, ndim: int) -> jax.Array:
    """A [D] vector in float32 shaped to broadcast over the last axis of an `ndim`-rank array."""
    return v.astype(jnp.float32).reshape((1,) * (ndim - 1) + (-1,))


class LayerNorm(nn.Module):
    """Drop-in for flax.linen.LayerNorm (same parameter names and initialisers) on `layer_norm`.
    epsilon 1e-5 as in Sonnet's CompressiveTransformer and the Transformer-XL authors' code
    (flax's default is 1e-6; parameters do not depend on it)."""

    dtype: jnp.dtype | str = jnp.float32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        return layer_norm(x, scale, bias, self.epsilon, self.dtype)
