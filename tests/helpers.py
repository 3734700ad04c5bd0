"""Small builders shared by the tests: tiny configs, models and multi-segment runs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from pydoc_data.topics import topics
from jax.extend import core as jax_core

import ctx
from ctx import evaluate
from ctx.backend import resolve_attention_here
from ctx.data.tokenizer import ByteTokenizer
from ctx.sharding import make_mesh

# The repository root: where `python -m ctx.*` subprocesses run.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name: str) -> str:
    """The path of a program in tests/scripts/, run by the tests in processes of their own."""
    return os.path.join(ROOT, "tests", "scripts", name)


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root (the environment: the tests' own,
    CPU only, unless `env`), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def user_namespaces_work() -> bool:
    """Whether this kernel lets an unprivileged process make a user and mount namespace
    (`unshare`), where the tests mount real small or read-only file systems."""
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    return done.returncode == 0


def run_script(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """A program of tests/scripts/ in a process of its own, as `run_module` runs a module."""
    return subprocess.run(
        [sys.executable, script(name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


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
    flags = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} "
        "--xla_cpu_collective_call_terminate_timeout_seconds=120"
    )
    return dict(
        os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PJRT_NPROC=str(8 * devices), **extra
    )


def tiny_model_config(**overrides) -> ctx.ModelConfig:
    """The tiny model of the unit tests (validated, as the entry points make it)."""
    defaults = dict(
        vocab_size=32,
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_ff=32,
        segment_length=4,
        memory_length=4,
        compressed_length=4,
        compression_rate=2,
    )
    defaults.update(overrides)
    return ctx.ModelConfig.from_config(ctx.model_config(**defaults))


def resolved(config) -> ctx.ModelConfig:
    """A whole config's model section as the entry points pass it on: typed, attention resolved here."""
    return resolve_attention_here(ctx.ModelConfig.from_config(config.model))


def build(cfg, batch_size=2, seed=0):
    """Model, initialised variables and empty memory of a ModelConfig (or a config's model section)."""
    cfg = ctx.ModelConfig.from_config(cfg)
    model = ctx.CompressiveTransformer(cfg)
    memory = ctx.init_memory(cfg, batch_size)
    tokens = jnp.zeros((batch_size, cfg.segment_length), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(seed), tokens, memory)
    return model, variables, memory


def byte_corpus(texts):
    """A byte-tokenized corpus whose documents are `texts` (ids "0", "1", ...)."""
    from ctx.data.source import Document, TokenizedCorpus
    from ctx.data.tokenizer import ByteTokenizer

    return TokenizedCorpus.from_documents(
        [Document(str(i), t) for i, t in enumerate(texts)], ByteTokenizer()
    )


def random_tokens(cfg, batch_size, n_segments, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (batch_size, n_segments * cfg.segment_length)).astype(
        np.int32
    )


def run_segments(model, variables, memory, tokens_BT, reset_first=None):
    """Run consecutive segments with lax.scan; returns (logits [B,T,V], final memory)."""
    n_s = model.config.segment_length
    B, T = tokens_BT.shape
    segments = jnp.asarray(tokens_BT).reshape(B, T // n_s, n_s).transpose(1, 0, 2)

    def step(mem, tokens):
        logits, mem, _ = model.apply(variables, tokens, mem)
        return mem, logits

    memory, logits = jax.jit(lambda m, s: jax.lax.scan(step, m, s))(memory, segments)
    return logits.transpose(1, 0, 2, 3).reshape(B, T, -1), memory


# The demo config shrunk to seconds (tiny model, 2 validation documents), defined once:
# `tiny_train_config` applies it with a short run, and TINY_CLI_FLAGS passes it to a command.
TINY = {
    "model.n_layers": 2,
    "model.d_model": 32,
    "model.n_heads": 2,
    "model.d_ff": 64,
    "model.segment_length": 8,
    "model.memory_length": 8,
    "model.compressed_length": 8,
    "train.batch_size": 8,
    "train.segments_per_call": 4,
    "train.eval_every": 0,
    "train.warmup_steps": 4,
    "train.decay_steps": 100,
    "data.validation_fraction": 0.03,
}
TINY_RUN = {"train.num_steps": 8, "train.checkpoint_every": 4}
TINY_CLI_FLAGS = [f"--config.{key}={value}" for key, value in TINY.items()]


def tiny_train_config(**train_overrides):
    """The demo config with TINY and TINY_RUN, then `train_overrides` (train.FIELD=value)."""
    from experiments import demo

    cfg = demo.get_config()
    for key, value in {**TINY, **TINY_RUN}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    cfg.train.update(train_overrides)
    return cfg


def read_metrics(workdir) -> list[dict]:
    """Every metric row of a run (ctx.metrics.read_metrics, for a str or Path workdir)."""
    from ctx.metrics import read_metrics as read

    return read(os.fspath(workdir))


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


# Real prose: the Python documentation's topics, as the demo corpus has them.
TEXTS = [topics[k] for k in sorted(topics)]


def make_pg19_layout(root):
    """Real prose as books, with the awkward cases: commas in titles, an empty book, a book
    shorter than a segment, bytes that are not UTF-8, and a stray non-book file."""
    for split in ("train", "validation", "test"):
        os.makedirs(root / split)
    (root / "metadata.csv").write_text(
        "10,A Tale, of Two Commas,1859,http://gutenberg/10\n"
        '11,"Quoted, Title",1900,http://gutenberg/11\n'
        "12,Plain,1800,http://gutenberg/12\n13,Empty,1801,http://gutenberg/13\n"
        "14,Tiny,1802,http://gutenberg/14\n20,Valid,1850,http://gutenberg/20\n30,Test,1860,http://gutenberg/30\n"
    )
    (root / "train" / "10.txt").write_text("".join(TEXTS[0:20]))
    (root / "train" / "11.txt").write_text("".join(TEXTS[20:40]))
    (root / "train" / "12.txt").write_bytes("".join(TEXTS[40:60]).encode() + b"\xff\xfe bad bytes")
    (root / "train" / "13.txt").write_text("")
    (root / "train" / "14.txt").write_text("Hi.")
    (root / "train" / "notes.md").write_text("not a book")
    (root / "validation" / "20.txt").write_text("".join(TEXTS[60:70]))
    (root / "test" / "30.txt").write_text("".join(TEXTS[70:79]))
    return root


def shrinking_case() -> dict:
    """24 documents on 16 rows, one segment per chunk: longest first, rows 0-3 get one document
    of 3 segments, rows 4-11 two of 2 and rows 12-15 one of 2. For the last segment only rows
    4-11 have work, so the batch halves to them: on 8 devices, gathered from 16 rows over the
    shards to one row per device. Untrained tiny model."""
    cfg = tiny_model_config(vocab_size=ByteTokenizer.vocab_size)
    texts = [f"{i:02d} 3 segs.." for i in range(4)] + [
        f"{i:02d} two." for i in range(20)
    ]  # 11 and 7 bytes
    corpus = byte_corpus(texts)
    model, variables, _ = build(cfg)
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    compiled, sizes = evaluate.make_eval_chunk_fn(model), []

    def recording(params, memory, chunk):
        sizes.append(memory.batch_size)
        return compiled(params, memory, chunk)

    run = functools.partial(
        evaluate.evaluate_corpus, model, variables["params"], corpus, mesh, 16, 1
    )
    shrunk, full = run(chunk_fn=recording), run(shrink_batch=False)
    return {
        "devices": mesh.size,
        "sizes": sizes,
        "shrunk": [d["nll"] for d in shrunk["per_document"]],
        "full": [d["nll"] for d in full["per_document"]],
        "tokens": [d["tokens"] for d in full["per_document"]],
    }
