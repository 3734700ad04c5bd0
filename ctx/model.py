"""CompressiveTransformer: embed -> layers under nn.scan (memory on the scan axis) -> logits.

`apply(variables, tokens, memory, reset=..., deterministic=...)` is pure: it returns the
logits, the next Memory (stop-gradient-ed) and `aux` (compression loss and attention mass).

Shape letters, in names like `x_BND` (as in nanodo) and throughout ctx, each with one meaning:
  L layers            B batch rows (streams)     N segment length n_s
  M memory n_m        C compressed memory n_cm   E compressed slots made per segment, n_s / c
  S memory slots C+M  T keys C+M+N               P relative positions of a position table
  D d_model           H heads                    K head dim d_model / H
  F d_ff              V vocabulary               G segments per jitted call (train.segments_per_call)
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ctx import losses
from ctx.attention import RelativeAttention, attention_mask, head_major
from ctx.compression import Compressor
from ctx.config import ModelConfig
from ctx.memory import Memory, advance_memory_kv, fifo_update, reset_rows, shift_in, update_masks
from ctx.ops import LayerNorm, relu

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """One layer: attention over [cmem; mem; x], MLP, then this layer's memory update."""

    cfg: ModelConfig
    deterministic: bool = True
    mode: str = "segment"  # or 'prefill' / 'decode' (sampling with cached keys and values)

    def _compress(self, attention: RelativeAttention, evicted_BND: jax.Array, probs_BHNT: jax.Array,
                  qkv: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Compress the evicted memories and compute the compression loss. `qkv` is the
        attention's head-major (queries, keys, values): the evicted entries are rows
        n_cm .. n_cm+n_s of its [cmem; mem; segment] keys and values, so the loss reuses them."""
        cfg = self.cfg
        evicted_BND = jax.lax.stop_gradient(evicted_BND)
        usage_BN = None
        if cfg.compression == "most_used":  # attention each evicted entry got, over heads and queries
            start = cfg.compressed_length
            usage_BN = probs_BHNT[..., start:start + cfg.segment_length].mean(axis=(1, 2))
        compressor = Compressor(cfg, name="compress")
        compressed_BED = compressor(evicted_BND, jax.lax.stop_gradient(usage_BN) if usage_BN is not None else None)
        if cfg.compression_loss == "attention":
            q_HBNK, k_HBTK, v_HBTK = qkv
            evicted = slice(cfg.compressed_length, cfg.compressed_length + cfg.segment_length)
            compressed_kv = map(head_major, attention.keys_values(compressed_BED, stop_gradient=True))
            loss = losses.attention_reconstruction_loss(q_HBNK, (k_HBTK[:, :, evicted], v_HBTK[:, :, evicted]),
                                                        tuple(compressed_kv))
        elif cfg.compression_loss == "autoencoder":
            loss = losses.autoencoder_loss(evicted_BND, compressor.decode(compressed_BED))
        else:
            loss = jnp.zeros((), jnp.float32)
        return jax.lax.stop_gradient(compressed_BED), loss

    @nn.compact
    def __call__(self, x_BND: jax.Array, *inputs: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """mode 'segment': (x, mem, cmem, mask) -> x, (mem, cmem, compression loss, attention mass);
        given also the memories' keys and values (x, mem, cmem, mask, k, v), it uses them and
        returns them advanced as well: (..., attention mass, k, v).
        mode 'prefill': (_, mem, cmem) -> _, (keys, values, position tables) for sampling.
        mode 'decode': (x [B,1,d], keys, values, tables..., mask, position) -> x, (keys, values).
        """
        cfg = self.cfg
        dropout = partial(nn.Dropout(cfg.dropout), deterministic=self.deterministic)
        ln_attention = LayerNorm(dtype=cfg.dtype, name="ln_attention")
        ln_mlp = LayerNorm(dtype=cfg.dtype, name="ln_mlp")
        attention = RelativeAttention(cfg, self.deterministic, name="attention")

        def mlp(y_BND):
            y_BNF = relu(nn.Dense(cfg.d_ff, dtype=cfg.dtype, name="mlp_in")(y_BND))
            return nn.Dense(cfg.d_model, dtype=cfg.dtype, name="mlp_out")(dropout(y_BNF))

        def residual(x, attend):
            """The layer around an attention call; returns (x, attention input, attend's output)."""
            if cfg.layer_norm == "pre":
                attention_in = ln_attention(x)
                out, *extra = attend(attention_in)
                x = x + dropout(out)
                return x + dropout(mlp(ln_mlp(x))), attention_in, extra
            out, *extra = attend(x)  # post-LN, the paper's Algorithm 1: attention sees the residual
            y = ln_attention(x + dropout(out))
            return ln_mlp(y + dropout(mlp(y))), x, extra

        if self.mode == "prefill":
            mem_BMD, cmem_BCD = inputs
            k, v = attention.keys_values(jnp.concatenate([cmem_BCD, mem_BMD], axis=1).astype(cfg.dtype))
            r, rc = attention.position_tables(cfg.memory_length, cfg.compressed_length)
            rc = jnp.zeros((0,) + r.shape[1:], r.dtype) if rc is None else rc
            return x_BND, (k, v, r, rc)
        if self.mode == "decode":
            k, v, r, rc, mask_B1T, position = inputs
            x_BND, _, (k, v) = residual(x_BND, lambda a: attention.decode(
                a, k, v, r, rc, mask_B1T, position, cfg.compressed_length, cfg.memory_length))
            return x_BND, (k, v)

        mem_BMD, cmem_BCD, mask_B1NT, *memory_kv = inputs
        x_BND, attention_in_BND, (probs_BHNT, qkv) = residual(
            x_BND, lambda a: attention(a, mem_BMD, cmem_BCD, mask_B1NT, tuple(memory_kv) or None))
        new_mem_BMD, evicted_BND = fifo_update(mem_BMD, jax.lax.stop_gradient(attention_in_BND))
        new_cmem_BCD, loss, compressed_BED = cmem_BCD, jnp.zeros((), jnp.float32), None
        if cfg.compresses:
            compressed_BED, loss = self._compress(attention, evicted_BND, probs_BHNT, qkv)
            new_cmem_BCD = shift_in(cmem_BCD, compressed_BED)
        C, M = cmem_BCD.shape[1], mem_BMD.shape[1]
        if memory_kv:
            compressed_kv = (map(head_major, attention.keys_values(compressed_BED)) if compressed_BED is not None
                             else (None, None))
            memory_kv = [advance_memory_kv(kv, full[:, :, C + M:], new, C)
                         for kv, full, new in zip(memory_kv, qkv[1:], compressed_kv)]
        mass_BHNT = jax.lax.stop_gradient(probs_BHNT)
        self.sow("intermediates", "attention_probs", mass_BHNT)
        attention_mass = jnp.stack([mass_BHNT[..., :C].sum(-1).mean(), mass_BHNT[..., C:C + M].sum(-1).mean(),
                                    mass_BHNT[..., C + M:].sum(-1).mean()])
        return x_BND, (new_mem_BMD, new_cmem_BCD, loss, attention_mass, *memory_kv)


class Embedding(nn.Module):
    """Token embedding. Small vocabularies embed by a one-hot matmul, whose backward is a GEMM
    instead of a scatter-add (much faster on CPUs and TPUs); large ones gather."""

    cfg: ModelConfig
    one_hot_below: int = 4096

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        table = self.param("embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model))
        table = table.astype(cfg.dtype)
        if cfg.vocab_size < self.one_hot_below:
            return jax.nn.one_hot(tokens, cfg.vocab_size, dtype=cfg.dtype) @ table
        return jnp.take(table, tokens, axis=0)


class CompressiveTransformer(nn.Module):
    """The Compressive Transformer LM (n_cm = 0: Transformer-XL; n_m = n_cm = 0: vanilla)."""

    config: Any  # config.model (ConfigDict) or a ModelConfig

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_config(self.config)

    def _layers(self, cfg: ModelConfig, deterministic: bool, mode: str, in_axes: tuple) -> nn.Module:
        block = Block
        if cfg.remat != "none" and mode == "segment":
            # A fully unrolled stack puts forward and backward in one loop-free body, where XLA
            # would merge the recomputation back into the forward pass: remat needs its barriers
            # there. A scanned stack keeps them apart by the loop, and barriers would only cost.
            unrolled = cfg.layers_per_scan_iteration >= cfg.n_layers
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=unrolled)
        return nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                       split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                       length=cfg.n_layers, unroll=cfg.layers_per_scan_iteration)(
                           cfg, deterministic, mode, name="layers")

    def _embed(self, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
        return Embedding(cfg, name="embed")(tokens)

    def _logits(self, cfg: ModelConfig, x_BND: jax.Array) -> jax.Array:
        if cfg.layer_norm == "pre":
            x_BND = LayerNorm(dtype=cfg.dtype, name="ln_final")(x_BND)
        return nn.Dense(cfg.vocab_size, dtype=cfg.dtype, name="logits")(x_BND).astype(jnp.float32)

    @nn.compact
    def __call__(self, tokens_BN: jax.Array | None, memory: Memory, reset: jax.Array | None = None,
                 deterministic: bool = True, *, cache: "DecodeCache | None" = None, prefill: bool = False,
                 memory_kv: tuple[jax.Array, jax.Array] | None = None):
        """One segment: (logits [B,n_s,V], next memory, aux).

        `memory_kv`: the memories' keys and values [L,H,B,n_cm+n_m,K] (`memory_keys_values`),
        used instead of projecting the memories again; aux["memory_kv"] holds the next
        segment's. Evaluation carries them (parameters are fixed there); training cannot.

        For sampling (ctx.sample): `prefill=True` returns a DecodeCache of the memory's keys and
        values; with `cache`, `tokens_BN` is one token per row [B,1] at offset `cache.position`
        of the current segment, and the result is (logits [B,1,V], updated cache).
        """
        cfg = self.model_config
        if prefill:
            return self._prefill(cfg, memory)
        if cache is not None:
            return self._decode(cfg, tokens_BN, cache)
        if tokens_BN.ndim != 2 or tokens_BN.shape[1] != cfg.segment_length:
            raise ValueError(f"tokens must be int [batch, segment_length={cfg.segment_length}], "
                             f"got shape {tokens_BN.shape}")
        memory = reset_rows(memory, reset)
        kv = () if memory_kv is None else tuple(memory_kv)
        if kv and reset is not None:  # as reset_rows zeroes the memories they were projected from
            keep = ~reset.astype(bool)[None, None, :, None, None]
            kv = tuple(jnp.where(keep, t, jnp.zeros((), t.dtype)) for t in kv)
        x_BND = nn.Dropout(cfg.dropout)(self._embed(cfg, tokens_BN), deterministic=deterministic)
        mask_B1NT = attention_mask(memory.mem_mask, memory.cmem_mask, cfg.segment_length)
        layers = self._layers(cfg, deterministic, "segment", (0, 0, nn.broadcast) + (0,) * len(kv))
        x_BND, (mem, cmem, compression_losses, attention_mass, *kv) = layers(
            x_BND, memory.mem, memory.cmem, mask_B1NT, *kv)
        logits_BNV = self._logits(cfg, x_BND)
        mem_mask, cmem_mask = update_masks(memory, cfg)
        new_memory = Memory(mem=mem, cmem=cmem, mem_mask=mem_mask, cmem_mask=cmem_mask)
        aux = {
            "compression_loss": compression_losses.mean(),
            "compression_loss_per_layer": compression_losses,
            "attention_mass": attention_mass,  # [L, 3]: mass on (cmem, mem, segment)
        }
        if kv:
            aux["memory_kv"] = tuple(kv)
        return logits_BNV, jax.lax.stop_gradient(new_memory), aux

    def _prefill(self, cfg: ModelConfig, memory: Memory) -> "DecodeCache":
        layers = self._layers(cfg, True, "prefill", (0, 0))
        _, (k, v, r, rc) = layers(jnp.zeros(()), memory.mem, memory.cmem)
        N = cfg.segment_length
        pad = jnp.zeros(k.shape[:2] + (N,) + k.shape[3:], k.dtype)
        return DecodeCache(k=jnp.concatenate([k, pad], axis=2), v=jnp.concatenate([v, pad], axis=2), r=r, rc=rc,
                           memory_mask=jnp.concatenate([memory.cmem_mask, memory.mem_mask], axis=1),
                           position=jnp.zeros((), jnp.int32))

    def _decode(self, cfg: ModelConfig, token_B1: jax.Array, cache: "DecodeCache"):
        N = cfg.segment_length
        segment_mask = jnp.broadcast_to(jnp.arange(N) <= cache.position, (cache.memory_mask.shape[0], N))
        mask_B1T = jnp.concatenate([cache.memory_mask, segment_mask], axis=1)[:, None]
        layers = self._layers(cfg, True, "decode", (0, 0, 0, 0, nn.broadcast, nn.broadcast))
        x_B1D, (k, v) = layers(self._embed(cfg, token_B1), cache.k, cache.v, cache.r, cache.rc, mask_B1T,
                               cache.position)
        return self._logits(cfg, x_B1D), cache.replace(k=k, v=v, position=cache.position + 1)


def memory_keys_values(cache: "DecodeCache") -> tuple[jax.Array, jax.Array]:
    """The memories' keys and values [L,H,B,n_cm+n_m,K] of a prefill cache, as `memory_kv` takes them."""
    S = cache.memory_mask.shape[1]
    return tuple(jnp.transpose(t[:, :, :S], (0, 3, 1, 2, 4)) for t in (cache.k, cache.v))


@flax.struct.dataclass
class DecodeCache:
    """Per-layer keys/values of [cmem; mem; current segment] and projected position tables,
    so sampling computes each token once instead of re-running its segment."""

    k: jax.Array  # [L, B, n_cm + n_m + n_s, H, K]
    v: jax.Array
    r: jax.Array  # [L, n_m + n_s, H, K]
    rc: jax.Array  # [L, n_cm + n_s, H, K] (empty without compressed memory)
    memory_mask: jax.Array  # [B, n_cm + n_m]
    position: jax.Array  # offset of the next token in the current segment
