"""The compiled pieces of a training run: TrainState, and the jitted chunk of segment steps.

Each segment is one optimizer step (truncated back-propagation: the memory entering a
segment is constant); one jitted call scans G segments with the carry (TrainState, Memory,
rng). The loop around it (data, checkpoints, validation) is ctx.train; ctx.aot compiles the
same chunk ahead of time for other machines.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ctx.config import ModelConfig, require_resolved
from ctx.nn import losses
from ctx.nn.memory import Memory, init_memory
from ctx.nn.transformer import CompressiveTransformer
from ctx.optim import learning_rate, make_optimizer
from ctx.sharding import (
    check_batch_fits,
    make_mesh,
    memory_shardings,
    replicated,
    tracing_on,
    tree_param_sharding,
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class Trainer:
    """The compiled pieces of one run: model, optimizer, mesh, shardings, the chunk step."""

    def __init__(
        self, config: ml_collections.ConfigDict, model_config: ModelConfig, mesh=None
    ) -> None:
        """`config`: the run's train and mesh sections; `model_config`: its model, converted and
        resolved once where the run started (and self-checked there), for the mesh's devices."""
        self.config = config
        self.model_config = require_resolved(model_config, "Trainer")
        self.mesh = mesh or make_mesh(config.mesh)
        self.model = CompressiveTransformer(self.model_config)
        self.tx = make_optimizer(config.train)
        check_batch_fits(config.train.batch_size, self.mesh)
        self.memory_sharding = memory_shardings(self.mesh)
        abstract = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
        self.state_sharding = tree_param_sharding(self.mesh, abstract)
        self.init_state = jax.jit(self._init_state, out_shardings=self.state_sharding)
        self.train_chunk = jax.jit(
            self._train_chunk,
            donate_argnums=(0, 1, 2),
            out_shardings=(
                self.state_sharding,
                self.memory_sharding,
                replicated(self.mesh),
                replicated(self.mesh),
            ),
        )

    def _init_state(self, rng: jax.Array) -> TrainState:
        cfg = self.model_config
        tokens = jnp.zeros((1, cfg.segment_length), jnp.int32)
        params = self.model.init(rng, tokens, init_memory(cfg, 1))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
        )

    def init_memory(self) -> Memory:
        return jax.device_put(
            init_memory(self.model_config, self.config.train.batch_size), self.memory_sharding
        )

    def abstract_checkpoint(self) -> dict[str, Any]:
        """Shapes and shardings of the checkpointed device state, for restoring anywhere."""

        def with_sharding(tree, shardings):
            return jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
            )

        state = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
        memory = jax.eval_shape(
            lambda: init_memory(self.model_config, self.config.train.batch_size)
        )
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(self.mesh))
        return {
            "train_state": with_sharding(state, self.state_sharding),
            "memory": with_sharding(memory, self.memory_sharding),
            "rng": rng,
        }

    def _segment_step(self, carry, batch):
        state, memory, rng = carry
        rng, dropout_rng = jax.random.split(rng)

        def loss_fn(params):
            logits, new_memory, aux = self.model.apply(
                {"params": params},
                batch["tokens"],
                memory,
                reset=batch["reset"],
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )
            lm_loss = losses.weighted_mean_nll(logits, batch["targets"], batch["weights"])
            # The two losses reach disjoint parameters, so their sum trains each on its own.
            return lm_loss + aux.compression_loss, (lm_loss, new_memory, aux)

        grads, (lm_loss, new_memory, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": lm_loss,
            "compression_loss": aux.compression_loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": learning_rate(self.config.train, self.config.train.peak_lr)(
                opt_state.gradient_step
            ),
            "target_tokens": batch["weights"].sum(),
        }
        if aux.attention_mass is not None:
            mass = aux.attention_mass.mean(axis=0)
            metrics.update(
                attention_mass_compressed=mass[0],
                attention_mass_memory=mass[1],
                attention_mass_segment=mass[2],
            )
        return (
            TrainState(step=state.step + 1, params=params, opt_state=opt_state),
            new_memory,
            rng,
        ), metrics

    def _train_chunk(
        self, state: TrainState, memory: Memory, rng: jax.Array, chunk: dict[str, jax.Array]
    ):
        with tracing_on(self.mesh):
            (state, memory, rng), metrics = jax.lax.scan(
                self._segment_step, (state, memory, rng), chunk
            )
        return state, memory, rng, metrics
