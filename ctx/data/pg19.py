"""PG-19 through TFDS without TensorFlow: a builder with the stock `pg19` features and splits
that reads the bucket's layout from any etils.epath location and writes array_record.

The stock builder hard-codes `gs://deepmind-gutenberg`, reads through `tf.io.gfile` (so it
needs TensorFlow) and splits metadata rows naively on ',' (titles with commas shift fields).
This one takes the source as an argument: a local folder with the layout

    metadata.csv            rows `id,short_title,date,link`, no header
    train/<id>.txt  validation/<id>.txt  test/<id>.txt

or `gs://deepmind-gutenberg` itself (epath reads gs:// through gcsfs; `pip install gcsfs`
and credentials needed). Prepared files go to a cache folder keyed by the source.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ctx.data.source import SPLITS
from ctx.errors import InputError, MissingInput


def _books(folder: epath.Path) -> list[epath.Path]:
    """The split folder's books, <id>.txt, in name order (anything else there is not a book)."""
    return (
        sorted(p for p in folder.glob("*.txt") if p.name[: -len(".txt")].isdigit())
        if folder.is_dir()
        else []
    )


def parse_metadata(text: str) -> dict[int, dict[str, str]]:
    """`id,short_title,date,link` rows; quoted or not, a title may contain commas."""
    rows = {}
    for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) < 4 or not fields[0].strip().isdigit():
            raise InputError(
                f"metadata.csv line {number}: expected `id,short_title,date,link`, got {fields!r}"
            )
        book_id, *title, date, link = fields
        rows[int(book_id)] = {"title": ",".join(title), "date": date, "link": link}
    return rows


def check_layout(source: epath.Path) -> None:
    if not source.exists():
        raise MissingInput(
            f"data.path={source} does not exist; it must hold metadata.csv and "
            "train/, validation/, test/ (the gs://deepmind-gutenberg layout)"
        )
    if not source.is_dir():
        raise InputError(f"data.path={source} is not a directory")
    if not (source / "metadata.csv").exists():
        raise MissingInput(
            f"data.path={source} has no metadata.csv (rows `id,short_title,date,link`)"
        )


class CtxPg19(tfds.core.GeneratorBasedBuilder):
    """PG-19 books: book_text, book_id, book_title, publication_date, book_link."""

    VERSION = tfds.core.Version("0.1.1")

    def __init__(self, *, source: str, **kwargs) -> None:
        self._source = epath.Path(source)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "book_text": tfds.features.Text(),
                    "book_id": np.int32,
                    "book_title": np.str_,
                    "publication_date": np.str_,
                    "book_link": np.str_,
                }
            ),
            homepage="https://github.com/deepmind/pg19",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the source is read directly
        check_layout(self._source)
        metadata = parse_metadata((self._source / "metadata.csv").read_text())
        # A split folder without books is left out (TFDS refuses a split with no examples);
        # asking for it is then the error `load_split` gives.
        return {
            split: self._generate_examples(self._source / split, metadata)
            for split in SPLITS
            if _books(self._source / split)
        }

    def _generate_examples(self, folder: epath.Path, metadata):
        for path in _books(folder):
            book_id = int(path.name[: -len(".txt")])
            meta = metadata.get(book_id, {"title": "", "date": "", "link": ""})
            text = path.read_bytes().decode("utf-8", errors="replace").strip()
            yield (
                book_id,
                {
                    "book_text": text,
                    "book_id": book_id,
                    "book_title": meta["title"],
                    "publication_date": meta["date"],
                    "book_link": meta["link"],
                },
            )


def prepared_dir(source: str, cache_dir: str) -> str:
    key = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "tfds", f"pg19-{key}")


def load_split(source: str, split: str, cache_dir: str):
    """The split as a random-access data source of examples (prepared once per source)."""
    check_layout(epath.Path(source))
    if (epath.Path(source) / split).is_dir() and not _books(epath.Path(source) / split):
        raise InputError(
            f"data.path={source}: {split}/ holds no books; put the {split} split's books there "
            "as <id>.txt (the gs://deepmind-gutenberg layout)"
        )
    builder = CtxPg19(
        source=source, data_dir=prepared_dir(source, cache_dir), file_format="array_record"
    )
    builder.download_and_prepare()
    if split not in builder.info.splits:
        raise InputError(
            f"split {split!r} is not in {source} (found: {sorted(builder.info.splits)}); "
            "add the folder or pick another --split"
        )
    return builder.as_data_source(split=split)
