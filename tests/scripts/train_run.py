"""Train the tiny run into WORKDIR (argv[1]) for NUM_STEPS (argv[2]) on 8 simulated devices with
mesh.fsdp = FSDP (argv[3]), optionally with model.attention_impl = argv[4] and model.dropout =
argv[5] (default 0)."""

import sys

import jax

from ctx import train
from tests.helpers import tiny_train_config

cfg = tiny_train_config(num_steps=int(sys.argv[2]))
cfg.mesh.fsdp = int(sys.argv[3])
if len(sys.argv) > 4:
    cfg.model.attention_impl, cfg.model.dropout = (
        sys.argv[4],
        float(sys.argv[5] if len(sys.argv) > 5 else 0),
    )
assert jax.device_count() == 8
train.train_and_evaluate(cfg, sys.argv[1])
