"""gs:// against a real GCS server (fake-gcs-server on loopback, tests/gcs.py), every command as a
user runs it: train, resume, evaluate (its report and plot written to gs://) and sample on a
gs:// workdir; PG-19, enwik8 and WikiText-103 data and a SentencePiece model read from gs://
equal to the same files read locally. The clients follow STORAGE_EMULATOR_HOST, and so does ctx's
reachability check."""

import json
import os

import numpy as np
import pytest

from ctx.data.tokenizer import train_sentencepiece
from tests.gcs import FaultProxy, GcsServer
from tests.helpers import ROOT, TINY_CLI_FLAGS, make_pg19_layout, run_module, run_script

# Whole programs against a server process: the slow tier.
pytestmark = pytest.mark.slow

RUN = ["--config=experiments/demo.py", *TINY_CLI_FLAGS, "--config.train.checkpoint_every=4"]


@pytest.fixture
def gcs():
    server = GcsServer()
    yield server
    server.stop()


def command(gcs, module, *args):
    out = run_module(module, *RUN, *args, env=gcs.env() | {"PYTHONPATH": ROOT}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_train_resume_evaluate_and_sample_on_a_gs_workdir(gcs):
    workdir = gcs.path("run1")
    command(gcs, "ctx.train", "--config.train.num_steps=8", f"--workdir={workdir}")
    assert {"run1/checkpoints/4", "run1/checkpoints/8"} <= {
        "/".join(name.split("/")[:3]) for name in gcs.names("run1/checkpoints/")
    }
    resumed = command(gcs, "ctx.train", "--config.train.num_steps=12", f"--workdir={workdir}")
    assert f"Resumed from checkpoint 8 in {workdir}/checkpoints" in resumed.stdout
    metrics = run_script("read_metrics.py", workdir, env=gcs.env() | {"PYTHONPATH": ROOT})
    assert metrics.returncode == 0, metrics.stderr[-2000:]
    rows = [r for r in json.loads(metrics.stdout) if "split" not in r]
    assert [r["step"] for r in rows] == list(range(1, 13))  # every step once

    output = gcs.path("run1/eval/validation.json")
    evaluated = command(
        gcs, "ctx.evaluate", f"--workdir={workdir}", "--split=validation", f"--output={output}"
    )
    assert f"wrote {output} and {gcs.path('run1/eval/validation.png')}" in evaluated.stdout
    report = json.loads(gcs.read("run1/eval/validation.json"))
    assert report["step"] == 12 and np.isfinite(report["bits_per_byte"])
    assert gcs.read("run1/eval/validation.png").startswith(b"\x89PNG")

    sampled = command(gcs, "ctx.sample", f"--workdir={workdir}", "--prompt=The", "--num_tokens=20")
    assert sampled.stdout.startswith("The") and len(sampled.stdout.encode()) > 3


def test_a_step_never_committed_is_named_and_set_aside_and_the_run_resumes_before_it(gcs):
    """Checkpoint 8 without its commit marker (a save whose last write never finished, or whose
    reply was lost): the rerun names it, moves it aside unread, says it resumes from 4, and
    saves 8 again whole."""
    workdir = gcs.path("run")
    command(gcs, "ctx.train", "--config.train.num_steps=8", f"--workdir={workdir}")
    gcs.delete("run/checkpoints/8/commit_success.txt")
    rerun = command(gcs, "ctx.train", "--config.train.num_steps=12", f"--workdir={workdir}")
    assert (
        f"warning: checkpoint folder {workdir}/checkpoints/8 was never committed (a save that did "
        f"not finish); moved it to {workdir}/checkpoints/uncommitted-8, unread" in rerun.stdout
    )
    assert f"Resumed from checkpoint 4 in {workdir}/checkpoints" in rerun.stdout
    names = set(gcs.names("run/checkpoints/"))
    assert any(name.startswith("run/checkpoints/uncommitted-8/") for name in names)
    assert {
        "run/checkpoints/8/commit_success.txt",
        "run/checkpoints/12/commit_success.txt",
    } <= names


def test_pg19_enwik8_wikitext103_and_a_sentencepiece_model_read_from_gs(gcs, tmp_path):
    pg19 = make_pg19_layout(tmp_path / "pg19")
    model = train_sentencepiece(str(pg19), 400, str(tmp_path / "sp"))
    (tmp_path / "enwik8").write_bytes(
        np.random.default_rng(0).integers(0, 256, 1000, np.uint8).tobytes()
    )
    wt103 = tmp_path / "wt103"
    wt103.mkdir()
    article = " = Title {} = \n \n Some text about {} . \n \n = = Section = = \n More @-@ text . \n"
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (wt103 / name).write_text(" \n" + "".join(article.format(i, i) for i in range(3)))
    for local, name in (
        (pg19, "pg19"),
        (tmp_path / "sp.model", "sp.model"),
        (tmp_path / "enwik8", "enwik8"),
        (wt103, "wt103"),
    ):
        gcs.upload(local, name)

    def corpus(dataset, name, local, split, tokenizer="bytes", local_tokenizer="bytes"):
        return dict(
            dataset=dataset,
            path=gcs.path(name),
            local_path=str(local),
            split=split,
            tokenizer=tokenizer,
            local_tokenizer=local_tokenizer,
            cache_dir=str(tmp_path / f"cache-{dataset}"),
        )

    spec = {
        "pg19": corpus("pg19", "pg19", pg19, "train", gcs.path("sp.model"), model),
        "enwik8": corpus("enwik8", "enwik8", tmp_path / "enwik8", "validation"),
        "wt103": corpus("wt103", "wt103", wt103, "validation"),
    }
    out = run_script(
        "load_corpora.py", json.dumps(spec), env=gcs.env() | {"PYTHONPATH": ROOT}, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert {name: (c["documents"], c["same"]) for name, c in loaded.items()} == {
        "pg19": (4, True),
        "enwik8": (1, True),
        "wt103": (3, True),
    }


def test_dropped_requests_of_every_kind_leave_the_run_an_undisturbed_run_makes(gcs):
    """Every 4th request of a run (checkpoint writes and reads, metric parts, listings) dropped
    before the server sees it: the clients retry, and the run ends with the losses of the same
    run without faults, every metric row once, its checkpoints committed."""
    proxy = FaultProxy(gcs.url)
    try:
        command(gcs, "ctx.train", "--config.train.num_steps=8", f"--workdir={gcs.path('clean')}")
        proxy.fail(r"faulted/", "drop_before", every=4)
        out = run_module(
            *["ctx.train", *RUN, "--config.train.num_steps=8"],
            f"--workdir={gcs.path('faulted')}",
            env=gcs.env(proxy.url) | {"PYTHONPATH": ROOT},
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert proxy.faulted > 10
    finally:
        proxy.stop()
    rows = {}
    for run in ("clean", "faulted"):
        metrics = run_script("read_metrics.py", gcs.path(run), env=gcs.env() | {"PYTHONPATH": ROOT})
        rows[run] = [(r["step"], r.get("split"), r["loss"]) for r in json.loads(metrics.stdout)]
    assert rows["faulted"] == rows["clean"] and [
        step for step, split, _ in rows["clean"] if not split
    ] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {
        "faulted/checkpoints/4/commit_success.txt",
        "faulted/checkpoints/8/commit_success.txt",
    } <= set(gcs.names("faulted/checkpoints/"))


def test_a_metrics_outage_loses_no_row_and_writes_none_twice(tmp_path):
    """Metric uploads answered 503 for longer than the client retries: the rows wait and go out
    with the next upload once the store answers; a store still down at the end leaves the last
    rows in a local spool and says where. read_metrics gives each step once."""
    out = run_script(
        "metrics_outage.py", env={**os.environ, "CTX_CACHE_DIR": str(tmp_path)}, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == [1, 2, 3, 4, 5, 6, 7] and result["spooled"] == [8]
    assert result["faulted"] > 1  # the client did retry
    warnings = [line for line in out.stderr.splitlines() if "metrics" in line]
    assert any("did not take 2 rows" in line and "training goes on" in line for line in warnings)
    assert any(
        line.startswith("warning: metrics: 1 rows could not be uploaded") and str(tmp_path) in line
        for line in warnings
    )
