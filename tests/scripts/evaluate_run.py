"""Evaluate the tiny run in WORKDIR (argv[1]) on 8 simulated devices, at eval batch 16 (which
shrinks to 8 rows, one per device, so rows are gathered across shards); print the totals as JSON."""

import json
import sys

import jax

from ctx import evaluate
from tests.helpers import tiny_train_config

assert jax.device_count() == 8
cfg = tiny_train_config(num_steps=4)
cfg.eval.batch_size = 16
report = evaluate.evaluate_checkpoint(cfg, sys.argv[1], "validation")
print(
    json.dumps(
        {
            "total_nll": report["total_nll"],
            "tokens": report["tokens"],
            "devices": report["num_devices"],
        }
    )
)
