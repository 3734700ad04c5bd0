"""Which checkpoints a config may restore: the rules change when the model changes, not when
orbax does, so they live apart from the checkpoint I/O (training and inference share them)."""

from __future__ import annotations

from typing import Any

from ctx.errors import UserError


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that reads fine but was made for another model or state shape."""


# Model fields that shape parameters: a checkpoint only restores into the same values.
PARAMETER_FIELDS = (
    "vocab_size",
    "n_layers",
    "d_model",
    "n_heads",
    "d_ff",
    "compression",
    "compression_rate",
    "dilation_rates",
    "layer_norm",
)

# Fields that shape the saved training state beyond the parameters: the memory [L, B, n_m, d] and
# [L, B, n_cm, d], and the data position (rows of B streams, segments of n_s tokens). Resuming
# training needs the same values; evaluation may change them.
STATE_FIELDS = (
    ("train", "batch_size"),
    ("model", "memory_length"),
    ("model", "compressed_length"),
    ("model", "segment_length"),
)


def check_resumable(saved: dict, config: Any) -> None:
    """A checkpoint restores only into a model whose parameter shapes are the same."""
    differing = [
        f"model.{f}: checkpoint {saved['model'][f]!r}, config {config.model[f]!r}"
        for f in PARAMETER_FIELDS
        if f in saved["model"] and _plain(saved["model"][f]) != _plain(config.model[f])
    ]
    if (saved["model"].get("compressed_length", 0) > 0) != (config.model.compressed_length > 0):
        # Compressed memory brings its own position projection and compression network.
        differing.append(
            f"model.compressed_length: checkpoint {saved['model']['compressed_length']}, config "
            f"{config.model.compressed_length} (zero and non-zero have different parameters)"
        )
    if differing:
        raise CheckpointMismatch(
            "the checkpoint's model differs in fields that shape parameters: "
            + "; ".join(differing)
            + ". Use the checkpoint's values or a new --workdir"
        )


def check_resumable_training(saved: dict, config: Any) -> None:
    """Training resumes only into the saved state's shapes: refused here in one line naming the
    fields, before orbax would fail on a good checkpoint and make it look damaged."""
    check_resumable(saved, config)
    differing = [
        (section, field)
        for section, field in STATE_FIELDS
        if field in saved.get(section, {}) and saved[section][field] != config[section][field]
    ]
    if differing:
        found = "; ".join(
            f"{s}.{f}: checkpoint {saved[s][f]!r}, config {config[s][f]!r}" for s, f in differing
        )
        fix = " ".join(f"--config.{s}.{f}={saved[s][f]}" for s, f in differing)
        raise CheckpointMismatch(
            f"the run's checkpoint holds memory and a data position of another shape "
            f"({found}); resume with {fix}, or start a new --workdir (evaluation may "
            "change these)"
        )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
