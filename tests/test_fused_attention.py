"""The fused attention's contract (ctx.nn.fused_attention), held by every implementation the
self-check holds to it: both Pallas kernels in interpret mode (the code a TPU or a GPU runs) and
the cudnn path (its XLA twin on this CPU) equal ctx.nn.attention_reference in the output, the
range masses, the evicted keys' usage and all six gradients, with and without attention dropout,
on the inputs the self-check draws (`draw_operands`), called as the self-check calls them
(`ctx.selfcheck.fused_attention`). Each backend's own tiling rules are in its own test file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx import selfcheck
from ctx.nn import pallas_gpu, pallas_tpu
from ctx.nn.attention_reference import (
    draw_operands,
    dropout_mask,
    range_masses,
    reference_attention,
)
from ctx.nn.fused_attention import AttentionOperands, KeyLayout, flash_attention

# (n_cmem, n_mem, n_queries), head dim 8: memory, segment and tables over several query and key
# blocks of either kernel, with the compressed memory in whole key blocks; a compressed memory
# that ends inside a TPU key block (192 of 512: both tables in one tile); one that ends inside a
# GPU tile (48 of 64); a Transformer-XL; and 384-wide TPU key blocks (enwik8's) with 128-query
# blocks.
WHOLE_BLOCKS, INSIDE_TPU_BLOCK, INSIDE_GPU_TILE, TRANSFORMER_XL, WIDE_BLOCKS = (
    (256, 128, 512),
    (192, 320, 512),
    (48, 80, 64),
    (0, 384, 256),
    (384, 384, 384),
)
HEAD_DIM = 8
FUSED = ("pallas_tpu", "pallas_gpu")
GRADIENTS = AttentionOperands._fields[:6]


def case(impl, layout, slow=False):
    return pytest.param(
        impl, layout, marks=[pytest.mark.slow] if slow else [], id=f"{impl}-{layout}"
    )


# The GPU kernel interprets slowly at 512-query layouts: one of them in the fast tier.
CASES = (
    [
        case("pallas_tpu", layout)
        for layout in (WHOLE_BLOCKS, INSIDE_TPU_BLOCK, TRANSFORMER_XL, WIDE_BLOCKS)
    ]
    + [case("pallas_tpu", INSIDE_GPU_TILE)]
    + [case("pallas_gpu", layout) for layout in (WHOLE_BLOCKS, INSIDE_GPU_TILE, TRANSFORMER_XL)]
    + [case("pallas_gpu", layout, slow=True) for layout in (INSIDE_TPU_BLOCK, WIDE_BLOCKS)]
    + [case("cudnn", layout) for layout in (INSIDE_GPU_TILE, TRANSFORMER_XL)]
)


def problem(impl, layout, dtype="float32", dropout=0.0) -> selfcheck.Problem:
    n_cmem, n_mem, N = layout
    return selfcheck.Problem(
        impl, N, n_mem, n_cmem, HEAD_DIM, dtype, dropout, usage=impl in FUSED and n_cmem > 0
    )


def operands(layout, dtype="float32", seed=1) -> AttentionOperands:
    return draw_operands(*layout, HEAD_DIM, dtype, seed)


def assert_gradients_equal(attention, reference, args, tolerance):
    """The six gradients of Σ weights·output, each to `tolerance` of its largest entry."""
    weights = jax.random.normal(jax.random.key(9), args.q.shape, jnp.float32)

    def gradients(f):
        def loss(*differentiable):
            return jnp.sum(f(*differentiable, args.visible).astype(jnp.float32) * weights)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args[:6])

    got, want = gradients(attention), gradients(reference)
    for name, g, w in zip(GRADIENTS, got, want):
        assert g.dtype == w.dtype == args.q.dtype, name
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(
            np.asarray(g, np.float32),
            np.asarray(w, np.float32),
            atol=tolerance * scale,
            err_msg=name,
        )
    return got


@pytest.mark.parametrize("impl, layout", CASES)
def test_the_output_range_masses_and_evicted_keys_usage_equal_the_reference(impl, layout):
    p = problem(impl, layout)
    args = operands(layout)
    out, masses, usage = jax.jit(selfcheck.fused_attention(p))(*args)
    want, probs = reference_attention(*args, n_cmem=p.n_cmem, n_mem=p.n_mem)
    np.testing.assert_allclose(out, want, atol=1e-5)
    if impl == "cudnn":  # no statistics
        assert masses is None and usage is None
        return
    np.testing.assert_allclose(masses, range_masses(probs, p.n_cmem, p.n_mem), atol=1e-5)
    np.testing.assert_allclose(masses.sum(-1), 1.0, atol=1e-5)
    if p.usage:
        assert usage.shape == (2, 2, p.n_queries)
        np.testing.assert_allclose(
            usage, probs[..., p.n_cmem : p.n_cmem + p.n_queries].sum(axis=2), atol=1e-5
        )
        assert not np.any(
            np.asarray(usage)[:, 1, : p.n_mem]
        )  # row 1 has no valid memory: none of it is attended
    else:
        assert usage is None  # only when asked


@pytest.mark.parametrize("impl, layout", CASES)
def test_every_gradient_equals_the_references(impl, layout):
    p = problem(impl, layout)
    args = operands(layout)
    grads = assert_gradients_equal(
        lambda *a: selfcheck.fused_attention(p)(*a)[0],
        lambda *a: reference_attention(*a, n_cmem=p.n_cmem, n_mem=p.n_mem)[0],
        args,
        1e-5,
    )
    memory = p.n_cmem + p.n_mem
    assert not np.any(
        np.asarray(grads[2])[:, 1, :memory]
    )  # row 1's empty slots' keys get no gradient
    assert np.all(np.any(np.asarray(grads[2])[:, 0, memory // 4 :] != 0, axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("layout", [WHOLE_BLOCKS, INSIDE_TPU_BLOCK, TRANSFORMER_XL])
def test_in_bfloat16_every_gradient_equals_the_reference_to_bf16_precision(impl, layout):
    p = problem(impl, layout, "bfloat16")
    assert_gradients_equal(
        lambda *a: selfcheck.fused_attention(p)(*a)[0],
        lambda *a: reference_attention(*a, n_cmem=p.n_cmem, n_mem=p.n_mem)[0],
        operands(layout, "bfloat16"),
        3e-2,
    )


@pytest.mark.parametrize("impl", FUSED)
def test_with_dropout_the_kernel_drops_the_references_weights_in_the_output_and_every_gradient(
    impl,
):
    """Attention dropout inside the tile: the output and all six gradients equal the
    reference's with the mask `kept_weights` hashes from the seed and the indices (the backward
    regenerates the forward's), so both kernels drop the same weights."""
    rate, seed = 0.3, jnp.int32(1234)
    p = problem(impl, INSIDE_GPU_TILE, dropout=rate)
    args = operands(INSIDE_GPU_TILE)

    def attention(*a):
        return selfcheck.fused_attention(p)(*a, dropout=rate, seed=seed)[0]

    def reference(*a):
        return reference_attention(*a, n_cmem=p.n_cmem, n_mem=p.n_mem, dropout=rate, seed=seed)[0]

    got = jax.jit(attention)(*args)
    np.testing.assert_allclose(got, reference(*args), atol=1e-5)
    undropped = reference_attention(*args, n_cmem=p.n_cmem, n_mem=p.n_mem)[0]
    assert np.abs(np.asarray(got - undropped)).max() > 0.1  # it did drop
    assert_gradients_equal(attention, reference, args, 1e-5)
    with pytest.raises(ValueError, match="attention dropout at 0.3 needs a dropout_seed"):
        selfcheck.fused_attention(p)(*args, dropout=rate)


def test_the_dropout_mask_keeps_one_minus_the_rate_independently_per_seed_head_row_query_and_key():
    rate = 0.3
    mask = np.asarray(dropout_mask(jnp.int32(1234), 4, 2, 256, 1024, rate))
    assert abs(mask.mean() - (1 - rate)) < 2e-3
    # Independent masks agree on 0.7² + 0.3² = 58% of the weights.
    assert (
        0.57 < (mask[0] == mask[1]).mean() < 0.59
        and 0.57 < (mask[:, 0] == mask[:, 1]).mean() < 0.59
    )
    assert (
        0.57
        < (mask == np.asarray(dropout_mask(jnp.int32(1235), 4, 2, 256, 1024, rate))).mean()
        < 0.59
    )
    assert 0.57 < (mask[..., 1:] == mask[..., :-1]).mean() < 0.59  # neighbouring keys
    assert 0.57 < (mask[:, :, 1:] == mask[:, :, :-1]).mean() < 0.59  # neighbouring queries


def test_the_tpu_kernel_reports_the_usage_of_any_key_range_and_the_gpu_kernel_of_the_evicted_keys_only():
    n_cmem, n_mem, N = INSIDE_TPU_BLOCK
    args = operands(INSIDE_TPU_BLOCK)
    probs = reference_attention(*args, n_cmem=n_cmem, n_mem=n_mem)[1]
    for first, end in [
        (100, 700),
        (0, 8),
    ]:  # across the 512-key block where the compressed memory ends
        usage = jax.jit(flash_attention, static_argnums=(0, 2, 3, 4))(
            pallas_tpu.KERNELS, args, n_cmem, n_mem, (first, end)
        )[2]
        np.testing.assert_allclose(usage, probs[..., first:end].sum(axis=2), atol=1e-5)
    with pytest.raises(
        ValueError, match=r"usage of the evicted keys \(192, 704\) only, not of \(0, 8\)"
    ):
        flash_attention(pallas_gpu.KERNELS, args, n_cmem, n_mem, (0, 8))


def test_the_key_layout_names_the_ranges_the_gap_and_who_sees_whom():
    layout = KeyLayout(n_cmem=4, n_mem=6, n_queries=3, dropout=0.0)
    assert layout.n_keys == 13 and layout.ranges == ((0, 4), (4, 10), (10, 13))
    assert layout.virtual_key_gap == 3 and KeyLayout(0, 6, 3, 0.0).virtual_key_gap == 0
    np.testing.assert_array_equal(
        layout.virtual_key(jnp.arange(13)), [0, 1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    )
    sees = np.asarray(
        layout.sees(jnp.ones((1, 13), jnp.int32), jnp.arange(3)[:, None], jnp.arange(13)[None])
    )
    assert sees[:, :10].all()  # every memory slot
    np.testing.assert_array_equal(
        sees[:, 10:], np.tril(np.ones((3, 3), bool))
    )  # the segment, causally
    assert not layout.sees(jnp.int32(0), 2, 0)  # an empty slot
    assert layout.dropout_scale(1, 0, 0, 0) is None
    scale = np.asarray(
        KeyLayout(0, 8, 8, 0.5).dropout_scale(
            jnp.int32(1), 0, jnp.arange(8)[:, None], jnp.arange(16)[None]
        )
    )
    assert set(np.unique(scale)) == {0.0, 2.0}
