"""Multi-host start-up with JAX's own runtime: one process per host, the same command on all.

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


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto",
               heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS) -> bool:
    """Start jax.distributed if this run spans processes; returns whether it did.

    mode 'auto': with explicit settings, or on a multi-host TPU slice / SLURM job;
    'on': always (JAX auto-detects the cluster); 'off': never.
    """
    if heartbeat_timeout_seconds < 1:
        raise ValueError(f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds} must be at least 1")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed={mode!r} is unknown; choose auto, on or off")
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if mode == "off" or (mode == "auto" and not explicit and not _multi_host_environment()):
        return False
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together; give all three")
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return True

# How the runtime words a failed collective or RPC: an absl status code first ("UNKNOWN: Gloo
# AllGather failed: ... Connection closed by peer"); ctx's own errors never start this way.
_RUNTIME_STATUS = re.compile(r"^(UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|CANCELLED|DATA_LOSS): ")


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
    from jax._src import distributed as jax_distributed  # the runtime client; no public accessor

    client = jax_distributed.global_state.client
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
