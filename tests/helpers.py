"""Small builders shared by the tests: tiny configs, models and multi-segment runs."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

import ctx

# The repository root: where `python -m ctx.*` subprocesses run.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name: str) -> str:
    """The path of a program in tests/scripts/, run by the tests in processes of their own."""
    return os.path.join(ROOT, "tests", "scripts", name)


def simulated_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """Environment for a subprocess with `devices` simulated CPU devices.

    XLA:CPU runs the devices' collectives on one intra-op pool of max(cores, devices) threads,
    and a thread waits inside an all-reduce until every device has arrived. With exactly one
    thread per device, a device's all-reduce that was launched but is still queued can starve
    behind threads blocked in another one: CI deadlocked once with 7 devices in the training
    step's loss all-reduce and device 0 in the layer scan's. PJRT_NPROC sizes that pool: with 8
    threads per device, starving needs 8 collectives in flight per device at once. A stuck
    collective still ends the run, after 2 minutes (XLA's default 40 s is short for 8 devices
    on 2 busy cores).
    """
    flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} "
             "--xla_cpu_collective_call_terminate_timeout_seconds=120")
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PJRT_NPROC=str(8 * devices), **extra)


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


def byte_corpus(texts):
    """A byte-tokenized corpus whose documents are `texts` (ids "0", "1", ...)."""
    from ctx.data.source import Document, TokenizedCorpus
    from ctx.data.tokenizer import ByteTokenizer

    return TokenizedCorpus.from_documents([Document(str(i), t) for i, t in enumerate(texts)], ByteTokenizer())


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


def tiny_train_config(**train_overrides):
    """The demo config shrunk to seconds: tiny model, short run, 2 validation documents."""
    from experiments import demo

    cfg = demo.get_config()
    m = cfg.model
    m.n_layers, m.d_model, m.n_heads, m.d_ff = 2, 32, 2, 64
    m.segment_length = m.memory_length = m.compressed_length = 8
    t = cfg.train
    t.num_steps, t.batch_size, t.segments_per_call = 8, 8, 4
    t.checkpoint_every, t.eval_every = 4, 0
    t.warmup_steps, t.decay_steps = 4, 100
    cfg.data.validation_fraction = 0.03
    cfg.train.update(train_overrides)
    return cfg


def read_metrics(workdir):
    import json
    import os

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# The tiny_train_config model and run, as command-line overrides of experiments/demo.py.
TINY_CLI_FLAGS = ["--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.d_ff=64",
                  "--config.model.segment_length=8", "--config.model.memory_length=8",
                  "--config.model.compressed_length=8", "--config.train.batch_size=8",
                  "--config.train.segments_per_call=4", "--config.train.eval_every=0",
                  "--config.train.warmup_steps=4", "--config.train.decay_steps=100",
                  "--config.data.validation_fraction=0.03"]


def dot_generals(jaxpr, repeat: int = 1):
    """(equation, times it runs) for every dot_general in a jaxpr, sub-jaxprs included (a
    scan body counts `length` times)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn, repeat
        times = repeat * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax_core.Jaxpr):
                    yield from dot_generals(sub, times)
