"""A tiny training run in its own process, with a fault provoked at an exact moment through
ctx.train's hooks; exits 143 when it stopped on SIGTERM.

    python tests/scripts/train_with_faults.py WORKDIR NUM_STEPS CHECKPOINT_EVERY [--fault=KIND:STEP]
        [--distributed=PORT:NUM_PROCESSES:PROCESS_ID] [train.FIELD=VALUE ...]

KIND: kill_during_save (SIGKILL once checkpoint STEP is handed to the asynchronous
checkpointer), sigterm_during_save (SIGTERM then), sigterm_during_validation (SIGTERM as
the validation at STEP starts), sigterm_after_step (SIGTERM after the chunk ending at STEP,
once the loop has decided not to stop). --distributed joins a jax.distributed run on localhost.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ctx import distributed, train  # noqa: E402 - after the repository root is on the path
from tests.helpers import tiny_train_config  # noqa: E402


class Faults(train.Hooks):
    def __init__(self, fault: str) -> None:
        self.kind, _, step = fault.partition(":")
        self.step = int(step) if step else -1

    def _at(self, kind: str, step: int, sig: int) -> None:
        if self.kind == kind and step == self.step:
            os.kill(os.getpid(), sig)

    def after_save(self, step: int) -> None:
        self._at("kill_during_save", step, signal.SIGKILL)
        self._at("sigterm_during_save", step, signal.SIGTERM)

    def before_validation(self, step: int) -> None:
        self._at("sigterm_during_validation", step, signal.SIGTERM)

    def after_chunk(self, step: int) -> None:
        self._at("sigterm_after_step", step, signal.SIGTERM)


def main(argv: list[str]) -> int:
    workdir, num_steps, checkpoint_every, *rest = argv
    options = dict(a[2:].split("=", 1) for a in rest if a.startswith("--"))
    if "distributed" in options:
        port, processes, process_id = (int(x) for x in options["distributed"].split(":"))
        distributed.initialize(
            f"127.0.0.1:{port}", processes, process_id, heartbeat_timeout_seconds=10
        )
    cfg = tiny_train_config(
        num_steps=int(num_steps), checkpoint_every=int(checkpoint_every), segments_per_call=2
    )
    for override in (a for a in rest if not a.startswith("--")):
        key, value = override.removeprefix("train.").split("=")
        cfg.train[key] = type(cfg.train[key])(value)
    result = train.train_and_evaluate(cfg, workdir, hooks=Faults(options.get("fault", "")))
    print("RESULT", result["step"], result["preempted"], flush=True)
    return 143 if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
