"""Metric rows to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow).

Only process 0 writes; other processes get a writer that does nothing. Object stores
(gs://) cannot append, so there the JSONL file is rewritten whole at each flush.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from etils import epath
        from tensorboardX import SummaryWriter

        self._remote = "://" in workdir
        self._path = epath.Path(workdir) / "metrics.jsonl"
        if self._remote:
            self._lines = [self._path.read_text()] if self._path.exists() else []
        else:
            self._jsonl = open(self._path, "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """One row: `step` plus scalars; a `split` key prefixes the TensorBoard tags."""
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self._remote:
            self._lines.append(line)
        else:
            self._jsonl.write(line)
        prefix = row.get("split", "train")
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, row["step"])

    def flush(self) -> None:
        if self.enabled:
            if self._remote:
                self._path.write_text("".join(self._lines))
            else:
                self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if not self._remote:
                self._jsonl.close()
            self._tb.close()
