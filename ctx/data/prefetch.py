"""A bounded background prefetch of training chunks, so building segments on the host
overlaps the accelerator's work instead of stalling it.

Chunk lengths are a deterministic function of the step, so the producer thread follows
them on its own; with each chunk it hands over the stream position *after* that chunk,
which is what a checkpoint written after consuming the chunk must record.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from ctx.data.stream import Chunk, TrainStream


class ChunkPrefetcher:
    def __init__(
        self,
        stream: TrainStream,
        first_step: int,
        last_step: int,
        chunk_length: Callable[[int], int],
        depth: int = 2,
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(stream, first_step, last_step, chunk_length), daemon=True
        )
        self._thread.start()

    def _produce(self, stream, step, last_step, chunk_length) -> None:
        try:
            while step < last_step and not self._stop.is_set():
                k = chunk_length(step)
                chunk = stream.next_chunk(k)
                self._put((k, chunk, stream.state()))
                step += k
        except BaseException as error:  # surfaced in the consumer
            self._put(error)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[int, Chunk, dict]]:
        return self

    def __next__(self) -> tuple[int, Chunk, dict]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
