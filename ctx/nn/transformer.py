"""CompressiveTransformer: embed -> layers under nn.scan (memory on the scan axis) -> logits.

`apply(variables, tokens, memory, reset=..., deterministic=...)` is pure: it returns the
logits, the next Memory (stop-gradient-ed) and a SegmentAux (compression loss, attention mass);
`CompressiveTransformer`'s docstring lists the other entry points (sampling, carried keys/values).

Shape letters, in names like `x_BND` (as in nanodo) and throughout ctx, each with one meaning:
  L layers            B batch rows (streams)     N segment length n_s
  M memory n_m        C compressed memory n_cm   E compressed slots made per segment, n_s / c
  S memory slots C+M  T keys C+M+N               P relative positions of a position table
  D d_model           H heads                    K head dim d_model / H
  F d_ff              V vocabulary               G segments per jitted call (train.segments_per_call)
  R position tables (1, or 2 with compressed memory)  W kernel width of a compression conv (c, or 2)
"""

from __future__ import annotations

from functools import partial
from typing import Callable, TypeVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ctx.config import ModelConfig, require_resolved
from ctx.errors import InputError
from ctx.nn import losses, pallas_reconstruction
from ctx.nn.attention import AttentionOut, LayerCache, RelativeAttention, attention_mask, head_major
from ctx.nn.compression import Compressor
from ctx.nn.memory import (
    LayerMemory,
    Memory,
    advance_memory_kv,
    fifo_update,
    reset_rows,
    shift_in,
    update_masks,
)
from ctx.nn.ops import LayerNorm, relu
from ctx.nn.pallas_launch import KERNEL_INPUTS, KERNEL_OUTPUTS

Rest = TypeVar("Rest")

REMAT_POLICIES = {
    "full": None,
    # Matmul outputs, and the fused attention kernels' outputs (else their forward runs twice)
    # and inputs (else their head-major copies are made again).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUTS, KERNEL_INPUTS),
    ),
}


@flax.struct.dataclass
class SegmentAux:
    """What a segment reports besides its logits and memory: per layer (a scalar and [3] inside
    one layer's step; [L] and [L, 3] once the layer scan has stacked them)."""

    compression_loss_per_layer: jax.Array
    # Mean attention mass on KEY_KINDS (compressed, memory, segment); None under
    # model.attention_impl='cudnn', whose kernel returns no such statistic.
    attention_mass: jax.Array | None

    @property
    def compression_loss(self) -> jax.Array:
        """The auxiliary loss training adds: the mean over layers."""
        return self.compression_loss_per_layer.mean()


@flax.struct.dataclass
class DecodeCache:
    """What sampling carries from token to token, so each token is computed once instead of
    re-running its segment."""

    layers: LayerCache
    memory_mask: jax.Array  # [B, n_cm + n_m]
    position: jax.Array  # offset of the next token in the current segment


class Block(nn.Module):
    """One layer: attention over [cmem; mem; x], MLP, then this layer's memory update.

    Its three steps take (x, this layer's slice of a stacked pytree, inputs shared by all
    layers), the form the layer scan maps over."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.ln_attention = LayerNorm(dtype=cfg.dtype)
        self.ln_mlp = LayerNorm(dtype=cfg.dtype)
        self.attention = RelativeAttention(cfg)
        self.mlp_in = nn.Dense(cfg.d_ff, dtype=cfg.dtype)
        self.mlp_out = nn.Dense(cfg.d_model, dtype=cfg.dtype)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.compresses:
            self.compress = Compressor(cfg)

    def _residual(
        self,
        x_BND: jax.Array,
        attend: Callable[[jax.Array], tuple[jax.Array, Rest]],
        deterministic: bool,
    ) -> tuple[jax.Array, jax.Array, Rest]:
        """The layer around an attention call `attend(input) -> (output, rest)`; returns
        (x, the attention's input, rest)."""
        dropout = partial(self.dropout, deterministic=deterministic)

        def mlp(y_BND):
            return self.mlp_out(dropout(relu(self.mlp_in(y_BND))))

        if self.cfg.layer_norm == "pre":
            attention_in = self.ln_attention(x_BND)
            out, rest = attend(attention_in)
            x_BND = x_BND + dropout(out)
            return x_BND + dropout(mlp(self.ln_mlp(x_BND))), attention_in, rest
        out, rest = attend(x_BND)  # post-LN, the paper's Algorithm 1: attention sees the residual
        y = self.ln_attention(x_BND + dropout(out))
        return self.ln_mlp(y + dropout(mlp(y))), x_BND, rest

    def _compress(
        self, evicted_BND: jax.Array, attended: AttentionOut
    ) -> tuple[jax.Array, jax.Array]:
        """Compress the evicted memories and compute the compression loss. `attended.usage`:
        the attention each evicted entry got, over heads and queries (for 'most_used'). The
        evicted entries are rows n_cm .. n_cm+n_s of the attention's [cmem; mem; segment] keys
        and values, so the loss reuses them."""
        cfg = self.cfg
        evicted_BND = jax.lax.stop_gradient(evicted_BND)
        compressed_BED = self.compress(evicted_BND, attended.usage)
        if cfg.compression_loss == "attention":
            C, N = cfg.compressed_length, cfg.segment_length
            compressed_kv = tuple(
                map(head_major, self.attention.keys_values(compressed_BED, stop_gradient=True))
            )
            if cfg.fused_reconstruction_loss:
                loss = pallas_reconstruction.reconstruction_loss(
                    attended.queries, attended.keys, attended.values, C, N, *compressed_kv
                )
            else:
                loss = losses.attention_reconstruction_loss(
                    losses.reconstruction_difference(
                        attended.queries, attended.keys, attended.values, C, N, *compressed_kv
                    )
                )
        elif cfg.compression_loss == "autoencoder":
            loss = losses.autoencoder_loss(evicted_BND, self.compress.decode(compressed_BED))
        else:
            loss = jnp.zeros((), jnp.float32)
        return jax.lax.stop_gradient(compressed_BED), loss

    def segment(
        self, x_BND: jax.Array, layer: LayerMemory, mask_B1NT: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, tuple[LayerMemory, SegmentAux]]:
        """One segment through this layer: (x, (this layer's next memory, its aux)). Carried
        keys/values (`layer.keys`) are used instead of projecting the memories, and advanced."""
        cfg = self.cfg
        carried = None if layer.keys is None else (layer.keys, layer.values)

        def attend(a_BND):
            attended = self.attention(
                a_BND, layer.mem, layer.cmem, mask_B1NT, carried, deterministic
            )
            return attended.out, attended

        x_BND, attention_in_BND, attended = self._residual(x_BND, attend, deterministic)
        new_mem_BMD, evicted_BND = fifo_update(layer.mem, jax.lax.stop_gradient(attention_in_BND))
        new_cmem_BCD, loss, compressed_BED = layer.cmem, jnp.zeros((), jnp.float32), None
        if cfg.compresses:
            compressed_BED, loss = self._compress(evicted_BND, attended)
            new_cmem_BCD = shift_in(layer.cmem, compressed_BED)
        C, M = layer.cmem.shape[1], layer.mem.shape[1]
        next_layer = LayerMemory(mem=new_mem_BMD, cmem=new_cmem_BCD)
        if carried is not None:
            compressed_kv = (
                (None, None)
                if compressed_BED is None
                else map(head_major, self.attention.keys_values(compressed_BED))
            )
            keys, values = (
                advance_memory_kv(kv, full[:, :, C + M :], new, C)
                for kv, full, new in zip(carried, (attended.keys, attended.values), compressed_kv)
            )
            next_layer = next_layer.replace(keys=keys, values=values)
        if attended.probs is not None:  # the fused kernels form none
            self.sow("intermediates", "attention_probs", jax.lax.stop_gradient(attended.probs))
        return x_BND, (
            next_layer,
            SegmentAux(compression_loss_per_layer=loss, attention_mass=attended.mass),
        )

    def memory_keys_values(self, carry: None, layer: LayerMemory) -> tuple[None, LayerMemory]:
        """This layer's memories with their keys and values."""
        keys, values = self.attention.memory_keys_values(layer.mem, layer.cmem)
        return carry, layer.replace(keys=keys, values=values)

    def prefill(self, carry: None, layer: LayerMemory) -> tuple[None, LayerCache]:
        """This layer's decode cache for a new segment after memories `layer`."""
        cfg = self.cfg
        _, with_kv = self.memory_keys_values(carry, layer)
        pad_HBNK = jnp.zeros(
            with_kv.keys.shape[:2] + (cfg.segment_length,) + with_kv.keys.shape[3:],
            with_kv.keys.dtype,
        )
        pos_table, cmem_pos_table = self.attention.position_tables()
        return carry, LayerCache(
            keys=jnp.concatenate([with_kv.keys, pad_HBNK], axis=2),
            values=jnp.concatenate([with_kv.values, pad_HBNK], axis=2),
            pos_table=pos_table,
            cmem_pos_table=cmem_pos_table,
        )

    def decode(
        self, x_B1D: jax.Array, layer: LayerCache, shared: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, LayerCache]:
        """One token through this layer; `shared` is (mask [B,1,T], the token's offset in its segment)."""
        mask_B1T, position = shared
        x_B1D, _, layer = self._residual(
            x_B1D, lambda a: self.attention.decode(a, layer, mask_B1T, position), deterministic=True
        )
        return x_B1D, layer


def layer_stack(cfg: ModelConfig) -> type[nn.Module]:
    """Block scanned over the layers: each step maps over its stacked per-layer pytree (axis 0)
    and broadcasts the rest; parameters are stacked on axis 0."""
    block = Block
    if cfg.remat != "none":
        # A fully unrolled stack puts forward and backward in one loop-free body, where XLA
        # would merge the recomputation back into the forward pass: remat needs its barriers
        # there. A scanned stack keeps them apart by the loop, and barriers would only cost.
        unrolled = cfg.layers_per_scan_iteration >= cfg.n_layers
        block = nn.remat(
            Block,
            policy=REMAT_POLICIES[cfg.remat],
            prevent_cse=unrolled,
            static_argnums=(4,),
            methods=["segment"],
        )  # (self, x, layer, mask, deterministic)
    scan = dict(
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        length=cfg.n_layers,
        unroll=cfg.layers_per_scan_iteration,
    )
    return nn.scan(
        block,
        methods={
            "segment": dict(scan, in_axes=(0, nn.broadcast, nn.broadcast)),
            "memory_keys_values": dict(scan, in_axes=0),
            "prefill": dict(scan, in_axes=0),
            "decode": dict(scan, in_axes=(0, nn.broadcast)),
        },
    )


# Vocabularies smaller than this embed by a one-hot matmul (bytes, small BPE); larger ones gather.
ONE_HOT_EMBEDDING_BELOW = 4096


class Embedding(nn.Module):
    """Token embedding. Small vocabularies embed by a one-hot matmul, whose backward is a GEMM
    instead of a scatter-add (much faster on CPUs and TPUs); large ones gather."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        table = self.param("embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model))
        table = table.astype(cfg.dtype)
        if cfg.vocab_size < ONE_HOT_EMBEDDING_BELOW:
            return jax.nn.one_hot(tokens, cfg.vocab_size, dtype=cfg.dtype) @ table
        return jnp.take(table, tokens, axis=0)


class CompressiveTransformer(nn.Module):
    """The Compressive Transformer LM (n_cm = 0: Transformer-XL; n_m = n_cm = 0: vanilla).

    Entry points, each `model.apply(variables, ..., method=...)` on small pytrees:
      __call__ (the default)   one training/evaluation segment -> (logits, next Memory, SegmentAux)
      with_memory_keys_values  Memory -> the same Memory carrying its keys and values
      prefill                  Memory -> DecodeCache for sampling the segment after it
      decode                   one token per row and a DecodeCache -> (logits, next DecodeCache)
    """

    config: ModelConfig  # ctx.ModelConfig.from_config(cfg.model), with attention_impl resolved

    def setup(self) -> None:
        cfg = require_resolved(self.config, "CompressiveTransformer")
        self.embed = Embedding(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = layer_stack(cfg)(cfg)
        if cfg.layer_norm == "pre":
            self.ln_final = LayerNorm(dtype=cfg.dtype)
        self.logits = nn.Dense(cfg.vocab_size, dtype=cfg.dtype)

    def _logits(self, x_BND: jax.Array) -> jax.Array:
        if self.config.layer_norm == "pre":
            x_BND = self.ln_final(x_BND)
        return self.logits(x_BND).astype(jnp.float32)

    def __call__(
        self,
        tokens_BN: jax.Array,
        memory: Memory,
        reset: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, Memory, SegmentAux]:
        """One segment: (logits [B,n_s,V], next memory, aux), rows in `reset` starting afresh.

        A memory that carries its keys and values (`with_memory_keys_values`) is read without
        projecting the memories again, and the next one carries them too: evaluation does
        this (parameters are fixed there); training cannot."""
        cfg = self.config
        if tokens_BN.ndim != 2 or tokens_BN.shape[1] != cfg.segment_length:
            raise InputError(
                f"tokens must be int [batch, segment_length={cfg.segment_length}], "
                f"got shape {tokens_BN.shape}"
            )
        memory = reset_rows(memory, reset)
        x_BND = self.embed_dropout(self.embed(tokens_BN), deterministic=deterministic)
        mask_B1NT = attention_mask(memory.mem_mask, memory.cmem_mask, cfg.segment_length)
        x_BND, (layers, aux) = self.layers.segment(x_BND, memory.layers, mask_B1NT, deterministic)
        mem_mask, cmem_mask = update_masks(memory, cfg)
        new_memory = memory.with_layers(layers).replace(mem_mask=mem_mask, cmem_mask=cmem_mask)
        return self._logits(x_BND), jax.lax.stop_gradient(new_memory), aux

    def with_memory_keys_values(self, memory: Memory) -> Memory:
        """`memory` with the keys and values [L,H,B,n_cm+n_m,K] of its memories."""
        _, layers = self.layers.memory_keys_values(None, memory.layers)
        return memory.with_layers(layers)

    def prefill(self, memory: Memory) -> DecodeCache:
        """The decode cache for sampling the segment that follows `memory`."""
        _, layers = self.layers.prefill(None, memory.without_keys_values().layers)
        return DecodeCache(
            layers=layers,
            memory_mask=jnp.concatenate([memory.cmem_mask, memory.mem_mask], axis=1),
            position=jnp.zeros((), jnp.int32),
        )

    def decode(self, token_B1: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """One token per row [B,1] at offset `cache.position` of the current segment:
        (logits [B,1,V], the cache with its keys and values)."""
        N = self.config.segment_length
        segment_mask = jnp.broadcast_to(
            jnp.arange(N) <= cache.position, (cache.memory_mask.shape[0], N)
        )
        mask_B1T = jnp.concatenate([cache.memory_mask, segment_mask], axis=1)[:, None]
        x_B1D, layers = self.layers.decode(
            self.embed(token_B1), cache.layers, (mask_B1T, cache.position)
        )
        return self._logits(x_B1D), cache.replace(layers=layers, position=cache.position + 1)
