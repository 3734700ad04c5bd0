"""Compression functions f_c: n_s evicted memories -> n_s/c compressed slots (paper §3.2; docs/paper-notes.md §4).

One Flax module, `Compressor`, holds whichever function the config names; it is created
with the name `compress` inside every layer so its parameters (per layer, stacked by the
layer scan) are selected by that path component. Inputs are always stop-gradient-ed by
the caller, so only the compression loss can train these parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctx.config import ModelConfig
from ctx.nn import ops


def strided_conv(x_BND: jax.Array, kernel_WDD: jax.Array) -> jax.Array:
    """Conv1D with kernel = stride = c (W = c) and no padding, as one GEMM: [B, N/c, c*d] @ [c*d, d]."""
    B, N, D = x_BND.shape
    c = kernel_WDD.shape[0]
    groups = x_BND[:, : N // c * c].reshape(B, N // c, c * D)
    return groups @ kernel_WDD.reshape(c * D, -1).astype(x_BND.dtype)


def causal_dilated_conv(x_BND: jax.Array, kernel_WDD: jax.Array, rate: int) -> jax.Array:
    """Kernel-2 (W = 2) conv with dilation `rate`, left-padded with zeros: y[t] = x[t-rate] W0 + x[t] W1."""
    shifted = jnp.pad(x_BND, ((0, 0), (rate, 0), (0, 0)))[:, : x_BND.shape[1]]
    kernel = kernel_WDD.astype(x_BND.dtype)
    return shifted @ kernel[0] + x_BND @ kernel[1]


class Compressor(nn.Module):
    """f_c for one layer: 'conv', 'dilated_conv', 'max', 'mean' or 'most_used'."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.d_model
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        if cfg.compression == "dilated_conv":
            self.dilated = [self.param(f"dilated_{r}", init, (2, d, d)) for r in cfg.dilation_rates]
        if cfg.compression in ("conv", "dilated_conv"):
            self.strided = self.param("strided", init, (cfg.compression_rate, d, d))

    def _linear_parts(self, x_BND: jax.Array, relu: bool) -> jax.Array:
        """The conv stack: causal dilated convs (ReLU between) then the strided conv."""
        if self.cfg.compression == "dilated_conv":
            for rate, kernel in zip(self.cfg.dilation_rates, self.dilated):
                x_BND = causal_dilated_conv(x_BND, kernel, rate)
                x_BND = ops.relu(x_BND) if relu else x_BND
        return strided_conv(x_BND, self.strided)

    def __call__(self, evicted_BND: jax.Array, usage_BN: jax.Array | None = None) -> jax.Array:
        """Compress [B, n_s, d] to [B, n_s/c, d]; `usage` (attention received) for most_used."""
        cfg = self.cfg
        B, N, D = evicted_BND.shape
        E, c = cfg.slots_per_segment, cfg.compression_rate
        if cfg.compression in ("conv", "dilated_conv"):
            return self._linear_parts(evicted_BND, relu=True)
        if cfg.compression == "max":
            return evicted_BND.reshape(B, E, c, D).max(axis=2)
        if cfg.compression == "mean":
            return evicted_BND.reshape(B, E, c, D).mean(axis=2)
        # most_used: keep the E most-attended entries, in time order.
        _, top_BE = jax.lax.top_k(usage_BN, E)
        return jnp.take_along_axis(evicted_BND, jnp.sort(top_BE, axis=1)[..., None], axis=1)

    def decode(self, compressed_BED: jax.Array) -> jax.Array:
        """The tied transpose of the conv stack (ReLUs dropped): [B,n_s/c,d] -> [B,n_s,d].

        This is the auto-encoding loss's decoder g (docs/paper-notes.md §5), tied to the
        compression conv: `jax.linear_transpose` gives the exact transpose of any stack. Sonnet's
        `conv.transpose()` is a separate transposed conv with weights of its own (a deviation).
        """
        B, _, d = compressed_BED.shape
        example = jax.ShapeDtypeStruct((B, self.cfg.segment_length, d), compressed_BED.dtype)
        transpose = jax.linear_transpose(lambda x: self._linear_parts(x, relu=False), example)
        (decoded_BND,) = transpose(compressed_BED)
        return decoded_BND
