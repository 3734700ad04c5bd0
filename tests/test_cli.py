"""The entry points' error contract: a UserError (the user's input, files, flags) is one line and
exit status 2; anything else is a bug: one line too, naming its type, exit 1 (--verbose:
tests/test_reliability.py). --help lists the flags and exits 0."""

import os
import sys

import pytest

from ctx import cli
from ctx.checkpoint import CheckpointError
from ctx.compat import CheckpointMismatch
from ctx.config import ConfigError
from ctx.errors import InputError, MissingInput, TrainingDiverged, UserError
from ctx.run_guard import WorkdirLocked
from tests.helpers import run_module


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
