"""The vectorised relative attention against a brute-force loop over (query, key) pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx.config import ModelConfig
from ctx.nn.attention import RelativeAttention, attention_mask
from ctx.nn.relative_position import relative_shift
from tests import reference
from tests.helpers import tiny_model_config


def test_relative_shift_matches_explicit_indexing():
    N, P = 3, 7
    raw = np.arange(N * P, dtype=np.float32).reshape(N, P)  # column k: distance P-1-k
    shifted = np.asarray(relative_shift(jnp.asarray(raw)))
    M = P - N
    for i in range(N):
        for j in range(M + i + 1):  # past and present keys only
            distance = M + i - j
            assert shifted[i, j] == raw[i, P - 1 - distance]


def _attention_case(C, M, N=4, B=2):
    """A RelativeAttention with non-zero biases (so u, v and the compressed-memory v all
    matter), random inputs, and masks where row 0 is fully valid and row 1 has only its
    newest memory slots valid (as after a recent reset)."""
    cfg = ModelConfig.from_config(
        tiny_model_config(segment_length=N, memory_length=M, compressed_length=C)
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, N, cfg.d_model)).astype(np.float32)
    mem = rng.normal(size=(B, M, cfg.d_model)).astype(np.float32)
    cmem = rng.normal(size=(B, C, cfg.d_model)).astype(np.float32)
    mem_mask = np.stack([np.ones(M, bool), np.arange(M) >= M - 1])
    cmem_mask = np.stack([np.ones(C, bool), np.arange(C) >= C - 2])
    module = RelativeAttention(cfg)
    mask = attention_mask(jnp.asarray(mem_mask), jnp.asarray(cmem_mask), N)
    variables = module.init(jax.random.key(1), x, mem, cmem, mask)
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), variables["params"]
    )
    return module, params, (x, mem, cmem, mask), (mem_mask, cmem_mask)


@pytest.mark.parametrize("C, M", [(3, 5), (0, 5), (0, 0), (4, 0), (6, 2)])
def test_attention_matches_brute_force(C, M):
    module, params, inputs, (mem_mask, cmem_mask) = _attention_case(C, M)
    x, mem, cmem, _ = inputs
    attended = module.apply({"params": params}, *inputs)
    out, probs = attended.out, attended.probs
    assert attended.queries.shape[2] == x.shape[1] and attended.keys.shape[2] == C + M + x.shape[1]
    np.testing.assert_allclose(
        attended.mass.sum(), 1.0, rtol=1e-5
    )  # every query's attention is counted once
    assert attended.usage is None  # only 'most_used' compression reports it
    p = reference._to_numpy(params)
    for b in range(x.shape[0]):
        ref_out, ref_probs = reference.attention(
            p, x[b], mem[b], cmem[b], mem_mask[b], cmem_mask[b]
        )
        np.testing.assert_allclose(np.asarray(probs[b]), ref_probs, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out[b]), ref_out, rtol=1e-4, atol=1e-5)
    # Invalid memory gets exactly zero attention.
    assert float(jnp.abs(probs[1, :, :, :C][..., ~cmem_mask[1]]).max(initial=0.0)) == 0.0
    assert float(jnp.abs(probs[1, :, :, C : C + M][..., ~mem_mask[1]]).max(initial=0.0)) == 0.0


@pytest.mark.parametrize("C, M", [(3, 5), (0, 5)])
def test_attention_gradients_match_the_brute_force(C, M):
    """jax.grad of the vectorised attention (biases split off as score rows, one position GEMM
    and shift for both tables) against central differences of the float64 brute-force loop,
    along a random direction per parameter."""
    module, params, inputs, (mem_mask, cmem_mask) = _attention_case(C, M)
    x, mem, cmem, _ = inputs
    weights = np.random.default_rng(1).normal(size=x.shape)
    grads = jax.grad(lambda p: (module.apply({"params": p}, *inputs).out * weights).sum())(params)

    def reference_loss(p):
        return sum(
            (
                reference.attention(
                    p,
                    x[b].astype(np.float64),
                    mem[b].astype(np.float64),
                    cmem[b].astype(np.float64),
                    mem_mask[b],
                    cmem_mask[b],
                )[0]
                * weights[b]
            ).sum()
            for b in range(x.shape[0])
        )

    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), reference._to_numpy(params))
    names = ["query", "key", "value", "pos_kernel", "u_bias", "v_bias"]
    names += ["cmem_pos_kernel", "cmem_v_bias"] if C else []
    rng, eps = np.random.default_rng(2), 1e-5
    for name in names:
        direction = rng.normal(size=p64[name].shape)
        shifted = [{**p64, name: p64[name] + sign * eps * direction} for sign in (1, -1)]
        numeric = (reference_loss(shifted[0]) - reference_loss(shifted[1])) / (2 * eps)
        analytic = float((np.asarray(grads[name], np.float64) * direction).sum())
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-3), name


def test_attention_mask_hand_computed():
    mem_mask = jnp.array([[False, True]])
    cmem_mask = jnp.array([[True]])
    mask = np.asarray(attention_mask(mem_mask, cmem_mask, 3))[0, 0]
    expected = np.array(
        [
            # cmem, mem0, mem1, x0, x1, x2
            [1, 0, 1, 1, 0, 0],
            [1, 0, 1, 1, 1, 0],
            [1, 0, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)
