"""Checkpoints: orbax CheckpointManager (async) with three items per step.

`state` holds what decides the next step on the device (train state, memory, rng),
`data` the stream position and `config` the config the run was started with (both JSON).
Checkpoint N is the state after N training segments.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ctx.distributed import any_process, causes, smallest_on_any_process, wait_for_all_processes
from ctx.errors import UserError
from ctx.nn.memory import Memory
from ctx.remote import is_remote

T = TypeVar("T")
# The Memory fields a checkpoint holds (the carried keys and values are derived data).
SAVED_MEMORY_FIELDS = ("mem", "cmem", "mem_mask", "cmem_mask")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that exists but cannot be read, or one that the machine would not let us write."""


# A write the file system refused: what the user can do about it, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that file system",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or use a --workdir on another file system",
    errno.EROFS: "make the file system writable or use another --workdir",
    errno.EACCES: "make the folder writable for this user or use another --workdir",
    errno.EPERM: "make the folder writable for this user or use another --workdir",
    errno.ENOENT: "the folder vanished while the run wrote to it; restore it or use another --workdir",
}


def _refused_write(error: BaseException) -> int | None:
    """The errno of a file-system refusal behind `error` (orbax and tensorstore wrap it in
    other exceptions and report it as `os_error_code`), or None for any other failure."""
    for seen in causes(error):
        if isinstance(seen, OSError) and seen.errno in _WRITE_FIXES:
            return seen.errno
        found = re.search(r"os_error_code='?(\d+)", str(seen))
        if found and int(found.group(1)) in _WRITE_FIXES:
            return int(found.group(1))
    return None


class _WriteErrorEcho(logging.Filter):
    """Drops orbax's and asyncio's logged tracebacks of a refused write (hundreds of lines per
    failed save): the failure surfaces once, as the CheckpointError that names path and fix.
    Once that is raised, the failed save's abandoned writer threads fail too as the process
    ends ('cannot schedule new futures after interpreter shutdown'): their tracebacks go too."""

    refusal_reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (self.refusal_reported or _refused_write(error)):
            return False
        return "os_error_code=" not in record.getMessage()


_ECHO_FILTER = _WriteErrorEcho()


def quiet_refused_writes() -> None:
    """For a program that writes checkpoints, for its lifetime (its entry point calls this, not
    an import): a refused write surfaces once, as the CheckpointError that names path and fix,
    instead of hundreds of tracebacks. Drops orbax's and asyncio's logged echoes of it, the
    'Event loop is closed' reports of tensorstore's threads finishing the abandoned writes
    (every other unraisable exception reaches the hook it had), and Python's warnings about
    the failed save's never-awaited coroutines at exit. Calling it again changes nothing."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _ECHO_FILTER not in logger.filters:
            logger.addFilter(_ECHO_FILTER)
    warnings.filterwarnings(
        "ignore", message="coroutine .* was never awaited", category=RuntimeWarning
    )
    previous = sys.unraisablehook
    if getattr(previous, "mutes_closed_loop", False):
        return

    def hook(unraisable):
        if not (
            unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"
        ):
            previous(unraisable)

    hook.mutes_closed_loop = True
    sys.unraisablehook = hook


def read_latest_config(directory: str) -> dict | None:
    """The config saved with the newest committed step, read as plain JSON without orbax.

    Used before a run starts, on every process: it does no collective, so processes that
    see the folder appear at different moments cannot fall out of step.
    """
    folder = epath.Path(directory)
    steps = (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )
    if not steps:
        return None
    path = folder / str(steps[-1]) / "config" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"the config saved with checkpoint {steps[-1]} ({path}) cannot be read "
            f"({type(error).__name__}); the checkpoint is damaged"
        ) from None


def _is_empty(leaf: Any) -> bool:
    return 0 in tuple(getattr(leaf, "shape", ()))


def _without_empty(tree: Any) -> Any:
    """Zero-size arrays (a Transformer-XL's cmem, n_cm = 0) as None: orbax cannot save them."""
    return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _is_memory(node: Any) -> bool:
    return isinstance(node, Memory)


def _saved_form(tree: Any) -> Any:
    """Memory as a dict of its four arrays: the keys and values only evaluation carries are
    never saved, and checkpoints keep the tree they always had."""
    return jax.tree.map(
        lambda m: {f: getattr(m, f) for f in SAVED_MEMORY_FIELDS} if _is_memory(m) else m,
        tree,
        is_leaf=_is_memory,
    )


def _from_saved_form(restored: Any, abstract: Any) -> Any:
    return jax.tree.map(
        lambda a, r: Memory(**r) if _is_memory(a) else r, abstract, restored, is_leaf=_is_memory
    )


def _with_empty(restored: Any, abstract: Any) -> Any:
    """Put back the zero-size arrays `_without_empty` left out, on the abstract's shardings."""
    leaves, treedef = jax.tree.flatten(abstract)
    saved = iter(jax.tree.leaves(restored))
    return treedef.unflatten(
        [
            jax.device_put(np.zeros(x.shape, x.dtype), getattr(x, "sharding", None))
            if _is_empty(x)
            else next(saved)
            for x in leaves
        ]
    )


# Listing steps reads each step folder's metadata; a live run's clean-up can delete a folder
# between orbax seeing its name and reading it. Listing again no longer sees that step.
LIST_ATTEMPTS = 20


def _listed(list_steps: Callable[[], T]) -> T:
    for _ in range(LIST_ATTEMPTS - 1):
        try:
            return list_steps()
        except FileNotFoundError:
            time.sleep(0.05)
    return list_steps()


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int) -> None:
        directory = os.fspath(directory)
        # orbax needs absolute paths; URLs (gs://...) are already absolute.
        self.directory = directory if is_remote(directory) else os.path.abspath(directory)
        # The step folder is made before save returns: made in the background, a folder the file
        # system refuses (read-only, vanished) leaves orbax's writer threads waiting 20 minutes
        # for it, and the process with them.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self.manager = _listed(
            lambda: ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data", "config")
            )
        )
        self._writing: int | None = None  # the step of the latest save started

    def reload(self) -> None:
        """See steps that another process committed or deleted since this manager listed them."""
        _listed(self.manager.reload)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start writing checkpoint `step` (asynchronously: `write_failure`, `wait` and `close`
        report a write that failed)."""
        self.wait()  # the previous write's failure, named after its own step
        self._writing = step
        with self._writes():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_without_empty(_saved_form(state))),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config),
                ),
                force=True,
            )

    def write_failure(self) -> CheckpointError | None:
        """The failure of an asynchronous checkpoint write so far, if any (so that a run stops
        at once instead of at its next save)."""
        try:
            with self._writes():
                self.manager.check_for_errors()
        except CheckpointError as error:
            return error
        return None

    @contextlib.contextmanager
    def _writes(self):
        """A write the file system refused (full, read-only, vanished) becomes one CheckpointError
        naming the path, the reason and the fix; other failures pass unchanged."""
        try:
            yield
        except Exception as error:
            code = _refused_write(error)
            if code is None:
                raise
            named = re.search(re.escape(self.directory) + r"/(\d+)", str(error))
            step = int(named.group(1)) if named else self._writing
            kept = (
                [int(p.name) for p in epath.Path(self.directory).iterdir() if p.name.isdigit()]
                if epath.Path(self.directory).is_dir()
                else []
            )
            resume = (
                f"checkpoint {max(kept)} and earlier are kept: run the same command again to resume from it"
                if kept
                else "no earlier checkpoint exists"
            )
            _ECHO_FILTER.refusal_reported = True
            raise CheckpointError(
                f"checkpoint {step} could not be written to {self.directory}/{step} "
                f"({os.strerror(code)}); {_WRITE_FIXES[code]}, then {resume}"
            ) from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore onto the shardings in `abstract_state` (any device count)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_without_empty(_saved_form(abstract_state))),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        state = _from_saved_form(restored.state, abstract_state)
        return _with_empty(state, abstract_state), restored.data, restored.config

    def restore_latest(
        self, abstract_state: Any, fallback: bool = False
    ) -> tuple[int, Any, dict] | None:
        """(step, state, data) of the newest readable checkpoint, or None if there is none.

        A half-written step (an interrupted async save, on any host) is never listed: orbax
        commits a step by renaming its folder once every process has written its part. A
        committed step that cannot be read is an error naming it, unless `fallback`, which moves
        on to the previous step. Never a silent fresh start. With several processes every
        decision is taken together, so all of them restore the same step: a step that only some
        list is not used, and a step that one cannot read is unread by all.
        """
        self._set_aside_uncommitted()
        steps = sorted(self.all_steps(), reverse=True)
        listed_everywhere = smallest_on_any_process(steps[0] if steps else -1)
        steps = [s for s in steps if s <= listed_everywhere]
        for i, step in enumerate(steps):
            reason = None
            try:
                state, data, _ = self.restore(step, abstract_state)
            except Exception as error:  # orbax/tensorstore raise many types for damaged files
                first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
                reason = f"{type(error).__name__}: {first_line}"
            if not any_process(reason is not None):
                return step, state, data
            if reason is None:
                reason = "another process could not read it"
            older = steps[i + 1] if i + 1 < len(steps) else None
            if not fallback or older is None:
                hint = (
                    f"set --config.train.on_corrupt_checkpoint=previous to resume from step {older}"
                    if older is not None
                    else "no older checkpoint is left to fall back to"
                )
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory}/{step} cannot be read ({reason}); "
                    f"{hint}"
                ) from None
            self._set_aside(step)
            print(
                f"warning: checkpoint {step} cannot be read ({reason}); moved it to "
                f"{self.directory}/corrupt-{step} and trying step {older}",
                flush=True,
            )
        return None

    def _set_aside(self, step: int, kind: str = "corrupt") -> None:
        """Rename a damaged or uncommitted step out of orbax's sight, as `kind`-STEP (kept for
        inspection, never deleted); the first process renames it, and every process then lists
        the steps again."""
        if jax.process_index() == 0:
            self._rename_aside(step, kind)
        wait_for_all_processes(f"ctx-set-aside-{kind}-{step}")
        self.reload()

    def _set_aside_uncommitted(self) -> None:
        """Step folders without orbax's commit (on gs://, no commit marker: a save that did not
        finish, or whose last reply was lost) are named and set aside before any step is read,
        so none is read and a later save of the same step starts clean. The first process
        renames them; every process then lists the steps again."""
        if jax.process_index() == 0:
            folder = epath.Path(self.directory)
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            committed = set(self.all_steps())
            for step in sorted(int(n) for n in names if n.isdigit() and int(n) not in committed):
                self._rename_aside(step, "uncommitted")
                print(
                    f"warning: checkpoint folder {self.directory}/{step} was never committed (a "
                    f"save that did not finish); moved it to {self.directory}/uncommitted-{step}, "
                    "unread",
                    flush=True,
                )
        wait_for_all_processes("ctx-set-aside-uncommitted")
        self.reload()

    def _rename_aside(self, step: int, kind: str) -> None:
        source = epath.Path(self.directory) / str(step)
        target = epath.Path(self.directory) / f"{kind}-{step}"
        if target.exists():
            target = (
                epath.Path(self.directory)
                / f"{kind}-{step}-{len(list(epath.Path(self.directory).iterdir()))}"
            )
        source.rename(target)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of checkpoint `step`, onto the shardings in `abstract_params`."""
        target = {"train_state": {"params": abstract_params}}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
        return restored.state["train_state"]["params"]

    def restore_data(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def restore_config(self, step: int) -> dict:
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            ).config
        except Exception as error:
            raise CheckpointError(
                f"the config saved with checkpoint {step} in {self.directory}/{step} cannot be "
                f"read ({type(error).__name__}); the checkpoint is damaged"
            ) from None

    def wait(self) -> None:
        with self._writes():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # the same failure again: the first report says it
                self.manager.close()
            raise
        with self._writes():
            self.manager.close()
