"""B parallel streams of segments: each row walks its own documents contiguously.

A segment is tokens/targets/weights [B, n_s] plus reset [B] (true where the row starts a
new document). The training stream is infinite, shuffled per epoch and resumable from a
small JSON state; the evaluation stream visits every document exactly once.

Row r's k-th document is entry r + B*k of the infinite sequence of epochs (each a seeded
permutation of the corpus), so the batches depend only on the seed and the global batch
size, never on how many processes produce the rows.
"""

from __future__ import annotations

import heapq
from typing import Iterator, Sequence

import numpy as np

from ctx.data.source import TokenizedCorpus
from ctx.errors import InputError

Chunk = dict[str, np.ndarray]


# The arrays of a training or evaluation chunk that go to the devices ([G, B, ...] each).
SEGMENT_KEYS = ("tokens", "targets", "weights", "reset")


def empty_chunk(G: int, B: int, n_s: int, reset: bool) -> Chunk:
    """Zero tokens/targets/weights [G,B,n_s] (weight 0 = padding) and reset [G,B]."""
    return {
        "tokens": np.zeros((G, B, n_s), np.int32),
        "targets": np.zeros((G, B, n_s), np.int32),
        "weights": np.zeros((G, B, n_s), np.float32),
        "reset": np.full((G, B), reset),
    }


class TrainStream:
    """Infinite training segments for the global rows `rows` (default: all of them)."""

    def __init__(
        self,
        corpus: TokenizedCorpus,
        batch_size: int,
        segment_length: int,
        seed: int,
        shuffle: bool = True,
        rows: Sequence[int] | None = None,
    ) -> None:
        self.corpus, self.batch_size, self.segment_length = corpus, batch_size, segment_length
        self.seed, self.shuffle = seed, shuffle
        self.rows = list(range(batch_size) if rows is None else rows)
        self.docs_done = [0] * batch_size  # per global row: documents finished
        self.next_segment = [0] * batch_size  # per global row: next segment of its document
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.corpus)
            self._orders = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            }
        return self._orders[epoch]

    def document_of(self, row: int) -> int:
        g = row + self.batch_size * self.docs_done[row]
        return int(self._order(g // len(self.corpus))[g % len(self.corpus)])

    def state(self) -> dict:
        """JSON-serialisable position of every row (saved in checkpoints)."""
        return {
            "docs_done": list(self.docs_done),
            "next_segment": list(self.next_segment),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def restore(self, state: dict) -> None:
        if state["batch_size"] != self.batch_size or state["seed"] != self.seed:
            raise InputError(
                f"the saved data position is for batch_size={state['batch_size']}, "
                f"seed={state['seed']}; this run has batch_size={self.batch_size}, "
                f"seed={self.seed}: resume with the same train.batch_size and seed"
            )
        self.docs_done, self.next_segment = list(state["docs_done"]), list(state["next_segment"])

    def next_chunk(self, num_segments: int) -> Chunk:
        """[G, B_local, n_s] tokens/targets/weights and [G, B_local] reset.

        Every process advances the positions of all B rows (cheap: lengths only), so the
        saved state is global whichever process writes it; segments are built only for the
        local rows.
        """
        G, n_s = num_segments, self.segment_length
        local = {row: b for b, row in enumerate(self.rows)}
        B = len(self.rows)
        chunk = empty_chunk(G, B, n_s, reset=False)
        for k in range(G):
            for row in range(self.batch_size):
                doc, j = self.document_of(row), self.next_segment[row]
                if row in local:
                    b = local[row]
                    chunk["tokens"][k, b], chunk["targets"][k, b], chunk["weights"][k, b] = (
                        self.corpus.segment(doc, j, n_s)
                    )
                    chunk["reset"][k, b] = j == 0
                if j + 1 == self.corpus.num_segments(doc, n_s):
                    self.docs_done[row], self.next_segment[row] = self.docs_done[row] + 1, 0
                else:
                    self.next_segment[row] = j + 1
        return chunk


def balanced_rows(segments_per_document: Sequence[int], batch_size: int) -> list[list[int]]:
    """Documents for each of `batch_size` rows, longest first onto the row with the least work.

    A split takes as many segments as its busiest row (every row walks its documents in
    turn), so the assignment decides the evaluation's length: dealt out round-robin, one row
    can collect several long books while the others idle on padding. Greedy longest-first
    keeps the busiest row at most one document (the longest) above the average; ties go to the lower row and
    document index, so every process computes the same plan.
    """
    loads = [(0, row) for row in range(batch_size)]
    rows: list[list[int]] = [[] for _ in range(batch_size)]
    for doc in sorted(
        range(len(segments_per_document)), key=lambda d: (-segments_per_document[d], d)
    ):
        load, row = heapq.heappop(loads)
        rows[row].append(doc)
        heapq.heappush(loads, (load + segments_per_document[doc], row))
    return rows


def eval_chunks(
    corpus: TokenizedCorpus,
    batch_size: int,
    segment_length: int,
    chunk_size: int,
    batch_multiple: int = 0,
) -> Iterator[Chunk]:
    """Every document exactly once, from empty memory, rows assigned by `balanced_rows`.

    Rows that run out get empty segments (weight 0, reset). Besides the training keys each
    chunk has `document` (index in the corpus, -1 on padding) and `position` (index of the
    target token within its document) [G, B_chunk, n_s], and `row` [B_chunk]: which of the
    `batch_size` rows it holds, in order.

    batch_multiple > 0 lets the batch shrink as rows finish, so the tail of a split with a
    few long documents does not compute padding for the finished rows: before a chunk,
    while at most half the rows still have segments and half the batch is a multiple of
    `batch_multiple` (the batch shards), the batch halves, keeping the rows with work (and
    finished ones to fill up). The caller carries the kept rows' memory over
    (`ctx.nn.memory.select_rows`); halving bounds the batch sizes, so the compiles, to log2(B).
    """
    n_s = segment_length
    documents = balanced_rows(
        [corpus.num_segments(doc, n_s) for doc in range(len(corpus))], batch_size
    )
    plans = [
        [(doc, j) for doc in docs for j in range(corpus.num_segments(doc, n_s))]  # per global row
        for docs in documents
    ]
    total = max(len(plan) for plan in plans)
    rows = list(range(batch_size))
    for start in range(0, total, chunk_size):
        if batch_multiple:
            rows = _rows_with_work(rows, [len(plans[row]) > start for row in rows], batch_multiple)
        G, B = chunk_size, len(rows)
        chunk = {
            **empty_chunk(G, B, n_s, reset=True),  # rows that ran out stay empty and reset
            "document": np.full((G, B, n_s), -1, np.int32),
            "position": np.zeros((G, B, n_s), np.int32),
            "row": np.asarray(rows, np.int32),
        }
        for k in range(G):
            for b, row in enumerate(rows):
                if start + k >= len(plans[row]):
                    continue
                doc, j = plans[row][start + k]
                chunk["tokens"][k, b], chunk["targets"][k, b], chunk["weights"][k, b] = (
                    corpus.segment(doc, j, n_s)
                )
                chunk["reset"][k, b] = j == 0
                chunk["document"][k, b] = np.where(chunk["weights"][k, b] > 0, doc, -1)
                chunk["position"][k, b] = j * n_s + np.arange(n_s)
        yield chunk


def _rows_with_work(rows: list[int], busy: list[bool], batch_multiple: int) -> list[int]:
    """`rows` halved while the busy ones fit and the size stays a multiple of batch_multiple."""
    size, needed = len(rows), sum(busy)
    while size % 2 == 0 and (size // 2) % batch_multiple == 0 and size // 2 >= needed:
        size //= 2
    if size == len(rows):
        return rows
    idle = [row for row, b in zip(rows, busy) if not b]
    return sorted([row for row, b in zip(rows, busy) if b] + idle[: size - needed])
