"""ctx.flash_attention, the Pallas kernel behind model.attention_impl='pallas_tpu': in Pallas
interpret mode on CPU it equals naive softmax attention in the output and in all four
gradients over several query and key blocks, and it lowers through Mosaic into TPU programs
compiled ahead of time with libtpu (the kernel alone at the PG-19 shape, and a whole training
chunk). Needs libtpu for the compiles (the [tpu] extra, which the test set-up installs)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from ctx import aot, train
from ctx.flash_attention import block_sizes, flash_attention
from experiments import demo
from tests.helpers import ROOT, read_metrics, script, simulated_devices_env, tiny_train_config


def naive_attention(q, k, v, bias):
    logits = jnp.einsum("hbnk,hbtk->hbnt", q, k, preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
    return jnp.einsum("hbnt,hbtk->hbnk", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def inputs(H, B, N, T, K, dtype, seed=0):
    """Random q, k, v and a bias that masks, as the model's does, the first 100 keys (empty
    memory slots) and the future of each query, with a large negative value."""
    q, k, v, bias = (jax.random.normal(key, shape, jnp.float32) for key, shape in zip(
        jax.random.split(jax.random.key(seed), 4), [(H, B, N, K), (H, B, T, K), (H, B, T, K), (H, B, N, T)]))
    visible = (np.arange(T)[None] <= (T - N) + np.arange(N)[:, None]) & (np.arange(T) >= 100)[None]
    bias = jnp.where(visible, bias, jnp.finfo(dtype).min / 2)
    return [x.astype(dtype) for x in (q, k, v, bias)]


def test_block_sizes_divide_the_axes_in_tpu_tiles_or_take_them_whole():
    assert block_sizes(512, 1536) == (256, 512)
    assert block_sizes(512, 640) == (256, 128)
    assert block_sizes(24, 40) == (8, 40)  # 40 keys: no multiple of 128 divides it, so one block
    assert block_sizes(5, 12) == (5, 12)


def attend(q, k, v, bias):
    """The kernel's output, with key ranges split at 150 and 300 (across key blocks of 128)."""
    return flash_attention(q, k, v, bias, (150, 300))[0]


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_the_kernel_equals_naive_attention_in_the_output_and_every_gradient(dtype, tolerance):
    q, k, v, bias = inputs(2, 1, 512, 640, 8, dtype)  # 2 query blocks x 5 key blocks
    assert block_sizes(512, 640) == (256, 128)
    weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def loss(attention):
        return lambda *args: jnp.sum(attention(*args).astype(jnp.float32) * weights)

    got, want = jax.jit(attend)(q, k, v, bias), naive_attention(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance)
    grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    expected = jax.grad(loss(naive_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for name, g, e in zip("q k v bias".split(), grads, expected):
        assert g.dtype == e.dtype == dtype, name
        scale = float(jnp.max(jnp.abs(e.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tolerance * scale,
                                   err_msg=name)
    assert not np.any(np.asarray(grads[3], np.float32)[..., :100])  # masked keys get no gradient


def test_the_kernel_returns_the_attention_each_query_gives_each_key_range():
    q, k, v, bias = inputs(2, 2, 512, 640, 8, jnp.float32)
    _, mass = jax.jit(flash_attention, static_argnums=4)(q, k, v, bias, (150, 300))
    probs = np.asarray(jax.nn.softmax(jnp.einsum("hbnk,hbtk->hbnt", q, k) + bias, axis=-1))
    expected = np.stack([probs[..., :150].sum(-1), probs[..., 150:300].sum(-1), probs[..., 300:].sum(-1)], -1)
    assert mass.shape == (2, 2, 512, 3)
    np.testing.assert_allclose(mass, expected, atol=1e-5)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)


def test_the_kernel_lowers_through_mosaic_for_tpu_at_the_pg19_shape_with_its_cost():
    """8 heads, batch 2, 512 queries against 1,536 keys (cmem + mem + segment), head dim 128,
    bf16: the forward and the backward each are one Mosaic call, with the kernel's own FLOP
    and byte counts (XLA sees none otherwise)."""
    target = aot.Target.tpu("v5p-8")
    H, B, N, T, K = 8, 2, 512, 1536, 128
    sharding = SingleDeviceSharding(target.devices[0])
    abstract = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
                for shape in [(H, B, N, K), (H, B, T, K), (H, B, T, K), (H, B, N, T)]]

    def loss(*args):
        return jnp.sum(attend(*args).astype(jnp.float32))

    forward = target.compile(jax.jit(attend).lower(*abstract))
    both = target.compile(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*abstract))
    assert forward.as_text().count("tpu_custom_call") == 1 and both.as_text().count("tpu_custom_call") == 2
    cost = forward.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] >= 2 * 2 * H * B * N * T * K  # q·k and p·v
    assert cost["bytes accessed"] >= 2 * H * B * N * T  # the bf16 bias, read once


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
def test_eight_devices_with_the_pallas_kernel_train_like_one_with_xla(tmp_path):
    """The kernel runs per device inside a shard_map over the batch rows (XLA cannot partition
    it): 8 simulated devices, with fsdp, give the losses of the XLA reference on one device."""
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    cfg = tiny_train_config(num_steps=4)
    cfg.model.dropout = 0.0
    train.train_and_evaluate(cfg, one)
    out = subprocess.run([sys.executable, script("train_run.py"), eight, "4", "2", "pallas_tpu"],
                         env=simulated_devices_env(8, PYTHONPATH=ROOT), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "attention fused, ctx's Pallas flash kernel (Pallas interpret mode on cpu" in out.stdout
    rows1, rows8 = ([r for r in read_metrics(w) if "split" not in r] for w in (one, eight))
    assert rows8[0]["num_devices"] == 8 and [r["step"] for r in rows8] == [1, 2, 3, 4]
    for key in ("loss", "compression_loss"):
        np.testing.assert_allclose([r[key] for r in rows8], [r[key] for r in rows1], rtol=1e-4, atol=1e-7)
