"""Demo: a tiny Compressive Transformer on the Python docs (offline), trained on a CPU.

    python -m ctx.train --config=experiments/demo.py --workdir=runs/demo

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
    if variant == "txl":
        m.memory_length, m.compressed_length = 64, 0
    elif variant == "vanilla":
        m.memory_length, m.compressed_length = 0, 0
    elif variant != "ct":
        raise ValueError(f"unknown variant {variant!r} of experiments/demo.py; choose ct, txl or vanilla")
    return cfg


if __name__ == "__main__":  # python -m experiments.demo: build the model and run a few segments
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ctx

    cfg = get_config().model
    model = ctx.CompressiveTransformer(cfg)
    memory = ctx.init_memory(cfg, batch_size=2)
    text = np.frombuffer(" ".join(["The compressive transformer keeps a memory."] * 20).encode(), np.uint8)
    segments = jnp.asarray(text[: 4 * cfg.segment_length * 2].reshape(2, 4, cfg.segment_length).transpose(1, 0, 2),
                           jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), segments[0], memory)
    n_params = sum(x.size for x in jax.tree.leaves(variables))
    apply = jax.jit(model.apply)
    for i, tokens in enumerate(segments):
        logits, memory, aux = apply(variables, tokens, memory)
        print(f"segment {i}: logits {logits.shape}, compression loss {float(aux['compression_loss']):.4f}, "
              f"valid memory {int(memory.mem_mask[0].sum())}/{cfg.memory_length}, "
              f"valid compressed {int(memory.cmem_mask[0].sum())}/{cfg.compressed_length}")
    print(f"{n_params:,} parameters")
