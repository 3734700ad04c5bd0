"""Sampling with memory.

    python -m ctx.sample --config=experiments/demo.py --workdir=runs/demo --prompt="The with statement"

The prompt (behind BOS, as in training) is streamed through whole segments to build the
memory; the rest is fed one token at a time against cached keys and values of
[cmem; mem; segment so far]. When a segment fills, it moves into memory through the same
segment pass as training (FIFO, compression), so what the sampler sees is exactly what a
teacher-forced pass over the same text would compute.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ctx.backend import model_config_for_run
from ctx.cli import FLAGS, define_config_flags, run_main
from ctx.config import ModelConfig
from ctx.errors import InputError
from ctx.nn.memory import init_memory
from ctx.nn.transformer import CompressiveTransformer
from ctx.restore import restore_for_inference
from ctx.sharding import make_mesh


@dataclasses.dataclass
class Sample:
    tokens: np.ndarray  # [B, num_tokens] generated ids
    logprobs: np.ndarray  # [B, num_tokens] log-probability of each under the model (temperature 1)


@partial(jax.jit, static_argnames=("top_k",))
def choose_token(
    logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Sample from softmax(logits / temperature) restricted to the top_k tokens and to the
    smallest set whose probability reaches top_p; temperature 0 is greedy."""
    logits = logits_BV.astype(jnp.float32)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly more likely tokens
    keep_sorted = before < top_p
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    scaled = jnp.where(keep, scaled, -jnp.inf)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _steps(cfg: ModelConfig):
    """The jitted segment, prefill and decode steps of one model config, built once, so that
    repeated `generate` calls (a notebook loop) reuse their compiled programs."""
    model = CompressiveTransformer(cfg)
    advance = jax.jit(lambda p, segment, memory: model.apply(p, segment, memory)[1])
    prefill = jax.jit(
        lambda p, memory: model.apply(p, memory, method=CompressiveTransformer.prefill)
    )
    decode = jax.jit(
        lambda p, token, cache: model.apply(p, token, cache, method=CompressiveTransformer.decode)
    )
    return advance, prefill, decode


def generate(
    params: Any,
    cfg: ModelConfig,
    prompt_tokens,
    num_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    bos_id: int = 0,
) -> Sample:
    """Continue `prompt_tokens` ([P] or [B, P] ids) by `num_tokens` tokens per row."""
    prompt = np.asarray(prompt_tokens, np.int64)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    if prompt.ndim != 2:
        raise InputError(f"prompt_tokens must be [P] or [batch, P] ids, got shape {prompt.shape}")
    if prompt.size and (prompt.min() < 0 or prompt.max() >= cfg.vocab_size):
        raise InputError(
            f"prompt token ids must be in [0, {cfg.vocab_size}), got [{prompt.min()}, {prompt.max()}]"
        )
    if num_tokens < 1:
        raise InputError(f"num_tokens must be positive, got {num_tokens}")
    if not 0.0 < top_p <= 1.0 or temperature < 0 or top_k < 0:
        raise InputError(
            f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    variables = {"params": params}
    B, n_s = prompt.shape[0], cfg.segment_length
    inputs = np.concatenate([np.full((B, 1), bos_id), prompt], axis=1).astype(np.int32)
    whole = (inputs.shape[1] - 1) // n_s  # whole segments before the last input token's segment
    advance, prefill, decode = _steps(cfg)

    memory = init_memory(cfg, B)
    for s in range(whole):
        memory = advance(variables, jnp.asarray(inputs[:, s * n_s : (s + 1) * n_s]), memory)
    cache, segment = prefill(variables, memory), []

    def feed(token_B):
        nonlocal memory, cache, segment
        logits, cache = decode(variables, jnp.asarray(token_B, jnp.int32)[:, None], cache)
        segment.append(np.asarray(token_B))
        if len(segment) == n_s:  # the segment is full: move it into memory as training does
            memory = advance(variables, jnp.asarray(np.stack(segment, axis=1), jnp.int32), memory)
            cache, segment = prefill(variables, memory), []
        return logits[:, 0]

    for j in range(whole * n_s, inputs.shape[1]):
        logits = feed(inputs[:, j])
    tokens, logprobs = [], []
    for i in range(num_tokens):
        rng, key = jax.random.split(rng)
        token = choose_token(logits, key, temperature, top_k, top_p)
        tokens.append(np.asarray(token))
        logprobs.append(
            np.asarray(
                jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
            )
        )
        if i + 1 < num_tokens:
            logits = feed(np.asarray(token))
    return Sample(tokens=np.stack(tokens, axis=1), logprobs=np.stack(logprobs, axis=1))


def main() -> None:
    if not FLAGS.workdir:
        raise InputError("--workdir is required (the training run to sample from)")
    if not FLAGS.prompt:
        raise InputError("--prompt is empty; give some text to continue, e.g. --prompt='The'")
    config = FLAGS.config
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    # The choice of attention goes to stderr: stdout is the sampled text alone.
    model_cfg = model_config_for_run(
        config, "ctx.sample", mesh.devices.flat[0], evaluation=True, log=sys.stderr
    )
    restored = restore_for_inference(
        config, FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step, mesh, model_cfg
    )
    prompt = restored.tokenizer.encode(FLAGS.prompt)
    sample = generate(
        restored.params,
        restored.model.config,
        prompt,
        FLAGS.num_tokens,
        jax.random.PRNGKey(FLAGS.seed),
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        bos_id=restored.tokenizer.bos_id,
    )
    sys.stdout.write(FLAGS.prompt + restored.tokenizer.decode(sample.tokens[0]) + "\n")


if __name__ == "__main__":
    from absl import flags

    define_config_flags()
    flags.DEFINE_string("prompt", None, "Text to continue.")
    flags.DEFINE_integer("num_tokens", 200, "How many tokens to generate.", lower_bound=1)
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0 = greedy).", lower_bound=0.0)
    flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = all).", lower_bound=0)
    flags.DEFINE_float(
        "top_p",
        0.95,
        "Nucleus: keep the most likely tokens up to this mass (0 < top_p <= 1).",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: the latest).")
    run_main(main)
