"""Looking inside: where attention goes (compressed memory, memory, segment; by age), the
per-layer compression loss, and the memories as NumPy arrays (their plots: ctx.plots)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ctx.config import ModelConfig
from ctx.nn.memory import Memory, init_memory
from ctx.nn.transformer import CompressiveTransformer


def derived_temporal_range(cfg: ModelConfig) -> int:
    """How far back the last position of a segment can see through l layers: each layer
    reaches from position p to S(p) - R, with S(p) = n_s * floor(p / n_s) its segment's start
    and R = n_m + c * n_cm (derivation in tests/test_model.py). When R is a multiple of n_s
    this is the paper's n_s - 1 + l * (n_m + c * n_cm); Transformer-XL has n_cm = 0."""
    n_s, reach = (
        cfg.segment_length,
        cfg.memory_length + cfg.compression_rate * cfg.compressed_length,
    )
    oldest = n_s - 1  # the last position of the segment that starts at 0
    for _ in range(cfg.n_layers):
        oldest = n_s * (oldest // n_s) - reach
    return n_s - 1 - oldest


def dependence_by_distance(cfg: ModelConfig, seed: int = 0) -> np.ndarray:
    """[T] bools: does the token d positions before the last one change the last position's
    logits? Measured on a random sequence, batch row r with token r changed. A freshly
    initialised model suffices: what can be reached is architectural."""
    n_s = cfg.segment_length
    n_segments = derived_temporal_range(cfg) // n_s + 3
    T = n_segments * n_s
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, T).astype(np.int32)
    batch = np.repeat(tokens[None], T + 1, axis=0)  # the last row is left unchanged
    batch[np.arange(T), np.arange(T)] = (batch[np.arange(T), np.arange(T)] + 1) % cfg.vocab_size
    model = CompressiveTransformer(cfg)
    params = model.init(
        jax.random.PRNGKey(seed), jnp.zeros((1, n_s), jnp.int32), init_memory(cfg, 1)
    )["params"]

    @jax.jit
    def last_logits(segments):
        def step(memory, tokens):
            logits, memory, _ = model.apply({"params": params}, tokens, memory)
            return memory, logits[:, -1]

        return jax.lax.scan(step, init_memory(cfg, T + 1), segments)[1][-1]

    last = np.asarray(
        last_logits(jnp.asarray(batch.reshape(T + 1, n_segments, n_s).transpose(1, 0, 2)))
    )
    changed = np.abs(last[:T] - last[T]).max(-1) > 1e-5
    return changed[::-1]


def measured_temporal_range(cfg: ModelConfig, seed: int = 0) -> int:
    """The largest distance back at which the input still changes the last position's logits."""
    return int(np.flatnonzero(dependence_by_distance(cfg, seed)).max())


def inspect_segment(model, params: Any, tokens, memory: Memory, buckets: int = 4) -> dict[str, Any]:
    """Run one segment and report per layer: attention mass on each memory kind, split into
    `buckets` age groups (oldest first), the mean age in tokens of each group, and the
    compression loss. Also returns the next memory, so a notebook can walk a text. The fused
    attention forms no probabilities, so this always runs the XLA one (same parameters)."""
    cfg = dataclasses.replace(model.config, attention_impl="xla")
    model = CompressiveTransformer(cfg)
    (logits, new_memory, aux), state = jax.jit(
        lambda p, t, m: model.apply({"params": p}, t, m, mutable=["intermediates"])
    )(params, tokens, memory)
    probs = np.asarray(state["intermediates"]["layers"]["attention_probs"][0])  # [L,B,H,N,T]
    C, M, N, c = cfg.compressed_length, cfg.memory_length, cfg.segment_length, cfg.compression_rate
    i = np.arange(N)[:, None]
    ages = {  # [N, slots]: how many tokens back each key is from each query
        "compressed": M + c * (C - np.arange(C))[None, :] + i - c / 2,
        "memory": M + i - np.arange(M)[None, :],
        "segment": np.maximum(i - np.arange(N)[None, :], 0),
    }
    spans = {"compressed": (0, C), "memory": (C, C + M), "segment": (C + M, C + M + N)}
    by_age, mean_age = {}, {}
    for kind, (lo, hi) in spans.items():
        groups = np.array_split(np.arange(hi - lo), buckets) if hi > lo else []
        by_age[kind] = (
            np.stack([probs[..., lo + g].sum(-1).mean(axis=(1, 2, 3)) for g in groups], axis=1)
            if len(groups)
            else np.zeros((cfg.n_layers, 0))
        )
        mean_age[kind] = (
            np.array([ages[kind][:, g].mean() for g in groups]) if len(groups) else np.zeros(0)
        )
    return {
        "attention_mass": np.asarray(aux.attention_mass),  # [L, 3] (compressed, memory, segment)
        "attention_by_age": by_age,  # kind -> [L, buckets]
        "mean_age_tokens": mean_age,  # kind -> [buckets]
        "compression_loss_per_layer": np.asarray(aux.compression_loss_per_layer),
        "logits": np.asarray(logits),
        "memory": new_memory,
    }
