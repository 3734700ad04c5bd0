"""Documents and their token ids: what a stream walks through.

A TokenizedCorpus keeps all token ids of a split in one flat int32 array with document
offsets, so a large split can be tokenized once into a cache and memory-mapped afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Iterable

import numpy as np

from ctx.errors import InputError
from ctx.progress import progress as progress_bar

# Every dataset's splits (PG-19's are folders of these names).
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    text: str


class TokenizedCorpus:
    """Token ids per document (flat array + offsets); empty documents are skipped and counted."""

    def __init__(
        self,
        ids: list[str],
        flat: np.ndarray,
        offsets: np.ndarray,
        num_bytes: np.ndarray,
        num_words: np.ndarray,
        tokenizer,
        skipped_empty: int = 0,
    ) -> None:
        self.ids, self.flat, self.offsets = ids, flat, offsets
        self.num_bytes, self.num_words = num_bytes, num_words
        self.tokenizer, self.skipped_empty = tokenizer, skipped_empty

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[Document],
        tokenizer,
        progress: bool = False,
        empty: str = "the documents are all empty",
    ) -> "TokenizedCorpus":
        """Tokenize `documents`; `empty` says what is wrong, and how to fix it, when none has text."""
        ids, arrays, num_bytes, num_words, skipped = [], [], [], [], 0
        for batch in _batches(progress_bar(progress, documents, desc="tokenize", unit="doc"), 64):
            for doc, tokens in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                if len(tokens) == 0:
                    skipped += 1
                    continue
                ids.append(str(doc.id))
                arrays.append(tokens)
                num_bytes.append(len(doc.text.encode("utf-8", "surrogateescape")))
                num_words.append(len(doc.text.split()))
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)]).astype(
            np.int64
        )
        if not ids:
            raise InputError(f"{empty} ({skipped} empty document(s) skipped, none with text)")
        flat = np.concatenate(arrays)
        return cls(
            ids,
            flat,
            offsets,
            np.asarray(num_bytes, np.int64),
            np.asarray(num_words, np.int64),
            tokenizer,
            skipped,
        )

    @classmethod
    def cached(
        cls,
        path: str,
        documents: Callable[[], Iterable[Document]],
        tokenizer,
        progress: bool = False,
        empty: str = "the documents are all empty",
    ) -> "TokenizedCorpus":
        """Load the cache folder at `path`, or tokenize once and write it there atomically."""
        if not os.path.isfile(os.path.join(path, "index.json")):
            start = time.perf_counter()
            corpus = cls.from_documents(documents(), tokenizer, progress, empty)
            corpus._save(path, seconds=time.perf_counter() - start)
        with open(os.path.join(path, "index.json")) as f:
            index = json.load(f)
        arrays = np.load(os.path.join(path, "arrays.npz"))
        flat = np.load(os.path.join(path, "tokens.npy"), mmap_mode="r")
        return cls(
            index["ids"],
            flat,
            arrays["offsets"],
            arrays["num_bytes"],
            arrays["num_words"],
            tokenizer,
            index["skipped_empty"],
        )

    def _save(self, path: str, seconds: float) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".incomplete-")
        np.save(os.path.join(tmp, "tokens.npy"), self.flat)
        np.savez(
            os.path.join(tmp, "arrays.npz"),
            offsets=self.offsets,
            num_bytes=self.num_bytes,
            num_words=self.num_words,
        )
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(
                {
                    "ids": self.ids,
                    "skipped_empty": self.skipped_empty,
                    "tokens": int(len(self.flat)),
                    "tokenize_seconds": seconds,
                    "tokens_per_sec": len(self.flat) / max(seconds, 1e-9),
                },
                f,
            )
        try:
            os.replace(tmp, path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.ids)

    def document(self, index: int) -> np.ndarray:
        return np.asarray(self.flat[self.offsets[index] : self.offsets[index + 1]])

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def num_segments(self, index: int, segment_length: int) -> int:
        return math.ceil(self.length(index) / segment_length)

    def segment(
        self, index: int, j: int, segment_length: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment j of document `index`: (inputs, targets, weights), each [n_s], padded.

        Inputs are the tokens shifted right behind BOS, so every token is a target once.
        """
        start = j * segment_length
        lo = self.offsets[index] + start
        end = min(lo + segment_length, self.offsets[index + 1])
        targets = np.asarray(self.flat[lo:end])
        inputs = (
            np.asarray(self.flat[lo - 1 : end - 1])
            if start
            else np.concatenate([[self.tokenizer.bos_id], self.flat[lo : end - 1]]).astype(np.int32)
        )
        pad = segment_length - len(targets)
        weights = np.concatenate([np.ones(len(targets), np.float32), np.zeros(pad, np.float32)])
        return np.pad(inputs, (0, pad)), np.pad(targets, (0, pad)), weights

    def unigram_bits_per_token(self) -> float:
        """Entropy (bits) of the corpus' own token frequencies: the unigram baseline."""
        counts = np.bincount(np.asarray(self.flat))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


def _batches(items: Iterable, size: int) -> Iterable[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
