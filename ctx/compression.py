"""Compression functions f_c: n_s evicted memories -> n_s/c compressed slots (PAPER.md 4).

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

_DIMS = ("NWC", "WIO", "NWC")


def _conv(x_BTD: jax.Array, kernel_WIO: jax.Array, stride: int = 1, dilation: int = 1,
          left_pad: int = 0) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x_BTD, kernel_WIO.astype(x_BTD.dtype), window_strides=(stride,), padding=((left_pad, 0),),
        rhs_dilation=(dilation,), dimension_numbers=_DIMS)


class Compressor(nn.Module):
    """f_c for one layer: 'conv', 'dilated_conv', 'max', 'mean' or 'most_used'."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.d_model
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        if cfg.compression == "dilated_conv":
            self.dilated = [self.param(f"dilated_{r}", init, (2, d, d)) for r in cfg.dilation_rates]
        if cfg.compression in ("conv", "dilated_conv"):
            self.strided = self.param("strided", init, (cfg.compression_rate, d, d))

    def _linear_parts(self, x_BND: jax.Array, relu: bool) -> jax.Array:
        """The conv stack: causal dilated convs (ReLU between) then the strided conv."""
        if self.cfg.compression == "dilated_conv":
            for rate, kernel in zip(self.cfg.dilation_rates, self.dilated):
                x_BND = _conv(x_BND, kernel, dilation=rate, left_pad=rate)
                x_BND = jax.nn.relu(x_BND) if relu else x_BND
        return _conv(x_BND, self.strided, stride=self.cfg.compression_rate)

    def __call__(self, evicted_BND: jax.Array, usage_BN: jax.Array | None = None) -> jax.Array:
        """Compress [B, n_s, d] to [B, n_s/c, d]; `usage` (attention received) for most_used."""
        cfg = self.cfg
        B, N, d = evicted_BND.shape
        k, c = cfg.slots_per_segment, cfg.compression_rate
        if cfg.compression in ("conv", "dilated_conv"):
            return self._linear_parts(evicted_BND, relu=True)
        if cfg.compression == "max":
            return evicted_BND.reshape(B, k, c, d).max(axis=2)
        if cfg.compression == "mean":
            return evicted_BND.reshape(B, k, c, d).mean(axis=2)
        # most_used: keep the k most-attended entries, in time order.
        _, top_BK = jax.lax.top_k(usage_BN, k)
        return jnp.take_along_axis(evicted_BND, jnp.sort(top_BK, axis=1)[..., None], axis=1)

    def decode(self, compressed_BKD: jax.Array) -> jax.Array:
        """The tied transpose of the conv stack (ReLUs dropped): [B,n_s/c,d] -> [B,n_s,d].

        This is the auto-encoding loss's decoder g (PAPER.md 5): Sonnet ties it to the
        compression conv, and `jax.linear_transpose` gives the exact transpose of any stack.
        """
        B, _, d = compressed_BKD.shape
        example = jax.ShapeDtypeStruct((B, self.cfg.segment_length, d), compressed_BKD.dtype)
        transpose = jax.linear_transpose(lambda x: self._linear_parts(x, relu=False), example)
        (decoded_BND,) = transpose(compressed_BKD)
        return decoded_BND
