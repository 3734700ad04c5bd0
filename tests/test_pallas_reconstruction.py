"""The attention-reconstruction loss's reads as one Pallas TPU kernel (ctx.nn.pallas_reconstruction),
run here in interpret mode (the kernel a TPU runs), against the XLA loss of ctx.nn.losses; and
its Mosaic lowering for TPU at the paper layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from ctx import aot
from ctx.nn import losses
from ctx.nn.pallas_reconstruction import reconstruction_difference, reconstruction_loss

# (heads, rows, queries N, head dim, compressed memory C, evicted N keys at C, compressed E)
LAYOUTS = [
    (2, 3, 32, 16, 32, 16),  # the evicted keys start on a multiple of their count
    (2, 2, 32, 16, 48, 16),  # they do not: the kernel reads all keys and takes them in VMEM
    (1, 2, 64, 128, 128, 32),
]


def _inputs(H, B, N, K, C, E, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    T = C + 2 * N  # [cmem; mem; segment], the evicted keys are the memory's oldest N
    q, k, v = (
        jax.random.normal(key, shape, dtype)
        for key, shape in zip(ks[:3], [(H, B, N, K), (H, B, T, K), (H, B, T, K)])
    )
    kc, vc = (jax.random.normal(key, (H, B, E, K), dtype) for key in ks[3:])
    return q, k, v, kc, vc


def _fused_loss(C, N):
    return lambda q, k, v, kc, vc: reconstruction_loss(q, k, v, C, N, kc, vc)


def _xla_loss(C, N):
    return lambda q, k, v, kc, vc: losses.attention_reconstruction_loss(
        losses.reconstruction_difference(q, k, v, C, N, kc, vc)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_fused_reads_equal_the_xla_loss_and_only_the_compressed_keys_and_values_learn(layout):
    H, B, N, K, C, E = layout
    inputs = _inputs(H, B, N, K, C, E, jnp.float32)
    everything = tuple(range(5))
    fused, fused_grads = jax.value_and_grad(_fused_loss(C, N), argnums=everything)(*inputs)
    xla, xla_grads = jax.value_and_grad(_xla_loss(C, N), argnums=everything)(*inputs)
    np.testing.assert_allclose(fused, xla, rtol=1e-6)
    np.testing.assert_allclose(
        reconstruction_difference(*inputs[:3], C, N, *inputs[3:]),
        losses.reconstruction_difference(*inputs[:3], C, N, *inputs[3:]),
        rtol=1e-5,
        atol=1e-6,
    )
    for name, g_fused, g_xla in zip(
        ("q", "k", "v", "compressed k", "compressed v"), fused_grads, xla_grads
    ):
        np.testing.assert_allclose(
            g_fused, g_xla, rtol=1e-5, atol=1e-5 * float(np.abs(g_xla).max()) + 1e-12, err_msg=name
        )
    # Queries and evicted keys/values are constants of the loss; the compression learns.
    assert all(not np.any(g) for g in fused_grads[:3])
    assert all(np.abs(g).max() > 1e-4 for g in fused_grads[3:])


def test_in_bfloat16_the_fused_loss_agrees_with_the_float32_loss_to_bf16_precision():
    H, B, N, K, C, E = LAYOUTS[0]
    exact = _inputs(H, B, N, K, C, E, jnp.float32)
    rounded = tuple(x.astype(jnp.bfloat16) for x in exact)
    reference = _xla_loss(C, N)(*(x.astype(jnp.float32) for x in rounded))
    loss, grads = jax.value_and_grad(_fused_loss(C, N), argnums=(3, 4))(*rounded)
    np.testing.assert_allclose(loss, reference, rtol=2e-2)
    reference_grads = jax.grad(_xla_loss(C, N), argnums=(3, 4))(
        *(x.astype(jnp.float32) for x in rounded)
    )
    for g, r in zip(grads, reference_grads):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            g.astype(jnp.float32), r, rtol=0.1, atol=0.05 * float(jnp.abs(r).max())
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "H, K, C, N, E",
    [
        (8, 128, 512, 512, 256),  # PG-19
        (8, 128, 1152, 768, 256),  # enwik8: evicted keys off a block edge
        (16, 64, 512, 512, 128),
    ],
)  # WT103
def test_the_kernels_lower_through_mosaic_at_the_paper_layouts_without_score_sized_arrays(
    H, K, C, N, E
):
    """Batch 2, bf16: the loss's forward is one Mosaic call and its gradient one more, with the
    kernels' own FLOP counts; neither program holds a score-sized array ([H,B,N,N] or [H,B,N,E])."""
    target = aot.Target.tpu("v5p-8")
    B, T = 2, C + 2 * N
    sharding = SingleDeviceSharding(target.devices[0])
    abstract = [
        jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
        for shape in [(H, B, N, K), (H, B, T, K), (H, B, T, K), (H, B, E, K), (H, B, E, K)]
    ]
    loss = _fused_loss(C, N)
    forward = target.compile(jax.jit(loss).lower(*abstract))
    both = target.compile(jax.jit(jax.value_and_grad(loss, argnums=(3, 4))).lower(*abstract))
    assert (
        forward.as_text().count("tpu_custom_call") == 1
        and both.as_text().count("tpu_custom_call") == 2
    )
    cost = forward.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] >= 4 * H * B * N * K * (N + E)  # two reads, two products each
    for program in (forward, both):
        assert not any(f"[{H},{B},{N},{width}]" in program.as_text() for width in (N, E))
