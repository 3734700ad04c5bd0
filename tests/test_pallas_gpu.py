"""ctx.nn.pallas_gpu, the Pallas (Triton) kernel behind model.attention_impl='pallas_gpu': its
tiles; its backward writes every entry of the band gradient exactly once; `auto` picks it where
Triton can tile the config; and its programs (the kernel at the PG-19 shape, a whole training
chunk) lower for CUDA on this CPU machine. (Its numbers against the reference:
tests/test_fused_attention.py; model-level equality with xla: tests/test_attention_impl.py.)"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx import aot, selfcheck
from ctx.config import ModelConfig
from ctx.nn import pallas_gpu
from ctx.nn.attention_policy import resolve_attention
from ctx.nn.fused_attention import AttentionOperands, KeyLayout, flash_attention
from experiments import demo


def test_tiles_are_the_largest_power_of_two_up_to_64_dividing_the_queries_and_the_keys():
    assert pallas_gpu.block_size(512, 1536) == 64
    assert pallas_gpu.block_size(768, 2688) == 64  # enwik8: 1,152 + 768 + 768 keys
    assert pallas_gpu.block_size(64, 128) == 64 and pallas_gpu.block_size(32, 96) == 32
    assert pallas_gpu.block_size(8, 24) == 8  # the tiny test models: interpret mode only


@pytest.mark.parametrize("n_cmem, n_mem, N", [(24, 40, 64), (0, 64, 32), (128, 128, 128)])
def test_the_backward_writes_every_band_gradient_entry_exactly_once(n_cmem, n_mem, N):
    """The query-gradient kernel scatters each tile's logits' gradient to band columns and zeros
    to the columns no key reads: over all of a query block's key blocks (up to its last query)
    and zero blocks, each column of each row in [0, P) is stored once and nothing else is
    stored unmasked (on a GPU an entry never stored is garbage; two stores of one would race)."""
    lay = pallas_gpu.Tiling.of(KeyLayout(n_cmem, n_mem, N, dropout=0.0), n_cmem + n_mem + N)
    b, P = lay.block, lay.band_width
    for query_block in range(N // b):
        counts = np.zeros((b, P), int)
        query = query_block * b + np.arange(b)[:, None]
        stores = [
            pallas_gpu.band_columns(
                query, np.asarray(lay.virtual_key(j * b + np.arange(b)[None])), lay
            )
            for j in range(lay.key_blocks_seen_by(query_block))
        ]
        for first, length in lay.unread_virtual_keys:
            stores += [
                pallas_gpu.band_columns(query, first + t * b + np.arange(b)[None], lay)
                for t in range(length // b)
            ]
        for column in stores:
            inside = (column >= 0) & (column < P)
            np.add.at(
                counts,
                (np.broadcast_to(query - query_block * b, column.shape)[inside], column[inside]),
                1,
            )
        assert (counts == 1).all(), (query_block, np.argwhere(counts != 1)[:5])


def test_auto_picks_the_gpu_kernel_on_nvidia_gpus_where_triton_can_tile_the_config():
    def resolved(kind="NVIDIA H100 80GB HBM3", impl="auto", **fields):
        return resolve_attention(
            ModelConfig(attention_impl=impl, **fields), "gpu", kind
        ).attention_impl

    assert resolved() == resolved(dropout=0.1) == resolved(compression="most_used") == "pallas_gpu"
    assert resolved(d_model=48, n_heads=2) == "cudnn"  # head dim 24: not a power of two
    assert (
        resolved(segment_length=8, memory_length=8, dropout=0.1) == "xla"
    )  # tiles under 16, and dropout
    assert resolved("AMD Instinct MI300X") == "cudnn"
    with pytest.raises(
        ValueError,
        match=r"pallas_gpu' cannot run this config: segment_length \(8\) and "
        r"memory_length \+ compressed_length \(16\) must be multiples of 16",
    ):
        resolved(impl="pallas_gpu", segment_length=8, memory_length=8, compressed_length=8)
    with pytest.raises(
        ValueError, match="pallas_gpu' is a Triton kernel for NVIDIA GPUs, and this is TPU v5"
    ):
        resolve_attention(ModelConfig(attention_impl="pallas_gpu"), "tpu", "TPU v5")
    assert (
        resolve_attention(ModelConfig(attention_impl="pallas_gpu"), "cpu", "cpu").attention_impl
        == "pallas_gpu"
    )


def _triton_kernels(text: str) -> list[str]:
    return re.findall(r'name = "(relative_attention_[a-z_]+_gpu)"', text)


@pytest.mark.slow
def test_the_kernel_lowers_for_cuda_at_the_pg19_shape():
    """8 heads, batch 2, 512 queries against 1,536 keys, head dim 128, bf16, attention dropout
    0.1: the forward, the evicted keys' usage and both backward kernels become Triton calls."""
    H, B, N, K, C, M = 8, 2, 512, 128, 512, 512
    T, P = C + M + N, C + M + 2 * N
    shapes = [(H, B, N, K), (H, K), (H, B, T, K), (H, B, T, K), (H, 2, K), (H, P, K)]
    abstract = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes] + [
        jax.ShapeDtypeStruct((B, T), jnp.bool_)
    ]

    def loss(*args):
        out, _, usage = flash_attention(
            pallas_gpu.KERNELS, AttentionOperands(*args), C, M, (C, C + N), 0.1, jnp.int32(7)
        )
        return jnp.sum(out.astype(jnp.float32)), usage

    lowered = (
        jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
        .trace(*abstract)
        .lower(lowering_platforms=("cuda",))
    )
    assert sorted(_triton_kernels(lowered.as_text())) == [
        "relative_attention_forward_gpu",
        "relative_attention_key_usage_gpu",
        "relative_attention_key_value_gradient_gpu",
        "relative_attention_query_gradient_gpu",
    ]


@pytest.mark.slow
def test_a_training_chunk_with_the_gpu_kernel_lowers_for_cuda():
    """The demo config's whole training program (two layers, attention dropout) with
    pallas_gpu, lowered for CUDA here: each layer's forward and two backward kernels."""
    cfg = demo.get_config()
    cfg.train.segments_per_call = 2
    cfg.model.attention_impl = "pallas_gpu"
    _, lowered = aot._lower(cfg, aot.Target.local(), lowering_platforms=("cuda",))
    kernels = _triton_kernels(lowered.as_text())
    assert set(kernels) == {
        "relative_attention_forward_gpu",
        "relative_attention_key_value_gradient_gpu",
        "relative_attention_query_gradient_gpu",
    }


def test_the_self_check_runs_the_gpu_kernel_at_the_configs_layout():
    cfg = resolve_attention(ModelConfig.from_config(demo.get_config().model), "cpu")
    result = selfcheck.run_self_check(
        dataclasses.replace(cfg, attention_impl="pallas_gpu", dropout=0.1)
    )
    assert result["ok"], {k: c for k, c in result["checks"].items() if not c["ok"]}
    assert {"dropout_mask_probe", "gradient_tables_dropout", "attention_mass"} <= set(
        result["checks"]
    )
