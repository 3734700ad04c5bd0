"""What the paper's three language-model configs share (paper §5; docs/paper-notes.md §6): Adam
with warmup from 1e-6 to 3e-4 and cosine decay to 1e-6, global-norm clip 0.1, and updates every
4 segments after 60k steps. Each task file (experiments/pg19.py, enwik8.py, wt103.py) sets its
sizes on top; they import this from the library so that they load by path from anywhere.

The dropout rate applies to the attention weights too (model.attention_dropout unset), as
Sonnet's one rate does; the paper does not say otherwise. The Pallas attention (TPUs) drops
them inside its kernel; cuDNN's (GPUs) drops no weights, so it needs
`--config.model.attention_dropout=0` (the other dropout stays): a different regulariser, to be
chosen knowingly."""

from ctx.config import ConfigError, default_config


def paper_config(
    *,
    variant: str,
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_ff: int,
    segment_length: int,
    memory_length: int,
    compressed_length: int,
    compression_rate: int,
    vocab_size: int,
    dropout: float,
    batch_size: int,
    warmup_steps: int,
    decay_steps: int,
):
    """variant 'ct' (the paper's model) or 'txl' (n_cm = 0 at the same attention length)."""
    if variant not in ("ct", "txl"):
        raise ConfigError(
            f"unknown config variant {variant!r}; choose ct or txl (--config=FILE.py:txl)"
        )
    cfg = default_config()
    cfg.model.update(
        dict(
            vocab_size=vocab_size,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            dropout=dropout,
            segment_length=segment_length,
            memory_length=memory_length,
            compressed_length=compressed_length,
            compression_rate=compression_rate,
            compression="conv",
            compression_loss="attention",
        )
    )
    if variant == "txl":
        cfg.model.memory_length, cfg.model.compressed_length = memory_length + compressed_length, 0
    cfg.train.update(
        dict(
            batch_size=batch_size,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            num_steps=warmup_steps + decay_steps,
            checkpoint_every=1000,
            eval_every=5000,
            segments_per_call=16,
            peak_lr=3e-4,
            init_lr=1e-6,
            end_lr=1e-6,
            grad_clip=0.1,
            accumulate_after=60_000,
            accumulate_every=4,
        )
    )
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "dots"
    return cfg
