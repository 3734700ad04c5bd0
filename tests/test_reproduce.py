"""The small reproduction suite: the recall task's layout by hand, and the suite end to end at
smoke scale (tiny models; the real figures come from `--scale=full`, see the README)."""

import json

import numpy as np
import pytest

from ctx.data.stream import empty_chunk
from experiments import recall, reproduce

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow


def test_episode_layout():
    chunk = empty_chunk(4, 2, 4, reset=False)
    recall.write_episode(chunk, 1, 1, 3, payload=5, rng=np.random.default_rng(0))
    tokens = chunk["tokens"][1:4, 1].reshape(-1)
    assert tokens[0] == 5  # the payload opens the episode
    assert ((tokens[1:8] > recall.PAYLOADS) & (tokens[1:8] < recall.VOCAB)).all()  # fillers only
    assert (tokens[8:] == recall.QUERY).all()  # the last segment asks
    assert (chunk["targets"][3, 1] == 5).all() and (chunk["weights"][3, 1] == 1).all()
    assert chunk["weights"].sum() == 4  # nothing else is scored
    assert chunk["reset"][:, 1].tolist() == [False, True, False, False]
    assert (chunk["tokens"][:, 0] == 0).all() and not chunk["reset"][
        :, 0
    ].any()  # other row untouched
    # The query at position i of the last segment is (m - 1) * n_s + i tokens after the payload.
    assert np.flatnonzero(tokens == recall.QUERY)[0] == (3 - 1) * 4


def test_stream_rows_are_back_to_back_episodes_across_chunks():
    stream = recall.RecallStream(batch_size=3, segment_length=4, lengths=[2, 3], seed=0)
    chunks = [stream.next_chunk(5) for _ in range(4)]
    joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    for row in range(3):
        starts = np.flatnonzero(joined["reset"][:, row])
        assert starts[0] == 0
        for start, end in zip(starts, list(starts[1:])):
            m = end - start
            assert m in (2, 3)
            payload = joined["tokens"][start, row, 0]
            assert 1 <= payload <= recall.PAYLOADS
            assert (joined["targets"][end - 1, row] == payload).all()
            assert (joined["weights"][end - 1, row] == 1).all() and joined["weights"][
                start : end - 1, row
            ].sum() == 0


def test_reach_in_segments_by_hand():
    """n_s = 16: CT sees n_m + c*n_cm = 16 + 4*32 = 144 tokens back (9 segments), so an episode
    of 10 segments still has its payload in reach; TXL sees 48 (3 segments): 4."""
    assert recall.reach_in_segments(recall.recall_config("ct").model) == 10
    assert recall.reach_in_segments(recall.recall_config("txl").model) == 4
    ct, txl = recall.recall_config("ct").model, recall.recall_config("txl").model
    assert ct.memory_length + ct.compressed_length == txl.memory_length  # equal attention length


def test_eval_episodes_end_together():
    chunk = recall.eval_episodes(3, 5, batch_size=16, segment_length=4, seed=0)
    assert chunk["reset"][0].all() and chunk["reset"][2].all()  # padding, then the episode
    assert sorted(set(chunk["tokens"][2, :, 0])) == list(range(1, 1 + recall.PAYLOADS))
    assert chunk["weights"].sum() == 16 * 4 and chunk["weights"][4].all()


def run_suite(output_dir, *flags):
    """The suite in this process (its compilations land in the tests' shared cache)."""
    return reproduce.main(["--suite=small", "--scale=smoke", f"--output_dir={output_dir}", *flags])


def test_small_suite_writes_table_json_and_plots_and_resumes(tmp_path):
    assert run_suite(tmp_path, "--seeds=1", "--ablation=conv:attention") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"recall", "ablation", "prose", "range", "hardware", "wall_seconds"}
    assert [r["segments"] for r in results["recall"]["ct"]["rows"]] == list(
        reproduce.RECALL_EVAL_LENGTHS
    )
    assert all(0 <= r["accuracy"]["mean"] <= 1 for r in results["recall"]["txl"]["rows"])
    assert (
        results["ablation"][0]["bits_per_byte"]["n"] == 1
        and results["ablation"][0]["bits_per_byte"]["mean"] > 0
    )
    assert (
        results["prose"]["ct"]["compressed_length"] > 0
        and results["prose"]["txl"]["compressed_length"] == 0
    )
    for row in results["range"]:
        assert row["measured"] == row["derived"], row
    table = (tmp_path / "results.md").read_text()
    for heading in (
        "Long-range recall",
        "Compression function",
        "CT against TXL on prose",
        "Temporal range",
    ):
        assert heading in table
    for plot in ("recall.png", "ablation.png", "loss_by_position.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    # A rerun finds the finished runs and does not train them again.
    metrics = tmp_path / "runs" / "ablation-conv-attention-seed0" / "metrics.jsonl"
    trained = [line for line in metrics.read_text().splitlines() if '"split"' not in line]
    assert run_suite(tmp_path, "--seeds=1", "--ablation=conv:attention", "--parts=ablation") == 0
    assert [line for line in metrics.read_text().splitlines() if '"split"' not in line] == trained
    rerun = json.loads((tmp_path / "results.json").read_text())["ablation"]
    assert rerun[0]["bits_per_byte"] == results["ablation"][0]["bits_per_byte"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--parts=recall,speed"], "unknown ['speed']"),
        (["--ablation=conv:none"], "--ablation=conv:none: choose entries from"),
        (["--seeds=0"], "--seeds=0 must be at least 1"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        run_suite(tmp_path / "out", *flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
