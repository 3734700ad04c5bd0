"""Analytic model FLOPs per token (multiply-add = 2 FLOPs), for MFU.

Forward, per layer and token, with n_s = N, keys T = n_cm + n_m + n_s:
  projections   2·d·(3·d) (q, k, v of the token) + 2·d·d (output)
  memory k, v   2·(n_cm + n_m)·2·d·d / N  (memory keys/values are recomputed each segment)
  content       2·T·d (scores) + 2·T·d (weighted values)
  position      2·(n_m+N)·d + 2·(n_cm+N)·d (q·R), and the tables' projection
                2·((n_m+N) + (n_cm+N))·d·d / N per segment
  MLP           2·2·d·d_ff
  compression   conv: 2·c·d·d per slot = 2·d·d per token; dilated adds 2·2·d·d per rate
  compression loss (attention): k, v of the compressed slots (2·2·d·d/c; the evicted
                entries' keys and values are reused from the attention) plus
                2·2·N·d·(1 + 1/c) attention reads
plus the output layer 2·d·V. Training = 3 × forward (backward twice the forward), except
that the compression network's backward sees only the compression loss (counted the same).
"""
from __future__ import annotations

from typing import Any

from ctx.config import ModelConfig


def forward_flops_per_token(config: Any) -> float:
    cfg = ModelConfig.from_config(config)
    d, N, M, C, c = cfg.d_model, cfg.segment_length, cfg.memory_length, cfg.compressed_length, cfg.compression_rate
    T = C + M + N
    layer = (2 * d * 3 * d + 2 * d * d
             + 2 * (C + M) * 2 * d * d / N
             + 4 * T * d
             + 2 * (M + N) * d + (2 * (C + N) * d if C else 0)
             + 2 * ((M + N) + ((C + N) if C else 0)) * d * d / N
             + 4 * d * cfg.d_ff)
    if C and cfg.compression in ("conv", "dilated_conv"):
        layer += 2 * d * d
        if cfg.compression == "dilated_conv":
            layer += 2 * 2 * d * d * len(cfg.dilation_rates)
    if C and cfg.compression_loss == "attention":
        layer += 2 * 2 * d * d / c + 2 * 2 * N * d * (1 + 1 / c)
    return cfg.n_layers * layer + 2 * d * cfg.vocab_size


def train_flops_per_token(config: Any) -> float:
    return 3 * forward_flops_per_token(config)


def parameter_count(config: Any) -> dict[str, int]:
    """Parameters of the whole model and of the compression network alone."""
    cfg = ModelConfig.from_config(config)
    d, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    attention = 4 * d * H * K + 2 * H * K + d * H * K + d  # q k v pos, u v, out + bias
    if cfg.compresses:
        attention += d * H * K + H * K
    layer = attention + 2 * d * cfg.d_ff + cfg.d_ff + d + 4 * d  # MLP, 2 LayerNorms
    compress = 0
    if cfg.has_compression_params:
        compress = cfg.compression_rate * d * d + (2 * d * d * len(cfg.dilation_rates)
                                                    if cfg.compression == "dilated_conv" else 0)
    total = cfg.n_layers * (layer + compress) + cfg.vocab_size * d + d * cfg.vocab_size + cfg.vocab_size
    total += 2 * d if cfg.layer_norm == "pre" else 0
    return {"total": total, "compression": cfg.n_layers * compress}
