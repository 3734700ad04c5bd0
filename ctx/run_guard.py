"""Guards around a training run: one process per workdir, and SIGTERM as a request to stop.

TPU preemption sends SIGTERM; the loop finishes its current chunk, writes a checkpoint and
exits, so the restarted run resumes exactly where this one stopped.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from typing import Any

from ctx.errors import UserError
from ctx.remote import is_remote


class WorkdirLocked(UserError, RuntimeError):
    """Another training process holds the workdir."""


class WorkdirLock:
    """An exclusive flock on `workdir/.lock`, held for the life of the run (local paths only;
    a gs:// workdir relies on the launcher starting one job per workdir)."""

    def __init__(self, workdir: str) -> None:
        self._file = None
        if is_remote(workdir):
            return
        path = os.path.join(workdir, ".lock")
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise WorkdirLocked(
                f"another training process (pid {holder}) is using --workdir={workdir}; "
                "wait for it to finish or choose another workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class StopRequest:
    """Turns SIGTERM, and a first Ctrl-C (SIGINT), into a flag the loop checks between chunks
    (main thread only): the chunk finishes and a checkpoint is written, rather than a
    KeyboardInterrupt landing inside the checkpointer's threads. A second Ctrl-C interrupts at
    once (`interrupted` says a Ctrl-C asked)."""

    def __init__(self) -> None:
        self.requested = self.interrupted = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # the next one is at once

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
