"""Transformer-XL relative multi-head attention over [compressed memory; memory; segment].

Positions follow DeepMind's Sonnet CompressiveTransformer (PAPER.md 3.2): the content term
spans all keys; the position term has one sinusoid table, projection and bias `v` for
memory + segment, and a separate set for compressed memory, as if the compressed memory
came directly before the segment. `u` is shared because it sits in the content term.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctx.config import ModelConfig

NEG_INF = -1e30


def sinusoid_table(distances: jax.Array, d: int) -> jax.Array:
    """R_delta = [sin(delta * w), cos(delta * w)], w_k = 10000^(-2k/d); shape [P, d]."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    angles = distances.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def relative_shift(x_BHNP: jax.Array) -> jax.Array:
    """Turn scores against distances into scores against keys with one pad and reshapes.

    Input column k holds distance P-1-k; output [i, j] = input[i, j + N-1-i], i.e. the
    score of query i against key j at distance (P-N) + i - j. Entries with j > (P-N) + i
    (the future) are garbage and must be masked by the caller.
    """
    *lead, N, P = x_BHNP.shape
    padded = jnp.pad(x_BHNP, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
    shifted = padded.reshape(*lead, P + 1, N)[..., 1:, :]
    return shifted.reshape(*lead, N, P)


def attention_mask(mem_mask_BM: jax.Array, cmem_mask_BC: jax.Array, n_s: int) -> jax.Array:
    """bool [B,1,N,C+M+N]: valid memory slots are visible to every query; causal in-segment."""
    B = mem_mask_BM.shape[0]
    causal_NN = np.tril(np.ones((n_s, n_s), bool))
    memory_BNT = jnp.broadcast_to(
        jnp.concatenate([cmem_mask_BC, mem_mask_BM], axis=1)[:, None, :],
        (B, n_s, cmem_mask_BC.shape[1] + mem_mask_BM.shape[1]))
    segment_BNN = jnp.broadcast_to(causal_NN, (B, n_s, n_s))
    return jnp.concatenate([memory_BNT, segment_BNN], axis=-1)[:, None]


def _dense_init():
    """fan-in scaled init for [d, heads, head_dim] projection kernels."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))


class RelativeAttention(nn.Module):
    """Multi-head attention of a segment over [cmem; mem; segment] with relative positions."""

    cfg: ModelConfig
    deterministic: bool = True

    def setup(self) -> None:
        cfg = self.cfg
        shape = (cfg.d_model, cfg.n_heads, cfg.head_dim)
        self.query = self.param("query", _dense_init(), shape)
        self.key = self.param("key", _dense_init(), shape)
        self.value = self.param("value", _dense_init(), shape)
        self.pos_kernel = self.param("pos_kernel", _dense_init(), shape)
        self.u_bias = self.param("u_bias", nn.initializers.zeros, shape[1:])
        self.v_bias = self.param("v_bias", nn.initializers.zeros, shape[1:])
        if cfg.compresses:
            self.cmem_pos_kernel = self.param("cmem_pos_kernel", _dense_init(), shape)
            self.cmem_v_bias = self.param("cmem_v_bias", nn.initializers.zeros, shape[1:])
        self.out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.dtype, name="out")
        self.dropout = nn.Dropout(cfg.dropout)

    def _cast(self, w: jax.Array) -> jax.Array:
        return w.astype(self.cfg.dtype)

    def queries(self, x_BND: jax.Array) -> jax.Array:
        """Queries scaled by head_dim^-0.5 (before u/v are added, as in Sonnet)."""
        q = jnp.einsum("bnd,dhk->bnhk", x_BND, self._cast(self.query))
        return q * (self.cfg.head_dim ** -0.5)

    def keys_values(self, x_BTD: jax.Array, stop_gradient: bool = False) -> tuple[jax.Array, jax.Array]:
        """Keys and values of any inputs; with stop_gradient the projections are constants."""
        wk, wv = self._cast(self.key), self._cast(self.value)
        if stop_gradient:
            wk, wv = jax.lax.stop_gradient(wk), jax.lax.stop_gradient(wv)
        return (jnp.einsum("btd,dhk->bthk", x_BTD, wk), jnp.einsum("btd,dhk->bthk", x_BTD, wv))

    def _projected_table(self, kernel: jax.Array, P: int, deterministic: bool) -> jax.Array:
        """W_R · R for distances P-1 .. 0 (descending, as relative_shift expects): [P, H, K]."""
        table_PD = sinusoid_table(jnp.arange(P - 1, -1, -1), self.cfg.d_model).astype(self.cfg.dtype)
        table_PD = self.dropout(table_PD, deterministic=deterministic)
        return jnp.einsum("pd,dhk->phk", table_PD, self._cast(kernel))

    def _position_scores(self, qv_BNHK: jax.Array, kernel: jax.Array, n_keys_before: int) -> jax.Array:
        """Position term [B,H,N,n_keys_before+N]: query i vs key j at distance n_before+i-j."""
        r_PHK = self._projected_table(kernel, n_keys_before + qv_BNHK.shape[1], self.deterministic)
        return relative_shift(jnp.einsum("bnhk,phk->bhnp", qv_BNHK, r_PHK))

    def position_tables(self, n_mem: int, n_cmem: int) -> tuple[jax.Array, jax.Array | None]:
        """Projected sinusoid tables (distances descending) for memory+segment and cmem+segment;
        sampling computes them once per segment instead of once per token."""
        N = self.cfg.segment_length
        r = self._projected_table(self.pos_kernel, n_mem + N, deterministic=True)
        return r, self._projected_table(self.cmem_pos_kernel, n_cmem + N, deterministic=True) if n_cmem else None

    def decode(self, x_B1D: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, r_PHK: jax.Array,
               rc_PHK: jax.Array | None, mask_B1T: jax.Array, position: jax.Array, n_cmem: int, n_mem: int):
        """One query at segment offset `position` against cached keys/values of
        [cmem; mem; segment so far]. Returns (output [B,1,d], updated k and v caches)."""
        C, M, N = n_cmem, n_mem, self.cfg.segment_length
        x_B1D = x_B1D.astype(self.cfg.dtype)
        q_B1HK = self.queries(x_B1D)
        k_new, v_new = self.keys_values(x_B1D)
        k_BTHK = jax.lax.dynamic_update_slice_in_dim(k_BTHK, k_new.astype(k_BTHK.dtype), C + M + position, axis=1)
        v_BTHK = jax.lax.dynamic_update_slice_in_dim(v_BTHK, v_new.astype(v_BTHK.dtype), C + M + position, axis=1)
        content_BH1T = jnp.einsum("bnhk,bthk->bhnt", q_B1HK + self._cast(self.u_bias), k_BTHK)
        # Key j of [mem; segment] is at distance M + position - j: column N-1-position+j of
        # the descending table (the relative shift, for one row).
        columns = N - 1 - position + jnp.arange(M + N)
        raw = jnp.einsum("bnhk,phk->bhnp", q_B1HK + self._cast(self.v_bias), r_PHK)
        position_BH1T = jnp.take(raw, jnp.clip(columns, 0, M + N - 1), axis=-1)
        if C:
            raw_c = jnp.einsum("bnhk,phk->bhnp", q_B1HK + self._cast(self.cmem_v_bias), rc_PHK)
            cmem_position = jnp.take(raw_c, jnp.clip(N - 1 - position + jnp.arange(C), 0, C + N - 1), axis=-1)
            position_BH1T = jnp.concatenate([cmem_position, position_BH1T], axis=-1)
        logits = jnp.where(mask_B1T[:, None], (content_BH1T + position_BH1T).astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.cfg.dtype)
        return self.out(jnp.einsum("bhnt,bthk->bnhk", probs, v_BTHK)), k_BTHK, v_BTHK

    def __call__(self, x_BND: jax.Array, mem_BMD: jax.Array, cmem_BCD: jax.Array,
                 mask_B1NT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (output [B,N,d], attention probabilities [B,H,N,T], scaled queries)."""
        C, M = cmem_BCD.shape[1], mem_BMD.shape[1]
        x_BND = x_BND.astype(self.cfg.dtype)
        q_BNHK = self.queries(x_BND)
        kv_in_BTD = jnp.concatenate([cmem_BCD.astype(x_BND.dtype), mem_BMD.astype(x_BND.dtype), x_BND], axis=1)
        k_BTHK, v_BTHK = self.keys_values(kv_in_BTD)
        content_BHNT = jnp.einsum("bnhk,bthk->bhnt", q_BNHK + self._cast(self.u_bias), k_BTHK)
        position_BHNT = self._position_scores(q_BNHK + self._cast(self.v_bias), self.pos_kernel, M)
        if C:
            cmem_position = self._position_scores(q_BNHK + self._cast(self.cmem_v_bias),
                                                  self.cmem_pos_kernel, C)[..., :C]
            position_BHNT = jnp.concatenate([cmem_position, position_BHNT], axis=-1)
        logits = (content_BHNT + position_BHNT).astype(jnp.float32)
        logits = jnp.where(mask_B1NT, logits, NEG_INF)
        probs_BHNT = jax.nn.softmax(logits, axis=-1)
        dropped = self.dropout(probs_BHNT, deterministic=self.deterministic).astype(self.cfg.dtype)
        read_BNHK = jnp.einsum("bhnt,bthk->bnhk", dropped, v_BTHK)
        return self.out(read_BNHK), probs_BHNT, q_BNHK
