"""ctx.roofline against hand-computed costs: a compiled program's operations (a dot fusion and
an elementwise fusion), a Mosaic kernel's declared cost read from its backend config, and the
GPU kernels' declared FLOPs and bytes (ctx.nn.pallas_gpu.declared_cost) counted by hand."""

import jax
import jax.numpy as jnp
import pytest

from ctx import roofline
from ctx.nn import pallas_gpu

PEAK, BANDWIDTH = 1e12, 1e9


def test_a_compiled_program_costs_its_dot_flops_and_each_operations_bytes():
    M, K, N = 64, 32, 16
    text = (
        jax.jit(lambda x, y: jnp.tanh(x @ y) + 1)
        .lower(jnp.zeros((M, K), jnp.float32), jnp.zeros((K, N), jnp.float32))
        .compile()
        .as_text()
    )
    cost = roofline.program_cost(text, PEAK, BANDWIDTH)
    assert [o["opcode"] for o in cost["operations"]] == ["fusion", "fusion"]
    by_flops = sorted(cost["operations"], key=lambda o: -o["flops"])
    dot, elementwise = by_flops
    assert dot["flops"] == 2 * M * N * K and dot["bytes"] == 4 * (M * K + K * N + M * N)
    assert elementwise["flops"] == 0 and elementwise["bytes"] == 4 * 2 * M * N
    assert dot["seconds"] == pytest.approx(max(2 * M * N * K / PEAK, dot["bytes"] / BANDWIDTH))
    assert cost["seconds"] == pytest.approx(dot["seconds"] + elementwise["seconds"])
    assert cost["flops"] == 2 * M * N * K


def test_a_mosaic_kernel_is_charged_the_cost_it_declares():
    config = (
        '{"custom_call_config": {"body": "x", "cost_estimate":{"flops":"5000","transcendentals":"0",'
        '"bytes_accessed":"7000"}}}'
    )
    text = (
        "HloModule m\n\nENTRY %main (p0: f32[8,128]) -> f32[8,128] {\n"
        "  %p0 = f32[8,128]{1,0} parameter(0)\n"
        '  ROOT %kernel = f32[8,128]{1,0} custom-call(%p0), custom_call_target="tpu_custom_call", '
        f"backend_config={config}\n}}\n"
    )
    (op,) = roofline.program_cost(text, PEAK, BANDWIDTH)["operations"]
    assert (op["flops"], op["bytes"], op["cost_from"]) == (5000.0, 7000.0, "declared")
    assert op["seconds"] == pytest.approx(7000 / BANDWIDTH)


def test_the_gpu_kernels_declare_their_tiles_flops_and_bytes():
    """PG-19's layout, one head and row: 8 query blocks of 64 against 16 memory key blocks and,
    causally, 1..8 segment blocks: 8 x 16 + 36 = 164 visible tiles."""
    H, B, N, K, C, M = 1, 1, 512, 128, 512, 512
    T, P, b, s = C + M + N, C + M + 2 * N, 64, 2
    q, band, visible, k = (s, (H, B, N, K)), (s, (H, B, N, P)), (4, (B, T)), (s, (H, B, T, K))
    seeds, stats = (4, (2,)), (4, (H, B, N))
    tiles = 8 * 16 + 8 * 9 // 2
    flops, moved = pallas_gpu.declared_cost(
        "relative_attention_forward_gpu", [seeds, q, band, visible, k, k]
    )
    assert flops == 2 * 2 * tiles * b * b * K
    assert moved == tiles * (2 * b * K * s + b * b * s) + 2 * N * K * s + 4 * N * 5
    operands = [seeds, q, band, visible, k, k, stats, stats, q]
    key_value = pallas_gpu.declared_cost("relative_attention_key_value_gradient_gpu", operands)[0]
    assert key_value == 4 * 2 * tiles * b * b * K
    assert (
        pallas_gpu.declared_cost("relative_attention_query_gradient_gpu", operands)[0]
        == 3 * 2 * tiles * b * b * K
    )
    usage_flops, _ = pallas_gpu.declared_cost(
        "relative_attention_key_usage_gpu", [q, band, visible, k, stats]
    )
    assert usage_flops == 2 * N * N * K  # every query against the N evicted keys, once
    assert pallas_gpu.declared_cost("some_other_kernel", operands) is None


def test_a_convolution_counts_only_the_window_positions_that_read_input():
    """TPU compilers write dots as convolutions and their batch dimensions as padded windows,
    so a convolution's FLOPs count the (output, window) pairs that read input: 4 input and 6
    output features, 10 positions, a window of 3 padded by 1 on each side: 30 - 2 pairs."""
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), ((1, 1),)))
    text = conv.lower(jnp.zeros((1, 4, 10)), jnp.zeros((6, 4, 3))).compile().as_text()
    assert roofline.program_cost(text, PEAK, BANDWIDTH)["flops"] == 2 * 6 * 4 * 28


def test_tiled_layouts_move_their_padding():
    """f32[8,8,512,1] in TPU's T(8,128) tiles is stored as [8,8,512,128]: 128x the bytes."""
    text = (
        "HloModule m\n\nENTRY %main (p0: f32[8,8,512,1]) -> f32[8,8,512,1] {\n"
        "  %p0 = f32[8,8,512,1]{3,2,1,0:T(8,128)} parameter(0)\n"
        "  ROOT %c = f32[8,8,512,1]{3,2,1,0:T(8,128)} copy(%p0)\n}\n"
    )
    (op,) = roofline.program_cost(text, PEAK, BANDWIDTH)["operations"]
    assert op["bytes"] == 2 * 4 * 8 * 8 * 512 * 128
