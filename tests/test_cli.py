"""The entry points' error contract: a UserError (the user's input, files, flags) is one line and
exit status 2; anything else is a bug: one line too, naming its type, exit 1 (--verbose:
tests/test_reliability.py). --help lists the flags and exits 0."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ctx import cli
from ctx.checkpoint import CheckpointError
from ctx.compat import CheckpointMismatch
from ctx.config import ConfigError
from ctx.errors import InputError, MissingInput, TrainingDiverged, UserError
from ctx.run_guard import WorkdirLocked
from tests.helpers import ROOT, TINY_CLI_FLAGS, run_module, script, user_namespaces_work


def run(monkeypatch, capsys, main, *argv):
    monkeypatch.setattr(sys, "argv", ["ctx-test", *argv])
    with pytest.raises(SystemExit) as stop:
        cli.run_main(main, needs_config=False)
    return stop.value.code, capsys.readouterr().err


def fail_with(error):
    def main():
        raise error

    return main


def test_user_errors_exit_2_and_bugs_exit_1(monkeypatch, capsys):
    code, err = run(monkeypatch, capsys, fail_with(MissingInput("data.path=/x does not exist")))
    assert (code, err) == (2, "error: data.path=/x does not exist\n")
    for error in (
        ConfigError,
        InputError,
        CheckpointError,
        CheckpointMismatch,
        WorkdirLocked,
        TrainingDiverged,
    ):
        assert issubclass(error, UserError)
        assert run(monkeypatch, capsys, fail_with(error("what and the fix")))[0] == 2
    # What jax, numpy or ctx itself raise is a bug, not the user's input, whatever its type.
    code, err = run(
        monkeypatch, capsys, fail_with(ValueError("Incompatible shapes for broadcasting"))
    )
    assert code == 1 and err.startswith("error (ValueError; --verbose shows the traceback)")
    code, err = run(monkeypatch, capsys, fail_with(FileNotFoundError("/tmp/x.lock")))
    assert code == 1 and err.startswith("error (FileNotFoundError;")
    code, err = run(monkeypatch, capsys, fail_with(KeyError("tokens")))
    assert code == 1 and err == "error (KeyError; --verbose shows the traceback): 'tokens'\n"
    code, err = run(monkeypatch, capsys, fail_with(TypeError("unsupported operand")))
    assert code == 1 and err.startswith("error (TypeError; --verbose shows the traceback)")


def test_bad_flags_are_input_whatever_the_parser_raises(monkeypatch, capsys):
    code, err = run(
        monkeypatch, capsys, fail_with(AssertionError("main must not run")), "--no_such_flag=1"
    )
    assert (
        code == 2
        and err.startswith("error: ")
        and "no_such_flag" in err
        and len(err.splitlines()) == 1
    )


@pytest.mark.parametrize(
    "module", ["ctx.train", "ctx.evaluate", "ctx.sample", "ctx.bench", "ctx.data.tokenizer"]
)
def test_help_lists_every_flag_and_where_the_config_fields_are(module):
    out = run_module(module, "--help")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    flags = [line for line in out.stdout.splitlines() if line.startswith("  --")]
    assert "  --verbose: Show full tracebacks for errors. (default: 'false')" in flags
    if module != "ctx.data.tokenizer":
        assert (
            any(line.startswith("  --config: ") for line in flags) and "ctx/config.py" in out.stdout
        )
        assert any(line.startswith("  --workdir: ") for line in flags)
    assert f"python -m {module} --" in out.stdout  # the docstring's example command comes first


def test_without_accelerators_the_commands_print_no_libtpu_start_up_noise():
    """With the [tpu] extra installed, JAX's start-up on a machine without TPUs made libtpu print
    half a dozen error-looking lines before any command's own output; now a command's stderr is
    its own one line. (Runs as users run it: no JAX_PLATFORMS.)"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = run_module(
        "ctx.data.tokenizer", "--input=/nonexistent/corpus", "--output=/tmp/x", env=env
    )
    assert (out.returncode, out.stderr) == (
        2,
        "error: --input=/nonexistent/corpus does not exist\n",
    )
    out = run_module("ctx.train", "--config=experiments/demo.py", env=env)
    assert (
        out.returncode == 2
        and out.stderr == "error: --workdir is required (where checkpoints and metrics go)\n"
    )
    assert out.stdout.startswith("ctx.train: jax ") and " on cpu: " in out.stdout


def test_a_workdir_that_cannot_be_created_is_the_users_one_line(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    out = run_module(
        "ctx.train", "--config=experiments/demo.py", f"--workdir={tmp_path / 'a_file' / 'run'}"
    )
    assert out.returncode == 2 and out.stderr == (
        f"error: --workdir={tmp_path / 'a_file' / 'run'} cannot be created "
        "(Not a directory); choose a folder this user can write\n"
    )


def test_a_value_beyond_the_models_int32_limit_is_the_users_one_line_before_any_library_sees_it():
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--config.model.vocab_size=100000000000",
        "--workdir=/nonexistent/never-created",
    )
    assert out.returncode == 2 and out.stderr == (
        "error: model.vocab_size must be at most 2147483647: token ids, lengths and steps are "
        "int32 in the compiled programs, got 100000000000\n"
    )


@pytest.mark.slow  # a training run
def test_ctrl_c_during_training_saves_the_step_and_says_so_in_one_line(tmp_path):
    """A first SIGINT (Ctrl-C) once checkpoint 4 exists: the chunk finishes, its step is saved, no
    traceback (nothing interrupted inside the checkpointer), one line saying which step and how
    to resume, exit status 130; the same command then resumes from it."""
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "ctx.train",
        "--config=experiments/demo.py",
        *TINY_CLI_FLAGS,
        "--config.train.checkpoint_every=4",
        f"--workdir={workdir}",
    ]
    run = subprocess.Popen(
        [*command, "--config.train.num_steps=100000"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "4").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=300)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("train:")]
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    saved = re.fullmatch(
        rf"interrupted: stopped at step (\d+); checkpoint \1 is saved in {workdir}/"
        r"checkpoints: the same command resumes from it",
        lines[-1],
    )
    assert saved and len(lines) == 1, lines
    step = int(saved.group(1))
    assert (workdir / "checkpoints" / str(step)).is_dir()
    resumed = subprocess.run(
        [*command, f"--config.train.num_steps={step + 4}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert f"Resumed from checkpoint {step} in {workdir}/checkpoints" in resumed.stdout


@pytest.mark.skipif(
    not user_namespaces_work(),
    reason="this kernel forbids unprivileged user namespaces (unshare), needed to mount a "
    "read-only tmpfs (a root user writes anywhere else)",
)
@pytest.mark.parametrize(
    "module, flag",
    [("ctx.train", "--workdir=FOLDER/run"), ("ctx.evaluate", "--output=FOLDER/report.json")],
)
def test_a_workdir_or_output_on_a_read_only_file_system_is_one_line_and_nothing_changes(
    tmp_path, module, flag
):
    folder = tmp_path / "read_only"
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            script("in_a_read_only_folder.sh"),
            str(folder),
            sys.executable,
            "-m",
            module,
            "--config=experiments/demo.py",
            f"--workdir={tmp_path / 'elsewhere'}",
            flag.replace("FOLDER", str(folder)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    named = flag.split("=")[0]
    assert (tmp_path / "read_only.rc").read_text().strip() == "2"
    assert (tmp_path / "read_only.err").read_text() == (
        f"error: {named}={flag.split('=')[1].replace('FOLDER', str(folder))}: {folder} cannot be "
        "written (a read-only file system); nothing was changed\n"
    )
    assert (tmp_path / "read_only.kept").read_text().split() == ["before"]
