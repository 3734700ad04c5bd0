"""ctx.nn.pallas_gpu, the Pallas (Triton) kernel behind model.attention_impl='pallas_gpu': in
Pallas interpret mode on CPU it equals naive relative attention in the output, the range
masses, the evicted keys' usage and all six gradients, over several query and key blocks and
key blocks that straddle the compressed memory and the memory; with attention dropout its
output is the TPU kernel's to rounding (one hash, one mask); its backward writes every entry of
the band gradient exactly once; and its programs (the kernel at the PG-19 shape, a whole
training chunk) lower for CUDA on this CPU machine. (Model-level equality with xla for every
case: tests/test_attention_impl.py.)"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx import aot, selfcheck
from ctx.config import ModelConfig, resolve_attention
from ctx.nn import pallas_gpu, pallas_tpu
from ctx.nn.attention_reference import range_masses, reference_attention
from experiments import demo
from tests.test_flash_attention import LAYOUTS, inputs

# (n_cmem, n_mem, n_queries): LAYOUTS' first (whole key blocks), one whose compressed memory
# ends inside a 64-key block (48 of 48 + 80 + 64: a tile holds both tables' keys), and a
# Transformer-XL.
GPU_LAYOUTS = [LAYOUTS[0], (48, 80, 64), LAYOUTS[2]]


def test_tiles_are_the_largest_power_of_two_up_to_64_dividing_the_queries_and_the_keys():
    assert pallas_gpu.block_size(512, 1536) == 64
    assert pallas_gpu.block_size(768, 2688) == 64  # enwik8: 1,152 + 768 + 768 keys
    assert pallas_gpu.block_size(64, 128) == 64 and pallas_gpu.block_size(32, 96) == 32
    assert pallas_gpu.block_size(8, 24) == 8  # the tiny test models: interpret mode only


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_the_kernel_equals_naive_attention_in_the_output_statistics_and_every_gradient(layout):
    n_cmem, n_mem, N = layout
    args = inputs(n_cmem, n_mem, N, jnp.float32)
    usage_keys = (n_cmem, n_cmem + N) if n_cmem else None
    weights = jax.random.normal(jax.random.key(9), args[0].shape, jnp.float32)
    out, mass, usage = jax.jit(lambda *a: pallas_gpu.flash_attention(*a, n_cmem, n_mem, usage_keys))(*args)
    want, probs = reference_attention(*args, n_cmem, n_mem)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(mass, range_masses(probs, n_cmem, n_mem), atol=1e-5)
    if n_cmem:
        np.testing.assert_allclose(usage, probs[..., n_cmem:n_cmem + N].sum(axis=2), rtol=1e-5, atol=1e-5)
    else:
        assert usage is None

    def loss(attention):
        return lambda *a: jnp.sum(attention(*a) * weights)

    argnums = tuple(range(6))
    grads = jax.jit(jax.grad(loss(lambda *a: pallas_gpu.flash_attention(*a, n_cmem, n_mem)[0]), argnums))(*args)
    expected = jax.grad(loss(lambda *a: reference_attention(*a, n_cmem, n_mem)[0]), argnums)(*args)
    for name, g, e in zip("q u k v v_biases tables".split(), grads, expected):
        np.testing.assert_allclose(g, e, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)
    assert not np.any(np.asarray(grads[2])[:, 1, :100])  # empty slots' keys get no gradient


def test_with_attention_dropout_it_drops_the_weights_the_tpu_kernel_and_the_reference_drop():
    n_cmem, n_mem, N = GPU_LAYOUTS[1]
    rate, seed = 0.3, jnp.int32(77)
    args = inputs(n_cmem, n_mem, N, jnp.float32)
    args[-1] = args[-1].at[1].set(jnp.arange(n_cmem + n_mem + N) >= 30)
    weights = jax.random.normal(jax.random.key(9), args[0].shape, jnp.float32)

    def attend(kernel):
        return lambda *a: kernel(*a, n_cmem, n_mem, None, rate, seed)[0]

    gpu, tpu = (jax.jit(attend(k.flash_attention))(*args) for k in (pallas_gpu, pallas_tpu))
    want = reference_attention(*args, n_cmem, n_mem, rate, seed)[0]
    np.testing.assert_allclose(gpu, tpu, atol=1e-5)
    np.testing.assert_allclose(gpu, want, atol=1e-5)
    assert np.abs(np.asarray(gpu - reference_attention(*args, n_cmem, n_mem)[0])).max() > 0.1  # it did drop
    argnums = tuple(range(6))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(attend(pallas_gpu.flash_attention)(*a) * weights), argnums))(*args)
    expected = jax.grad(lambda *a: jnp.sum(reference_attention(*a, n_cmem, n_mem, rate, seed)[0] * weights),
                        argnums)(*args)
    for name, g, e in zip("q u k v v_biases tables".split(), grads, expected):
        np.testing.assert_allclose(g, e, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)
    with pytest.raises(ValueError, match="attention dropout at 0.3 needs a dropout_seed"):
        pallas_gpu.flash_attention(*args, n_cmem, n_mem, None, rate)
    with pytest.raises(ValueError, match=r"usage of the evicted keys \(48, 112\) only"):
        pallas_gpu.flash_attention(*args, n_cmem, n_mem, (0, 8))


@pytest.mark.parametrize("n_cmem, n_mem, N", [(24, 40, 64), (0, 64, 32), (128, 128, 128)])
def test_the_backward_writes_every_band_gradient_entry_exactly_once(n_cmem, n_mem, N):
    """The query-gradient kernel scatters each tile's logits' gradient to band columns and zeros
    to the columns no key reads: over all of a query block's key blocks (up to its last query)
    and zero blocks, each column of each row in [0, P) is stored once and nothing else is
    stored unmasked (on a GPU an entry never stored is garbage; two stores of one would race)."""
    lay = pallas_gpu._Layout(n_cmem, n_mem, N, pallas_gpu.block_size(N, n_cmem + n_mem + N))
    b, P = lay.block, lay.band_width
    for query_block in range(N // b):
        counts = np.zeros((b, P), int)
        query = query_block * b + np.arange(b)[:, None]
        stores = [pallas_gpu.band_columns(query, np.asarray(pallas_gpu.virtual_keys(j * b + np.arange(b)[None], lay)),
                                          lay) for j in range(lay.key_blocks_seen_by(query_block))]
        for first, length in lay.unread_virtual_keys:
            stores += [pallas_gpu.band_columns(query, first + t * b + np.arange(b)[None], lay)
                       for t in range(length // b)]
        for column in stores:
            inside = (column >= 0) & (column < P)
            np.add.at(counts, (np.broadcast_to(query - query_block * b, column.shape)[inside], column[inside]), 1)
        assert (counts == 1).all(), (query_block, np.argwhere(counts != 1)[:5])


def test_auto_picks_the_gpu_kernel_on_nvidia_gpus_where_triton_can_tile_the_config():
    def resolved(kind="NVIDIA H100 80GB HBM3", impl="auto", **fields):
        return resolve_attention(ModelConfig(attention_impl=impl, **fields), "gpu", kind).attention_impl

    assert resolved() == resolved(dropout=0.1) == resolved(compression="most_used") == "pallas_gpu"
    assert resolved(d_model=48, n_heads=2) == "cudnn"  # head dim 24: not a power of two
    assert resolved(segment_length=8, memory_length=8, dropout=0.1) == "xla"  # tiles under 16, and dropout
    assert resolved("AMD Instinct MI300X") == "cudnn"
    with pytest.raises(ValueError, match=r"pallas_gpu' cannot run this config: segment_length \(8\) and "
                       r"memory_length \+ compressed_length \(16\) must be multiples of 16"):
        resolved(impl="pallas_gpu", segment_length=8, memory_length=8, compressed_length=8)
    with pytest.raises(ValueError, match="pallas_gpu' is a Triton kernel for NVIDIA GPUs, and this is TPU v5"):
        resolve_attention(ModelConfig(attention_impl="pallas_gpu"), "tpu", "TPU v5")
    assert resolve_attention(ModelConfig(attention_impl="pallas_gpu"), "cpu", "cpu").attention_impl == "pallas_gpu"


def _triton_kernels(text: str) -> list[str]:
    return re.findall(r'name = "(relative_attention_[a-z_]+_gpu)"', text)


def test_the_kernel_lowers_for_cuda_at_the_pg19_shape():
    """8 heads, batch 2, 512 queries against 1,536 keys, head dim 128, bf16, attention dropout
    0.1: the forward, the evicted keys' usage and both backward kernels become Triton calls."""
    H, B, N, K, C, M = 8, 2, 512, 128, 512, 512
    T, P = C + M + N, C + M + 2 * N
    shapes = [(H, B, N, K), (H, K), (H, B, T, K), (H, B, T, K), (H, 2, K), (H, P, K)]
    abstract = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes] + [
        jax.ShapeDtypeStruct((B, T), jnp.bool_)]

    def loss(*args):
        out, _, usage = pallas_gpu.flash_attention(*args, C, M, (C, C + N), 0.1, jnp.int32(7))
        return jnp.sum(out.astype(jnp.float32)), usage

    lowered = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)).trace(*abstract).lower(
        lowering_platforms=("cuda",))
    assert sorted(_triton_kernels(lowered.as_text())) == [
        "relative_attention_forward_gpu", "relative_attention_key_usage_gpu",
        "relative_attention_key_value_gradient_gpu", "relative_attention_query_gradient_gpu"]


def test_a_training_chunk_with_the_gpu_kernel_lowers_for_cuda():
    """The demo config's whole training program (two layers, attention dropout) with
    pallas_gpu, lowered for CUDA here: each layer's forward and two backward kernels."""
    cfg = demo.get_config()
    cfg.train.segments_per_call = 2
    cfg.model.attention_impl = "pallas_gpu"
    _, lowered = aot._lower(cfg, aot.Target.local(), lowering_platforms=("cuda",))
    kernels = _triton_kernels(lowered.as_text())
    assert set(kernels) == {"relative_attention_forward_gpu", "relative_attention_key_value_gradient_gpu",
                            "relative_attention_query_gradient_gpu"}


def test_the_self_check_runs_the_gpu_kernel_at_the_configs_layout():
    cfg = resolve_attention(ModelConfig.from_config(demo.get_config().model), "cpu")
    result = selfcheck.run_self_check(dataclasses.replace(cfg, attention_impl="pallas_gpu", dropout=0.1))
    assert result["ok"], {k: c for k, c in result["checks"].items() if not c["ok"]}
    assert {"dropout_mask_probe", "gradient_tables_dropout", "attention_mass"} <= set(result["checks"])
