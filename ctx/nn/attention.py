"""Transformer-XL relative multi-head attention over [compressed memory; memory; segment].

Positions follow DeepMind's Sonnet CompressiveTransformer (docs/paper-notes.md §2): the
content term spans all keys; the position term (ctx.nn.relative_position) has one sinusoid table,
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

import functools
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ctx.config import ModelConfig
from ctx.nn.ops import MASKED_LOGIT, softmax
from ctx.nn import pallas_gpu, pallas_tpu
from ctx.nn.fused_attention import AttentionOperands, FusedKernels, flash_attention
from ctx.nn.pallas_launch import KERNEL_INPUTS
from ctx.nn.relative_position import position_scores, sinusoid_table


def attention_mask(mem_mask_BM: jax.Array, cmem_mask_BC: jax.Array, n_s: int) -> jax.Array:
    """bool [B,1,N,C+M+N]: valid memory slots are visible to every query; causal in-segment."""
    B = mem_mask_BM.shape[0]
    causal_NN = np.tril(np.ones((n_s, n_s), bool))
    memory_BNT = jnp.broadcast_to(
        jnp.concatenate([cmem_mask_BC, mem_mask_BM], axis=1)[:, None, :],
        (B, n_s, cmem_mask_BC.shape[1] + mem_mask_BM.shape[1]),
    )
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


@flax.struct.dataclass
class AttentionOut:
    """A segment's attention: its output and what the layer reuses or reports. Keys and values
    are of [cmem; mem; segment]; `mass` is the mean attention a query gives each of the three,
    `usage` (for 'most_used', else None) the mean attention each evicted memory (keys C .. C+N)
    receives over heads and queries; neither has a gradient. The fused kernels form no
    probabilities, and cuDNN no mass."""

    out: jax.Array  # [B,N,D]
    queries: jax.Array  # scaled, [H,B,N,K]
    keys: jax.Array  # [H,B,T,K]
    values: jax.Array  # [H,B,T,K]
    probs: jax.Array | None  # [B,H,N,T]
    mass: jax.Array | None  # [3]
    usage: jax.Array | None  # [B,N]


@flax.struct.dataclass
class LayerCache:
    """Sampling's per-layer cache ([L, ...] stacked by the layer scan): keys and values of
    [cmem; mem; segment so far] and the projected position tables (distances descending)."""

    keys: jax.Array  # [(L,) H, B, n_cm + n_m + n_s, K]
    values: jax.Array
    pos_table: jax.Array  # [(L,) n_m + n_s, H, K]
    cmem_pos_table: jax.Array  # [(L,) n_cm + n_s, H, K] (empty without compressed memory)


def _dense_init():
    """fan-in scaled init for [d, heads, head_dim] projection kernels."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
    )


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
        self.dropout = nn.Dropout(
            cfg.dropout
        )  # of the position table, as in Sonnet and Transformer-XL
        self.weight_dropout = nn.Dropout(cfg.attention_dropout_rate)

    def _cast(self, w: jax.Array) -> jax.Array:
        return w.astype(self.cfg.dtype)

    def _query_kernel(self) -> jax.Array:
        """W_q scaled by head_dim^-0.5: the scores are (q+u)·k and (q+v)·R of scaled q (as in Sonnet)."""
        return self._cast(self.query) * (self.cfg.head_dim**-0.5)

    def queries(self, x_BND: jax.Array) -> jax.Array:
        """Scaled queries [B,N,H,K]."""
        return jnp.einsum("bnd,dhk->bnhk", x_BND, self._query_kernel())

    def keys_values(
        self, x_BTD: jax.Array, stop_gradient: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B,T,H,K] of any inputs; with stop_gradient the projections are constants."""
        wk, wv = self._cast(self.key), self._cast(self.value)
        if stop_gradient:
            wk, wv = jax.lax.stop_gradient(wk), jax.lax.stop_gradient(wv)
        return (jnp.einsum("btd,dhk->bthk", x_BTD, wk), jnp.einsum("btd,dhk->bthk", x_BTD, wv))

    def _projected_table(self, kernel: jax.Array, P: int, deterministic: bool) -> jax.Array:
        """W_R · R for distances P-1 .. 0 (descending, as relative_shift expects): [P, H, K]."""
        table_PD = sinusoid_table(jnp.arange(P - 1, -1, -1), self.cfg.d_model).astype(
            self.cfg.dtype
        )
        table_PD = self.dropout(table_PD, deterministic=deterministic)
        return jnp.einsum("pd,dhk->phk", table_PD, self._cast(kernel))

    def memory_keys_values(
        self, mem_BMD: jax.Array, cmem_BCD: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Keys and values [H,B,C+M,K] of [cmem; mem], as the segment path computes them."""
        memory_BSD = jnp.concatenate([cmem_BCD, mem_BMD], axis=1).astype(self.cfg.dtype)
        return tuple(project(memory_BSD, (self._cast(self.key), self._cast(self.value))))

    def _position_inputs(
        self, n_queries: int, *, n_mem: int, n_cmem: int, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """The projected tables [H,P,K] of `relative_position.position_scores` (the compressed
        memory's first, when there is one) and their v biases [H,R,K]."""
        tables = [(self.pos_kernel, self.v_bias, n_mem + n_queries)]
        if n_cmem:
            tables.insert(0, (self.cmem_pos_kernel, self.cmem_v_bias, n_cmem + n_queries))
        r_HPK = jnp.concatenate(
            [
                jnp.transpose(self._projected_table(kernel, P, deterministic), (1, 0, 2))
                for kernel, _, P in tables
            ],
            axis=1,
        )
        return r_HPK, jnp.stack([self._cast(bias) for _, bias, _ in tables], axis=1)

    def position_tables(self) -> tuple[jax.Array, jax.Array]:
        """Projected sinusoid tables (distances descending) for memory+segment [n_m+n_s,H,K] and
        cmem+segment [n_cm+n_s,H,K] (empty without compressed memory); sampling computes them
        once per segment instead of once per token."""
        cfg, N = self.cfg, self.cfg.segment_length
        pos_table = self._projected_table(
            self.pos_kernel, cfg.memory_length + N, deterministic=True
        )
        if not cfg.compresses:
            return pos_table, jnp.zeros((0,) + pos_table.shape[1:], pos_table.dtype)
        return pos_table, self._projected_table(
            self.cmem_pos_kernel, cfg.compressed_length + N, deterministic=True
        )

    def decode(
        self, x_B1D: jax.Array, cache: LayerCache, mask_B1T: jax.Array, position: jax.Array
    ) -> tuple[jax.Array, LayerCache]:
        """One query at segment offset `position` against the cached keys/values of
        [cmem; mem; segment so far]: (output [B,1,d], the cache with this token's key and value)."""
        C, M, N = self.cfg.compressed_length, self.cfg.memory_length, self.cfg.segment_length
        x_B1D = x_B1D.astype(self.cfg.dtype)
        q_B1HK = self.queries(x_B1D)
        k_new, v_new = (head_major(t) for t in self.keys_values(x_B1D))
        k_HBTK, v_HBTK = (
            jax.lax.dynamic_update_slice_in_dim(
                old, new.astype(old.dtype), C + M + position, axis=2
            )
            for old, new in ((cache.keys, k_new), (cache.values, v_new))
        )
        content_BH1T = jnp.einsum(
            "bnhk,hbtk->bhnt", q_B1HK + self._cast(self.u_bias)[None, None], k_HBTK
        )

        def position_term(bias, table_PHK, n_keys):
            # Key j is at distance n_before + position - j: column N - 1 - position + j of the
            # descending table (the relative shift, for one row); future keys are clipped.
            raw = jnp.einsum("bnhk,phk->bhnp", q_B1HK + self._cast(bias)[None, None], table_PHK)
            columns = jnp.clip(N - 1 - position + jnp.arange(n_keys), 0, table_PHK.shape[0] - 1)
            return jnp.take(raw, columns, axis=-1)

        position_BH1T = position_term(self.v_bias, cache.pos_table, M + N)
        if C:
            position_BH1T = jnp.concatenate(
                [position_term(self.cmem_v_bias, cache.cmem_pos_table, C), position_BH1T], axis=-1
            )
        logits = (content_BH1T + position_BH1T).astype(jnp.float32)
        probs = softmax(logits, mask_B1T[:, None]).astype(self.cfg.dtype)
        out = self.out(jnp.einsum("bhnt,hbtk->bnhk", probs, v_HBTK))
        return out, cache.replace(keys=k_HBTK, values=v_HBTK)

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
            k_HBTK, v_HBTK = (
                jnp.concatenate([k_mem, k_HBTK], axis=2),
                jnp.concatenate([v_mem, v_HBTK], axis=2),
            )
        return q_HBNK, k_HBTK, v_HBTK

    @property
    def _reports_usage(self) -> bool:
        """Whether a segment reports the attention its evicted memories received ('most_used')."""
        return self.cfg.compresses and self.cfg.compression == "most_used"

    def __call__(
        self,
        x_BND: jax.Array,
        mem_BMD: jax.Array,
        cmem_BCD: jax.Array,
        mask_B1NT: jax.Array,
        memory_kv: tuple[jax.Array, jax.Array] | None = None,
        deterministic: bool = True,
    ) -> AttentionOut:
        """A segment's attention over [cmem; mem; segment], by the config's attention_impl.
        `memory_kv`: the memories' keys and values [H,B,C+M,K] when already known (evaluation
        carries them from segment to segment instead of projecting the memories again)."""
        C, M = cmem_BCD.shape[1], mem_BMD.shape[1]
        q_HBNK, k_HBTK, v_HBTK = self._keys_values_with_memory(x_BND, mem_BMD, cmem_BCD, memory_kv)
        if self.cfg.fused_attention:  # kept under remat 'dots' (ctx.nn.pallas_launch)
            q_HBNK, k_HBTK, v_HBTK = (
                checkpoint_name(x, KERNEL_INPUTS) for x in (q_HBNK, k_HBTK, v_HBTK)
            )
        r_HPK, v_HRK = self._position_inputs(
            q_HBNK.shape[2], n_mem=M, n_cmem=C, deterministic=deterministic
        )
        attend = {
            "xla": self._xla,
            "cudnn": self._cudnn,
            "pallas_tpu": functools.partial(self._pallas, pallas_tpu.KERNELS),
            "pallas_gpu": functools.partial(self._pallas, pallas_gpu.KERNELS),
        }[self.cfg.attention_impl]
        read_BNHK, probs_BHNT, mass, usage_BN = attend(
            q_HBNK,
            k_HBTK,
            v_HBTK,
            r_HPK,
            v_HRK,
            mask_B1NT,
            n_mem=M,
            n_cmem=C,
            deterministic=deterministic,
        )
        return AttentionOut(
            out=self.out(read_BNHK.astype(self.cfg.dtype)),
            queries=q_HBNK,
            keys=k_HBTK,
            values=v_HBTK,
            probs=probs_BHNT,
            mass=mass,
            usage=usage_BN,
        )

    def _xla(
        self, q_HBNK, k_HBTK, v_HBTK, r_HPK, v_HRK, mask_B1NT, *, n_mem, n_cmem, deterministic
    ):
        """The reference: scores, softmax and probabilities as XLA ops (head-major throughout)."""
        C, M, N = n_cmem, n_mem, q_HBNK.shape[2]
        # (q + u)·k = q·k + u·k: the u·k row [H,B,T] is the same for every query.
        content_HBNT = (
            jnp.einsum("hbnk,hbtk->hbnt", q_HBNK, k_HBTK)
            + jnp.einsum("hk,hbtk->hbt", self._cast(self.u_bias), k_HBTK)[:, :, None, :]
        )
        position_HBNT = position_scores(q_HBNK, v_HRK, r_HPK, C)
        logits = (content_HBNT + position_HBNT).astype(jnp.float32)
        probs_HBNT = softmax(logits, mask_B1NT[:, 0][None])
        dropped = self.weight_dropout(probs_HBNT, deterministic=deterministic).astype(
            self.cfg.dtype
        )
        # Read head-major, then move the small [H,B,N,K] result; asked for [B,N,H,K] directly,
        # XLA transposed the score-sized probabilities and their gradient in the backward pass.
        read_BNHK = jnp.transpose(jnp.einsum("hbnt,hbtk->hbnk", dropped, v_HBTK), (1, 2, 0, 3))
        seen_HBNT = jax.lax.stop_gradient(probs_HBNT)
        mass = jnp.stack(
            [
                seen_HBNT[..., :C].sum(-1).mean(),
                seen_HBNT[..., C : C + M].sum(-1).mean(),
                seen_HBNT[..., C + M :].sum(-1).mean(),
            ]
        )
        usage_BN = seen_HBNT[..., C : C + N].mean(axis=(0, 2)) if self._reports_usage else None
        return read_BNHK, jnp.transpose(probs_HBNT, (1, 0, 2, 3)), mass, usage_BN

    def _pallas(
        self,
        kernels: FusedKernels,
        q_HBNK,
        k_HBTK,
        v_HBTK,
        r_HPK,
        v_HRK,
        mask_B1NT,
        *,
        n_mem,
        n_cmem,
        deterministic,
    ):
        """One of ctx's flash kernels (ctx/nn/pallas_tpu.py, ctx/nn/pallas_gpu.py): the mask,
        position term and dropout inside each tile; the mass and the evicted keys' usage from
        its row statistics."""
        C, N = n_cmem, q_HBNK.shape[2]
        rate = 0.0 if deterministic else self.cfg.attention_dropout_rate
        seed = None
        if rate:  # drawn where the xla path's nn.Dropout of the weights draws
            seed = jax.lax.bitcast_convert_type(
                jax.random.bits(self.make_rng("dropout"), (), jnp.uint32), jnp.int32
            )
        visible_BT = mask_B1NT[
            :, 0, -1, :
        ]  # the last query sees every valid memory slot and the segment
        operands = AttentionOperands(
            q=q_HBNK,
            u=self._cast(self.u_bias),
            k=k_HBTK,
            v=v_HBTK,
            v_biases=v_HRK,
            tables=r_HPK,
            visible=visible_BT,
        )
        read_HBNK, mass_HBNR, usage_HBN = flash_attention(
            kernels,
            operands,
            n_cmem=n_cmem,
            n_mem=n_mem,
            usage_keys=(C, C + N) if self._reports_usage else None,
            dropout=rate,
            dropout_seed=seed,
        )
        mass = jax.lax.stop_gradient(mass_HBNR.mean(axis=(0, 1, 2)))
        usage_BN = None if usage_HBN is None else jax.lax.stop_gradient(usage_HBN.mean(axis=0) / N)
        return jnp.transpose(read_HBNK, (1, 2, 0, 3)), None, mass, usage_BN

    def _cudnn(
        self, q_HBNK, k_HBTK, v_HBTK, r_HPK, v_HRK, mask_B1NT, *, n_mem, n_cmem, deterministic
    ):
        """jax.nn.dot_product_attention (cuDNN on GPUs), batch-major, with q + u (already scaled)
        and the shifted position term as its bias, the mask folded in as a large negative value
        (a boolean mask would make cuDNN compute a useless bias gradient). No mass, no dropout."""
        del (
            n_mem,
            deterministic,
        )  # a ModelConfig with cudnn has no attention dropout (it validates itself)
        read_BNHK = cudnn_attention(
            q_HBNK, self._cast(self.u_bias), k_HBTK, v_HBTK, v_HRK, r_HPK, mask_B1NT, n_cmem
        )
        return read_BNHK, None, None, None


def cudnn_attention(
    q_HBNK: jax.Array,
    u_HK: jax.Array,
    k_HBTK: jax.Array,
    v_HBTK: jax.Array,
    v_HRK: jax.Array,
    r_HPK: jax.Array,
    mask_B1NT: jax.Array,
    n_cmem: int,
) -> jax.Array:
    """[B,N,H,K]: jax.nn.dot_product_attention (cuDNN on GPUs, the same call's XLA ops
    elsewhere) of the head-major q + u, k and v, with the shifted position term, the mask folded
    in, as its bias (in the compute dtype)."""
    dtype = q_HBNK.dtype
    bias_BHNT = position_scores(q_HBNK, v_HRK, r_HPK, n_cmem, batch_major=True)
    bias_BHNT = jnp.where(mask_B1NT, bias_BHNT.astype(dtype), jnp.asarray(MASKED_LOGIT, dtype))
    query_HBNK = q_HBNK + u_HK[:, None, None, :]
    query_BNHK, key_BTHK, value_BTHK = (
        jnp.transpose(t, (1, 2, 0, 3)) for t in (query_HBNK, k_HBTK, v_HBTK)
    )

    def attend(implementation):
        return functools.partial(
            jax.nn.dot_product_attention, scale=1.0, implementation=implementation
        )

    if not cudnn_found():  # jax traces the cuDNN call only where it can ask cuDNN its version
        return attend("xla")(query_BNHK, key_BTHK, value_BTHK, bias_BHNT)
    # Picked by the platform the program is lowered for, as the Pallas kernels are, so a CPU
    # machine with cuDNN's wheel compiling for a GPU lowers the cuDNN call.
    return jax.lax.platform_dependent(
        query_BNHK, key_BTHK, value_BTHK, bias_BHNT, cuda=attend("cudnn"), default=attend("xla")
    )


@functools.cache
def cudnn_found() -> bool:
    """Whether this process can load cuDNN (a GPU machine, or cuDNN's wheel beside jax's CUDA plugin)."""
    from jax._src.cudnn import fused_attention_stablehlo

    try:
        fused_attention_stablehlo.check_cudnn_version()
    except RuntimeError:
        return False
    return True
