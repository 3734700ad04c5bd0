"""Datasets from real files: a PG-19 layout through TFDS, SentencePiece, enwik8, WikiText-103."""

import os

import numpy as np
import pytest

from ctx import config as ctx_config
from ctx.data import datasets
from ctx.data.datasets import load_corpus
from ctx.data.pg19 import parse_metadata
from ctx.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from ctx.errors import InputError
from tests.helpers import ROOT, TEXTS, make_pg19_layout, run_module


def pg19_data_config(root, cache, tokenizer="bytes"):
    cfg = ctx_config.default_config().data
    cfg.dataset, cfg.path, cfg.cache_dir, cfg.tokenizer = "pg19", str(root), str(cache), tokenizer
    return cfg


def test_metadata_titles_with_commas():
    rows = parse_metadata('1,A, B, C,1900,http://x\n2,"Q, R",1901,http://y\n')
    assert rows[1] == {"title": "A, B, C", "date": "1900", "link": "http://x"}
    assert rows[2] == {"title": "Q, R", "date": "1901", "link": "http://y"}
    with pytest.raises(ValueError, match="metadata.csv line 1"):
        parse_metadata("not,a row\n")


def test_pg19_layout_prepares_through_tfds_and_caches_tokens(tmp_path):
    root = make_pg19_layout(tmp_path / "pg19")
    cfg = pg19_data_config(root, tmp_path / "cache")
    train = load_corpus(cfg, "train")
    assert train.ids == ["10", "11", "12", "14"] and train.skipped_empty == 1
    assert train.length(3) == 3  # a book shorter than a segment is kept
    text_12 = train.tokenizer.decode(train.document(2))
    assert text_12.endswith("\ufffd\ufffd bad bytes")  # invalid UTF-8 becomes U+FFFD
    assert load_corpus(cfg, "validation").ids == ["20"] and load_corpus(cfg, "test").ids == ["30"]
    assert any(p.startswith("pg19-") for p in os.listdir(tmp_path / "cache" / "tokens"))
    again = load_corpus(cfg, "train")  # from the cache, memory-mapped
    assert isinstance(again.flat, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.flat), np.asarray(train.flat))
    assert again.skipped_empty == 1


def test_pg19_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(pg19_data_config(tmp_path / "missing", tmp_path / "c"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metadata.csv"):
        load_corpus(pg19_data_config(tmp_path / "empty", tmp_path / "c"), "train")
    root = make_pg19_layout(tmp_path / "nosplit")
    for f in (root / "test").iterdir():
        f.unlink()
    (root / "test").rmdir()
    with pytest.raises(ValueError, match="split 'test' is not in"):
        load_corpus(pg19_data_config(root, tmp_path / "c"), "test")
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        load_corpus(pg19_data_config(root, tmp_path / "c"), "dev")


def test_sentencepiece_cli_trains_a_round_tripping_model(tmp_path):
    root = make_pg19_layout(tmp_path / "pg19")
    prefix = tmp_path / "sp"
    out = run_module(
        "ctx.data.tokenizer",
        f"--input={root}",
        "--vocab_size=600",
        f"--output={prefix}",
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sp.model").exists() and (tmp_path / "sp.vocab").exists()
    tok = SentencePieceTokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 600
    for text in [TEXTS[5], "  two  spaces\n\n\nthree newlines\t tab ", "unseen: 漢字 ✓ ü"]:
        assert tok.decode(tok.encode(text)) == text
    corpus = load_corpus(
        pg19_data_config(root, tmp_path / "cache", str(tmp_path / "sp.model")), "train"
    )
    assert corpus.tokenizer.fingerprint.startswith("spm-")
    # Bad input: too many pieces for the text, missing input.
    out = run_module(
        "ctx.data.tokenizer",
        f"--input={root}",
        "--vocab_size=900000",
        f"--output={tmp_path / 'big'}",
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert (
        out.returncode == 2 and "lower --vocab_size" in out.stderr and "Traceback" not in out.stderr
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.model"))


def test_enwik8_split_keeps_raw_bytes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(data)
    monkeypatch.setattr(
        datasets,
        "ENWIK8_SPLITS",
        {"train": (0, 900), "validation": (900, 950), "test": (950, 1000)},
    )
    cfg = ctx_config.default_config().data
    cfg.dataset, cfg.path, cfg.cache_dir, cfg.piece_bytes = (
        "enwik8",
        str(tmp_path / "enwik8"),
        str(tmp_path / "c"),
        256,
    )
    train = load_corpus(cfg, "train")
    assert len(train) == 4
    np.testing.assert_array_equal(np.asarray(train.flat), np.frombuffer(data[:900], np.uint8))
    np.testing.assert_array_equal(
        np.asarray(load_corpus(cfg, "test").flat), np.frombuffer(data[950:], np.uint8)
    )
    monkeypatch.setattr(datasets, "ENWIK8_SPLITS", {"train": (0, 90_000_000)})
    cfg.cache_dir = str(tmp_path / "c2")
    with pytest.raises(ValueError, match="enwik8 has 100,000,000"):
        load_corpus(cfg, "train")


def test_wikitext103_articles_are_documents(tmp_path):
    article = " = Title {} = \n \n Some text about {} . \n \n = = Section = = \n More @-@ text . \n"
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (tmp_path / name).write_text(" \n" + "".join(article.format(i, i) for i in range(3)))
    cfg = ctx_config.default_config().data
    cfg.dataset, cfg.path, cfg.cache_dir = "wt103", str(tmp_path), str(tmp_path / "c")
    corpus = load_corpus(cfg, "validation")
    assert len(corpus) == 3
    assert corpus.ids[1:] == ["Title 1", "Title 2"]
    assert "= = Section = =" in corpus.tokenizer.decode(corpus.document(1))
    assert sum(corpus.num_words) == sum(
        len(t.split()) for t in [(tmp_path / "wiki.valid.tokens").read_text()]
    )


def test_unknown_dataset_and_missing_path(tmp_path):
    cfg = ctx_config.default_config().data
    cfg.dataset = "c4"
    with pytest.raises(ValueError, match="data.dataset='c4' is unknown"):
        load_corpus(cfg, "train")
    cfg.dataset, cfg.path = "wt103", str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(cfg, "train")


@pytest.mark.slow
def test_training_on_a_pg19_layout_with_sentencepiece(tmp_path):
    from ctx import train
    from ctx.data.tokenizer import train_sentencepiece
    from tests.helpers import read_metrics, tiny_train_config

    root = make_pg19_layout(tmp_path / "pg19")
    model_path = train_sentencepiece(str(root), 400, str(tmp_path / "sp"))
    cfg = tiny_train_config(num_steps=4)
    cfg.data.update(
        dict(
            dataset="pg19", path=str(root), cache_dir=str(tmp_path / "cache"), tokenizer=model_path
        )
    )
    with pytest.raises(ValueError, match=r"has 400 tokens but model.vocab_size=256"):
        train.train_and_evaluate(cfg, str(tmp_path / "mismatch"))
    assert not (tmp_path / "mismatch").exists()
    cfg.model.vocab_size = 400
    result = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == open(model_path, "rb").read()
    assert len([r for r in read_metrics(tmp_path / "run") if "split" not in r]) == 4
    assert result["validation"]["documents"] == 1 and result["validation"]["words"] > 1000


def test_inputs_that_leave_nothing_to_work_on_name_what_is_empty_and_the_fix(tmp_path):
    root = make_pg19_layout(tmp_path / "pg19")
    for book in (root / "validation").iterdir():
        book.unlink()
    with pytest.raises(
        InputError, match=r"pg19: validation/ holds no books; put the validation split's books"
    ):
        load_corpus(pg19_data_config(root, tmp_path / "c"), "validation")
    assert (
        len(load_corpus(pg19_data_config(root, tmp_path / "c"), "train")) == 4
    )  # the other splits still prepare
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(
        InputError, match=r"empty.model is not a SentencePiece model \(the file is empty\); give"
    ):
        load_tokenizer(str(tmp_path / "empty.model"))
    (tmp_path / "text.model").write_text("not a model")
    with pytest.raises(
        InputError, match=r"text.model is not a SentencePiece model \(.*\); give the .model file"
    ):
        load_tokenizer(str(tmp_path / "text.model"))
    demo = ctx_config.default_config().data
    demo.validation_fraction = 0.0
    with pytest.raises(
        InputError, match=r"the demo's validation split has no topics: data.validation_fraction=0.0"
    ):
        load_corpus(demo, "validation")
    (tmp_path / "wt").mkdir()
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (tmp_path / "wt" / name).write_text("")
    wt103 = ctx_config.default_config().data
    wt103.dataset, wt103.path, wt103.cache_dir = "wt103", str(tmp_path / "wt"), str(tmp_path / "c")
    with pytest.raises(
        InputError, match=r"the test split of data.dataset=wt103 .* wiki.test.tokens is empty"
    ):
        load_corpus(wt103, "test")
