"""The Memory pytree: per-layer FIFO memory and compressed memory with validity masks.

Memory is pure data threaded through jitted calls. Rows are independent streams:
`reset_rows` empties the rows that start a new document, and `update_masks` advances the
validity masks exactly as the per-layer FIFO update (`fifo_update`) advances the contents.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ctx.config import ModelConfig

# What a segment's attention reads, in key order: compressed memory, memory, the segment itself
# (the order of every per-kind statistic, e.g. aux["attention_mass"][..., k]).
KEY_KINDS = ("compressed", "memory", "segment")


@flax.struct.dataclass
class Memory:
    """mem [L,B,n_m,d] and cmem [L,B,n_cm,d], oldest first; masks say which slots hold data."""

    mem: jax.Array
    cmem: jax.Array
    mem_mask: jax.Array  # bool [B, n_m]
    cmem_mask: jax.Array  # bool [B, n_cm]

    @property
    def batch_size(self) -> int:
        return self.mem_mask.shape[0]


def init_memory(config: Any, batch_size: int, dtype: Any = None) -> Memory:
    """Empty memory for `batch_size` streams (zeros, every slot invalid)."""
    cfg = ModelConfig.from_config(config)
    dtype = dtype or jnp.dtype(cfg.dtype)
    L, d = cfg.n_layers, cfg.d_model
    return Memory(
        mem=jnp.zeros((L, batch_size, cfg.memory_length, d), dtype),
        cmem=jnp.zeros((L, batch_size, cfg.compressed_length, d), dtype),
        mem_mask=jnp.zeros((batch_size, cfg.memory_length), bool),
        cmem_mask=jnp.zeros((batch_size, cfg.compressed_length), bool),
    )


def reset_rows(memory: Memory, reset: jax.Array | None) -> Memory:
    """Clear (zero and invalidate) the rows where `reset[B]` is true; others are untouched."""
    if reset is None:
        return memory
    keep = ~reset.astype(bool)
    keep_LB = keep[None, :, None, None]
    return Memory(
        mem=jnp.where(keep_LB, memory.mem, jnp.zeros((), memory.mem.dtype)),
        cmem=jnp.where(keep_LB, memory.cmem, jnp.zeros((), memory.cmem.dtype)),
        mem_mask=memory.mem_mask & keep[:, None],
        cmem_mask=memory.cmem_mask & keep[:, None],
    )


def select_rows(memory: Memory, rows: Sequence[int]) -> Memory:
    """The memory of batch rows `rows`, in that order: evaluation's batch shrinking."""
    index = jnp.asarray(rows, jnp.int32)
    return Memory(mem=memory.mem[:, index], cmem=memory.cmem[:, index],
                  mem_mask=memory.mem_mask[index], cmem_mask=memory.cmem_mask[index])


def keep_newest(x_BTD: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The newest `n` entries along `axis` (works for n = 0, unlike x[:, -0:])."""
    return jax.lax.slice_in_dim(x_BTD, x_BTD.shape[axis] - n, x_BTD.shape[axis], axis=axis)


def fifo_update(mem_BMD: jax.Array, h_BND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's FIFO step: returns (new memory [B,n_m,d], evicted oldest n_s [B,n_s,d])."""
    n_s, n_m = h_BND.shape[1], mem_BMD.shape[1]
    full = jnp.concatenate([mem_BMD, h_BND.astype(mem_BMD.dtype)], axis=1)
    return keep_newest(full, n_m), full[:, :n_s]


def shift_in(old: jax.Array, new: jax.Array, axis: int = 1) -> jax.Array:
    """`new` appended after `old` along `axis`, keeping as many of the newest entries as `old`
    holds: one FIFO step (newly compressed slots into cmem, their masks, keys and values)."""
    full = jnp.concatenate([old, new.astype(old.dtype)], axis=axis)
    return keep_newest(full, old.shape[axis], axis)


def advance_memory_kv(kv_HBSK: jax.Array, segment_HBNK: jax.Array, compressed_HBEK: jax.Array | None,
                      n_cmem: int) -> jax.Array:
    """Keys (or values) [H,B,n_cm+n_m,K] of [cmem; mem] after one segment: the memory part
    advances as `fifo_update` advances the memory (the segment's own keys enter), the
    compressed part as cmem does (the new slots' keys enter)."""
    cmem, mem = kv_HBSK[:, :, :n_cmem], shift_in(kv_HBSK[:, :, n_cmem:], segment_HBNK, axis=2)
    if compressed_HBEK is not None:
        cmem = shift_in(cmem, compressed_HBEK, axis=2)
    return jnp.concatenate([cmem, mem], axis=2)


def compressed_slot_mask(evicted_B_N: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Validity [B, n_s/c] of the slots compressed from the evicted entries.

    Valid entries are always a suffix (the newest), because resets happen only at segment
    starts. A pooled/convolved slot is valid when its whole group is; 'most_used' keeps the
    top-used entries in time order, so as many of its slots are valid as there were valid
    entries (up to n_s/c), and they are the newest.
    """
    B, k = evicted_B_N.shape[0], cfg.slots_per_segment
    if cfg.compression == "most_used":
        n_valid = jnp.minimum(evicted_B_N.sum(axis=1), k)
        return jnp.arange(k)[None, :] >= (k - n_valid)[:, None]
    return evicted_B_N.reshape(B, k, cfg.compression_rate).all(axis=-1)


def update_masks(memory: Memory, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Masks after one segment: the FIFO advanced by n_s, new compressed slots appended."""
    n_s = cfg.segment_length
    full = jnp.concatenate([memory.mem_mask, jnp.ones((memory.batch_size, n_s), bool)], axis=1)
    mem_mask = keep_newest(full, cfg.memory_length)
    if not cfg.compresses:
        return mem_mask, memory.cmem_mask
    new_slots = compressed_slot_mask(full[:, :n_s], cfg)  # validity of the n_s evicted entries
    return mem_mask, shift_in(memory.cmem_mask, new_slots)
