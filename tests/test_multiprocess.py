"""Real multi-process runs on localhost: jax.distributed with gloo, two processes each
holding half of the global batch, against one process holding all of it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, TINY_CLI_FLAGS, read_metrics, run_module, script

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(module, workdir, *args):
    return [
        sys.executable,
        "-m",
        f"ctx.{module}",
        "--config=experiments/demo.py",
        f"--workdir={workdir}",
        *TINY_CLI_FLAGS,
        *args,
    ]


ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def start(module, workdir, *args, processes=2):
    """`python -m ctx.<module>` on `processes` processes joined by jax.distributed."""
    port = free_port()
    return start_processes(
        workdir,
        module,
        [
            command(module, workdir, *args)
            + [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
            ]
            for i in range(processes)
        ],
    )


def start_processes(workdir, name, commands):
    """Start `commands`, process i logging to a file of its own (no pipe can fill up)."""
    logs = [
        open(os.path.join(workdir.parent, f"{workdir.name}-{name}-{i}-{free_port()}.log"), "w+")
        for i in range(len(commands))
    ]
    procs = [
        subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV)
        for argv, log in zip(commands, logs)
    ]
    return procs, logs


def start_with_faults(workdir, num_steps, faults, *overrides):
    """tests/scripts/train_with_faults.py on len(faults) processes joined by jax.distributed;
    process i gets --fault=faults[i] (None: no fault)."""
    port = free_port()
    return start_processes(
        workdir,
        "faults",
        [
            [
                sys.executable,
                script("train_with_faults.py"),
                str(workdir),
                str(num_steps),
                "4",
                f"--distributed={port}:{len(faults)}:{i}",
                *([f"--fault={fault}"] if fault else []),
                *overrides,
            ]
            for i, fault in enumerate(faults)
        ],
    )


def wait_all(procs, logs, timeout):
    """Exit codes of every process; a hang fails the test with every process's log."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s:\n" + "\n".join(read_logs(logs)))
    finally:
        for p in procs:
            p.kill()


def read_logs(logs):
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
    return texts


def run(module, workdir, *args, processes=1, timeout=400):
    """`python -m ctx.<module>` on 1 process, or on `processes` processes joined by jax.distributed."""
    if processes == 1:
        out = subprocess.run(
            command(module, workdir, *args),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=ENV,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return [out.stdout]
    procs, logs = start(module, workdir, *args, processes=processes)
    codes = [p.wait(timeout=timeout) for p in procs]
    outputs = read_logs(logs)
    assert codes == [0] * processes, "\n".join(
        f"--- process {i} (exit {c}):\n{o[-2500:]}" for i, (c, o) in enumerate(zip(codes, outputs))
    )
    return outputs


def losses(workdir):
    return [r["loss"] for r in read_metrics(workdir) if "split" not in r]


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run("train", one, "--config.train.num_steps=8", "--config.train.checkpoint_every=4")
    run(
        "train", two, "--config.train.num_steps=4", "--config.train.checkpoint_every=4", processes=2
    )
    rows = [r for r in read_metrics(two) if "split" not in r]
    assert [r["num_devices"] for r in rows] == [2] * 4  # one metrics file, written by process 0
    # Saved by 2 processes, resumed by 1.
    out = run("train", two, "--config.train.num_steps=8", "--config.train.checkpoint_every=4")
    assert "Resumed from checkpoint 4" in out[0]
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    # Saved by 1 process, resumed by 2.
    out = run(
        "train",
        one,
        "--config.train.num_steps=12",
        "--config.train.checkpoint_every=4",
        processes=2,
    )
    assert "Resumed from checkpoint 8" in out[0]
    run("train", two, "--config.train.num_steps=12", "--config.train.checkpoint_every=4")
    np.testing.assert_allclose(losses(one), losses(two), rtol=1e-5)

    # Evaluation on 2 processes gives the report of 1.
    reports = {}
    for n in (1, 2):
        path = tmp_path / f"report{n}.json"
        run("evaluate", one, "--split=validation", f"--output={path}", processes=n)
        reports[n] = json.loads(path.read_text())
    assert reports[2]["num_devices"] == 2 and reports[1]["num_devices"] == 1
    assert (
        reports[1]["tokens"] == reports[2]["tokens"]
        and reports[1]["documents"] == reports[2]["documents"]
    )
    assert reports[2]["total_nll"] == pytest.approx(reports[1]["total_nll"], rel=1e-5)


def test_distributed_flags_must_come_together(tmp_path):
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        f"--workdir={tmp_path / 'w'}",
        "--num_processes=2",
    )
    assert out.returncode == 2 and "go together" in out.stderr


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_the_run_resumes(tmp_path):
    """A preemption notice reaches pod hosts at different moments: SIGTERM goes to process 1 only.
    Both processes save the same step and exit 143 (before, process 1 entered its save while
    process 0 started the next chunk, and each waited for the other forever)."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    steps = ["--config.train.num_steps=200", "--config.train.checkpoint_every=1000"]
    run("train", straight, *steps)
    procs, logs = start("train", interrupted, *steps)
    deadline = time.time() + 240
    while not (interrupted / "metrics.jsonl").exists() or len(losses(interrupted)) < 8:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "\n".join(
            read_logs(logs)
        )
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    try:
        codes = [p.wait(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(
            "the processes hung after a SIGTERM to process 1 only:\n" + "\n".join(read_logs(logs))
        )
    finally:
        for p in procs:
            p.kill()
    texts = read_logs(logs)
    assert codes == [143, 143], "\n".join(t[-2000:] for t in texts)
    saved = sorted(int(s) for s in os.listdir(interrupted / "checkpoints") if s.isdigit())
    stopped = [int(t.split("Stopped by SIGTERM after step ")[1].split(":")[0]) for t in texts]
    assert len(saved) == 1 and stopped == saved * 2 and saved[0] < 200
    out = run("train", interrupted, *steps)  # resumed here by one process
    assert f"Resumed from checkpoint {saved[0]}" in out[0]
    np.testing.assert_allclose(losses(interrupted), losses(straight), rtol=1e-5)


def test_a_lost_process_ends_the_others_in_bounded_time_and_a_restart_resumes(tmp_path):
    """SIGKILL of process 1 (a VM gone): process 0 does not wait in a collective forever; it says
    so at once and names process 1 once that one misses its heartbeats, ending with a status the
    launchers restart (not 2, which means bad input); a restart resumes from the last checkpoint
    both completed."""
    workdir = tmp_path / "run"
    args = [
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every=8",
        "--heartbeat_timeout_seconds=10",
    ]
    procs, logs = start("train", workdir, *args)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "16").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "\n".join(
            read_logs(logs)
        )
        time.sleep(0.2)
    procs[1].kill()
    killed = time.time()
    try:
        code = procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(
            "process 0 still waits a minute after process 1 was lost:\n"
            + read_logs(logs)[0][-3000:]
        )
    finally:
        procs[0].kill()
    log = read_logs(logs)[0]
    assert time.time() - killed < 60
    if code == 1:  # ctx ended it: one line at the failed collective, then the lost process named
        assert (
            "error: a collective between the processes failed" in log
            and "resumes from the last" in log
        )
        assert "error: process 1 stopped sending heartbeats: it was lost." in log
    else:  # the runtime, which learns of the loss at the same moment, ended it first, naming it too
        assert (
            code in (134, -signal.SIGABRT) and "unhealthy (stopped sending heartbeats):\n1" in log
        ), log[-3000:]
    saved = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    out = run(
        "train",
        workdir,
        f"--config.train.num_steps={saved + 4}",
        "--config.train.checkpoint_every=8",
    )
    assert f"Resumed from checkpoint {saved}" in out[0]


# The loop takes its stop decision after a chunk's metrics, before its save and validation: a
# SIGTERM during either (or just after the decision) stops every process one chunk later.
@pytest.mark.parametrize(
    "fault", ["sigterm_after_step:8", "sigterm_during_save:8", "sigterm_during_validation:8"]
)
def test_sigterm_to_one_process_at_any_moment_stops_all_at_one_step(tmp_path, fault):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    validation = "train.eval_every=8"
    procs, logs = start_processes(
        straight,
        "straight",
        [[sys.executable, script("train_with_faults.py"), str(straight), "16", "4", validation]],
    )
    assert wait_all(procs, logs, 300) == [0], read_logs(logs)[0][-3000:]
    procs, logs = start_with_faults(interrupted, 16, [None, fault], validation)
    codes = wait_all(procs, logs, 300)
    texts = read_logs(logs)
    assert codes == [143, 143], "\n".join(t[-2500:] for t in texts)
    assert all("RESULT 10 True" in t for t in texts)  # both stopped after step 10, the next chunk
    assert max(int(s) for s in os.listdir(interrupted / "checkpoints") if s.isdigit()) == 10
    procs, logs = start_with_faults(interrupted, 16, [None, None], validation)
    assert wait_all(procs, logs, 300) == [0, 0], "\n".join(read_logs(logs))
    assert "Resumed from checkpoint 10" in read_logs(logs)[0]
    np.testing.assert_allclose(losses(interrupted), losses(straight), rtol=1e-5)


def test_a_host_killed_during_a_save_leaves_no_step_that_some_hosts_load(tmp_path):
    """SIGKILL of process 1 just after it handed checkpoint 8 to the asynchronous checkpointer:
    orbax commits a step only once every process has written its part, so step 8 never
    appears, and on restart both processes resume from step 4, the last one both completed."""
    straight, workdir = tmp_path / "straight", tmp_path / "run"
    procs, logs = start_processes(
        straight,
        "straight",
        [[sys.executable, script("train_with_faults.py"), str(straight), "12", "4"]],
    )
    assert wait_all(procs, logs, 300) == [0], read_logs(logs)[0][-3000:]
    procs, logs = start_with_faults(workdir, 12, [None, "kill_during_save:8"])
    codes = wait_all(procs, logs, 120)  # process 0 ends once process 1 misses its heartbeats (10 s)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, codes
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [4]
    procs, logs = start_with_faults(workdir, 12, [None, None])
    texts = (
        read_logs(logs)
        if wait_all(procs, logs, 300) == [0, 0]
        else pytest.fail("\n".join(read_logs(logs)))
    )
    assert "Resumed from checkpoint 4" in texts[0] and all("RESULT 12 False" in t for t in texts)
    np.testing.assert_allclose(losses(workdir)[-8:], losses(straight)[-8:], rtol=1e-5)
