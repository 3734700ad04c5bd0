"""The paper's optimizer (paper §5; docs/paper-notes.md §6) with the compression network on its own branch.

Main network: Adam, linear warmup init_lr -> peak_lr, cosine decay to end_lr, global-norm
clipping. The `compress` parameters get their own Adam and clip (optax.multi_transform), so
the compression loss never changes the main network's clipping scale. Around both:
optax.MultiSteps accumulates `accumulate_every` segments per update once
`accumulate_after` updates are done (the paper's "update every 4 steps after 60k").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate(train_cfg: Any, peak: float) -> optax.Schedule:
    warmup = optax.linear_schedule(train_cfg.init_lr, peak, max(train_cfg.warmup_steps, 1))
    decay = optax.cosine_decay_schedule(
        peak, max(train_cfg.decay_steps, 1), alpha=train_cfg.end_lr / peak
    )
    return optax.join_schedules([warmup, decay], [train_cfg.warmup_steps])


def is_compress_path(path) -> bool:
    return any(getattr(k, "key", None) == "compress" for k in path)


def param_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "compress" if is_compress_path(p) else "main", params
    )


def _adam(train_cfg: Any, schedule: optax.Schedule, clip: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(
            schedule,
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
        ),
    )


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
    branches = optax.multi_transform(
        {
            "main": _adam(
                train_cfg, learning_rate(train_cfg, train_cfg.peak_lr), train_cfg.grad_clip
            ),
            "compress": _adam(
                train_cfg,
                learning_rate(train_cfg, train_cfg.compress_peak_lr),
                train_cfg.compress_grad_clip,
            ),
        },
        param_labels,
    )
    after, every = train_cfg.accumulate_after, train_cfg.accumulate_every

    def every_k(update_count):
        return jnp.where(update_count >= after, every, 1)

    return optax.MultiSteps(branches, every_k_schedule=every_k)
