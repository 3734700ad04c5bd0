"""The CPU benchmark config (issue: performance), matched to ../shared/bench/peer_lucidrains.py.

    python -m ctx.bench --config=experiments/bench.py          # prints one JSON object
    python -m ctx.train --config=experiments/bench.py --workdir=runs/bench

vocab 256 (bytes), 4 layers, d_model 256, 4 heads, d_ff 1024, n_s = n_m = n_cm = 128, c = 4,
conv + attention-reconstruction loss, batch 8, float32, dropout 0. Training on the demo
corpus keeps validation and checkpoints out of the timed window (both only at the end).
"""

from ctx.config import default_config


def get_config(variant: str = "ct"):
    if variant not in ("ct", "txl"):
        raise ValueError(f"unknown variant {variant!r} of experiments/bench.py; choose ct or txl")
    cfg = default_config()
    cfg.model.update(
        dict(
            vocab_size=256,
            n_layers=4,
            d_model=256,
            n_heads=4,
            d_ff=1024,
            dropout=0.0,
            segment_length=128,
            memory_length=128,
            compressed_length=128,
            compression_rate=4,
            compression="conv",
            compression_loss="attention",
            dtype="float32",
        )
    )
    if variant == "txl":
        cfg.model.memory_length, cfg.model.compressed_length = 256, 0
    cfg.train.update(
        dict(
            num_steps=200,
            batch_size=8,
            segments_per_call=20,
            checkpoint_every=200,
            eval_every=0,
            warmup_steps=100,
            decay_steps=10_000,
        )
    )
    return cfg
