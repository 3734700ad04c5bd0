"""A synthetic long-range task: recall a payload token seen k tokens ago (issue: reproduction).

An episode of m segments (E = m * n_s tokens) starts with a payload token v, then random
filler tokens, and ends with one segment of query tokens whose targets are all v; only those
targets are scored. A query at position i of the last segment is k = (m - 1) * n_s + i tokens
after the payload. Memory is reset at every episode start, so v is the only payload in reach.

A one-layer model can answer iff v is inside its attention window: Transformer-XL reaches
n_m + i tokens back; the Compressive Transformer reaches n_m + c * n_cm + i (v then sits in a
compressed slot with c - 1 fillers). At equal attention length (TXL n_m = CT n_m + n_cm) the
CT should solve the m that TXL cannot, and neither the m beyond both.

Token ids: 0 = query, 1..PAYLOADS = payloads, the rest fillers.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctx.backend import model_config_for_run
from ctx.config import default_config
from ctx.data.stream import empty_chunk
from ctx.nn.memory import init_memory
from ctx.sharding import device_chunk
from ctx.train import Trainer

QUERY = 0
PAYLOADS = 8
FILLERS = 16
VOCAB = 1 + PAYLOADS + FILLERS


def recall_config(
    variant: str,
    *,
    segment_length: int = 16,
    attention_memory: int = 48,
    compression_rate: int = 4,
    d_model: int = 64,
    steps: int = 1500,
    batch_size: int = 32,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """One layer. 'ct': n_m = n_s and n_cm = attention_memory - n_s (conv + attention-reconstruction
    loss); 'txl': n_m = attention_memory, n_cm = 0. Both attend over n_s + attention_memory keys."""
    cfg = default_config()
    cfg.seed = seed
    compressed = attention_memory - segment_length if variant == "ct" else 0
    cfg.model.update(
        dict(
            vocab_size=VOCAB,
            n_layers=1,
            d_model=d_model,
            n_heads=4,
            d_ff=2 * d_model,
            segment_length=segment_length,
            memory_length=attention_memory - compressed,
            compressed_length=compressed,
            compression_rate=compression_rate,
        )
    )
    cfg.train.update(
        dict(
            num_steps=steps,
            batch_size=batch_size,
            segments_per_call=10,
            peak_lr=1e-3,
            compress_peak_lr=1e-3,
            warmup_steps=100,
            decay_steps=steps,
            grad_clip=1.0,
            compress_grad_clip=1.0,
        )
    )
    return cfg


def reach_in_segments(model: ml_collections.ConfigDict) -> int:
    """The largest episode length m (in segments) whose payload a one-layer model can attend to
    from every query: the last segment sees n_m + c * n_cm earlier tokens, whole segments only."""
    n_s = model.segment_length
    back = model.memory_length + model.compression_rate * model.compressed_length
    return 1 + back // n_s


def write_episode(
    chunk: dict[str, np.ndarray],
    row: int,
    first: int,
    m: int,
    payload: int,
    rng: np.random.Generator,
) -> None:
    """Episode segments first .. first+m-1 of `row` in a [K,B,n_s] chunk (they must fit)."""
    n_s = chunk["tokens"].shape[2]
    tokens = rng.integers(1 + PAYLOADS, VOCAB, size=m * n_s)
    tokens[0] = payload
    tokens[-n_s:] = QUERY
    chunk["tokens"][first : first + m, row] = tokens.reshape(m, n_s)
    chunk["targets"][first + m - 1, row] = payload
    chunk["weights"][first + m - 1, row] = 1.0
    chunk["reset"][first, row] = True


class RecallStream:
    """Rows of back-to-back episodes, each of a length drawn from `lengths`, cut into chunks."""

    def __init__(
        self, batch_size: int, segment_length: int, lengths: Sequence[int], seed: int
    ) -> None:
        self.batch_size, self.segment_length, self.lengths = (
            batch_size,
            segment_length,
            list(lengths),
        )
        self.rng = np.random.default_rng(seed)
        self.pending: list[list[dict[str, np.ndarray]]] = [[] for _ in range(batch_size)]

    def _episode(self) -> list[dict[str, np.ndarray]]:
        m = int(self.rng.choice(self.lengths))
        one = empty_chunk(m, 1, self.segment_length, reset=False)
        write_episode(one, 0, 0, m, int(self.rng.integers(1, 1 + PAYLOADS)), self.rng)
        return [{k: v[s, 0] for k, v in one.items()} for s in range(m)]

    def next_chunk(self, K: int) -> dict[str, np.ndarray]:
        chunk = empty_chunk(K, self.batch_size, self.segment_length, reset=False)
        for row, pending in enumerate(self.pending):
            for s in range(K):
                if not pending:
                    pending.extend(self._episode())
                for key, value in pending.pop(0).items():
                    chunk[key][s, row] = value
        return chunk


def eval_episodes(
    m: int, total: int, batch_size: int, segment_length: int, seed: int
) -> dict[str, np.ndarray]:
    """A [total,B,n_s] chunk whose last m segments hold one episode per row (payloads spread
    evenly); the segments before it are unscored padding, so every m shares one compilation."""
    rng = np.random.default_rng([seed, m])
    chunk = empty_chunk(total, batch_size, segment_length, reset=False)
    chunk["reset"][0] = True
    for row in range(batch_size):
        write_episode(chunk, row, total - m, m, 1 + row % PAYLOADS, rng)
    return chunk


def make_recall_eval(model):
    """jit(params, chunk) -> (accuracy [n_s], nll [n_s]) on the last segment of aligned episodes."""

    def evaluate(params, chunk):
        memory = init_memory(model.config, chunk["tokens"].shape[1])

        def step(memory, batch):
            logits, memory, _ = model.apply(
                {"params": params}, batch["tokens"], memory, reset=batch["reset"]
            )
            return memory, logits

        _, logits = jax.lax.scan(step, memory, chunk)
        last, targets = logits[-1].astype(jnp.float32), chunk["targets"][-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(last), targets[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(last, axis=-1) == targets).astype(jnp.float32)
        return correct.mean(axis=0), nll.mean(axis=0)

    return jax.jit(evaluate)


def run_recall(
    config: ml_collections.ConfigDict,
    train_lengths: Sequence[int],
    eval_lengths: Sequence[int],
    eval_batch: int = 256,
) -> dict[str, Any]:
    """Train on episodes of the given lengths, then score each eval length on fresh episodes."""
    trainer = Trainer(config, model_config_for_run(config, "experiments.recall"))
    K, n_s = config.train.segments_per_call, config.model.segment_length
    stream = RecallStream(config.train.batch_size, n_s, train_lengths, seed=config.seed)
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
    memory, rng = trainer.init_memory(), jax.random.PRNGKey(config.seed + 1)
    start, losses = time.perf_counter(), []
    for _ in range(config.train.num_steps // K):
        chunk = device_chunk(trainer.mesh, stream.next_chunk(K))
        state, memory, rng, metrics = trainer.train_chunk(state, memory, rng, chunk)
        losses.append(float(np.mean(jax.device_get(metrics["loss"]))))
    evaluate = make_recall_eval(trainer.model)
    rows = []
    for m in eval_lengths:
        episodes = eval_episodes(m, max(eval_lengths), eval_batch, n_s, config.seed + 7)
        accuracy, nll = jax.device_get(evaluate(state.params, episodes))
        rows.append(
            {
                "segments": m,
                "k_min": (m - 1) * n_s,
                "k_max": m * n_s - 1,
                "accuracy": float(accuracy.mean()),
                "nll": float(nll.mean()),
                "reachable": m <= reach_in_segments(config.model),
            }
        )
    return {
        "rows": rows,
        "train_loss": losses,
        "seconds": time.perf_counter() - start,
        "chance_accuracy": 1 / PAYLOADS,
    }
