"""The Memory pytree: per-layer FIFO memory and compressed memory with validity masks.

Memory is pure data threaded through jitted calls. Rows are independent streams:
`reset_rows` empties the rows that start a new document, and `update_masks` advances the
validity masks exactly as the per-layer FIFO update (`fifo_update`) advances the contents.
Evaluation also carries the memories' keys and values (parameters are fixed there, so they
need not be projected again each segment); they are optional fields of the same pytree, so
resets and row selection treat them with the memories they were projected from.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ctx.config import ModelConfig

# What a segment's attention reads, in key order: compressed memory, memory, the segment itself
# (the order of every per-kind statistic, e.g. aux.attention_mass[..., k]).
KEY_KINDS = ("compressed", "memory", "segment")


@flax.struct.dataclass
class LayerMemory:
    """What the layers carry from segment to segment, stacked on a leading L axis (the layer
    scan hands each layer its slice): the memories and, when carried, their keys and values."""

    mem: jax.Array  # [(L,) B, n_m, d]
    cmem: jax.Array  # [(L,) B, n_cm, d]
    keys: jax.Array | None = None  # [(L,) H, B, n_cm + n_m, K] of [cmem; mem], or None
    values: jax.Array | None = None


@flax.struct.dataclass
class Memory:
    """mem [L,B,n_m,d] and cmem [L,B,n_cm,d], oldest first; masks say which slots hold data;
    optionally the keys and values [L,H,B,n_cm+n_m,K] of [cmem; mem] (`carries_keys_values`)."""

    mem: jax.Array
    cmem: jax.Array
    mem_mask: jax.Array  # bool [B, n_m]
    cmem_mask: jax.Array  # bool [B, n_cm]
    keys: jax.Array | None = None
    values: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.mem_mask.shape[0]

    @property
    def carries_keys_values(self) -> bool:
        return self.keys is not None

    @property
    def layers(self) -> LayerMemory:
        return LayerMemory(mem=self.mem, cmem=self.cmem, keys=self.keys, values=self.values)

    def with_layers(self, layers: LayerMemory) -> Memory:
        return self.replace(
            mem=layers.mem, cmem=layers.cmem, keys=layers.keys, values=layers.values
        )

    def without_keys_values(self) -> Memory:
        return self.replace(keys=None, values=None)


def init_memory(cfg: ModelConfig, batch_size: int, dtype: Any = None) -> Memory:
    """Empty memory for `batch_size` streams (zeros, every slot invalid)."""
    dtype = dtype or jnp.dtype(cfg.dtype)
    L, d = cfg.n_layers, cfg.d_model
    return Memory(
        mem=jnp.zeros((L, batch_size, cfg.memory_length, d), dtype),
        cmem=jnp.zeros((L, batch_size, cfg.compressed_length, d), dtype),
        mem_mask=jnp.zeros((batch_size, cfg.memory_length), bool),
        cmem_mask=jnp.zeros((batch_size, cfg.compressed_length), bool),
    )


def _map_rows(memory: Memory, fn: Callable[[jax.Array, int], jax.Array]) -> Memory:
    """Apply fn(array, its batch axis) to every array of `memory` (the carried keys/values too)."""
    batch_axis = {"mem": 1, "cmem": 1, "mem_mask": 0, "cmem_mask": 0, "keys": 2, "values": 2}
    return memory.replace(
        **{
            name: fn(getattr(memory, name), axis)
            for name, axis in batch_axis.items()
            if getattr(memory, name) is not None
        }
    )


def reset_rows(memory: Memory, reset: jax.Array | None) -> Memory:
    """Clear (zero and invalidate) the rows where `reset[B]` is true; others are untouched."""
    if reset is None:
        return memory
    keep_B = ~reset.astype(bool)

    def clear(x, axis):
        keep = jnp.expand_dims(keep_B, [a for a in range(x.ndim) if a != axis])
        return jnp.where(keep, x, jnp.zeros((), x.dtype))

    return _map_rows(memory, clear)


def select_rows(memory: Memory, rows: Sequence[int]) -> Memory:
    """The memory of batch rows `rows`, in that order: evaluation's batch shrinking."""
    index = jnp.asarray(rows, jnp.int32)
    return _map_rows(memory, lambda x, axis: jnp.take(x, index, axis=axis))


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


def advance_memory_kv(
    kv_HBSK: jax.Array, segment_HBNK: jax.Array, compressed_HBEK: jax.Array | None, n_cmem: int
) -> jax.Array:
    """Keys (or values) [H,B,n_cm+n_m,K] of [cmem; mem] after one segment: the memory part
    advances as `fifo_update` advances the memory (the segment's own keys enter), the
    compressed part as cmem does (the new slots' keys enter)."""
    cmem, mem = kv_HBSK[:, :, :n_cmem], shift_in(kv_HBSK[:, :, n_cmem:], segment_HBNK, axis=2)
    if compressed_HBEK is not None:
        cmem = shift_in(cmem, compressed_HBEK, axis=2)
    return jnp.concatenate([cmem, mem], axis=2)


def compressed_slot_mask(evicted_valid_BN: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Validity [B, n_s/c] of the slots compressed from the evicted entries.

    Valid entries are always a suffix (the newest), because resets happen only at segment
    starts. A pooled/convolved slot is valid when its whole group is; 'most_used' keeps the
    top-used entries in time order, so as many of its slots are valid as there were valid
    entries (up to n_s/c), and they are the newest.
    """
    B, E = evicted_valid_BN.shape[0], cfg.slots_per_segment
    if cfg.compression == "most_used":
        n_valid = jnp.minimum(evicted_valid_BN.sum(axis=1), E)
        return jnp.arange(E)[None, :] >= (E - n_valid)[:, None]
    return evicted_valid_BN.reshape(B, E, cfg.compression_rate).all(axis=-1)


def update_masks(memory: Memory, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Masks after one segment: the FIFO advanced by n_s, new compressed slots appended."""
    n_s = cfg.segment_length
    full = jnp.concatenate([memory.mem_mask, jnp.ones((memory.batch_size, n_s), bool)], axis=1)
    mem_mask = keep_newest(full, cfg.memory_length)
    if not cfg.compresses:
        return mem_mask, memory.cmem_mask
    new_slots = compressed_slot_mask(full[:, :n_s], cfg)  # validity of the n_s evicted entries
    return mem_mask, shift_in(memory.cmem_mask, new_slots)
