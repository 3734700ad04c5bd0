"""ctx.nn.pallas_tpu, the Pallas kernel behind model.attention_impl='pallas_tpu': in Pallas
interpret mode on CPU it equals naive relative attention in the output and in all six
gradients over several query and key blocks, and it lowers through Mosaic into TPU programs
compiled ahead of time with libtpu (the kernel alone at the PG-19 shape, and a whole training
chunk). Needs libtpu for the compiles (the [tpu] extra, which the test set-up installs)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import SingleDeviceSharding

from ctx import aot, train
from ctx.nn import fused_attention, pallas_tpu
from ctx.nn.fused_attention import AttentionOperands
from ctx.nn.pallas_tpu import Tiling, _skew, _unskew_reversed, block_sizes
from experiments import demo
from tests.helpers import ROOT, read_metrics, run_script, simulated_devices_env, tiny_train_config


# (n_cmem, n_mem, n_queries) with head dim 8: memory, segment and tables over several query
# blocks (256) and key blocks, compressed memory in whole key blocks (128 of 7 x 128), the
# compressed memory ending inside a key block (192 of 2 x 512: both tables in one tile), and a
# Transformer-XL.
LAYOUTS = [(256, 128, 512), (192, 320, 512), (0, 384, 256)]


def flash_attention(*args, n_cmem=0, n_mem=0, usage_keys=None, dropout=0.0, dropout_seed=None):
    """The TPU kernel through the contract's entry point, on q, u, k, v, v biases, tables, visible."""
    return fused_attention.flash_attention(
        pallas_tpu.KERNELS,
        AttentionOperands(*args),
        n_cmem,
        n_mem,
        usage_keys,
        dropout,
        dropout_seed,
    )


def test_block_sizes_divide_the_axes_in_tpu_tiles_or_take_them_whole():
    assert block_sizes(512, 1536) == (256, 512)
    assert block_sizes(512, 640) == (256, 128)
    assert block_sizes(24, 40) == (8, 40)  # 40 keys: no multiple of 128 divides it, so one block
    assert block_sizes(5, 12) == (5, 12)
    assert [block_sizes(N, C + M + N, C) for C, M, N in LAYOUTS] == [
        (256, 128),
        (256, 512),
        (256, 128),
    ]
    # Key blocks end where the compressed memory does when a block size allows it.
    assert block_sizes(512, 1536, 384) == (256, 384) and block_sizes(512, 1536, 448) == (256, 512)
    assert block_sizes(768, 2688, 1152) == (256, 384)  # enwik8: 7 key blocks, not 21 of 128
    assert block_sizes(384, 1152, 384) == (
        128,
        384,
    )  # the 384-wide layout checked against naive attention


def test_the_interpreted_skew_is_the_row_strided_rotation_a_tpu_runs():
    """Interpreted, a tile skews its position band by one gather instead of `pltpu.roll`
    (whose interpreter is one roll per row); both give the same tile."""
    lay = Tiling(n_cmem=0, n_mem=16, n_queries=16, dropout=0.0, query_block=8, key_block=16)
    band = jax.random.normal(jax.random.key(3), (lay.query_block, lay.window), jnp.float32)
    rolled = jax.jit(
        lambda b: pltpu.roll(b, lay.window - lay.query_block + 1, 1, stride=1, stride_axis=0)
    )(band)
    interpreted = _skew(band, dataclasses.replace(lay, interpret=True))
    np.testing.assert_array_equal(interpreted, rolled[:, : lay.key_block])
    # Row i starts at column bq-1-i of the band: the last query is nearest to every key.
    np.testing.assert_array_equal(interpreted[-1], band[-1, : lay.key_block])
    np.testing.assert_array_equal(interpreted[0], band[0, lay.query_block - 1 :][: lay.key_block])


def test_the_backward_lays_the_gradient_back_with_the_rotation_a_tpu_runs():
    """The backward's inverse of the skew, as a TPU runs it (an exchange product reversing the
    rows, then `pltpu.roll(stride=1)`, both interpreted by Pallas here), equals the gather the
    interpreted kernel uses; and it is the skew's inverse: skewing it back gives the tile."""
    lay = Tiling(n_cmem=0, n_mem=16, n_queries=16, dropout=0.0, query_block=8, key_block=16)
    grad = jax.random.normal(jax.random.key(4), (lay.query_block, lay.key_block), jnp.float32)

    def kernel(grad_ref, out_ref):
        out_ref[...] = _unskew_reversed(grad_ref[...], lay)  # the TPU branch

    on_tpu = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lay.query_block, lay.window), jnp.float32),
        interpret=True,
    )(grad)
    interpreted = _unskew_reversed(grad, dataclasses.replace(lay, interpret=True))
    np.testing.assert_array_equal(on_tpu, interpreted)
    np.testing.assert_array_equal(
        _skew(jnp.flip(interpreted, 0), dataclasses.replace(lay, interpret=True)), grad
    )
    assert np.count_nonzero(np.asarray(interpreted)) == grad.size  # zeros around the tile


@pytest.mark.slow
def test_the_kernels_gradient_program_runs_again_from_the_compilation_cache(tmp_path):
    """The interpreted training program of a layout whose tiles use both tables, written to
    JAX's persistent compilation cache by one process, loads and runs in the next (it once was
    so large that XLA:CPU's loader overflowed its stack and the second process segfaulted)."""
    runs = [
        run_script("kernel_gradient_from_the_cache.py", str(tmp_path / "cache"), timeout=600)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert any((tmp_path / "cache").iterdir())
    assert runs[0].stdout.splitlines()[-1] == runs[1].stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("n_cmem, n_mem", [(512, 512), (448, 576), (0, 1024)])
def test_the_kernel_lowers_through_mosaic_for_tpu_at_the_pg19_shape_with_its_cost(n_cmem, n_mem):
    """8 heads, batch 2, 512 queries against 1,536 keys, head dim 128, bf16 (the PG-19 layout;
    one where the compressed memory ends inside a key block; a Transformer-XL): the forward
    and the backward each are one Mosaic call, with the kernel's own FLOP and byte counts (XLA
    sees none otherwise); the evicted keys' usage is one more; dropout changes neither count;
    the statistics between the calls are lane-dense rows."""
    target = aot.Target.tpu("v5p-8")
    H, B, N, K = 8, 2, 512, 128
    T, P = n_cmem + n_mem + N, (n_cmem + N if n_cmem else 0) + n_mem + N
    sharding = SingleDeviceSharding(target.devices[0])
    shapes = [
        (H, B, N, K),
        (H, K),
        (H, B, T, K),
        (H, B, T, K),
        (H, 2 if n_cmem else 1, K),
        (H, P, K),
    ]
    abstract = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
    abstract.append(jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=sharding))

    def attend(*args):
        return flash_attention(*args, n_cmem=n_cmem, n_mem=n_mem)[0]

    def loss(*args):
        return jnp.sum(attend(*args).astype(jnp.float32))

    def attend_and_rank(*args):  # with the usage of the evicted keys, for 'most_used'
        return flash_attention(*args, n_cmem=n_cmem, n_mem=n_mem, usage_keys=(n_cmem, n_cmem + N))[
            ::2
        ]

    def dropped_loss(*args):  # with attention dropout
        return jnp.sum(
            flash_attention(
                *args, n_cmem=n_cmem, n_mem=n_mem, dropout=0.1, dropout_seed=jnp.int32(7)
            )[0].astype(jnp.float32)
        )

    forward = target.compile(jax.jit(attend).lower(*abstract))
    both = target.compile(jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*abstract))
    ranked = target.compile(jax.jit(attend_and_rank).lower(*abstract))
    dropped = target.compile(
        jax.jit(jax.grad(dropped_loss, argnums=tuple(range(6)))).lower(*abstract)
    )
    assert (
        forward.as_text().count("tpu_custom_call") == 1
        and both.as_text().count("tpu_custom_call") == 2
    )
    assert (
        ranked.as_text().count("tpu_custom_call") == 2
        and dropped.as_text().count("tpu_custom_call") == 2
    )
    cost = forward.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] >= 3 * 2 * H * B * N * T * K  # q·k, the position windows, p·v
    assert cost["bytes accessed"] >= 2 * H * B * (2 * N + 2 * T) * K  # q, k, v read, out written
    # Neither the probabilities nor the position term nor their gradients: no score-sized
    # array in either program (the backward lays the logits' gradient back onto the table's
    # windows inside the kernel).
    for program in (forward, both):
        assert not any(f"[{H},{B},{N},{width}]" in program.as_text() for width in (T, P)), n_cmem
    # The per-query statistics (log-sum-exp, delta, range masses) travel as rows: a column
    # [H,B,N,1] or [H,B,N,3] would take a 128-lane tile per query in HBM.
    for program in (forward, both, ranked, dropped):
        assert not any(f"f32[{H},{B},{N},{width}]" in program.as_text() for width in (1, 2, 3)), (
            n_cmem
        )
        assert f"f32[{H},{B},1,{N}]" in program.as_text()


@pytest.mark.slow
def test_a_training_chunk_with_the_pallas_attention_compiles_for_a_tpu_slice():
    cfg = demo.get_config()
    cfg.train.segments_per_call = 2
    cfg.model.dropout = 0.0
    cfg.model.attention_impl = "pallas_tpu"
    target = aot.Target.tpu("v5p-8")
    _, lowered = aot._lower(cfg, target)
    text = target.compile(lowered).as_text()
    assert text.count("tpu_custom_call") >= 2  # forward and backward kernels in the layer
    report = aot.fit(cfg, target)
    assert report["fits"] is True


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["pallas_tpu", "pallas_gpu"])
def test_eight_devices_with_the_pallas_kernel_train_like_one_with_dropout_too(tmp_path, kernel):
    """The kernels run per device inside a shard_map over the batch rows (XLA cannot partition
    them), and drop attention weights with masks seeded by each row's global index: 8 simulated
    devices, with fsdp and dropout 0.2 everywhere, give the losses of one device. (On one device
    the kernels equal the XLA attention: tests/test_attention_impl.py.)"""
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    cfg = tiny_train_config(num_steps=4)
    cfg.model.attention_impl, cfg.model.dropout = kernel, 0.2
    train.train_and_evaluate(cfg, one)
    out = run_script(
        "train_run.py",
        eight,
        "4",
        "2",
        kernel,
        "0.2",
        env=simulated_devices_env(8, PYTHONPATH=ROOT),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    platform = {"pallas_tpu": "TPU", "pallas_gpu": "GPU"}[kernel]
    assert (
        f"attention fused, ctx's Pallas flash kernel for {platform}s (Pallas interpret mode on cpu"
        in out.stdout
    )
    assert (
        f"ctx.train: attention self-check passed: {kernel} on cpu:cpu" in out.stdout
    )  # run before training
    rows1, rows8 = ([r for r in read_metrics(w) if "split" not in r] for w in (one, eight))
    assert rows8[0]["num_devices"] == 8 and [r["step"] for r in rows8] == [1, 2, 3, 4]
    for key in ("loss", "compression_loss"):
        np.testing.assert_allclose(
            [r[key] for r in rows8], [r[key] for r in rows1], rtol=1e-4, atol=1e-7
        )


@pytest.mark.slow
def test_the_tpu_skew_at_every_paper_layout_equals_the_interpreted_gather():
    """`pltpu.roll(stride=1)` as the kernel calls it on a TPU (interpreted by Pallas here: one
    roll per row), at each paper config's tile, band shape and shift (PG-19's rotates a
    [256, 768] band by 513), equals the gather the interpreted kernel uses, so the CPU tests'
    numbers are the TPU program's. (Mosaic's lowering of it: the AOT compiles above.)"""
    out = run_script(
        "strided_roll_at_paper_layouts.py",
        env=dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false"),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["pg19:ct"][:2] == [[256, 768], 513] and results["enwik8:ct"][:2] == [
        [256, 640],
        385,
    ]
    assert set(results) == {f"{t}:{v}" for t in ("pg19", "enwik8", "wt103") for v in ("ct", "txl")}
    assert all(difference == 0.0 for _, _, difference in results.values()), results


@pytest.mark.slow
@pytest.mark.parametrize("slice_name, task", [("v5litepod-8", "enwik8"), ("v6e-8", "wt103")])
def test_the_kernel_compiles_for_the_generations_of_the_other_paper_slices(slice_name, task):
    """enwik8 trains on v5e slices and WikiText-103 on v6e (docs/tpu.md): the kernel's forward
    and backward, with attention dropout and the evicted keys' usage, lower through Mosaic for
    those chips too, at the configs' own layouts (WT103's head dim is 64)."""
    import importlib

    m = importlib.import_module(f"experiments.{task}").get_config().model
    target = aot.Target.tpu(slice_name)
    H, B, N, K, C, M = (
        2,
        2,
        m.segment_length,
        m.d_model // m.n_heads,
        m.compressed_length,
        m.memory_length,
    )
    T, P = C + M + N, (C + N) + M + N
    sharding = SingleDeviceSharding(target.devices[0])
    shapes = [(H, B, N, K), (H, K), (H, B, T, K), (H, B, T, K), (H, 2, K), (H, P, K)]
    abstract = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
    abstract.append(jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=sharding))

    def loss(*args):
        out, _, usage = flash_attention(
            *args, n_cmem=C, n_mem=M, usage_keys=(C, C + N), dropout=0.1, dropout_seed=jnp.int32(7)
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(usage)

    text = target.compile(
        jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)))).lower(*abstract)
    ).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, usage, backward
