"""Faults provoked for real in subprocesses: SIGTERM, SIGKILL mid-save, corrupted
checkpoints, NaNs, a second process on the same workdir, and bad input at the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ctx import train
from tests.helpers import (
    ROOT,
    TINY_CLI_FLAGS,
    read_metrics,
    run_module,
    script,
    tiny_train_config,
    user_namespaces_work,
)

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow


def start_training(workdir, num_steps, checkpoint_every, *args):
    """tests/scripts/train_with_faults.py in a process of its own; args: --fault=KIND:STEP, FIELD=VALUE."""
    command = [
        sys.executable,
        script("train_with_faults.py"),
        str(workdir),
        str(num_steps),
        str(checkpoint_every),
    ]
    return subprocess.Popen(
        [*command, *args],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def train_rows(workdir):
    return [r for r in read_metrics(workdir) if "split" not in r]


def wait_for_rows(workdir, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(train_rows(workdir)) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    raise TimeoutError


def checkpoint_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit())


def test_sigterm_saves_and_resume_follows_the_uninterrupted_trajectory(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.train_and_evaluate(
        tiny_train_config(num_steps=40, checkpoint_every=1000, segments_per_call=2), str(straight)
    )
    proc = start_training(interrupted, 40, 1000)
    wait_for_rows(interrupted, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped_at = int(out.split("RESULT")[1].split()[0])
    assert stopped_at < 40 and checkpoint_steps(interrupted)[-1:] == [stopped_at], err[-3000:]
    train.train_and_evaluate(
        tiny_train_config(num_steps=40, checkpoint_every=1000, segments_per_call=2),
        str(interrupted),
    )
    a, b = train_rows(straight), train_rows(interrupted)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise
    assert [r["compression_loss"] for r in a] == [r["compression_loss"] for r in b]


def test_sigterm_after_the_stop_check_still_saves_before_stopping(tmp_path):
    """A SIGTERM that lands after the loop has decided not to save this chunk is honoured one
    chunk later, with a checkpoint; it never stops the run without one."""
    proc = start_training(tmp_path / "run", 40, 1000, "--fault=sigterm_after_step:4")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "RESULT 6 True" in out
    assert checkpoint_steps(tmp_path / "run") == [6]


def test_sigkill_during_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = start_training(workdir, 8, 2, "--fault=kill_during_save:6")
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_steps(workdir)[-1] == 4  # step 6 was never committed
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        f"--workdir={workdir}",
        *TINY_CLI_FLAGS,
        "--config.train.num_steps=8",
        "--config.train.checkpoint_every=2",
        "--config.train.segments_per_call=2",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Resumed from checkpoint 4" in out.stdout
    assert checkpoint_steps(workdir)[-1] == 8
    assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]


def test_corrupted_checkpoint_is_named_and_previous_step_is_an_option(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_train_config(num_steps=8, checkpoint_every=4), str(workdir))
    state_dir = workdir / "checkpoints" / "8" / "state"
    damaged = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 3, 1))
                damaged += 1
    assert damaged
    before = sorted(os.listdir(workdir / "checkpoints"))
    damaged = r"checkpoint 8 in .*checkpoints/8 cannot be read.*on_corrupt_checkpoint=previous"
    with pytest.raises(Exception, match=damaged):
        train.train_and_evaluate(tiny_train_config(num_steps=12, checkpoint_every=4), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing overwritten
    result = train.train_and_evaluate(
        tiny_train_config(num_steps=12, checkpoint_every=4, on_corrupt_checkpoint="previous"),
        str(workdir),
    )
    assert result["step"] == 12
    rows = train_rows(workdir)
    # Resumed after step 4: the rows the first run wrote for 5-8 are superseded, each step once.
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert (workdir / "checkpoints" / "corrupt-8").is_dir()  # set aside, not deleted


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(
        tiny_train_config(num_steps=4, checkpoint_every=2, segments_per_call=2), str(workdir)
    )
    # Continue the run with an absurd learning rate: the weights blow up within a few steps.
    cfg = tiny_train_config(
        num_steps=40,
        checkpoint_every=2,
        segments_per_call=2,
        peak_lr=1e30,
        compress_peak_lr=1e30,
        warmup_steps=0,
    )
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as info:
        train.train_and_evaluate(cfg, str(workdir))
    bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
    steps = checkpoint_steps(workdir)
    assert bad_step > 4 and steps and steps[-1] < bad_step
    assert all(np.isfinite(r["loss"]) for r in train_rows(workdir))


def test_a_second_process_on_the_same_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    first = start_training(workdir, 100000, 1000)
    try:
        wait_for_rows(workdir, 1, first)
        out = run_module(
            "ctx.train", "--config=experiments/demo.py", f"--workdir={workdir}", *TINY_CLI_FLAGS
        )
        assert out.returncode == 2
        assert f"another training process (pid {first.pid}) is using" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=experiments/demo.py:nope"], "unknown variant 'nope'"),
        (["--config=experiments/missing.py"], "missing.py"),
        (["--config=experiments/demo.py", "--config.train.num_steps=abc"], "num_steps"),
        (
            ["--config=experiments/demo.py", "--config.train.num_steps=-5"],
            "train.num_steps must be a non-negative",
        ),
        (
            ["--config=experiments/demo.py", "--config.model.segment_length=7"],
            "segment_length (7) must be a multiple",
        ),
        (
            [
                "--config=experiments/demo.py",
                "--config.data.dataset=pg19",
                "--config.data.path=/nonexistent",
            ],
            "does not exist",
        ),
        (
            ["--config=experiments/demo.py", "--config.data.tokenizer=/nonexistent.model"],
            "does not exist",
        ),
        (
            ["--config=experiments/demo.py", "--config.eval.batch_size=-2"],
            "eval.batch_size must be a non-negative",
        ),
        (
            ["--config=experiments/demo.py", "--config.train.peak_lr=nan"],
            "train.peak_lr must be a finite",
        ),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, args, message):
    workdir = tmp_path / "never"
    out = run_module("ctx.train", *args, f"--workdir={workdir}")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not workdir.exists()


def test_verbose_shows_the_traceback(tmp_path):
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--verbose",
        "--config.model.segment_length=7",
        f"--workdir={tmp_path / 'w'}",
    )
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_checkpoints_hold_no_pickles(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_train_config(num_steps=4), str(workdir))
    for root, _, files in os.walk(workdir / "checkpoints"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                head = f.read(2)
            assert not (
                head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            ), name
    json.loads((workdir / "checkpoints" / "4" / "config" / "metadata").read_text())


def test_config_file_errors_are_one_line_naming_the_flag(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "raises.py").write_text(
        "def get_config():\n    raise RuntimeError('no data here')\n"
    )
    cases = [
        (
            "--config=experiments/demo.py:nosuchvariant",
            "--config=experiments/demo.py:nosuchvariant: unknown variant",
        ),
        (
            f"--config={tmp_path / 'syntax.py'}",
            f"--config={tmp_path / 'syntax.py'}: invalid syntax",
        ),
        (f"--config={tmp_path / 'raises.py'}", f"--config={tmp_path / 'raises.py'}: no data here"),
        ("--config=experiments/nope.py", "--config=experiments/nope.py: no such file"),
    ]
    for flag, message in cases:
        out = run_module("ctx.train", flag, f"--workdir={tmp_path / 'w'}")
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            f"error: {out.stderr.strip()[7:]}"
        ]
        assert out.stderr.startswith(f"error: {message}") and "Traceback" not in out.stderr, (
            out.stderr
        )
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--config.model.nofield=1",
        f"--workdir={tmp_path / 'w'}",
    )
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: --config.model.nofield: the config has no field model.nofield (its fields: ctx/config.py)"
    )
    assert not (tmp_path / "w").exists()


def test_a_checkpoint_write_the_file_system_refuses_ends_in_one_line_and_loses_nothing(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "ctx.train",
        "--config=experiments/demo.py",
        f"--workdir={workdir}",
        *TINY_CLI_FLAGS,
        "--config.train.checkpoint_every=4",
    ]
    # No compilation cache: its entries are files over the limit too.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("JAX_PERSISTENT") and k != "JAX_COMPILATION_CACHE_DIR"
    }
    first = subprocess.run(
        [*command, "--config.train.num_steps=4"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert first.returncode == 0, first.stderr[-2000:]
    # The kernel refuses writes past 58 KiB per file (EFBIG, as a full disk refuses any write
    # with ENOSPC): checkpoints are larger, metrics and events are not.
    refused = subprocess.run(
        [
            "bash",
            "-c",
            'trap "" XFSZ; ulimit -f 58; exec "$@"',
            "bash",
            *command,
            "--config.train.num_steps=12",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert lines[-1].startswith(
        f"error: checkpoint 8 could not be written to {workdir}/checkpoints/8 "
        "(File too large); raise the file-size limit"
    ), lines[-1]
    assert lines[-1].endswith(
        "checkpoint 4 and earlier are kept: run the same command again to resume from it"
    )
    assert not [line for line in lines if "ERROR:absl" in line or "ERROR:asyncio" in line], (
        refused.stderr[-3000:]
    )
    assert len(lines) < 60, refused.stderr
    resumed = subprocess.run(
        [*command, "--config.train.num_steps=12"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert resumed.returncode == 0 and "Resumed from checkpoint 4" in resumed.stdout, (
        resumed.stderr[-2000:]
    )
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1] == 12


@pytest.mark.slow
@pytest.mark.skipif(
    not user_namespaces_work(),
    reason="this kernel forbids unprivileged user namespaces (unshare), needed to mount a small "
    "tmpfs; the file-size-limit test above covers the same refused-write path",
)
@pytest.mark.parametrize(
    "fault, reason, fix",
    [
        ("full", "No space left on device", "free space on that file system"),
        (
            "read_only",
            "Read-only file system",
            "make the file system writable or use another --workdir",
        ),
    ],
)
def test_a_full_or_read_only_disk_ends_in_one_line_and_the_run_resumes_once_fixed(
    tmp_path, fault, reason, fix
):
    """A real file system (a small tmpfs over checkpoints/, mounted in a user namespace) fills up
    or turns read-only after checkpoint 4: the save of checkpoint 8 ends the run in one line, exit
    2, checkpoint 4 stays; once space is freed (or the disk writable) the same command resumes."""
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "ctx.train",
        "--config=experiments/demo.py",
        f"--workdir={workdir}",
        *TINY_CLI_FLAGS,
        "--config.train.checkpoint_every=4",
    ]
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            script("checkpoints_on_a_small_disk.sh"),
            fault,
            str(workdir),
            *command,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, (
        done.returncode,
        done.stderr[-2000:],
        (workdir / "first.out").read_text()[-2000:],
    )
    refused = (workdir / "refused.err").read_text()
    lines = refused.strip().splitlines()
    assert (workdir / "refused.rc").read_text().strip() == "2", refused[-3000:]
    assert lines[-1].startswith(
        f"error: checkpoint 8 could not be written to {workdir}/checkpoints/8 "
        f"({reason}); {fix}, then"
    ), lines[-1]
    assert lines[-1].endswith(
        "checkpoint 4 and earlier are kept: run the same command again to resume from it"
    )
    assert [line for line in lines if not line.startswith("train:")] == lines[-1:], refused[
        -3000:
    ]  # bar + error
    assert (workdir / "kept").read_text().split() == ["4"]
    resumed = (workdir / "resumed.out").read_text()
    assert (workdir / "resumed.rc").read_text().strip() == "0", resumed[-2000:]
    assert "Resumed from checkpoint 4" in resumed
