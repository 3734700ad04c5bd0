"""The benchmark: throughput, step time, compile time, memory, FLOPs and MFU as one JSON object.

    python -m ctx.bench --config=experiments/bench.py [--config.model.dtype=bfloat16 ...]

Train and eval steps run on real demo-corpus segments, built before the timed window. Step
time is a jitted chunk of `segments_per_call` segments divided by its length; the median,
min and max are over `--chunks` chunks after compilation. MFU is the analytic model FLOP
rate (ctx.flops) over the matmul rate measured on the same machine in the same run, in the
model's compute dtype.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ctx.aot import compiled_memory
from ctx.backend import model_config_for_run
from ctx.cli import FLAGS, define_config_flags, run_main
from ctx.config import validate, with_global_batch
from ctx.data.datasets import load_corpus
from ctx.data.stream import TrainStream
from ctx.evaluate import make_eval_chunk_fn
from ctx.flops import forward_flops_per_token, parameter_count, train_flops_per_token
from ctx.profile import write_summary
from ctx.sharding import device_chunk
from ctx.trainer import Trainer


def matmul_flops_per_sec(dtype: str, n: int | None = None, repeats: int = 10) -> float:
    """Best rate of a jitted n×n×n matmul (the machine's practical ceiling). n defaults to
    2048 on CPU and 8192 on accelerators, where smaller products do not fill the chip."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _timed(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def run_benchmark(
    config: ml_collections.ConfigDict,
    chunks: int = 3,
    peak_flops_per_sec: float = 0.0,
    trace_dir: str = "",
) -> dict[str, Any]:
    """peak_flops_per_sec: the chip's datasheet rate in the compute dtype (0 = unknown); when
    given, `mfu_vs_peak` is reported beside `mfu` (which is against the measured matmul rate).
    trace_dir: when given, one more training chunk runs under jax.profiler and its time by
    source operation is written to trace_dir/op_time.json (ctx.profile)."""
    validate(config)
    config = with_global_batch(config, jax.device_count())
    trainer = Trainer(config, model_config_for_run(config, "ctx.bench"))
    cfg, G = trainer.model_config, config.train.segments_per_call
    stream = TrainStream(
        load_corpus(config.data, "train"),
        config.train.batch_size,
        cfg.segment_length,
        seed=config.seed,
    )
    host_chunks = [stream.next_chunk(G) for _ in range(chunks + 1)]
    device_chunks = [device_chunk(trainer.mesh, c) for c in host_chunks]
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
    memory, rng = trainer.init_memory(), jax.random.PRNGKey(1)

    start = time.perf_counter()
    compiled = trainer.train_chunk.lower(state, memory, rng, device_chunks[0]).compile()
    compile_seconds = time.perf_counter() - start
    (state, memory, rng, _), _ = _timed(compiled, state, memory, rng, device_chunks[0])  # warm-up
    train_seconds = []
    for chunk in device_chunks[1:]:
        (state, memory, rng, metrics), seconds = _timed(compiled, state, memory, rng, chunk)
        train_seconds.append(seconds / G)
    if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            (state, memory, rng, metrics), _ = _timed(
                compiled, state, memory, rng, device_chunks[-1]
            )
        op_time = write_summary(trace_dir, compiled.as_text(), steps=G)
    tokens_per_step = config.train.batch_size * cfg.segment_length

    eval_fn = make_eval_chunk_fn(trainer.model, trainer.mesh)
    eval_memory = trainer.init_memory()
    eval_memory, _ = _timed(
        lambda m: eval_fn(state.params, m, device_chunks[0])[0], eval_memory
    )  # compile
    eval_seconds = []
    for chunk in device_chunks[1:]:
        (eval_memory, _), seconds = _timed(eval_fn, state.params, eval_memory, chunk)
        eval_seconds.append(seconds / G)

    step = statistics.median(train_seconds)
    train_tps = tokens_per_step / step
    eval_tps = tokens_per_step / statistics.median(eval_seconds)
    flops = train_flops_per_token(cfg, config.train.batch_size)
    eval_flops = forward_flops_per_token(cfg, config.train.batch_size)
    matmul = matmul_flops_per_sec(cfg.dtype)
    device_stats = jax.devices()[0].memory_stats() or {}
    return {
        "train_tokens_per_sec": train_tps,
        "eval_tokens_per_sec": eval_tps,
        "step_seconds": step,
        "step_seconds_min": min(train_seconds),
        "step_seconds_max": max(train_seconds),
        "steps_timed": len(train_seconds) * G,
        "compile_seconds": compile_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_memory_mib": device_stats.get("peak_bytes_in_use", 0) / 2**20 or None,
        "flops_per_token": flops,
        "eval_flops_per_token": eval_flops,
        "matmul_flops_per_sec": matmul,
        "mfu": train_tps * flops / matmul,
        "mfu_vs_peak": train_tps * flops / peak_flops_per_sec if peak_flops_per_sec else None,
        "compiled_memory_gib": compiled_memory(compiled)["per_device_memory_estimate_gib"],
        "eval_mfu": eval_tps * eval_flops / matmul,
        "parameters": parameter_count(cfg)["total"],
        "tokens_per_step": tokens_per_step,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "dtype": cfg.dtype,
        "final_loss": float(metrics["loss"][-1]),
        **({"op_time": op_time} if trace_dir else {}),
    }


def main() -> None:
    print(
        json.dumps(
            run_benchmark(FLAGS.config, FLAGS.chunks, FLAGS.peak_tflops * 1e12, FLAGS.trace_dir)
        ),
        flush=True,
    )


if __name__ == "__main__":
    from absl import flags

    define_config_flags()
    flags.DEFINE_integer(
        "chunks",
        3,
        "Timed chunks of segments_per_call segments (after one warm-up chunk).",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "peak_tflops",
        0.0,
        "The chip's datasheet TFLOP/s in the compute dtype (e.g. 989 for "
        "H100/H200 dense bf16); adds mfu_vs_peak. 0 = not reported.",
        lower_bound=0.0,
    )
    flags.DEFINE_string(
        "trace_dir",
        "",
        "Trace one more training chunk with jax.profiler into this folder "
        "and write its time by source operation to op_time.json there.",
    )
    run_main(main)
