"""A tiny training run in its own process, with a fault provoked at an exact moment through
ctx.train's hooks; exits 143 when it stopped on SIGTERM.

    python tests/scripts/train_with_faults.py WORKDIR NUM_STEPS CHECKPOINT_EVERY \
        [--fault=kill_during_save:STEP | --fault=sigterm_after_step:STEP] [train.FIELD=VALUE ...]
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ctx import train  # noqa: E402 - after the repository root is on the path
from tests.helpers import tiny_train_config  # noqa: E402


class Faults(train.Hooks):
    """SIGKILL right after checkpoint STEP is handed to the asynchronous checkpointer, or
    SIGTERM after the chunk ending at STEP, once the loop has decided not to stop."""

    def __init__(self, fault: str) -> None:
        self.kind, _, step = fault.partition(":")
        self.step = int(step) if step else -1

    def after_save(self, step: int) -> None:
        if self.kind == "kill_during_save" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_chunk(self, step: int) -> None:
        if self.kind == "sigterm_after_step" and step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    workdir, num_steps, checkpoint_every, *rest = argv
    fault = next((a.split("=", 1)[1] for a in rest if a.startswith("--fault=")), "")
    cfg = tiny_train_config(num_steps=int(num_steps), checkpoint_every=int(checkpoint_every), segments_per_call=2)
    for override in (a for a in rest if not a.startswith("--fault=")):
        key, value = override.removeprefix("train.").split("=")
        cfg.train[key] = type(cfg.train[key])(value)
    result = train.train_and_evaluate(cfg, workdir, hooks=Faults(fault))
    print("RESULT", result["step"], result["preempted"], flush=True)
    return 143 if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
