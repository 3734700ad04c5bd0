"""Analytic model FLOPs per token (multiply-add = 2 FLOPs), for MFU.

Forward, per layer and token, with n_s = N, keys T = n_cm + n_m + n_s:
  projections   2·d·(3·d) (q, k, v of the token) + 2·d·d (output)
  memory k, v   2·(n_cm + n_m)·2·d·d / N  (memory keys/values are recomputed each segment)
  content       2·T·d (scores) + 2·T·d (weighted values), and u·k once per key: 2·T·d / N
  position      2·(n_m+N)·d + 2·(n_cm+N)·d (q·R), and, once per segment for the whole
                batch (so divided by B·N), the tables' projection 2·P·d·d and v·R 2·P·d,
                P = (n_m+N) + (n_cm+N) (a device recomputing them for its own rows is
                redundant work, like rematerialisation, and not counted)
  MLP           2·2·d·d_ff
  compression   conv: 2·c·d·d per slot = 2·d·d per token; dilated adds 2·2·d·d per rate
  compression loss (attention): k, v of the compressed slots (2·2·d·d/c; the evicted
                entries' keys and values are reused from the attention) plus
                2·2·N·d·(1 + 1/c) attention reads; autoencoder: the decoder, the
                compressor's transpose, costs what the compressor does
plus the output layer 2·d·V; the token embedding (a lookup) is not counted. Training =
3 × forward (backward twice the forward), except that the compression network's backward
sees only the compression loss (counted the same).
"""

from __future__ import annotations

from ctx.config import ModelConfig
from ctx.errors import InputError


def forward_flops_per_token(cfg: ModelConfig, batch_size: int) -> float:
    """cfg: the model config; batch_size: the global batch (rows per segment), over which
    the position tables' projection is shared."""
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive number of rows, got {batch_size}")
    d, N, M, C, c = (
        cfg.d_model,
        cfg.segment_length,
        cfg.memory_length,
        cfg.compressed_length,
        cfg.compression_rate,
    )
    T, P = C + M + N, (M + N) + ((C + N) if C else 0)
    layer = (
        2 * d * 3 * d
        + 2 * d * d
        + 2 * (C + M) * 2 * d * d / N
        + 4 * T * d
        + 2 * T * d / N
        + 2 * P * d
        + 2 * P * (d + 1) * d / (batch_size * N)
        + 4 * d * cfg.d_ff
    )
    compressor = 0.0
    if C and cfg.compression in ("conv", "dilated_conv"):
        compressor = 2 * d * d
        if cfg.compression == "dilated_conv":
            compressor += 2 * 2 * d * d * len(cfg.dilation_rates)
    layer += compressor
    if C and cfg.compression_loss == "attention":
        layer += 2 * 2 * d * d / c + 2 * 2 * N * d * (1 + 1 / c)
    elif C and cfg.compression_loss == "autoencoder":
        layer += compressor  # the decoder is the compressor's exact transpose
    return cfg.n_layers * layer + 2 * d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, batch_size: int) -> float:
    return 3 * forward_flops_per_token(cfg, batch_size)


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of the whole model and of the compression network alone."""
    d, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    attention = 4 * d * H * K + 2 * H * K + d * H * K + d  # q k v pos, u v, out + bias
    if cfg.compresses:
        attention += d * H * K + H * K
    layer = attention + 2 * d * cfg.d_ff + cfg.d_ff + d + 4 * d  # MLP, 2 LayerNorms
    compress = 0
    if cfg.has_compression_params:
        compress = cfg.compression_rate * d * d + (
            2 * d * d * len(cfg.dilation_rates) if cfg.compression == "dilated_conv" else 0
        )
    total = (
        cfg.n_layers * (layer + compress) + cfg.vocab_size * d + d * cfg.vocab_size + cfg.vocab_size
    )
    total += 2 * d if cfg.layer_norm == "pre" else 0
    return {"total": total, "compression": cfg.n_layers * compress}
