"""PG-19 (Rae et al. 2019, Table 3): 36-layer Compressive Transformer on whole books.

    python -m ctx.train --config=experiments/pg19.py --workdir=gs://BUCKET/pg19-ct \
        --config.data.path=gs://deepmind-gutenberg --config.data.tokenizer=PATH/pg19_32k.model
    python -m ctx.train --config=experiments/pg19.py:txl ...     # Transformer-XL baseline

Hardware: the paper used 256 TPUv3 cores, total batch 512, ~100B subword tokens.
Expected: test word-level perplexity 33.6 (TXL, memory 1024: 36.3); validation 43.4 (45.5).
Model width/heads are not reported by the paper: d_model 1024, 8 heads, d_ff 4096 is a guess.
n_s = n_m = n_cm = 512, c = 2; SentencePiece 32k subwords (TFDS's SubwordTextEncoder is
deprecated). Word-level schedule: 16k warmup, 500k cosine decay steps.
"""

from ctx.paper import paper_config


def get_config(variant: str = "ct"):
    cfg = paper_config(
        variant=variant,
        n_layers=36,
        d_model=1024,
        n_heads=8,
        d_ff=4096,
        segment_length=512,
        memory_length=512,
        compressed_length=512,
        compression_rate=2,
        vocab_size=32000,
        dropout=0.1,
        batch_size=512,
        warmup_steps=16_000,
        decay_steps=500_000,
    )
    cfg.data.dataset = "pg19"
    cfg.data.path = "gs://deepmind-gutenberg"
    cfg.data.tokenizer = "pg19_32k.model"
    return cfg
