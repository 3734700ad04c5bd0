"""Restore a trained model for inference (evaluation, sampling) from a run's workdir.

The model is built from the given config (plus overrides); fields that shape parameters
must match the checkpoint's recorded config, memory lengths and batch size may differ. The
tokenizer the run trained with is found through the checkpoint's fingerprint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from ctx.checkpoint import Checkpointer
from ctx.compat import check_resumable
from ctx.config import ModelConfig, require_resolved, validate
from ctx.data.tokenizer import check_vocab, load_tokenizer
from ctx.errors import InputError, MissingInput, UserError
from ctx.nn.memory import init_memory
from ctx.nn.transformer import CompressiveTransformer
from ctx.remote import is_remote
from ctx.sharding import tree_param_sharding


@dataclasses.dataclass
class Restored:
    model: CompressiveTransformer
    params: Any
    tokenizer: Any
    tokenizer_path: str  # data.tokenizer, or the run's own copy when that is what it trained with
    step: int


def resolve_tokenizer(configured: str, workdir: str, recorded: str | None) -> str:
    """The tokenizer to read a run with: the configured one (data.tokenizer), or the run's own
    copy in its workdir when the configured one is not what it trained with (`recorded`)."""
    copy = os.path.join(workdir, "tokenizer.model")
    if recorded in (None, "bytes") or not epath.Path(copy).is_file():
        return configured
    try:
        fingerprint = load_tokenizer(configured).fingerprint
    except UserError:  # missing or unusable: the run's copy may still be right
        fingerprint = None
    if fingerprint != recorded and load_tokenizer(copy).fingerprint == recorded:
        return copy
    return configured


# A run that trains while it is evaluated deletes old checkpoints (max_checkpoints_to_keep):
# the latest step can vanish while it is read; when a newer one has appeared meanwhile, that
# one is read instead (a read that fails on the newest step is an error as before).
READ_ATTEMPTS = 10


def restore_for_inference(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | None,
    mesh,
    model_config: ModelConfig,
) -> Restored:
    """Parameters of checkpoint `step` (default: latest) on `mesh`, and the run's tokenizer; the
    model is built from `model_config`, which the caller resolved (and checked) where it started."""
    validate(config)
    require_resolved(model_config, "restore_for_inference")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not is_remote(workdir) and not os.path.isdir(checkpoint_dir):
        raise MissingInput(
            f"--workdir={workdir} has no checkpoints/ folder; train first or fix the path"
        )
    checkpointer = Checkpointer(checkpoint_dir, max_to_keep=1000)
    try:
        for attempt in range(READ_ATTEMPTS):
            steps = checkpointer.all_steps()
            if not steps:
                raise MissingInput(f"no checkpoint in {checkpoint_dir}")
            chosen = steps[-1] if step is None else step
            if chosen not in steps:
                raise InputError(f"--step={chosen} is not in {checkpoint_dir} (steps: {steps})")
            try:
                model, params, tokenizer, tokenizer_path = _read(
                    checkpointer, chosen, config, workdir, mesh, model_config
                )
                break
            except Exception:  # noqa: BLE001 - re-raised unless a live run moved on while it was read
                if (
                    step is not None
                    or attempt + 1 == READ_ATTEMPTS
                    or not _superseded(checkpointer, chosen)
                ):
                    raise
    finally:
        checkpointer.close()
    return Restored(
        model=model, params=params, tokenizer=tokenizer, tokenizer_path=tokenizer_path, step=chosen
    )


def _superseded(checkpointer: Checkpointer, step: int, seconds: float = 10.0) -> bool:
    """Whether `step` is being deleted, or a newer step has been committed, within `seconds`:
    a live run's clean-up removes a step's folder while it may still be listed."""
    deadline = time.monotonic() + seconds
    while True:
        checkpointer.reload()
        now = checkpointer.all_steps()
        if step not in now or (now and max(now) > step):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _read(
    checkpointer: Checkpointer,
    step: int,
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh,
    cfg: ModelConfig,
):
    check_resumable(checkpointer.restore_config(step), config)
    recorded = checkpointer.restore_data(step).get("tokenizer")
    tokenizer_path = resolve_tokenizer(config.data.tokenizer, workdir, recorded)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab(tokenizer, config)
    model = CompressiveTransformer(cfg)
    abstract = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, cfg.segment_length), jnp.int32),
            init_memory(cfg, 1),
        )["params"]
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract,
        tree_param_sharding(mesh, abstract),
    )
    return model, checkpointer.restore_params(step, abstract), tokenizer, tokenizer_path
