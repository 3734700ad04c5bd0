"""CompressiveTransformer: embed -> layers under nn.scan (memory on the scan axis) -> logits.

`apply(variables, tokens, memory, reset=..., deterministic=...)` is pure: it returns the
logits, the next Memory (stop-gradient-ed) and `aux` (compression loss and attention mass).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctx import losses
from ctx.attention import RelativeAttention, attention_mask
from ctx.compression import Compressor
from ctx.config import ModelConfig
from ctx.memory import Memory, append_compressed, fifo_update, reset_rows, update_masks

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """One layer: attention over [cmem; mem; x], MLP, then this layer's memory update."""

    cfg: ModelConfig
    deterministic: bool = True

    def _compress(self, attention: RelativeAttention, evicted_BND: jax.Array, q_BNHK: jax.Array,
                  probs_BHNT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Compress the evicted memories and compute the compression loss."""
        cfg = self.cfg
        evicted_BND = jax.lax.stop_gradient(evicted_BND)
        usage_BN = None
        if cfg.compression == "most_used":  # attention each evicted entry got, over heads and queries
            start = cfg.compressed_length
            usage_BN = probs_BHNT[..., start:start + cfg.segment_length].mean(axis=(1, 2))
        compressor = Compressor(cfg, name="compress")
        compressed_BKD = compressor(evicted_BND, jax.lax.stop_gradient(usage_BN) if usage_BN is not None else None)
        if cfg.compression_loss == "attention":
            keys_values = partial(attention.keys_values, stop_gradient=True)
            loss = losses.attention_reconstruction_loss(q_BNHK, evicted_BND, compressed_BKD, keys_values)
        elif cfg.compression_loss == "autoencoder":
            loss = losses.autoencoder_loss(evicted_BND, compressor.decode(compressed_BKD))
        else:
            loss = jnp.zeros((), jnp.float32)
        return jax.lax.stop_gradient(compressed_BKD), loss

    @nn.compact
    def __call__(self, x_BND: jax.Array, mem_BMD: jax.Array, cmem_BCD: jax.Array,
                 mask_B1NT: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg = self.cfg
        dropout = partial(nn.Dropout(cfg.dropout), deterministic=self.deterministic)
        ln_attention = nn.LayerNorm(dtype=cfg.dtype, name="ln_attention")
        ln_mlp = nn.LayerNorm(dtype=cfg.dtype, name="ln_mlp")
        attention = RelativeAttention(cfg, self.deterministic, name="attention")

        def mlp(y_BND):
            y_BNF = jax.nn.relu(nn.Dense(cfg.d_ff, dtype=cfg.dtype, name="mlp_in")(y_BND))
            return nn.Dense(cfg.d_model, dtype=cfg.dtype, name="mlp_out")(dropout(y_BNF))

        if cfg.layer_norm == "pre":
            attention_in_BND = ln_attention(x_BND)
            out_BND, probs_BHNT, q_BNHK = attention(attention_in_BND, mem_BMD, cmem_BCD, mask_B1NT)
            x_BND = x_BND + dropout(out_BND)
            x_BND = x_BND + dropout(mlp(ln_mlp(x_BND)))
        else:  # post-LN, the paper's Algorithm 1
            attention_in_BND = x_BND
            out_BND, probs_BHNT, q_BNHK = attention(attention_in_BND, mem_BMD, cmem_BCD, mask_B1NT)
            x_BND = ln_attention(x_BND + dropout(out_BND))
            x_BND = ln_mlp(x_BND + dropout(mlp(x_BND)))

        new_mem_BMD, evicted_BND = fifo_update(mem_BMD, jax.lax.stop_gradient(attention_in_BND))
        new_cmem_BCD, loss = cmem_BCD, jnp.zeros((), jnp.float32)
        if cfg.compresses:
            compressed_BKD, loss = self._compress(attention, evicted_BND, q_BNHK, probs_BHNT)
            new_cmem_BCD = append_compressed(cmem_BCD, compressed_BKD)
        C, M = cmem_BCD.shape[1], mem_BMD.shape[1]
        mass_BHNT = jax.lax.stop_gradient(probs_BHNT)
        attention_mass = jnp.stack([mass_BHNT[..., :C].sum(-1).mean(), mass_BHNT[..., C:C + M].sum(-1).mean(),
                                    mass_BHNT[..., C + M:].sum(-1).mean()])
        return x_BND, (new_mem_BMD, new_cmem_BCD, loss, attention_mass)


class CompressiveTransformer(nn.Module):
    """The Compressive Transformer LM (n_cm = 0: Transformer-XL; n_m = n_cm = 0: vanilla)."""

    config: Any  # config.model (ConfigDict) or a ModelConfig

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_config(self.config)

    @nn.compact
    def __call__(self, tokens_BN: jax.Array, memory: Memory, reset: jax.Array | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, Memory, dict[str, jax.Array]]:
        cfg = self.model_config
        if tokens_BN.ndim != 2 or tokens_BN.shape[1] != cfg.segment_length:
            raise ValueError(f"tokens must be int [batch, segment_length={cfg.segment_length}], "
                             f"got shape {tokens_BN.shape}")
        memory = reset_rows(memory, reset)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0), name="embed")
        x_BND = embed(tokens_BN).astype(cfg.dtype)
        x_BND = nn.Dropout(cfg.dropout)(x_BND, deterministic=deterministic)
        mask_B1NT = attention_mask(memory.mem_mask, memory.cmem_mask, cfg.segment_length)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                         in_axes=(0, 0, nn.broadcast), length=cfg.n_layers)(cfg, deterministic, name="layers")
        x_BND, (mem, cmem, compression_losses, attention_mass) = layers(x_BND, memory.mem, memory.cmem, mask_B1NT)

        if cfg.layer_norm == "pre":
            x_BND = nn.LayerNorm(dtype=cfg.dtype, name="ln_final")(x_BND)
        logits_BNV = nn.Dense(cfg.vocab_size, dtype=cfg.dtype, name="logits")(x_BND).astype(jnp.float32)
        mem_mask, cmem_mask = update_masks(memory, cfg)
        new_memory = Memory(mem=mem, cmem=cmem, mem_mask=mem_mask, cmem_mask=cmem_mask)
        aux = {
            "compression_loss": compression_losses.mean(),
            "compression_loss_per_layer": compression_losses,
            "attention_mass": attention_mass,  # [L, 3]: mass on (cmem, mem, segment)
        }
        return logits_BNV, jax.lax.stop_gradient(new_memory), aux
