"""Evaluation: stream every document of a split through the model with memory.

    python -m ctx.evaluate --config=experiments/pg19.py --workdir=RUN --split=test \
        [--step=N] [--config.model.compressed_length=2048] [--output=report.json]

Each document starts from empty memory; B documents run in parallel (longest first onto
the row with the least work, so no row idles while another still has several long books:
`ctx.data.stream.balanced_rows`), and the batch halves whenever half the rows have run out
(`eval.shrink_batch`); the last segment of each is padded and masked, so no
document is dropped or counted twice whatever B, the device count or the host count.
Memory lengths and the batch may differ from training (parameter shapes do not depend on
them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from ctx.backend import announce, model_config_for_run
from ctx.cli import FLAGS, define_config_flags, run_main
from ctx.config import with_global_batch
from ctx.data.datasets import PG19_WORDS, check_data_config, load_corpus
from ctx.data.source import TokenizedCorpus
from ctx.data.stream import SEGMENT_KEYS, eval_chunks
from ctx.errors import InputError, MissingInput
from ctx.nn import losses
from ctx.nn.memory import init_memory, select_rows
from ctx.nn.transformer import CompressiveTransformer
from ctx.progress import progress as progress_bar
from ctx.remote import check_output
from ctx.restore import restore_for_inference
from ctx.sharding import (
    check_batch_fits,
    device_chunk,
    make_mesh,
    memory_shardings,
    process_rows,
    replicated,
    to_host,
    tracing_on,
)


def make_eval_chunk_fn(model, mesh=None):
    """jit(params, memory, chunk) -> (memory, nll [G,B,n_s]) with a scan over G segments (on
    `mesh`, where the arrays lie, if given).

    The memories' keys and values are projected once per chunk and then carried from segment
    to segment (each segment adds its own and the new compressed slots'), instead of
    projecting all n_cm + n_m memories again in every segment."""

    def segment(params, memory, batch):
        logits, memory, _ = model.apply(
            {"params": params}, batch["tokens"], memory, reset=batch["reset"]
        )
        return memory, losses.token_nll(logits, batch["targets"]) * batch["weights"]

    def chunk_fn(params, memory, chunk):
        with tracing_on(mesh):
            memory = model.apply(
                {"params": params}, memory, method=CompressiveTransformer.with_memory_keys_values
            )
            memory, nll = jax.lax.scan(lambda m, b: segment(params, m, b), memory, chunk)
        return memory.without_keys_values(), nll

    return jax.jit(chunk_fn, donate_argnums=(1,))


def position_buckets(max_position: int) -> list[tuple[int, int]]:
    """Log-spaced buckets of token position: [0,1), [1,2), [2,4), [4,8), ..."""
    edges = [0, 1]
    while edges[-1] < max_position:
        edges.append(edges[-1] * 2)
    return list(zip(edges[:-1], edges[1:]))


@dataclasses.dataclass
class NllSums:
    """Running sums of a split's NLL (nats) and scored tokens, per document and per log-spaced
    bucket of position in the document (`position_buckets`)."""

    doc_nll: np.ndarray  # [documents] float64
    doc_tokens: np.ndarray  # [documents] int64
    buckets: list[tuple[int, int]]
    bucket_nll: np.ndarray  # [buckets]
    bucket_count: np.ndarray  # [buckets]

    @classmethod
    def zeros(cls, documents: int, longest: int) -> "NllSums":
        buckets = position_buckets(longest)
        return cls(
            np.zeros(documents, np.float64),
            np.zeros(documents, np.int64),
            buckets,
            np.zeros(len(buckets)),
            np.zeros(len(buckets), np.int64),
        )

    def add(self, document: np.ndarray, position: np.ndarray, nll: np.ndarray) -> None:
        """Add scored tokens: their document ids, positions in the document and NLL (same shape)."""
        np.add.at(self.doc_nll, document, nll)
        np.add.at(self.doc_tokens, document, 1)
        bucket = np.searchsorted([start for start, _ in self.buckets], position, side="right") - 1
        np.add.at(self.bucket_nll, bucket, nll)
        np.add.at(self.bucket_count, bucket, 1)

    def by_position(self) -> list[dict[str, Any]]:
        return [
            {
                "start": s,
                "end": e,
                "mean_nll": float(self.bucket_nll[i] / self.bucket_count[i]),
                "count": int(self.bucket_count[i]),
            }
            for i, (s, e) in enumerate(self.buckets)
            if self.bucket_count[i]
        ]


def evaluate_corpus(
    model,
    params,
    corpus: TokenizedCorpus,
    mesh,
    batch_size: int,
    chunk_size: int,
    progress: bool = False,
    shrink_batch: bool = True,
    chunk_fn: Callable | None = None,
) -> dict[str, Any]:
    """Sums over the whole split: NLL (nats), tokens, bytes, words, per document and by position.

    shrink_batch: halve the batch as rows run out of documents (`eval_chunks`; one compile
    per size). chunk_fn: a `make_eval_chunk_fn(model)` to reuse, so that repeated
    validations during training compile once."""
    cfg = model.config
    n_docs = len(corpus)
    lengths = np.diff(corpus.offsets)
    sums = NllSums.zeros(n_docs, int(lengths.max()))
    if mesh.shape["fsdp"] == 1:
        params = jax.device_put(params, replicated(mesh))
    chunk_fn = chunk_fn or make_eval_chunk_fn(model, mesh)
    # Static rows: every process passes the same plain tuple, one compile per (rare) shrink.
    keep_rows = jax.jit(select_rows, static_argnums=1, out_shardings=memory_shardings(mesh))
    held, memory = None, None
    bar = progress_bar(progress, total=n_docs, desc="evaluate", unit="doc")
    start = time.perf_counter()
    for chunk in eval_chunks(
        corpus,
        batch_size,
        cfg.segment_length,
        chunk_size,
        batch_multiple=mesh.size if shrink_batch else 0,
    ):
        if held is None:
            memory = jax.device_put(init_memory(cfg, len(chunk["row"])), memory_shardings(mesh))
        elif len(chunk["row"]) < len(held):
            memory = keep_rows(memory, tuple(np.searchsorted(held, chunk["row"]).tolist()))
        held = chunk["row"]
        rows = process_rows(len(held))
        local = {k: chunk[k][:, rows.start : rows.stop] for k in SEGMENT_KEYS}
        memory, nll = chunk_fn(params, memory, device_chunk(mesh, local))
        nll = to_host(nll).astype(np.float64)
        scored = chunk["document"] >= 0
        sums.add(chunk["document"][scored], chunk["position"][scored], nll[scored])
        if bar is not None:
            bar.n = int(np.count_nonzero(sums.doc_tokens == lengths))
            bar.set_postfix(
                tokens_per_sec=f"{sums.doc_tokens.sum() / (time.perf_counter() - start):,.0f}"
            )
            bar.refresh()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    total_nll, tokens = float(sums.doc_nll.sum()), int(sums.doc_tokens.sum())
    n_bytes = int(np.sum(corpus.num_bytes))
    return {
        "documents": n_docs,
        "tokens": tokens,
        "bytes": n_bytes,
        "words": int(np.sum(corpus.num_words)),
        "total_nll": total_nll,
        "token_perplexity": math.exp(total_nll / tokens),
        "bits_per_token": total_nll / tokens / math.log(2),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "tokens_per_sec": tokens / seconds,
        "seconds": seconds,
        "by_position": sums.by_position(),
        "per_document": [
            {
                "id": corpus.ids[i],
                "tokens": int(sums.doc_tokens[i]),
                "words": int(corpus.num_words[i]),
                "nll": float(sums.doc_nll[i]),
            }
            for i in range(n_docs)
        ],
    }


def word_level(result: dict[str, Any], dataset: str, split: str) -> dict[str, Any]:
    """Word-level perplexity: official PG-19 counts for a full PG-19 split, else whitespace words."""
    official = PG19_WORDS.get(split) if dataset == "pg19" else None
    if official and result["documents"] == official[0]:
        words, source = official[1], "pg19-official"
    else:
        words, source = result["words"], "whitespace"
    return {
        "word_perplexity": math.exp(result["total_nll"] / max(words, 1)),
        "word_count_source": source,
        "word_count_used": words,
    }


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str,
    step: int | None = None,
    progress: bool = False,
    attention_selfcheck: bool = True,
) -> dict[str, Any]:
    """Restore checkpoint `step` (default: latest) of the run in workdir and evaluate a split
    (a fused attention checked on this device first, unless `attention_selfcheck` is off)."""
    check_data_config(config.data, split)
    mesh = make_mesh(config.mesh)
    batch_size = config.eval.batch_size or with_global_batch(config, mesh.size).train.batch_size
    check_batch_fits(batch_size, mesh)
    model_cfg = model_config_for_run(
        config, "ctx.evaluate", mesh.devices.flat[0], check=attention_selfcheck, evaluation=True
    )
    restored = restore_for_inference(config, workdir, step, mesh, model_cfg)
    model, params, step = restored.model, restored.params, restored.step
    data = (
        config.data.copy_and_resolve_references()
    )  # read with the run's tokenizer; the caller's config stays
    data.tokenizer = restored.tokenizer_path
    corpus = load_corpus(data, split, progress=progress and jax.process_index() == 0)
    result = evaluate_corpus(
        model,
        params,
        corpus,
        mesh,
        batch_size,
        config.eval.segments_per_call or config.train.segments_per_call,
        progress,
        shrink_batch=config.eval.shrink_batch,
    )
    return {
        "split": split,
        "step": step,
        "num_devices": mesh.size,
        "dataset": config.data.dataset,
        "tokenizer": restored.tokenizer_path,
        **result,
        **word_level(result, config.data.dataset, split),
        "model": config.model.to_dict(),
    }


def format_report(report: dict[str, Any]) -> str:
    rows = [
        ("split", report["split"]),
        ("step", report["step"]),
        ("documents", report["documents"]),
        ("tokens scored", f"{report['tokens']:,}"),
        ("words", f"{report['words']:,}"),
        ("total NLL (nats)", f"{report['total_nll']:,.1f}"),
        ("token perplexity", f"{report['token_perplexity']:.3f}"),
        (f"word perplexity ({report['word_count_source']})", f"{report['word_perplexity']:.3f}"),
        ("bits per byte", f"{report['bits_per_byte']:.4f}"),
        ("tokens/s", f"{report['tokens_per_sec']:,.0f}"),
        ("devices", report["num_devices"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(
        "loss by position: "
        + ", ".join(f"[{b['start']},{b['end']}) {b['mean_nll']:.3f}" for b in report["by_position"])
    )
    return "\n".join(lines)


def _read_report(path: str) -> dict[str, Any]:
    """An earlier `--output` report, for --compare: readable, JSON, with loss by position."""
    try:
        report = json.loads(epath.Path(path).read_text())
    except OSError as error:
        raise MissingInput(f"--compare={path} cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise InputError(
            f"--compare={path} is not a JSON report ({error.msg} at line {error.lineno})"
        ) from None
    if not isinstance(report, dict) or "by_position" not in report:
        raise InputError(
            f"--compare={path} is not a ctx.evaluate report (no by_position); pass an --output file"
        )
    return report


def main() -> None:
    from ctx.plots import plot_loss_by_position

    if not FLAGS.workdir:
        raise InputError("--workdir is required (the training run to evaluate)")
    announce("ctx.evaluate")
    if FLAGS.output:
        check_output(FLAGS.output, "--output")
    others = [_read_report(path) for path in FLAGS.compare]  # before the split is evaluated
    report = evaluate_checkpoint(
        FLAGS.config,
        FLAGS.workdir,
        FLAGS.split,
        None if FLAGS.step < 0 else FLAGS.step,
        progress=True,
        attention_selfcheck=FLAGS.attention_selfcheck,
    )
    if jax.process_index() != 0:
        return
    print(format_report(report))
    if FLAGS.output:
        epath.Path(FLAGS.output).write_text(json.dumps(report, indent=1))
        plot = os.path.splitext(FLAGS.output)[0] + ".png"
        plot_loss_by_position([report] + others, plot)
        print(f"wrote {FLAGS.output} and {plot}")


if __name__ == "__main__":
    from absl import flags

    define_config_flags()
    flags.DEFINE_string("split", "test", "Split to evaluate: train, validation or test.")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: the latest).")
    flags.DEFINE_string(
        "output", None, "Write the JSON report here (and the loss-by-position plot beside it)."
    )
    flags.DEFINE_bool(
        "attention_selfcheck",
        True,
        "Check a fused attention against the XLA reference on this "
        "device before evaluating (ctx.selfcheck); a failure refuses the run (attention_impl=auto: "
        "falls back to xla).",
    )
    flags.DEFINE_multi_string(
        "compare", [], "Other report JSONs to overlay on the plot (e.g. a TXL run)."
    )
    run_main(main)
