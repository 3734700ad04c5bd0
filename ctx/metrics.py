"""Metric rows to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow).

Only process 0 writes; other processes get a writer that does nothing. In a local workdir rows
are appended to `metrics.jsonl` and flushed at every `flush`. An object store (a gs:// workdir)
cannot append, and rewriting a file that grows with the run costs uploads in proportion to its
whole history at every flush. There the rows wait in memory and go out at most every
`remote_flush_seconds` (and whenever the loop forces it: at a save, a validation and the end) as
new objects holding only the new rows: `metrics/part-<first step>-<time>.jsonl`, and a TensorBoard
event file of their own under `tensorboard/` (TensorBoard reads every event file in a folder).
`read_metrics(workdir)` gives the whole history either way.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import fsspec

from ctx.remote import is_remote

# An upload per this many seconds at most, as tensorboardX's own writer flushes by default.
REMOTE_FLUSH_SECONDS = 120.0


class MetricWriter:
    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        remote_flush_seconds: float = REMOTE_FLUSH_SECONDS,
        clock=time.monotonic,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._workdir, self._remote, self._clock = workdir.rstrip("/"), is_remote(workdir), clock
        self._remote_flush_seconds, self._last_upload = remote_flush_seconds, clock()
        self._pending: list[dict[str, Any]] = []
        if not self._remote:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """One row: `step` plus scalars; a `split` key prefixes the TensorBoard tags."""
        if not self.enabled:
            return
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
            self._upload(self._pending)
            self._pending, self._last_upload = [], self._clock()

    def _upload(self, rows: list[dict[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        name = f"part-{rows[0]['step']:010d}-{time.time_ns()}"
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

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush(force=True)
        if not self._remote:
            self._jsonl.close()
            self._tb.close()


def _add_scalars(events, row: dict[str, Any]) -> None:
    prefix = row.get("split", "train")
    for key, value in row.items():
        if (
            key not in ("step", "split")
            and isinstance(value, (int, float))
            and math.isfinite(value)
        ):
            events.add_scalar(f"{prefix}/{key}", value, row["step"])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Every metric row of a run, in the order written: `metrics.jsonl`, then (a remote
    workdir) the parts under `metrics/` in step order."""
    workdir = workdir.rstrip("/") if isinstance(workdir, str) else os.fspath(workdir)
    fs, root = fsspec.core.url_to_fs(workdir)
    files = [f"{root}/metrics.jsonl"] if fs.exists(f"{root}/metrics.jsonl") else []
    if fs.isdir(f"{root}/metrics"):
        files += sorted(p for p in fs.ls(f"{root}/metrics", detail=False) if p.endswith(".jsonl"))
    rows = []
    for path in files:
        with fs.open(path, "r", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows
