"""Streams: contiguous documents per row, padding, resets, resumable, process-independent."""

import numpy as np

from ctx.data.demo_corpus import demo_documents
from ctx.data.source import TokenizedCorpus
from ctx.data.stream import TrainStream, balanced_rows, eval_chunks
from ctx.data.tokenizer import ByteTokenizer
from tests.helpers import byte_corpus


def small_corpus():
    texts = [
        "first document.",
        "",
        "a second, longer document with more bytes in it",
        "x",
        "the fourth one",
        "ünïcode ✓ text",
    ]
    return byte_corpus(texts)


def test_corpus_skips_and_counts_empty_documents():
    corpus = small_corpus()
    assert len(corpus) == 5 and corpus.skipped_empty == 1
    assert corpus.num_bytes[-1] == len("ünïcode ✓ text".encode())


def test_segments_shift_targets_behind_bos_and_pad_the_last():
    corpus = small_corpus()
    tokens = corpus.document(1)
    rest = len(tokens) - 32  # 15 bytes in the padded second segment
    inputs, targets, weights = corpus.segment(1, 0, 32)
    assert inputs[0] == ByteTokenizer.bos_id
    np.testing.assert_array_equal(inputs[1:], tokens[:31])
    np.testing.assert_array_equal(targets, tokens[:32])
    inputs, targets, weights = corpus.segment(1, 1, 32)
    np.testing.assert_array_equal(inputs[:rest], tokens[31 : 31 + rest])
    np.testing.assert_array_equal(targets[:rest], tokens[32:])
    np.testing.assert_array_equal(weights, [1] * rest + [0] * (32 - rest))
    assert (inputs[rest:] == 0).all() and (targets[rest:] == 0).all()
    inputs, targets, weights = corpus.segment(2, 0, 4)  # a 1-byte document
    np.testing.assert_array_equal(inputs, [0, 0, 0, 0])
    np.testing.assert_array_equal(weights, [1, 0, 0, 0])


def test_each_row_walks_whole_documents_contiguously():
    corpus = small_corpus()
    stream = TrainStream(corpus, batch_size=3, segment_length=4, seed=0)
    chunk = stream.next_chunk(40)
    for b in range(3):
        # Rebuild row b's documents from its segments: resets start documents.
        docs, current = [], []
        for k in range(40):
            if chunk["reset"][k, b] and current:
                docs.append(np.concatenate(current))
                current = []
            current.append(chunk["targets"][k, b][chunk["weights"][k, b] > 0])
        known = {tuple(corpus.document(i)) for i in range(len(corpus))}
        assert docs and all(tuple(d) in known for d in docs)
    assert chunk["reset"][0].all()  # every row starts with a document


def test_stream_resumes_exactly_and_is_independent_of_process_split():
    corpus = TokenizedCorpus.from_documents(demo_documents("train")[:12], ByteTokenizer())
    straight = TrainStream(corpus, batch_size=4, segment_length=16, seed=3)
    a = [straight.next_chunk(7) for _ in range(4)]
    first = TrainStream(corpus, batch_size=4, segment_length=16, seed=3)
    first.next_chunk(7), first.next_chunk(7)
    resumed = TrainStream(corpus, batch_size=4, segment_length=16, seed=3)
    resumed.restore(first.state())
    for expected in a[2:]:
        got = resumed.next_chunk(7)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    # Two "processes" holding rows 0-1 and 2-3 produce the same global batch.
    low = TrainStream(corpus, batch_size=4, segment_length=16, seed=3, rows=[0, 1])
    high = TrainStream(corpus, batch_size=4, segment_length=16, seed=3, rows=[2, 3])
    for expected in a:
        lo, hi = low.next_chunk(7), high.next_chunk(7)
        np.testing.assert_array_equal(
            np.concatenate([lo["tokens"], hi["tokens"]], axis=1), expected["tokens"]
        )
        # Each process's saved position covers every row, not only its own.
        assert low.state() == high.state()
    assert low.state() == straight.state()


def test_eval_chunks_score_every_token_of_every_document_once():
    corpus = small_corpus()
    counts = np.zeros(len(corpus), int)
    positions = [set() for _ in range(len(corpus))]
    for chunk in eval_chunks(corpus, batch_size=2, segment_length=4, chunk_size=3):
        scored = chunk["document"] >= 0
        np.add.at(counts, chunk["document"][scored], 1)
        for d, p in zip(chunk["document"][scored], chunk["position"][scored]):
            positions[d].add(int(p))
        assert (chunk["weights"][~scored] == 0).all()
    assert counts.tolist() == [corpus.length(i) for i in range(len(corpus))]
    assert all(positions[i] == set(range(corpus.length(i))) for i in range(len(corpus)))


def test_balanced_rows_put_long_documents_on_different_rows():
    # Round-robin would give row 0 both long documents: 16 segments against 2.
    assert balanced_rows([8, 1, 8, 1], batch_size=2) == [[0, 1], [2, 3]]
    assert balanced_rows([3, 5], batch_size=4) == [[1], [0], [], []]
    rng = np.random.default_rng(0)
    for _ in range(50):
        segments = rng.integers(1, 200, size=int(rng.integers(1, 60))).tolist()
        batch = int(rng.integers(1, 12))
        rows = balanced_rows(segments, batch)
        assert sorted(d for row in rows for d in row) == list(range(len(segments)))
        busiest = max(sum(segments[d] for d in row) for row in rows)
        assert busiest <= sum(segments) / batch + max(segments)  # the longest-first bound


def test_eval_chunks_take_as_many_segments_as_the_busiest_balanced_row():
    texts = ["x" * 31, "y", "z" * 31, "w"]  # 8, 1, 8 and 1 segments of 4 tokens (with the BOS)
    corpus = byte_corpus(texts)
    assert [corpus.num_segments(i, 4) for i in range(4)] == [8, 1, 8, 1]
    chunks = list(eval_chunks(corpus, batch_size=2, segment_length=4, chunk_size=1))
    assert len(chunks) == 9
    assert [c["document"][0, :, 0].tolist() for c in chunks[7:9]] == [[0, 2], [1, 3]]
    assert chunks[8]["reset"][0].tolist() == [True, True]


def test_eval_chunks_halve_the_batch_as_rows_run_out():
    texts = ["x" * 31, "y", "z" * 11, "w"]  # 8, 1, 3 and 1 segments of 4 tokens (with the BOS)
    corpus = byte_corpus(texts)
    chunks = list(
        eval_chunks(corpus, batch_size=8, segment_length=4, chunk_size=2, batch_multiple=1)
    )
    # 4 documents: 8 -> 4 rows at once; after the first chunk only the rows of documents 0 (8
    # segments) and 2 (3) have work: 2 rows; after the second only document 0's: 1 row.
    assert [c["row"].tolist() for c in chunks] == [[0, 1, 2, 3], [0, 1], [0], [0]]
    assert [c["tokens"].shape[1] for c in chunks] == [4, 2, 1, 1]
    assert [c["document"][:, 0, 0].tolist() for c in chunks] == [
        [0, 0]
    ] * 4  # row 0 never interrupted
    scored = np.zeros(len(corpus), int)
    for c in chunks:
        np.add.at(scored, c["document"][c["document"] >= 0], 1)
    assert scored.tolist() == [corpus.length(i) for i in range(len(corpus))]
    # The batch stays a multiple of the shards: with 2 it never goes below 2 rows.
    sizes = [c["tokens"].shape[1] for c in eval_chunks(corpus, 8, 4, 2, batch_multiple=2)]
    assert sizes == [4, 2, 2, 2]
    assert {c["tokens"].shape[1] for c in eval_chunks(corpus, 8, 4, 2)} == {8}  # 0: never shrinks


def test_demo_corpus_is_real_prose_with_a_held_out_split():
    train, valid = demo_documents("train"), demo_documents("validation")
    assert len(train) > 60 and 5 <= len(valid) <= 10
    assert not {d.id for d in train} & {d.id for d in valid}
    assert sum(len(d.text) for d in train) > 300_000
