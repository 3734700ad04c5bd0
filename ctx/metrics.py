"""Metric rows to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow).

Only process 0 writes; other processes get a writer that does nothing. In a local workdir rows
are appended to `metrics.jsonl` and flushed at every `flush`. An object store (a gs:// workdir)
cannot append, and rewriting a file that grows with the run costs uploads in proportion to its
whole history at every flush. There the rows wait in memory and go out at most every
`remote_flush_seconds` (and whenever the loop forces it: at a save, a validation and the end) as
new objects holding only the new rows: `metrics/part-<first step>-<time>.jsonl`, and a TensorBoard
event file of their own under `tensorboard/` (TensorBoard reads every event file in a folder).
`read_metrics(workdir)` gives the whole history either way, each (step, split) once: a run that
resumed from a checkpoint older than rows it had written (a crash, a checkpoint set aside) marks
where it started (`RESUMED_AT`), and what it writes after supersedes the rows past that step.

A store that does not take an upload (an outage longer than its client's own retries) costs no
row: they stay in memory and go out with the next upload; at the end the writer waits a bounded
while for the store, then leaves the rows in a local spool folder and says where.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import fsspec

from ctx.remote import is_remote

# An upload per this many seconds at most, as tensorboardX's own writer flushes by default.
REMOTE_FLUSH_SECONDS = 120.0
# How long the end of a run waits for a store that does not take the last rows, and how often
# it asks again meanwhile.
CLOSE_WAIT_SECONDS, CLOSE_RETRY_SECONDS = 180.0, 15.0
# The key of the row that marks where a run started writing (its restored step).
RESUMED_AT = "resumed_at"


class MetricWriter:
    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        remote_flush_seconds: float = REMOTE_FLUSH_SECONDS,
        clock=time.monotonic,
        close_wait_seconds: float = CLOSE_WAIT_SECONDS,
        close_retry_seconds: float = CLOSE_RETRY_SECONDS,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._workdir, self._remote, self._clock = workdir.rstrip("/"), is_remote(workdir), clock
        self._remote_flush_seconds, self._last_upload = remote_flush_seconds, clock()
        self._pending: list[dict[str, Any]] = []
        self._start_at: int | None = None
        self._close_wait, self._close_retry = close_wait_seconds, close_retry_seconds
        self._failing = False
        if not self._remote:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def start_at(self, step: int) -> None:
        """The run writes from `step` on (its restored step, or 0). Where an earlier run left
        rows, the first row is preceded by a marker that supersedes those past `step` (a fresh
        workdir gets none, so its metrics.jsonl holds metric rows only)."""
        if self.enabled and _has_rows(self._workdir):
            self._start_at = step

    def write(self, row: dict[str, Any]) -> None:
        """One row: `step` plus scalars; a `split` key prefixes the TensorBoard tags."""
        if not self.enabled:
            return
        if self._start_at is not None:
            marker, self._start_at = {"step": self._start_at, RESUMED_AT: self._start_at}, None
            self._append(marker)
        self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        if self._remote:
            self._pending.append(row)
            return
        self._jsonl.write(json.dumps(row) + "\n")
        _add_scalars(self._tb, row)

    def flush(self, force: bool = False) -> None:
        """Make the rows written so far durable: at once in a local workdir; in a remote one when
        `force`d or when the last upload is `remote_flush_seconds` old."""
        if not self.enabled:
            return
        if not self._remote:
            self._jsonl.flush()
            self._tb.flush()
            return
        if self._pending and (
            force or self._clock() - self._last_upload >= self._remote_flush_seconds
        ):
            self._last_upload = self._clock()
            try:
                self._upload(self._pending)
            except Exception as error:  # noqa: BLE001 - the store's client raises many kinds
                if not self._failing:  # once per outage; the rows wait for the next upload
                    print(
                        f"warning: metrics: {self._workdir}/metrics did not take "
                        f"{len(self._pending)} rows ({type(error).__name__}: {_first_line(error)}); "
                        "training goes on and they go out with the next upload",
                        file=sys.stderr,
                        flush=True,
                    )
                self._failing = True
                return
            if self._failing:
                print(
                    f"metrics: {self._workdir}/metrics takes rows again",
                    file=sys.stderr,
                    flush=True,
                )
            self._pending, self._failing = [], False

    def _upload(self, rows: list[dict[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        name = _part_name(rows)
        with fsspec.open(f"{self._workdir}/metrics/{name}.jsonl", "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        with tempfile.TemporaryDirectory() as local:
            events = SummaryWriter(local, filename_suffix=f".{name}")
            for row in rows:
                _add_scalars(events, row)
            events.close()
            for file_name in os.listdir(local):
                with (
                    open(os.path.join(local, file_name), "rb") as source,
                    fsspec.open(f"{self._workdir}/tensorboard/{file_name}", "wb") as target,
                ):
                    target.write(source.read())

    def close(self) -> str | None:
        """The last rows made durable. A store that does not take them is asked again for
        `close_wait_seconds`; then they are written to a local spool folder, whose path is
        returned (and said), for copying to the workdir's metrics/ when the store answers."""
        if not self.enabled:
            return None
        deadline = self._clock() + self._close_wait
        self.flush(force=True)
        if not self._remote:
            self._jsonl.close()
            self._tb.close()
            return None
        while self._pending and self._clock() < deadline:
            time.sleep(self._close_retry)
            self.flush(force=True)
        if not self._pending:
            return None
        spool = _spool_folder(self._workdir)
        os.makedirs(spool, exist_ok=True)
        path = os.path.join(spool, f"{_part_name(self._pending)}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in self._pending))
        print(
            f"warning: metrics: {len(self._pending)} rows could not be uploaded to "
            f"{self._workdir}/metrics; they are in {path}: copy it there when the store answers",
            file=sys.stderr,
            flush=True,
        )
        return path


def _has_rows(workdir: str) -> bool:
    fs, root = fsspec.core.url_to_fs(workdir)
    return fs.exists(f"{root}/metrics.jsonl") or fs.exists(f"{root}/metrics")


def _part_name(rows: list[dict[str, Any]]) -> str:
    """Named by the first step and the time of writing: read back in the order written."""
    return f"part-{rows[0]['step']:010d}-{time.time_ns()}"


def _spool_folder(workdir: str) -> str:
    cache = os.environ.get("CTX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ctx"
    )
    return os.path.join(cache, "metrics-spool", workdir.replace("://", "/").replace("/", "_"))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _add_scalars(events, row: dict[str, Any]) -> None:
    if RESUMED_AT in row:
        return
    prefix = row.get("split", "train")
    for key, value in row.items():
        if (
            key not in ("step", "split")
            and isinstance(value, (int, float))
            and math.isfinite(value)
        ):
            events.add_scalar(f"{prefix}/{key}", value, row["step"])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Every metric row of a run in step order, each (step, split) once: `metrics.jsonl`, then
    (a remote workdir) the parts under `metrics/` in the order they were written; a row written
    later replaces one of the same step and split, and a run's `RESUMED_AT` marker drops the
    rows written before it past its step (it took up from an older checkpoint)."""
    workdir = workdir.rstrip("/") if isinstance(workdir, str) else os.fspath(workdir)
    fs, root = fsspec.core.url_to_fs(workdir)
    files = [f"{root}/metrics.jsonl"] if fs.exists(f"{root}/metrics.jsonl") else []
    if fs.isdir(f"{root}/metrics"):
        parts = [p for p in fs.ls(f"{root}/metrics", detail=False) if p.endswith(".jsonl")]
        files += sorted(parts, key=lambda p: int(p.rsplit("-", 1)[1].removesuffix(".jsonl")))
    latest: dict[tuple[int, str | None], dict[str, Any]] = {}
    for path in files:
        with fs.open(path, "r", encoding="utf-8") as f:
            for row in (json.loads(line) for line in f if line.strip()):
                if RESUMED_AT in row:
                    for key in [key for key in latest if key[0] > row[RESUMED_AT]]:
                        del latest[key]
                    continue
                key = (row["step"], row.get("split"))
                latest.pop(key, None)
                latest[key] = row
    return sorted(latest.values(), key=lambda row: row["step"])
