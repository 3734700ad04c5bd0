"""Small builders shared by the tests: tiny configs, models and multi-segment runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ctx


def tiny_model_config(**overrides):
    defaults = dict(vocab_size=32, n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_length=4,
                    memory_length=4, compressed_length=4, compression_rate=2)
    defaults.update(overrides)
    return ctx.model_config(**defaults)


def build(cfg, batch_size=2, seed=0):
    model = ctx.CompressiveTransformer(cfg)
    memory = ctx.init_memory(cfg, batch_size)
    tokens = jnp.zeros((batch_size, cfg.segment_length), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(seed), tokens, memory)
    return model, variables, memory


def random_tokens(cfg, batch_size, n_segments, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (batch_size, n_segments * cfg.segment_length)).astype(np.int32)


def run_segments(model, variables, memory, tokens_BT, reset_first=None):
    """Run consecutive segments with lax.scan; returns (logits [B,T,V], final memory)."""
    n_s = model.model_config.segment_length
    B, T = tokens_BT.shape
    segments = jnp.asarray(tokens_BT).reshape(B, T // n_s, n_s).transpose(1, 0, 2)

    def step(mem, tokens):
        logits, mem, _ = model.apply(variables, tokens, mem)
        return mem, logits

    memory, logits = jax.jit(lambda m, s: jax.lax.scan(step, m, s))(memory, segments)
    return logits.transpose(1, 0, 2, 3).reshape(B, T, -1), memory
