"""Restore a trained model for inference (evaluation, sampling) from a run's workdir.

The model is built from the given config (plus overrides); fields that shape parameters
must match the checkpoint's recorded config, memory lengths and batch size may differ. The
tokenizer the run trained with is found through the checkpoint's fingerprint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from ctx.checkpoint import Checkpointer, check_resumable
from ctx.config import ModelConfig, validate
from ctx.data.tokenizer import check_vocab, load_tokenizer
from ctx.memory import init_memory
from ctx.model import CompressiveTransformer
from ctx.sharding import tree_param_sharding


@dataclasses.dataclass
class Restored:
    model: CompressiveTransformer
    params: Any
    tokenizer: Any
    step: int


def resolve_tokenizer(config: ml_collections.ConfigDict, workdir: str, recorded: str | None) -> None:
    """Use the run's own tokenizer copy when the configured one is not what it trained with."""
    copy = os.path.join(workdir, "tokenizer.model")
    if recorded in (None, "bytes") or not epath.Path(copy).is_file():
        return
    configured = None
    try:
        configured = load_tokenizer(config.data.tokenizer).fingerprint
    except (ValueError, FileNotFoundError):
        pass
    if configured != recorded and load_tokenizer(copy).fingerprint == recorded:
        config.data.tokenizer = copy


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, step: int | None, mesh) -> Restored:
    """Parameters of checkpoint `step` (default: latest) on `mesh`, and the run's tokenizer."""
    validate(config)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if "://" not in workdir and not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"--workdir={workdir} has no checkpoints/ folder; train first or fix the path")
    checkpointer = Checkpointer(checkpoint_dir, max_to_keep=1000)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"--step={step} is not in {checkpoint_dir} (steps: {steps})")
        check_resumable(checkpointer.restore_config(step), config)
        resolve_tokenizer(config, workdir, checkpointer.restore_data(step).get("tokenizer"))
        tokenizer = load_tokenizer(config.data.tokenizer)
        check_vocab(tokenizer, config)
        model = CompressiveTransformer(ModelConfig.from_config(config.model))
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
            (1, config.model.segment_length), jnp.int32), init_memory(config.model, 1))["params"])
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract, tree_param_sharding(mesh, abstract))
        params = checkpointer.restore_params(step, abstract)
    finally:
        checkpointer.close()
    return Restored(model=model, params=params, tokenizer=tokenizer, step=step)
