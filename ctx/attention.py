"""Transformer-XL relative multi-head attention over [compressed memory; memory; segment].

Positions follow DeepMind's Sonnet CompressiveTransformer (docs/paper-notes.md §2): the
content term spans all keys; the position term (ctx.relative_position) has one sinusoid table,
projection and bias `v` for memory + segment, and a separate set for compressed memory, as if
the compressed memory came directly before the segment. `u` is shared because it sits in the
content term.

Layout: the segment path works head-major ([H, B, N, ...]). Every attention product is
then a batched GEMM whose output is already in the layout the next op reads, so the
[B,H,N,T]-sized score tensors are never transposed (each transpose of them is a pass over
HBM as large as the softmax; docs/performance.md has the A/B figures). Queries, keys and values come
from one GEMM per input: the segment gives q, k and v; the memories, which need no input
gradient, give k and v (projected together with the segment, the backward would compute an
input gradient for every memory row too). Carried and cached keys and values (evaluation,
sampling) are head-major too, [H,B,T,K], as the segment path makes them.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctx.config import ModelConfig
from ctx.flash_attention import flash_attention
from ctx.ops import softmax
from ctx.relative_position import position_scores, sinusoid_table


def attention_mask(mem_mask_BM: jax.Array, cmem_mask_BC: jax.Array, n_s: int) -> jax.Array:
    """bool [B,1,N,C+M+N]: valid memory slots are visible to every query; causal in-segment."""
    B = mem_mask_BM.shape[0]
    causal_NN = np.tril(np.ones((n_s, n_s), bool))
    memory_BNT = jnp.broadcast_to(
        jnp.concatenate([cmem_mask_BC, mem_mask_BM], axis=1)[:, None, :],
        (B, n_s, cmem_mask_BC.shape[1] + mem_mask_BM.shape[1]))
    segment_BNN = jnp.broadcast_to(causal_NN, (B, n_s, n_s))
    return jnp.concatenate([memory_BNT, segment_BNN], axis=-1)[:, None]


def head_major(x_BTHK: jax.Array) -> jax.Array:
    """[B,T,H,K] -> [H,B,T,K]."""
    return jnp.transpose(x_BTHK, (2, 0, 1, 3))


def project(x_BTD: jax.Array, kernels: Sequence[jax.Array]) -> jax.Array:
    """All the given [d,H,K] projections of x as one GEMM: [len(kernels), H, B, T, K].

    The GEMM writes its natural [B,T,n,H,K] layout and one transpose makes it head-major:
    asked for head-major output directly, XLA:CPU computes the product transposed
    ([n·H·K, B·T]), which is slower (docs/performance.md)."""
    y_BTNHK = jnp.einsum("btd,dnhk->btnhk", x_BTD, jnp.stack(kernels, axis=1))
    return jnp.transpose(y_BTNHK, (2, 3, 0, 1, 4))


def _dense_init():
    """fan-in scaled init for [d, heads, head_dim] projection kernels."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))


class RelativeAttention(nn.Module):
    """Multi-head attention of a segment over [cmem; mem; segment] with relative positions."""

    cfg: ModelConfig

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
        self.dropout = nn.Dropout(cfg.dropout)  # of the position table, as in Sonnet and Transformer-XL
        self.weight_dropout = nn.Dropout(cfg.attention_dropout_rate)

    def _cast(self, w: jax.Array) -> jax.Array:
        return w.astype(self.cfg.dtype)

    def _query_kernel(self) -> jax.Array:
        """W_q scaled by head_dim^-0.5: the scores are (q+u)·k and (q+v)·R of scaled q (as in Sonnet)."""
        return self._cast(self.query) * (self.cfg.head_dim ** -0.5)

    def queries(self, x_BND: jax.Array) -> jax.Array:
        """Scaled queries [B,N,H,K]."""
        return jnp.einsum("bnd,dhk->bnhk", x_BND, self._query_kernel())

    def keys_values(self, x_BTD: jax.Array, stop_gradient: bool = False) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B,T,H,K] of any inputs; with stop_gradient the projections are constants."""
        wk, wv = self._cast(self.key), self._cast(self.value)
        if stop_gradient:
            wk, wv = jax.lax.stop_gradient(wk), jax.lax.stop_gradient(wv)
        return (jnp.einsum("btd,dhk->bthk", x_BTD, wk), jnp.einsum("btd,dhk->bthk", x_BTD, wv))

    def _projected_table(self, kernel: jax.Array, P: int, deterministic: bool) -> jax.Array:
        """W_R · R for distances P-1 .. 0 (descending, as relative_shift expects): [P, H, K]."""
        table_PD = sinusoid_table(jnp.arange(P - 1, -1, -1), self.cfg.d_model).astype(self.cfg.dtype)
        table_PD = self.dropout(table_PD, deterministic=deterministic)
        return jnp.einsum("pd,dhk->phk", table_PD, self._cast(kernel))

    def memory_keys_values(self, mem_BMD: jax.Array, cmem_BCD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [H,B,C+M,K] of [cmem; mem], as the segment path computes them."""
        memory_BSD = jnp.concatenate([cmem_BCD, mem_BMD], axis=1).astype(self.cfg.dtype)
        return tuple(project(memory_BSD, (self._cast(self.key), self._cast(self.value))))

    def _position_inputs(self, n_queries: int, n_mem: int, n_cmem: int, deterministic: bool
                         ) -> tuple[jax.Array, jax.Array]:
        """The projected tables [H,P,K] of `relative_position.position_scores` (the compressed
        memory's first, when there is one) and their v biases [H,R,K]."""
        tables = [(self.pos_kernel, self.v_bias, n_mem + n_queries)]
        if n_cmem:
            tables.insert(0, (self.cmem_pos_kernel, self.cmem_v_bias, n_cmem + n_queries))
        r_HPK = jnp.concatenate([jnp.transpose(self._projected_table(kernel, P, deterministic), (1, 0, 2))
                                 for kernel, _, P in tables], axis=1)
        return r_HPK, jnp.stack([self._cast(bias) for _, bias, _ in tables], axis=1)

    def position_tables(self, n_mem: int, n_cmem: int) -> tuple[jax.Array, jax.Array | None]:
        """Projected sinusoid tables (distances descending) for memory+segment and cmem+segment;
        sampling computes them once per segment instead of once per token."""
        N = self.cfg.segment_length
        r = self._projected_table(self.pos_kernel, n_mem + N, deterministic=True)
        return r, self._projected_table(self.cmem_pos_kernel, n_cmem + N, deterministic=True) if n_cmem else None

    def decode(self, x_B1D: jax.Array, k_HBTK: jax.Array, v_HBTK: jax.Array, r_PHK: jax.Array,
               rc_PHK: jax.Array | None, mask_B1T: jax.Array, position: jax.Array, n_cmem: int, n_mem: int):
        """One query at segment offset `position` against cached keys/values of
        [cmem; mem; segment so far]. Returns (output [B,1,d], updated k and v caches)."""
        C, M, N = n_cmem, n_mem, self.cfg.segment_length
        x_B1D = x_B1D.astype(self.cfg.dtype)
        q_B1HK = self.queries(x_B1D)
        k_new, v_new = (head_major(t) for t in self.keys_values(x_B1D))
        k_HBTK = jax.lax.dynamic_update_slice_in_dim(k_HBTK, k_new.astype(k_HBTK.dtype), C + M + position, axis=2)
        v_HBTK = jax.lax.dynamic_update_slice_in_dim(v_HBTK, v_new.astype(v_HBTK.dtype), C + M + position, axis=2)
        content_BH1T = jnp.einsum("bnhk,hbtk->bhnt", q_B1HK + self._cast(self.u_bias), k_HBTK)

        def position_term(bias, table_PHK, n_keys):
            # Key j is at distance n_before + position - j: column N - 1 - position + j of the
            # descending table (the relative shift, for one row); future keys are clipped.
            raw = jnp.einsum("bnhk,phk->bhnp", q_B1HK + self._cast(bias), table_PHK)
            columns = jnp.clip(N - 1 - position + jnp.arange(n_keys), 0, table_PHK.shape[0] - 1)
            return jnp.take(raw, columns, axis=-1)

        position_BH1T = position_term(self.v_bias, r_PHK, M + N)
        if C:
            position_BH1T = jnp.concatenate([position_term(self.cmem_v_bias, rc_PHK, C), position_BH1T], axis=-1)
        logits = (content_BH1T + position_BH1T).astype(jnp.float32)
        probs = softmax(logits, mask_B1T[:, None]).astype(self.cfg.dtype)
        return self.out(jnp.einsum("bhnt,hbtk->bnhk", probs, v_HBTK)), k_HBTK, v_HBTK

    def _keys_values_with_memory(self, x_BND, mem_BMD, cmem_BCD, memory_kv):
        """Scaled queries [H,B,N,K] of the segment, and keys and values [H,B,T,K] of
        [cmem; mem; segment]: the segment's from one GEMM, the memories' from another (they
        need no input gradient) unless carried in `memory_kv`."""
        dtype = self.cfg.dtype
        wk, wv = self._cast(self.key), self._cast(self.value)
        q_HBNK, k_HBTK, v_HBTK = project(x_BND.astype(dtype), (self._query_kernel(), wk, wv))
        if cmem_BCD.shape[1] + mem_BMD.shape[1]:
            if memory_kv is None:
                memory_kv = self.memory_keys_values(mem_BMD, cmem_BCD)
            k_mem, v_mem = (t.astype(dtype) for t in memory_kv)
            k_HBTK, v_HBTK = jnp.concatenate([k_mem, k_HBTK], axis=2), jnp.concatenate([v_mem, v_HBTK], axis=2)
        return q_HBNK, k_HBTK, v_HBTK

    def _fused(self, x_BND, mem_BMD, cmem_BCD, mask_B1NT, memory_kv, deterministic):
        """The attention through a fused kernel, which never writes the probabilities.
        'pallas_tpu': ctx.flash_attention, head-major like the rest of the segment path, which
        computes the content and position terms and the mask tile by tile from the queries,
        u, v, the projected tables and the memory-validity row, and also returns the attention
        mass per key range from its row statistics and, for 'most_used', the attention each evicted
        key receives (a kernel over those keys that recomputes their probabilities from the
        forward's log-sum-exp). 'cudnn': jax.nn.dot_product_attention,
        batch-major (cuDNN on GPUs, the same call's XLA ops elsewhere), given the queries q + u
        (already scaled, so scale 1) and the shifted position term as its additive bias in the
        compute dtype, with the mask folded in as a large negative value (a boolean mask would
        make cuDNN compute a useless bias gradient). No probabilities are returned. The Pallas
        kernel drops attention weights itself (a mask hashed from a seed this module draws and
        the weight's indices); cuDNN's public API drops none."""
        kernel = self.cfg.attention_kernel
        rate = 0.0 if deterministic else self.cfg.attention_dropout_rate
        if rate and kernel == "cudnn":  # validate_model refuses it; a hand-made ModelConfig may not
            raise ValueError(f"the cudnn attention has no attention dropout, and the config asks for {rate} "
                             "(model.attention_dropout, or model.dropout while it is None); set "
                             "attention_dropout=0, or attention_impl='pallas_tpu' (TPUs) or 'xla'")
        C, M = cmem_BCD.shape[1], mem_BMD.shape[1]
        dtype = self.cfg.dtype
        qkv = self._keys_values_with_memory(x_BND, mem_BMD, cmem_BCD, memory_kv)
        q_HBNK, k_HBTK, v_HBTK = qkv
        r_HPK, v_HRK = self._position_inputs(q_HBNK.shape[2], M, C, deterministic)
        mass = usage_BN = None
        if kernel == "pallas_tpu":
            visible_BT = mask_B1NT[:, 0, -1, :]  # the last query sees every valid memory slot and the segment
            N = q_HBNK.shape[2]
            seed = None
            if rate:  # drawn where the xla path's nn.Dropout of the weights draws
                seed = jax.lax.bitcast_convert_type(jax.random.bits(self.make_rng("dropout"), (), jnp.uint32),
                                                    jnp.int32)
            read_HBNK, mass_HBNR, usage_HBN = flash_attention(
                q_HBNK, self._cast(self.u_bias), k_HBTK, v_HBTK, v_HRK, r_HPK, visible_BT, C, M,
                (C, C + N) if self._reports_usage else None, rate, seed)
            read_BNHK = jnp.transpose(read_HBNK, (1, 2, 0, 3))
            mass = jax.lax.stop_gradient(mass_HBNR.mean(axis=(0, 1, 2)))
            if usage_HBN is not None:
                usage_BN = jax.lax.stop_gradient(usage_HBN.mean(axis=0) / N)
        else:
            query_HBNK = q_HBNK + self._cast(self.u_bias)[:, None, None, :]
            big = jnp.asarray(jnp.finfo(jnp.dtype(dtype)).min / 2, dtype)
            bias_BHNT = position_scores(q_HBNK, v_HRK, r_HPK, C, batch_major=True)
            bias_BHNT = jnp.where(mask_B1NT, bias_BHNT.astype(dtype), big)
            query_BNHK, key_BTHK, value_BTHK = (jnp.transpose(t, (1, 2, 0, 3)) for t in (query_HBNK, k_HBTK, v_HBTK))
            read_BNHK = jax.nn.dot_product_attention(
                query_BNHK, key_BTHK, value_BTHK, bias=bias_BHNT, scale=1.0,
                implementation="cudnn" if jax.default_backend() == "gpu" else "xla")
        return self.out(read_BNHK.astype(dtype)), None, qkv, mass, usage_BN

    @property
    def _reports_usage(self) -> bool:
        """Whether a segment reports the attention its evicted memories received ('most_used')."""
        return self.cfg.compresses and self.cfg.compression == "most_used"

    def __call__(self, x_BND: jax.Array, mem_BMD: jax.Array, cmem_BCD: jax.Array, mask_B1NT: jax.Array,
                 memory_kv: tuple[jax.Array, jax.Array] | None = None, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array, jax.Array], jax.Array | None,
                            jax.Array | None]:
        """Returns (output [B,N,d], attention probabilities [B,H,N,T], (scaled queries [H,B,N,K],
        keys [H,B,T,K], values [H,B,T,K]), attention mass [3], usage [B,N]); keys and values are
        of [cmem; mem; segment], the mass is the mean attention a query gives each of the three,
        the usage (for 'most_used' compression, else None) the mean attention each evicted
        memory (keys C .. C+N) receives over heads and queries; neither has a gradient. The
        fused kernels return no probabilities, and cuDNN no mass.
        `memory_kv`: the memories' keys and values [H,B,C+M,K] when already known (evaluation
        carries them from segment to segment instead of projecting the memories again)."""
        C, M = cmem_BCD.shape[1], mem_BMD.shape[1]
        dtype = self.cfg.dtype
        if self.cfg.fused_attention:
            return self._fused(x_BND, mem_BMD, cmem_BCD, mask_B1NT, memory_kv, deterministic)
        q_HBNK, k_HBTK, v_HBTK = self._keys_values_with_memory(x_BND, mem_BMD, cmem_BCD, memory_kv)
        # (q + u)·k = q·k + u·k: the u·k row [H,B,T] is the same for every query.
        content_HBNT = (jnp.einsum("hbnk,hbtk->hbnt", q_HBNK, k_HBTK)
                        + jnp.einsum("hk,hbtk->hbt", self._cast(self.u_bias), k_HBTK)[:, :, None, :])
        r_HPK, v_HRK = self._position_inputs(q_HBNK.shape[2], M, C, deterministic)
        position_HBNT = position_scores(q_HBNK, v_HRK, r_HPK, C)
        logits = (content_HBNT + position_HBNT).astype(jnp.float32)
        probs_HBNT = softmax(logits, mask_B1NT[:, 0][None])
        dropped = self.weight_dropout(probs_HBNT, deterministic=deterministic).astype(dtype)
        # Read head-major, then move the small [H,B,N,K] result; asked for [B,N,H,K] directly,
        # XLA transposed the score-sized probabilities and their gradient in the backward pass.
        read_BNHK = jnp.transpose(jnp.einsum("hbnt,hbtk->hbnk", dropped, v_HBTK), (1, 2, 0, 3))
        mass_HBNT = jax.lax.stop_gradient(probs_HBNT)
        mass = jnp.stack([mass_HBNT[..., :C].sum(-1).mean(), mass_HBNT[..., C:C + M].sum(-1).mean(),
                          mass_HBNT[..., C + M:].sum(-1).mean()])
        usage_BN = mass_HBNT[..., C:C + q_HBNK.shape[2]].mean(axis=(0, 2)) if self._reports_usage else None
        return (self.out(read_BNHK), jnp.transpose(probs_HBNT, (1, 0, 2, 3)), (q_HBNK, k_HBTK, v_HBTK), mass,
                usage_BN)
