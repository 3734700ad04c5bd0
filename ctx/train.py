"""Training: a jitted, device-sharded lax.scan over segments, checkpoints and resume.

    python -m ctx.train --config=experiments/demo.py --workdir=runs/demo

One jitted call runs G segments; the carry is (TrainState, Memory, rng) and every segment is
one optimizer step (truncated back-propagation: the memory entering a segment is constant).
`train_and_evaluate(config, workdir)` is the importable loop that notebooks and pods share.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
from etils import epath

from ctx import aot
from ctx.backend import announce, model_config_for_run
from ctx.checkpoint import Checkpointer, CheckpointError, quiet_refused_writes, read_latest_config
from ctx.cli import FLAGS, define_config_flags, run_main
from ctx.compat import check_resumable_training
from ctx.config import validate, with_global_batch
from ctx.data.datasets import load_corpus
from ctx.data.prefetch import ChunkPrefetcher
from ctx.data.stream import TrainStream
from ctx.data.tokenizer import check_vocab
from ctx.distributed import any_process
from ctx.errors import InputError, Interrupted, TrainingDiverged
from ctx.evaluate import evaluate_corpus, make_eval_chunk_fn
from ctx.metrics import MetricWriter
from ctx.progress import progress
from ctx.remote import check_workdir
from ctx.run_guard import StopRequest, WorkdirLock
from ctx.sharding import device_chunk, process_rows, replicated
from ctx.trainer import Trainer


def _chunk_length(step: int, config) -> int:
    """Chunks end exactly at checkpoint, validation and final steps."""
    train = config.train
    boundaries = [train.num_steps, (step // train.checkpoint_every + 1) * train.checkpoint_every]
    if train.eval_every:
        boundaries.append((step // train.eval_every + 1) * train.eval_every)
    return min([train.segments_per_call] + [b - step for b in boundaries if b > step])


class Hooks:
    """Points at which a caller acts on a running loop, each a no-op here. The reliability tests
    pass hooks that provoke real faults at exact moments (a SIGKILL inside a save, a SIGTERM
    just after the stop check), so the loop itself holds no test code."""

    def after_save(self, step: int) -> None:
        """Checkpoint `step` has been handed to the (asynchronous) checkpointer."""

    def before_validation(self, step: int) -> None:
        """The validation due at `step` is about to start."""

    def after_chunk(self, step: int) -> None:
        """A chunk ending at `step` is done: saved if due, validated if due, stop not yet decided."""


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    hooks: Hooks | None = None,
    attention_selfcheck: bool = True,
) -> dict[str, Any]:
    """Train to config.train.num_steps (resuming from workdir), validating on the way.

    Everything that can be wrong with the input is checked before workdir is touched, a fused
    attention included (`ctx.selfcheck`, unless `attention_selfcheck` is off). On
    SIGTERM the current chunk finishes, a checkpoint is written and the result says
    `preempted`; non-finite losses or gradients stop the run without saving that state.
    Returns the last training metrics and the final validation result.
    """
    validate(config)
    config = with_global_batch(config, jax.device_count())
    check_workdir(workdir, "--workdir")
    is_main = jax.process_index() == 0
    model_cfg = model_config_for_run(config, "ctx.train", check=attention_selfcheck)
    if (
        is_main and jax.default_backend() == "gpu"
    ):  # the GPU kernels' registers, spills, shared memory
        try:
            lines = aot.attention_kernel_lines(model_cfg, aot.Target.local())
        except (
            RuntimeError,
            OSError,
            subprocess.SubprocessError,
        ) as error:  # a report, never a reason to stop
            lines = [
                f"the Pallas kernels' resources could not be read ({str(error).splitlines()[0][:200]})"
            ]
        for line in lines:
            print(f"ctx.train: {line}", flush=True)
    trainer = Trainer(config, model_cfg)
    train_corpus = load_corpus(config.data, "train", progress=is_main)
    valid_corpus = load_corpus(config.data, "validation", progress=is_main)
    tokenizer = train_corpus.tokenizer
    check_vocab(tokenizer, config)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    saved_config = read_latest_config(checkpoint_dir)
    if saved_config is not None:
        check_resumable_training(saved_config, config)

    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local folders and gs:// alike
    except OSError as error:  # not writable, a file in the way, ...: the user's path
        raise InputError(
            f"--workdir={workdir} cannot be created ({error.strerror or error}); choose a "
            "folder this user can write"
        ) from None
    lock = WorkdirLock(workdir) if is_main else None
    stop = StopRequest()
    try:
        return _run(config, workdir, trainer, train_corpus, valid_corpus, stop, hooks or Hooks())
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Position:
    """Where the run is: the device state after `step` segments and the last metrics row."""

    step: int
    state: Any
    memory: Any
    rng: jax.Array
    last: dict[str, float] = dataclasses.field(default_factory=dict)


def _keep_tokenizer_copy(workdir: str, tokenizer) -> None:
    """A copy of a SentencePiece model in the workdir, where evaluation and sampling find it."""
    copy = epath.Path(workdir) / "tokenizer.model"
    if hasattr(tokenizer, "path") and not copy.exists():
        copy.write_bytes(epath.Path(tokenizer.path).read_bytes())


def _restore_or_start(
    config,
    workdir: str,
    trainer: Trainer,
    checkpointer: Checkpointer,
    stream: TrainStream,
    tokenizer,
) -> _Position:
    """The latest readable checkpoint (its stream position restored too), or a fresh start."""
    restored = checkpointer.restore_latest(
        trainer.abstract_checkpoint(), fallback=config.train.on_corrupt_checkpoint == "previous"
    )
    if restored is None:
        return _Position(
            step=0,
            state=trainer.init_state(jax.random.PRNGKey(config.seed)),
            memory=trainer.init_memory(),
            rng=jax.device_put(jax.random.PRNGKey(config.seed + 1), replicated(trainer.mesh)),
        )
    step, device_state, data_state = restored
    if data_state.get("tokenizer", tokenizer.fingerprint) != tokenizer.fingerprint:
        raise InputError(
            f"the run in {workdir} was trained with tokenizer {data_state['tokenizer']}, "
            f"but data.tokenizer={config.data.tokenizer} is {tokenizer.fingerprint}; "
            f"use the run's copy, {os.path.join(workdir, 'tokenizer.model')}"
        )
    stream.restore(data_state)
    if jax.process_index() == 0:
        print(f"Resumed from checkpoint {step} in {checkpointer.directory}", flush=True)
    return _Position(
        step=step,
        state=device_state["train_state"],
        memory=device_state["memory"],
        rng=device_state["rng"],
    )


def _metric_rows(
    metrics: dict,
    first_step: int,
    segments: int,
    seconds: float,
    tokens_per_segment: int,
    num_devices: int,
) -> Iterator[dict[str, float]]:
    """One row per segment of a chunk, in order; a non-finite loss or gradient stops the run
    at its row (the rows before it are still given)."""
    for i in range(segments):
        row = {
            "step": first_step + i + 1,
            **{key: float(v[i]) for key, v in metrics.items()},
            "tokens_per_sec": tokens_per_segment * segments / seconds,
            "num_devices": num_devices,
        }
        bad = [q for q in ("loss", "compression_loss", "grad_norm") if not math.isfinite(row[q])]
        if bad:
            raise TrainingDiverged(f"non-finite {', '.join(bad)} at step {row['step']}")
        yield row


def _save_due(train: ml_collections.ConfigDict, step: int) -> bool:
    return step % train.checkpoint_every == 0 or step == train.num_steps


def _validation_due(train: ml_collections.ConfigDict, step: int) -> bool:
    return bool(train.eval_every and step % train.eval_every == 0) or step == train.num_steps


def _validation_row(step: int, validation: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "split": "validation",
        "loss": validation["total_nll"] / validation["tokens"],
        **{
            key: validation[key]
            for key in ("token_perplexity", "bits_per_token", "bits_per_byte", "tokens")
        },
    }


def _run(
    config, workdir, trainer, train_corpus, valid_corpus, stop: StopRequest, hooks: Hooks
) -> dict[str, Any]:
    """The loop: per chunk, train G segments, record their metrics, save and validate when due,
    and stop at num_steps or, all processes together, after a SIGTERM."""
    is_main = jax.process_index() == 0
    tokenizer = train_corpus.tokenizer
    if is_main:
        _keep_tokenizer_copy(workdir, tokenizer)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), config.train.max_checkpoints_to_keep
    )
    writer = MetricWriter(workdir, enabled=is_main)
    stream = TrainStream(
        train_corpus,
        config.train.batch_size,
        trainer.model_config.segment_length,
        seed=config.seed,
        shuffle=config.data.shuffle,
        rows=process_rows(config.train.batch_size),
    )
    at = _restore_or_start(config, workdir, trainer, checkpointer, stream, tokenizer)
    writer.start_at(at.step)  # rows an earlier run wrote past this step are superseded
    eval_fn = make_eval_chunk_fn(trainer.model, trainer.mesh)  # compiled once for every validation

    def validate(params):
        return evaluate_corpus(
            trainer.model,
            params,
            valid_corpus,
            trainer.mesh,
            config.eval.batch_size or config.train.batch_size,
            config.eval.segments_per_call or config.train.segments_per_call,
            shrink_batch=config.eval.shrink_batch,
            chunk_fn=eval_fn,
        )

    def save(data_state):
        checkpointer.save(
            at.step,
            {"train_state": at.state, "memory": at.memory, "rng": at.rng},
            {**data_state, "tokenizer": tokenizer.fingerprint},
            config.to_dict(),
        )
        hooks.after_save(at.step)

    num_steps = config.train.num_steps
    tokens_per_segment = config.train.batch_size * trainer.model_config.segment_length
    bar = progress(is_main, total=num_steps, initial=at.step, desc="train", unit="seg")
    validation, preempted, saved_step = None, False, at.step
    chunks = ChunkPrefetcher(stream, at.step, num_steps, lambda s: _chunk_length(s, config))
    try:
        while at.step < num_steps:
            start = time.perf_counter()
            segments, host_chunk, data_state = next(chunks)
            at.state, at.memory, at.rng, metrics = trainer.train_chunk(
                at.state, at.memory, at.rng, device_chunk(trainer.mesh, host_chunk)
            )
            try:
                for row in _metric_rows(
                    jax.device_get(metrics),
                    at.step,
                    segments,
                    time.perf_counter() - start,
                    tokens_per_segment,
                    trainer.mesh.size,
                ):
                    writer.write(row)
                    at.last = row
            except TrainingDiverged as error:
                checkpointer.wait()
                raise TrainingDiverged(
                    f"{error}; the run stopped without saving that state, and the last good "
                    f"checkpoint ({checkpointer.latest_step()}) is kept"
                ) from None
            at.step += segments
            if bar is not None:
                bar.update(segments)
                bar.set_postfix(
                    loss=f"{at.last['loss']:.3f}", tok_s=f"{at.last['tokens_per_sec']:,.0f}"
                )
            # Read the flag once (a SIGTERM landing between two reads would stop without a save),
            # and for all processes at once: any one's SIGTERM stops every one at this step.
            stopping = any_process(stop.requested)
            saving, validating = (
                _save_due(config.train, at.step) or stopping,
                _validation_due(config.train, at.step),
            )
            if saving:
                save(data_state)
                saved_step = at.step
            if validating:
                hooks.before_validation(at.step)
                validation = validate(at.state.params)
                writer.write(_validation_row(at.step, validation))
            writer.flush(
                force=saving or validating
            )  # remote workdirs: otherwise at most every two minutes
            failure = checkpointer.write_failure()
            if any_process(failure is not None):
                raise failure or CheckpointError(
                    "a checkpoint write failed on another process; see its log"
                )
            hooks.after_chunk(at.step)
            if stopping and at.step < num_steps:
                preempted = True
                break
    except KeyboardInterrupt:  # a second Ctrl-C: at once, with what is committed
        checkpointer.wait()
        kept = checkpointer.latest_step()
        raise Interrupted(
            f"checkpoint {kept} in {checkpointer.directory} is kept; the same command resumes from it"
            if kept is not None
            else f"no checkpoint was written yet in {workdir}; the same command starts from step 0"
        ) from None
    finally:
        chunks.close()
        if bar is not None:
            bar.close()
        checkpointer.close()
        writer.close()
    if preempted and stop.interrupted:  # the first Ctrl-C: the chunk finished and was saved
        raise Interrupted(
            f"stopped at step {at.step}; checkpoint {at.step} is saved in {checkpointer.directory}: "
            "the same command resumes from it"
        )
    if validation is None and not preempted:  # already at num_steps: report on the restored state
        validation = validate(at.state.params)
    return {
        "train": at.last,
        "validation": validation,
        "step": at.step,
        "saved_step": saved_step,
        "params": at.state.params,
        "preempted": preempted,
        "unigram_bits_per_token": valid_corpus.unigram_bits_per_token(),
    }


def main() -> None:
    quiet_refused_writes()  # this process writes checkpoints for its lifetime
    if not FLAGS.topology:  # compiling for a TPU slice or GPUs does not use this machine's devices
        announce("ctx.train")
    if FLAGS.compile_only:
        report = aot.compile_report(FLAGS.config, FLAGS.topology, search_batch=FLAGS.search_batch)
        print(aot.summary(report), file=sys.stderr, flush=True)
        print(json.dumps(report), flush=True)
        return
    if FLAGS.topology or FLAGS.search_batch:
        raise InputError(
            "--topology and --search_batch go with --compile_only (they compile, they do not train)"
        )
    if not FLAGS.workdir:
        raise InputError("--workdir is required (where checkpoints and metrics go)")
    result = train_and_evaluate(
        FLAGS.config, FLAGS.workdir, attention_selfcheck=FLAGS.attention_selfcheck
    )
    if result["preempted"]:
        print(
            f"Stopped by SIGTERM after step {result['step']}: checkpoint {result['saved_step']} is saved; "
            "run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(143)
    if jax.process_index() == 0 and result["validation"]:
        v = result["validation"]
        print(
            f"step {result['step']}: validation {v['bits_per_byte']:.3f} bits/byte, "
            f"token perplexity {v['token_perplexity']:.2f} over {v['documents']} documents "
            f"(unigram baseline {result['unigram_bits_per_token']:.3f} bits/token)",
            flush=True,
        )


if __name__ == "__main__":
    from absl import flags

    define_config_flags()
    flags.DEFINE_bool(
        "attention_selfcheck",
        True,
        "Check a fused attention against the XLA reference on this "
        "device before training (ctx.selfcheck); a failure refuses the run (attention_impl=auto: "
        "falls back to xla).",
    )
    flags.DEFINE_bool(
        "compile_only", False, "Compile the training step ahead of time and report memory; no run."
    )
    flags.DEFINE_string(
        "topology",
        None,
        "With --compile_only: a TPU slice, by its Cloud accelerator type "
        "(v5p-256, v5litepod-16, v6e-64, v4-32) or libtpu layout (v5p:4x4x8), needs libtpu; or "
        "NVIDIA GPUs (h100, h200, a100-80gb, a100-40gb; h100-8 for 8 of a node), needs the "
        "[gpu-compile] extra.",
    )
    flags.DEFINE_bool(
        "search_batch",
        False,
        "With --compile_only: also find the largest per-chip batch that fits "
        "(bisection, one full compile per try).",
    )
    run_main(main)
