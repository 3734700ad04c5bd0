"""ctx.nn.ops: the same values and gradients as JAX's and Flax's own ops, with less kept for the backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from ctx.config import ModelConfig
from ctx.nn.attention import attention_mask
from ctx.nn.memory import LayerMemory
from ctx.nn.ops import LayerNorm, relu, softmax
from ctx.nn.transformer import Block
from tests.helpers import tiny_model_config


def _vjp(f, *args, cotangent):
    out, pullback = jax.vjp(f, *args)
    return out, pullback(cotangent)


@pytest.mark.parametrize(
    "ours, reference",
    [(softmax, lambda x: jax.nn.softmax(x, axis=-1)), (relu, jax.nn.relu)],
    ids=["softmax", "relu"],
)
def test_softmax_and_relu_match_jax_values_and_gradients(ours, reference):
    x = 3 * jax.random.normal(jax.random.key(0), (3, 5, 16))
    x = x.at[0, 0, :4].set(0.0)  # ReLU's kink: the gradient at exactly 0 is 0 in both
    g = jax.random.normal(jax.random.key(1), x.shape)
    (y, (dx,)), (y_ref, (dx_ref,)) = _vjp(ours, x, cotangent=g), _vjp(reference, x, cotangent=g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_masked_softmax_matches_jax_and_gives_masked_entries_nothing():
    x = 3 * jax.random.normal(jax.random.key(0), (3, 5, 16))
    g = jax.random.normal(jax.random.key(1), x.shape)
    mask = (
        jax.random.bernoulli(jax.random.key(2), 0.6, (1, 5, 16)).at[..., 0].set(True)
    )  # broadcast over rows
    y, (dx,) = _vjp(lambda x: softmax(x, mask), x, cotangent=g)
    y_ref, (dx_ref,) = _vjp(
        lambda x: jax.nn.softmax(jnp.where(mask, x, -1e30), axis=-1), x, cotangent=g
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    hidden = np.broadcast_to(~np.asarray(mask), x.shape)
    assert np.all(np.asarray(y)[hidden] == 0) and np.all(np.asarray(dx)[hidden] == 0)
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_matches_flax_values_and_gradients(dtype):
    x = 2 + 3 * jax.random.normal(jax.random.key(0), (4, 6, 32))
    ours, flax_ln = LayerNorm(dtype=dtype), nn.LayerNorm(dtype=dtype)
    params = flax_ln.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(1), x))
    params = jax.tree.map(
        lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params
    )  # non-trivial γ, β
    g = jax.random.normal(jax.random.key(3), x.shape).astype(dtype)
    (y, grads), (y_ref, grads_ref) = [
        _vjp(lambda p, x: m.apply(p, x), params, x, cotangent=g) for m in (ours, flax_ln)
    ]
    assert y.dtype == y_ref.dtype == jnp.dtype(dtype) and grads[1].dtype == x.dtype
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == "bfloat16" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **tolerance
    )
    for ours_leaf, ref_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(
            np.asarray(ours_leaf, np.float32), np.asarray(ref_leaf, np.float32), **tolerance
        )


def test_a_layer_keeps_one_tensor_per_op_for_its_backward(capsys):
    """The probabilities are the only [H,B,N,T] float tensor a layer keeps (jax.nn.softmax kept
    three), the ReLU output the only [B,N,d_ff] one (jax.nn.relu added a mask and a zeros
    tensor), and nothing of flax's LayerNorm intermediates is kept."""
    cfg = ModelConfig.from_config(tiny_model_config())
    B, N, T = 2, cfg.segment_length, cfg.compressed_length + cfg.memory_length + cfg.segment_length
    x, mem, cmem = (
        jnp.ones((B, n, cfg.d_model)) for n in (N, cfg.memory_length, cfg.compressed_length)
    )
    mask = attention_mask(
        jnp.ones((B, cfg.memory_length), bool), jnp.ones((B, cfg.compressed_length), bool), N
    )
    block, layer = Block(cfg), LayerMemory(mem=mem, cmem=cmem)
    params = block.init(jax.random.key(0), x, layer, mask, True, method=Block.segment)

    def loss(p, x):
        y, (_, aux) = block.apply(p, x, layer, mask, True, method=Block.segment)
        return y.sum() + aux.compression_loss_per_layer

    print_saved_residuals(loss, params, x)
    kept = capsys.readouterr().out.splitlines()
    score_sized = [line for line in kept if line.startswith(f"f32[{cfg.n_heads},{B},{N},{T}]")]
    assert len(score_sized) == 1 and "softmax" in score_sized[0], kept
    mlp_sized = [line for line in kept if f"[{B},{N},{cfg.d_ff}]" in line]
    assert len(mlp_sized) == 1 and mlp_sized[0].startswith("f32") and "relu" in mlp_sized[0], kept
    assert not [line for line in kept if "normalization.py" in line], kept
