"""The entry points' error contract: input errors are one line and exit status 2; a bug in ctx
is one line too, says it is one, and exits 1 (--verbose: tests/test_reliability.py)."""
import sys

import pytest

from ctx import cli


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
    code, err = run(monkeypatch, capsys, fail_with(FileNotFoundError("data.path=/x does not exist")))
    assert (code, err) == (2, "error: data.path=/x does not exist\n")
    code, err = run(monkeypatch, capsys, fail_with(KeyError("tokens")))
    assert code == 1 and err == "error (KeyError; --verbose shows the traceback): 'tokens'\n"
    code, err = run(monkeypatch, capsys, fail_with(TypeError("unsupported operand")))
    assert code == 1 and err.startswith("error (TypeError; --verbose shows the traceback)")


def test_bad_flags_are_input_whatever_the_parser_raises(monkeypatch, capsys):
    code, err = run(monkeypatch, capsys, fail_with(AssertionError("main must not run")), "--no_such_flag=1")
    assert code == 2 and err.startswith("error: ") and "no_such_flag" in err and len(err.splitlines()) == 1

