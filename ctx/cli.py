"""What the `python -m ctx.*` entry points share: config flags and one-line errors.

Bad input (an unknown config key, a missing file, an impossible size: a `ctx.errors.UserError`)
ends with one line on stderr naming what is wrong and exit status 2, not a traceback; anything
else is a bug, reported in one line naming its type with exit status 1; `--verbose` shows the
traceback of either.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags

from ctx.distributed import (
    HEARTBEAT_TIMEOUT_SECONDS,
    initialize,
    is_runtime_failure,
    lost_processes,
    use_the_cpu_where_nothing_else_is,
)
from ctx.errors import InputError, Interrupted, UserError

FLAGS = flags.FLAGS


# What a user can cause and fix. Other exceptions raised while a command works (a ValueError
# from jax, a KeyError, ...) are bugs: they end as one line too, but say so, with exit status 1.
USER_ERRORS = (UserError, flags.Error)


CONFIG_FIELDS_HELP = (
    "Config fields: every section's defaults and what each field means are in ctx/config.py; "
    "experiments/*.py hold the configs (demo, bench, pg19, enwik8, wt103). Override any field "
    "with --config.<section>.<field>=value."
)


def define_common_flags() -> None:
    """The flags every command has."""
    flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors.")


def define_config_flags() -> None:
    """The flags of the commands that run a config (train, evaluate, sample, bench)."""
    define_common_flags()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "experiments/<task>.py[:variant], overridable with --config.<section>.<field>=value",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events."
    )
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "on", "off"],
        "jax.distributed: auto = with the flags below, on TPU pod slices and under SLURM.",
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes (multi-process runs).", lower_bound=1
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index (multi-process runs).", lower_bound=0
    )
    flags.DEFINE_integer(
        "heartbeat_timeout_seconds",
        HEARTBEAT_TIMEOUT_SECONDS,
        "Multi-process runs: a process silent this long is lost, and the others exit with "
        "an error instead of waiting for it.",
        lower_bound=1,
    )


def run_main(main: Callable[[], None], needs_config: bool = True) -> None:
    """Parse flags and run `main`; user errors become one line and exit status 2. `--help`
    (or -h) lists the command's flags, a line each, and exits 0."""
    if any(arg in ("--help", "-h", "--helpfull") for arg in sys.argv[1:]):
        print(usage(needs_config))
        sys.exit(0)
    use_the_cpu_where_nothing_else_is()
    try:
        try:
            FLAGS(sys.argv)
            config = FLAGS.config if needs_config else None
            if config is not None:
                config.keys()  # ml_collections reports a config file that failed to load on first use
        except Exception as error:  # noqa: BLE001 - whatever failed inside (ml_collections raises
            # AttributeError for an unknown field), the command line or the config file it names is at fault
            raise InputError(_input_message(error)) from error
        if needs_config and config is None:
            raise InputError("--config is required, e.g. --config=experiments/demo.py")
        if needs_config:
            initialize(
                FLAGS.coordinator_address,
                FLAGS.num_processes,
                FLAGS.process_id,
                FLAGS.distributed,
                FLAGS.heartbeat_timeout_seconds,
            )
        main()
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, what was kept, no traceback
        kept = (
            str(interrupt) if isinstance(interrupt, Interrupted) else "nothing of this run is kept"
        )
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - every failure of a CLI ends as one line
        if "--verbose" in sys.argv or "--verbose=true" in sys.argv:
            raise
        if is_runtime_failure(error):
            _stop_after_lost_contact(error)
        user_error = isinstance(error, USER_ERRORS)
        prefix = (
            "error"
            if user_error
            else f"error ({type(error).__name__}; --verbose shows the traceback)"
        )
        print(f"{prefix}: {_one_line(error)}", file=sys.stderr)
        sys.exit(2 if user_error else 1)


def usage(needs_config: bool = True) -> str:
    """The running command's docstring and its flags (ctx's own and the program's), a line each."""
    program = sys.modules["__main__"]
    lines = [(program.__doc__ or "").strip(), "", "Flags:"]
    for module, defined in sorted(FLAGS.flags_by_module_dict().items()):
        if module.startswith("ctx") or module == sys.argv[0] or module == "__main__":
            for flag in sorted(defined, key=lambda f: f.name):
                default = "" if flag.default is None else f" (default: {flag.default_as_str})"
                lines.append(f"  --{flag.name}: {' '.join(flag.help.split())}{default}")
    if needs_config:
        lines += ["", CONFIG_FIELDS_HELP]
    return "\n".join(lines)


def _stop_after_lost_contact(error: BaseException) -> None:
    """A collective failed in a multi-process run: say so at once, then name the process that
    was lost once the runtime knows (the runtime may end this process first, with its own
    message naming it), and end with status 1, which the launchers restart (status 2 means bad
    input: no restart). os._exit skips the runtime's shutdown barrier, which would wait for the
    lost process and then abort with a core dump."""
    timeout = FLAGS.heartbeat_timeout_seconds
    print(
        f"error: a collective between the processes failed ({_one_line(error)[:300]}); this process "
        "stops too. Run the job again (the launchers do): it resumes from the last checkpoint every "
        f"process completed. Asking which process was lost (up to --heartbeat_timeout_seconds={timeout}).",
        file=sys.stderr,
        flush=True,
    )
    lost = lost_processes(timeout)
    if lost:
        print(
            f"error: process {', '.join(map(str, lost))} stopped sending heartbeats: "
            f"{'it was' if len(lost) == 1 else 'they were'} lost.",
            file=sys.stderr,
            flush=True,
        )
    sys.stdout.flush()
    os._exit(1)


def _input_message(error: BaseException) -> str:
    """One line for a flag or config-file failure: the config file's own exception, named after
    the --config flag, instead of ml_collections' traceback flattened into the message."""
    text = str(error)
    config_flag = next((a for a in sys.argv[1:] if a.startswith("--config=")), None)
    # absl's own flag errors name their flag; anything else came from loading the config file.
    if config_flag is None or (isinstance(error, flags.Error) and "Traceback" not in text):
        return _one_line(error)
    if isinstance(error, (AttributeError, KeyError)):  # an override of a field the config lacks
        name = text.strip("'\" ")
        override = next(
            (
                a
                for a in sys.argv[1:]
                if a.startswith("--config.") and f".{name}" in a.split("=")[0]
            ),
            None,
        )
        if override:
            field = override.split("=")[0].removeprefix("--config.")
            return f"{override.split('=')[0]}: the config has no field {field} (its fields: ctx/config.py)"
    missing = re.search(r"No such file or directory: '([^']+)'", text)
    if missing:
        return f"{config_flag}: no such file ({missing.group(1)}); configs are Python files like experiments/demo.py"
    if isinstance(error, SyntaxError):
        return f"{config_flag}: {error.msg} ({error.filename}, line {error.lineno})"
    last = [line.strip() for line in text.strip().splitlines() if line.strip()][-1]
    raised = re.match(r"^([A-Za-z_.]*(?:Error|Exception)): (.*)$", last)
    return f"{config_flag}: {raised.group(2) if raised else _one_line(error)}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return " ".join(line.strip() for line in text) if text else type(error).__name__
