"""The benchmark command runs and reports every figure (no speed is asserted here)."""

import json

import jax
import numpy as np
import pytest
from jax.extend import core as jax_core

from ctx.flops import forward_flops_per_token, train_flops_per_token
from ctx.profile import instruction_sources, summarize
from tests.helpers import build, dot_generals, run_module, tiny_model_config

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow

KEYS = (
    "train_tokens_per_sec",
    "eval_tokens_per_sec",
    "step_seconds",
    "compile_seconds",
    "peak_rss_mib",
    "flops_per_token",
    "matmul_flops_per_sec",
    "mfu",
)


def test_bench_prints_one_json_object_with_all_figures(tmp_path):
    tiny = [
        "--config.model.n_layers=1",
        "--config.model.d_model=32",
        "--config.model.n_heads=2",
        "--config.model.d_ff=64",
        "--config.model.segment_length=16",
        "--config.model.memory_length=16",
        "--config.model.compressed_length=16",
        "--config.train.segments_per_call=2",
    ]
    out = run_module(
        "ctx.bench", "--config=experiments/bench.py", *tiny, "--chunks=2", f"--trace_dir={tmp_path}"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert report[key] > 0, key
    assert report["step_seconds_min"] <= report["step_seconds"] <= report["step_seconds_max"]
    assert report["steps_timed"] == 4 and 0 < report["mfu"] < 2
    # --trace_dir: the traced chunk's time by source op, forward and backward, in milliseconds per step.
    with open(report["op_time"]) as f:
        by_process = json.load(f)
    ops = {
        row["op"]: row["ms"]
        for process in by_process.values()
        for row in process["top_ms_per_step"]
    }
    assert any(op.startswith("F layers/attention/") for op in ops), sorted(ops)
    assert any(op.startswith("B layers/attention/") for op in ops), sorted(ops)
    assert all(ms >= 0 for ms in ops.values())
    assert (
        0
        < sum(p["total_ms_per_step"] for p in by_process.values())
        < 1e3 * report["step_seconds_max"] * 20
    )


def test_profile_maps_traced_instructions_to_their_source_ops():
    hlo = (
        '  %fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/while/body/closed_call/'
        'transpose(jvp(M))/layers/attention/dot_general" stack_frame_id=1}\n'
        "  ROOT dot.1 = f32[2]{0} dot(%a, %b), "
        'metadata={op_name="jit(f)/jvp(M)/eval_jaxpr/layers/mlp/dot_general"}\n'
    )
    sources = instruction_sources(hlo)
    assert sources["fusion.3"] == sources["fusion_3"] == "B layers/attention/dot_general"
    assert sources["dot.1"] == "F layers/mlp/dot_general"
    # A fusion without metadata (as on GPUs) is named by its fused computation's root.
    gpu_hlo = (
        "%fused_softmax.7 (p0: f32[2]) -> f32[2] {\n  %p0 = f32[2]{0} parameter(0)\n"
        '  ROOT %e = f32[2]{0} exponential(%p0), metadata={op_name="jit(f)/jvp(M)/layers/attention/exp"}\n}\n\n'
        "ENTRY %main (a: f32[2]) -> f32[2] {\n  %a = f32[2]{0} parameter(0)\n"
        "  ROOT %loop_exp_fusion.2 = f32[2]{0} fusion(%a), kind=kLoop, calls=%fused_softmax.7\n}\n"
    )
    assert instruction_sources(gpu_hlo)["loop_exp_fusion_2"] == "F layers/attention/exp"
    events = [
        dict(pid=1, name="fusion_3", dur=3000.0),
        dict(pid=1, name="fusion_3", dur=1000.0),
        dict(pid=1, name="nvjet_gemm", dur=500.0),
        dict(pid=2, name="x", dur=7.0, args={"hlo_op": "dot.1"}),
    ]
    summary = summarize(events, {1: "/device:GPU:0", 2: "/host:CPU"}, sources, steps=2)
    gpu = summary["/device:GPU:0"]
    assert gpu["top_ms_per_step"] == [{"op": "B layers/attention/dot_general", "ms": 2.0}]
    assert (
        gpu["unmapped_ms_per_step"] == [{"op": "nvjet_gemm", "ms": 0.25}]
        and gpu["total_ms_per_step"] == 2.0
    )
    assert summary["/host:CPU"]["top_ms_per_step"] == [
        {"op": "F layers/mlp/dot_general", "ms": 0.0035}
    ]


def traced_dot_flops(jaxpr: jax_core.Jaxpr, skip_scope: str) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr (scan bodies times their length),
    except those traced under the named scope."""
    total = 0
    for eqn, times in dot_generals(jaxpr):
        if skip_scope not in str(eqn.source_info.name_stack):
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2
                * times
                * int(np.prod(eqn.outvars[0].aval.shape))
                * int(np.prod([lhs[i] for i in lhs_contract]))
            )
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(compressed_length=0),
        dict(compressed_length=0, memory_length=0),
        dict(compression="dilated_conv"),
        dict(compression_loss="autoencoder"),
        dict(compression="dilated_conv", compression_loss="autoencoder"),
        dict(compression="max", compression_loss="none"),
        dict(compression="most_used", compression_loss="none"),
        dict(layer_norm="post", compression="mean", compression_loss="none"),
        dict(memory_length=12, compressed_length=6, compression_rate=2),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "ct",
)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_analytic_flops_equal_the_traced_matmuls(overrides, batch_size):
    """ctx.flops counts exactly the matmul FLOPs a forward pass traces (position tables once per
    batch, the compression network and its loss included); only the embedding is left out."""
    cfg = tiny_model_config(
        **{**dict(segment_length=8, memory_length=8, compressed_length=8), **overrides}
    )
    model, variables, memory = build(cfg, batch_size)
    tokens = np.zeros((batch_size, cfg.segment_length), np.int32)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, tokens, memory))(variables).jaxpr
    traced = traced_dot_flops(jaxpr, skip_scope="embed") / (batch_size * cfg.segment_length)
    assert forward_flops_per_token(cfg, batch_size) == pytest.approx(traced, rel=1e-12)
    assert train_flops_per_token(cfg, batch_size) == 3 * forward_flops_per_token(cfg, batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        forward_flops_per_token(cfg, 0)
