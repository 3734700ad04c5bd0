"""WikiText-103 (Rae et al. 2019, Table 6): 18-layer Compressive Transformer.

    python -m ctx.train --config=experiments/wt103.py --workdir=gs://BUCKET/wt103-ct \
        --config.data.path=/data/wikitext-103 --config.data.tokenizer=PATH/wt103.model
    python -m ctx.train --config=experiments/wt103.py:txl ...    # Transformer-XL baseline

Expected (paper): test perplexity 17.1 (TXL M=1024: 18.1), evaluated with n_m 500, n_cm 1500.
Sizes: d_model 1024, 16 heads, d_ff 4096, n_s = n_m = n_cm = 512, c = 4 (section 5.3; App. B
says 3). The paper used a 267K-word vocabulary with adaptive inputs; ctx uses a subword
tokenizer, so its perplexity is per subword unless rescaled to words. Batch 128 (64 TPUv3 x 2);
word-level schedule: 16k warmup, 500k cosine decay; dropout 0.2 (TXL's WT103 script).
"""

from ctx.paper import paper_config


def get_config(variant: str = "ct"):
    cfg = paper_config(
        variant=variant,
        n_layers=18,
        d_model=1024,
        n_heads=16,
        d_ff=4096,
        segment_length=512,
        memory_length=512,
        compressed_length=512,
        compression_rate=4,
        vocab_size=32000,
        dropout=0.2,
        batch_size=128,
        warmup_steps=16_000,
        decay_steps=500_000,
    )
    cfg.data.dataset = "wt103"
    cfg.data.path = "wikitext-103"
    cfg.data.tokenizer = "wt103_32k.model"
    return cfg
