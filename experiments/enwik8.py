"""enwik8 (Rae et al. 2019, Table 4): 24-layer Compressive Transformer on bytes.

    python -m ctx.train --config=experiments/enwik8.py --workdir=gs://BUCKET/enwik8-ct \
        --config.data.path=/data/enwik8
    python -m ctx.train --config=experiments/enwik8.py:txl ...   # Transformer-XL baseline

Expected: 0.97 test bpc (TXL run by the authors: 0.98), evaluated with n_cm = 3072.
Sizes from App. B: d_model 1024, 8 heads, d_ff 3072, n_s = n_m = 768, n_cm = 1152, c = 3;
char-level schedule: 4k warmup, 100k cosine decay. Dropout is not reported (TXL's own
enwik8 script: 0.15); batch size is not reported (64 here).
"""

from ctx.paper import paper_config


def get_config(variant: str = "ct"):
    cfg = paper_config(
        variant=variant,
        n_layers=24,
        d_model=1024,
        n_heads=8,
        d_ff=3072,
        segment_length=768,
        memory_length=768,
        compressed_length=1152,
        compression_rate=3,
        vocab_size=256,
        dropout=0.15,
        batch_size=64,
        warmup_steps=4_000,
        decay_steps=100_000,
    )
    cfg.data.dataset = "enwik8"
    cfg.data.path = "enwik8"
    return cfg
