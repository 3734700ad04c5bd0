"""Process start-up with JAX's own runtime: which platform JAX starts (`use_the_cpu_where_
nothing_else_is`), and multi-host runs: one process per host, the same command on all.

`initialize()` calls `jax.distributed.initialize` when the run is multi-process:
explicit flags (--coordinator_address, --num_processes, --process_id), or what JAX
detects itself on Cloud TPU pod slices and under SLURM. ctx grows no cluster manager.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from ctx.errors import InputError


def system_accelerators(dev_dir: str = "/dev") -> dict[str, int]:
    """Accelerators the operating system shows, whatever JAX sees: NVIDIA GPUs
    (/dev/nvidiaN) and TPU chips (/dev/accelN on v4 and v5e, /dev/vfio/N on v5p and v6e)."""

    def matching(folder: str, pattern: str) -> int:
        try:
            return sum(bool(re.fullmatch(pattern, name)) for name in os.listdir(folder))
        except OSError:
            return 0

    return {
        "gpu": matching(dev_dir, r"nvidia\d+"),
        "tpu": matching(dev_dir, r"accel\d+") + matching(os.path.join(dev_dir, "vfio"), r"\d+"),
    }


def use_the_cpu_where_nothing_else_is() -> None:
    """With libtpu installed (the [tpu] extra, which also compiles for TPU slices from any
    machine), JAX's start-up probes for TPU chips and, on a machine with none, prints half a
    dozen lines of libtpu errors before a command's own output. Where the system shows neither
    a TPU chip nor a GPU (their device files) and the user chose no platform (JAX_PLATFORMS),
    JAX is told to use the CPU, which it would have used anyway; compiling for
    a TPU slice still works. Called by the entry points before JAX starts, never at import."""
    if os.environ.get("JAX_PLATFORMS") or any(system_accelerators().values()):
        return
    jax.config.update("jax_platforms", "cpu")


def _multi_host_environment() -> bool:
    """Cloud TPU pod slices list several workers; SLURM jobs have several tasks."""
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in tpu_hosts:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ


# A process that stops sending heartbeats for this long is lost: the distributed runtime then
# ends every other process with an error naming it, instead of leaving them waiting in a
# collective. JAX's default; shorter risks calling a host lost during a long compile or a
# checkpoint write to a slow bucket, longer holds a broken slice longer before a restart.
HEARTBEAT_TIMEOUT_SECONDS = 100


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "auto",
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
) -> bool:
    """Start jax.distributed if this run spans processes; returns whether it did.

    mode 'auto': with explicit settings, or on a multi-host TPU slice / SLURM job;
    'on': always (JAX auto-detects the cluster); 'off': never.
    """
    if heartbeat_timeout_seconds < 1:
        raise InputError(
            f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds} must be at least 1"
        )
    if mode not in ("auto", "on", "off"):
        raise InputError(f"--distributed={mode!r} is unknown; choose auto, on or off")
    explicit = (
        coordinator_address is not None or num_processes is not None or process_id is not None
    )
    if mode == "off" or (mode == "auto" and not explicit and not _multi_host_environment()):
        return False
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise InputError(
            "--coordinator_address, --num_processes and --process_id go together; give all three"
        )
    if explicit and not 0 <= process_id < num_processes:
        raise InputError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    return True


# How the runtime words a failed collective or RPC: an absl status code first ("UNKNOWN: Gloo
# AllGather failed: ... Connection closed by peer"); ctx's own errors never start this way.
_RUNTIME_STATUS = re.compile(
    r"^(UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|CANCELLED|DATA_LOSS): "
)


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what caused it (`raise ... from` or during handling), and so on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_runtime_failure(error: BaseException) -> bool:
    """Whether `error` is (or was caused by) the runtime's report of a failed collective or RPC
    in a multi-process run, typically a peer that died (orbax wraps a failed commit barrier in a
    TimeoutError): not a mistake in the input, so a restart can cure it."""
    return jax.process_count() > 1 and any(_RUNTIME_STATUS.match(str(e)) for e in causes(error))


def lost_processes(heartbeat_timeout_seconds: int) -> list[int] | None:
    """The processes the distributed runtime no longer hears from, or None if it cannot tell.

    Asks the coordinator which processes are alive; it answers once every live process has asked
    (each process that saw the failed collective does) and a dead one has missed its heartbeats,
    so this waits about the heartbeat timeout at most.
    """
    try:  # the runtime client has no public accessor (present in jax 0.10.2 and 0.11.2)
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
    except (ImportError, AttributeError):
        return None
    if client is None:
        return None
    everyone = list(range(jax.process_count()))
    answer: dict[str, dict] = {}

    def ask() -> None:
        with contextlib.suppress(Exception):  # the coordinator itself may be the one lost
            answer["live"] = client.get_live_nodes(everyone)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(heartbeat_timeout_seconds + 10)
    if "live" not in answer:
        return None
    return [p for p in everyone if p not in answer["live"]]


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process, the same answer on all of them (one tiny
    collective). Decisions that gate a collective (stop and save after a SIGTERM) must be taken
    by all processes together: a SIGTERM reaches pod hosts at different moments, and a process
    that saved while another started the next chunk would wait for it forever."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def smallest_on_any_process(value: int) -> int:
    """The smallest of every process's `value`, the same answer on all of them."""
    if jax.process_count() == 1:
        return value
    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def wait_for_all_processes(name: str) -> None:
    """Return once every process has reached the point called `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
