"""Writes tests/data/checkpoint_v1: a tiny Compressive Transformer run of the model code as it
was at commit 4388e5c (before the model's typed entry points), with the evaluation report
of its checkpoint. tests/test_old_checkpoint.py proves that later code restores, evaluates and
resumes it unchanged. Run once from the repository root; never regenerate it with newer code.
"""

import json
import os
import shutil
import sys

from ctx import evaluate, train
from tests.helpers import tiny_train_config

OUT = os.path.join("tests", "data", "checkpoint_v1")


def config():
    cfg = tiny_train_config(num_steps=4, checkpoint_every=4, batch_size=2, segments_per_call=2)
    cfg.model.d_model, cfg.model.d_ff, cfg.model.n_heads = 16, 32, 2
    cfg.model.segment_length = cfg.model.memory_length = cfg.model.compressed_length = 4
    return cfg


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    train.train_and_evaluate(config(), OUT)
    report = evaluate.evaluate_checkpoint(config(), OUT, "validation")
    for name in os.listdir(OUT):
        if name != "checkpoints":
            path = os.path.join(OUT, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with open(os.path.join(OUT, "evaluation.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True, default=float)
    sys.exit(0)
