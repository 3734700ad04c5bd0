"""Guards around a training run: one process per workdir, and SIGTERM as a request to stop.

TPU preemption sends SIGTERM; the loop finishes its current chunk, writes a checkpoint and
exits, so the restarted run resumes exactly where this one stopped.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading

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
    """Turns SIGTERM into a flag the loop checks between chunks (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
