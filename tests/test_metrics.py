"""Metric writing: local workdirs append; remote (object-store) workdirs upload only new rows, at
most once per interval, so a long run's uploads grow with its rows, not with rows x flushes."""

import json
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ctx.metrics import MetricWriter, read_metrics


class CountingMemoryFileSystem(MemoryFileSystem):
    """fsspec's in-memory file system, standing in for gs://, recording every object written."""

    protocol = "countingmem"
    written: list[tuple[str, int]] = []

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            close = f.close

            def counted_close():  # text wrappers and garbage collection close it again
                if not getattr(f, "counted", False):
                    f.counted = True
                    CountingMemoryFileSystem.written.append((path, len(f.getvalue())))
                close()

            f.close = counted_close
        return f


fsspec.register_implementation("countingmem", CountingMemoryFileSystem, clobber=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _row(step: int) -> dict:
    return {
        "step": step,
        "loss": 1.0 / step,
        "compression_loss": 0.5,
        "tokens_per_sec": 1234.5,
        "attention_mass_memory": 0.25,
        "grad_norm": 0.75,
    }


@pytest.fixture
def remote_workdir():
    workdir = f"countingmem://bucket/{uuid.uuid4().hex}/run"
    CountingMemoryFileSystem.written.clear()
    yield workdir
    CountingMemoryFileSystem.written.clear()


def test_a_remote_workdir_uploads_each_row_once_and_at_most_once_per_interval(remote_workdir):
    clock = Clock()
    writer = MetricWriter(remote_workdir, remote_flush_seconds=120, clock=clock)
    steps = 3000
    for step in range(1, steps + 1):  # one row and one flush per chunk of 2.3 s, as the loop does
        writer.write(_row(step))
        clock.now += 2.3
        writer.flush(force=step % 1000 == 0)  # a checkpoint every 1000 steps forces one
    writer.close()

    jsonl = [(p, n) for p, n in CountingMemoryFileSystem.written if p.endswith(".jsonl")]
    events = [(p, n) for p, n in CountingMemoryFileSystem.written if "/tensorboard/" in p]
    rows_bytes = sum(len(json.dumps(_row(s))) + 1 for s in range(1, steps + 1))
    assert sum(n for _, n in jsonl) == rows_bytes  # every row uploaded exactly once
    assert len({p for p, _ in CountingMemoryFileSystem.written}) == len(
        CountingMemoryFileSystem.written
    )  # no rewrite
    uploads = len(jsonl)
    assert steps * 2.3 / (120 + 2.3) <= uploads <= steps * 2.3 / 120 + 4, (
        uploads
    )  # the interval, plus forced ones
    assert len(events) == uploads and all(n > 0 for _, n in events)
    # Rewriting one growing file at each flush would have uploaded ~steps/2 times as much.
    assert sum(n for _, n in CountingMemoryFileSystem.written) < 3 * rows_bytes
    assert read_metrics(remote_workdir) == [_row(s) for s in range(1, steps + 1)]


def test_a_forced_flush_uploads_at_once_and_an_empty_one_writes_nothing(remote_workdir):
    clock = Clock()
    writer = MetricWriter(remote_workdir, remote_flush_seconds=120, clock=clock)
    writer.write(_row(1))
    writer.flush()
    assert read_metrics(remote_workdir) == []  # waits for the interval
    writer.flush(force=True)  # a save or a validation
    assert read_metrics(remote_workdir) == [_row(1)]
    count = len(CountingMemoryFileSystem.written)
    writer.flush(force=True)
    writer.close()
    assert len(CountingMemoryFileSystem.written) == count
    # A resumed run adds parts of its own; the reader gives both runs' rows in step order.
    resumed = MetricWriter(remote_workdir, clock=clock)
    resumed.write(_row(2))
    resumed.close()
    assert read_metrics(remote_workdir) == [_row(1), _row(2)]


def test_a_local_workdir_appends_to_metrics_jsonl_at_every_flush(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(_row(1))
    writer.write({"step": 1, "split": "validation", "loss": 2.0})
    writer.flush()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        _row(1),
        {"step": 1, "split": "validation", "loss": 2.0},
    ]
    writer.close()
    again = MetricWriter(str(tmp_path))  # a resumed run appends
    again.write(_row(2))
    again.close()
    assert read_metrics(str(tmp_path))[-1] == _row(2) and len(read_metrics(str(tmp_path))) == 3
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()
    )


def test_other_processes_write_nothing(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=False)
    writer.write(_row(1))
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_run_resumed_from_an_older_checkpoint_supersedes_the_rows_written_past_it(tmp_path):
    """A crash after rows 5-6 were written but before their checkpoint: the rerun starts at 4,
    and read_metrics gives each step once, the rerun's rows for 5-6 (and none past them that
    the rerun did not write again)."""
    first = MetricWriter(str(tmp_path))
    first.start_at(0)
    for step in range(1, 7):
        first.write({"step": step, "loss": 1.0})
    first.write({"step": 6, "split": "validation", "loss": 1.0})
    first.close()
    rerun = MetricWriter(str(tmp_path))
    rerun.start_at(4)
    rerun.write({"step": 5, "loss": 2.0})
    rerun.close()
    rows = read_metrics(str(tmp_path))
    assert [(r["step"], r.get("split"), r["loss"]) for r in rows] == [
        (1, None, 1.0),
        (2, None, 1.0),
        (3, None, 1.0),
        (4, None, 1.0),
        (5, None, 2.0),
    ]
    assert all("resumed_at" not in r for r in rows)  # the markers are not rows
