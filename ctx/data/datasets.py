"""Load a split of the configured dataset as a TokenizedCorpus.

`config.data.dataset`: 'demo' (the CPython docs, offline), 'pg19' (the bucket's layout, local
or gs://), 'enwik8' (the raw 100M-byte file; the standard 90M / 5M / 5M split, cut into
pieces of `data.piece_bytes` bytes that act as documents) or 'wt103' (a folder with
wiki.{train,valid,test}.tokens, one document per article). Splits other than the demo's are
tokenized once per tokenizer into `data.cache_dir` and memory-mapped afterwards.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Any, Iterator

from etils import epath

from ctx.data.demo_corpus import demo_documents
from ctx.data.source import SPLITS, Document, TokenizedCorpus
from ctx.data.tokenizer import load_tokenizer
from ctx.errors import InputError, MissingInput
from ctx.remote import check_reachable

DATASETS = ("demo", "pg19", "enwik8", "wt103")
ENWIK8_SPLITS = {
    "train": (0, 90_000_000),
    "validation": (90_000_000, 95_000_000),
    "test": (95_000_000, 100_000_000),
}
WT103_FILES = {
    "train": "wiki.train.tokens",
    "validation": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}
_WT103_TITLE = re.compile(r"^ = [^=].* = $")


def cache_dir(data_cfg: Any) -> str:
    return data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "ctx")


# docs/paper-notes.md §7: (books, words) of the full PG-19 splits, the denominators of the
# paper's word-level perplexity.
PG19_WORDS = {"validation": (50, 3_007_061), "test": (100, 6_966_499)}


def check_data_config(data_cfg: Any, split: str) -> None:
    """Errors a user can fix, found before anything is read or written."""
    if data_cfg.dataset not in DATASETS:
        raise InputError(
            f"data.dataset={data_cfg.dataset!r} is unknown; choose one of {list(DATASETS)}"
        )
    if split not in SPLITS:
        raise InputError(f"split {split!r} does not exist; choose one of {list(SPLITS)}")
    if data_cfg.dataset != "demo" and not data_cfg.path:
        raise InputError(
            f"data.path is empty; set --config.data.path to the {data_cfg.dataset} files"
        )
    if data_cfg.dataset != "demo":
        check_reachable(data_cfg.path, "data.path")  # gs:// paths: one line, before any work
    if data_cfg.get("tokenizer", "bytes") != "bytes":
        check_reachable(data_cfg.tokenizer, "data.tokenizer")
    if data_cfg.dataset in ("enwik8", "wt103") and not epath.Path(data_cfg.path).exists():
        raise MissingInput(f"data.path={data_cfg.path} does not exist")


def load_corpus(data_cfg: Any, split: str, progress: bool = False) -> TokenizedCorpus:
    check_data_config(data_cfg, split)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    if data_cfg.dataset == "demo":
        empty = (
            f"the demo's {split} split has no topics: data.validation_fraction="
            f"{data_cfg.validation_fraction} must be above 0 and below 1"
        )
        return TokenizedCorpus.from_documents(
            demo_documents(split, data_cfg.validation_fraction), tokenizer, empty=empty
        )
    documents = {
        "pg19": lambda: _pg19_documents(data_cfg, split),
        "enwik8": lambda: _enwik8_documents(data_cfg.path, split, data_cfg.piece_bytes),
        "wt103": lambda: _wt103_documents(data_cfg.path, split),
    }[data_cfg.dataset]
    if data_cfg.dataset == "pg19":  # prepare (and check the split) before naming the cache
        _pg19_source(data_cfg, split)
    key = hashlib.sha256(
        f"{os.path.abspath(data_cfg.path) if '://' not in data_cfg.path else data_cfg.path}|"
        f"{data_cfg.get('piece_bytes', 0)}".encode()
    ).hexdigest()[:12]
    path = os.path.join(
        cache_dir(data_cfg), "tokens", f"{data_cfg.dataset}-{key}-{split}-{tokenizer.fingerprint}"
    )
    return TokenizedCorpus.cached(
        path, documents, tokenizer, progress, empty=_empty_split(data_cfg, split)
    )


def _empty_split(data_cfg: Any, split: str) -> str:
    """What to say when a split holds no text: the split, the path and the fix."""
    where = f"the {split} split of data.dataset={data_cfg.dataset} (data.path={data_cfg.path})"
    if data_cfg.dataset == "pg19":
        return f"{where} has no books with text: put them in {data_cfg.path}/{split}/<id>.txt"
    if data_cfg.dataset == "wt103":
        return f"{where} has no articles with text: {WT103_FILES[split]} is empty"
    return f"{where} has no text"


def _pg19_source(data_cfg: Any, split: str):
    from ctx.data import pg19

    return pg19.load_split(data_cfg.path, split, cache_dir(data_cfg))


def _pg19_documents(data_cfg: Any, split: str) -> Iterator[Document]:
    source = _pg19_source(data_cfg, split)
    books = sorted((int(ex["book_id"]), i) for i, ex in enumerate(_iterate(source)))
    for book_id, i in books:  # in book-id order, whatever order TFDS stored them in
        text = source[i]["book_text"]
        yield Document(
            str(book_id),
            text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text,
        )


def _iterate(source):
    for i in range(len(source)):
        yield source[i]


def _enwik8_documents(path: str, split: str, piece_bytes: int) -> Iterator[Document]:
    path = epath.Path(path)  # a local or gs:// path
    if path.is_dir():
        path = path / "enwik8"
    size = path.stat().length
    start, end = ENWIK8_SPLITS[split]
    if size < end:
        raise InputError(
            f"{path} has {size:,} bytes; enwik8 has 100,000,000 (first 90M train, "
            "next 5M validation, last 5M test)"
        )
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(end - start)
    for i in range(0, len(data), piece_bytes):
        # enwik8 is modelled as raw bytes: surrogateescape keeps every byte, valid UTF-8 or not.
        yield Document(f"{split}-{i}", data[i : i + piece_bytes].decode("utf-8", "surrogateescape"))


def _wt103_documents(folder: str, split: str) -> Iterator[Document]:
    path = epath.Path(folder) / WT103_FILES[split]  # a local or gs:// folder
    if not path.is_file():
        raise MissingInput(
            f"{path} does not exist (WikiText-103 has {', '.join(WT103_FILES.values())})"
        )
    article, title = [], None
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for line in f:
            if _WT103_TITLE.match(line.rstrip("\n")):
                if title is not None:  # lines before the first title belong to the first article
                    yield Document(title, "".join(article))
                    article = []
                title = line.strip(" =\n")
            article.append(line)
    if article:
        yield Document(title or "0", "".join(article))
