"""Demo: a tiny Compressive Transformer on the Python docs (offline), trained on a CPU.

    python -m ctx.train --config=experiments/demo.py --workdir=runs/demo

Corpus: the 79 topics of the CPython docs shipped as `pydoc_data.topics` (0.46 MB of English
prose and code; every 10th topic held out). Model: 2 layers, d_model 128, bytes, n_s = n_m =
n_cm = 32, c = 2, conv + attention-reconstruction loss.
Variants: `:txl` (n_cm = 0 with the same attention length), `:vanilla` (no memory).
"""

from ctx.config import default_config


def get_config(variant: str = "ct"):
    cfg = default_config()
    m = cfg.model
    m.vocab_size = 256
    m.n_layers = 2
    m.d_model = 128
    m.n_heads = 4
    m.d_ff = 512
    m.segment_length = 32
    m.memory_length = 32
    m.compressed_length = 32
    m.compression_rate = 2
    t = cfg.train
    t.num_steps = 3000
    t.batch_size = 16
    t.segments_per_call = 25
    t.checkpoint_every = 500
    t.eval_every = 1000
    t.peak_lr = t.compress_peak_lr = 1e-3
    t.warmup_steps = 200
    t.decay_steps = 3000
    if variant == "txl":
        m.memory_length, m.compressed_length = 64, 0
    elif variant == "vanilla":
        m.memory_length, m.compressed_length = 0, 0
    elif variant != "ct":
        raise ValueError(
            f"unknown variant {variant!r} of experiments/demo.py; choose ct, txl or vanilla"
        )
    return cfg
