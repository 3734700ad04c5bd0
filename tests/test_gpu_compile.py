"""NVIDIA GPUs from a CPU machine: the GPU name table, and XLA's whole GPU pipeline (Triton,
PTX, ptxas) run here for an H100 or an A100: ctx's four attention kernels at the three paper
layouts with no spills, the demo's training chunk compiled for h100 with a full report, a tile
too large for shared memory refused in one line, the cuDNN attention picked by the lowering
platform.

The compiles need jax's CUDA plugin, which the test set-up installs into .venv/gpu-compile
(requirements-gpu-compile.txt) and only these processes load: on a machine without CUDA it
prints notices at import that would reach every other test's output."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ctx import gpu_topology, kernel_resources
from ctx.config import ConfigError
from ctx.nn import attention
from tests import FAST_COMPILE_XLA_FLAG
from tests.helpers import ROOT, run_module, run_script

GPU_COMPILER = os.path.join(sys.prefix, "gpu-compile")
# (heads, head dim, queries, compressed memory, memory) of PG-19, enwik8 and WikiText-103.
PAPER_LAYOUTS = {
    "pg19": "8,128,512,512,512",
    "enwik8": "8,128,768,1152,768",
    "wt103": "16,64,512,512,512",
}
# A pathological tile can compile for many minutes: no compile here may hang the suite.
COMPILE_TIMEOUT = 300


def compiler_env() -> dict[str, str]:
    """The plugin on the path, and XLA's flags without the tests' LLVM -O0: it changes the PTX
    that the kernels' registers and spills are read from."""
    if not os.path.isdir(GPU_COMPILER):
        pytest.fail(
            f"no {GPU_COMPILER}: the README's test command installs requirements-gpu-compile.txt there"
        )
    flags = os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_XLA_FLAG, "").strip()
    return {**os.environ, "PYTHONPATH": os.pathsep.join([GPU_COMPILER, ROOT]), "XLA_FLAGS": flags}


@pytest.mark.parametrize(
    "name, count, kind",
    [
        ("h100", 1, "NVIDIA H100 80GB HBM3"),
        ("H100-8", 8, "NVIDIA H100 80GB HBM3"),
        ("h200", 1, "NVIDIA H200 141GB HBM3e"),
        ("a100-80gb", 1, "NVIDIA A100-SXM4-80GB"),
        ("a100-40gb-4", 4, "NVIDIA A100-SXM4-40GB"),
    ],
)
def test_gpu_names_resolve_to_xlas_device_descriptions(name, count, kind):
    node = gpu_topology.resolve(name)
    facts = node.describe()
    assert (node.count, facts["device_kind"]) == (count, kind)
    assert facts["usable_memory_gib"] == pytest.approx(facts["device_memory_gib"] * 0.75)
    assert facts["ptx_arch"] == ("sm_90a" if kind.startswith("NVIDIA H") else "sm_80")


def test_device_facts_are_the_datasheets():
    h100, h200, a100 = (gpu_topology.resolve(n).model for n in ("h100", "h200", "a100-40gb"))
    assert h100.shared_memory_per_block == 227 * 1024 and a100.shared_memory_per_block == 163 * 1024
    assert h200.hbm_bytes_per_sec == 4.8e12 and h100.hbm_bytes_per_sec == pytest.approx(
        3.35e12, rel=0.01
    )
    assert round(h200.device_memory_bytes / 1e9) == 151 and a100.cores == 108


@pytest.mark.parametrize("name", ["h100x", "a100", "h100-16", "h100-0", "rtx4090"])
def test_an_unknown_gpu_is_one_line_listing_the_known_ones(name):
    with pytest.raises(ConfigError, match="known GPUs: h100, h200, a100-80gb, a100-40gb"):
        gpu_topology.resolve(name)


def test_programs_per_sm_count_registers_shared_memory_and_threads():
    h100 = gpu_topology.resolve("h100").model
    assert (
        kernel_resources.programs_per_sm(254, 128, 90368, h100) == 2
    )  # 256 x 128 x 2 = 65,536 registers
    assert kernel_resources.programs_per_sm(255, 256, 0, h100) == 1
    assert (
        kernel_resources.programs_per_sm(96, 128, 120 * 1024, h100) == 1
    )  # shared memory bounds it
    assert kernel_resources.programs_per_sm(32, 1024, 0, h100) == 2  # 2,048 threads per SM


def test_the_kernel_problems_name_spills_threads_and_shared_memory():
    h100 = gpu_topology.resolve("h100").model
    rows = [
        {
            "kernel": "a",
            "spill_store_bytes": 464,
            "spill_load_bytes": 464,
            "threads_per_block": 128,
            "shared_memory_bytes": 1024,
        },
        {
            "kernel": "b",
            "spill_store_bytes": 0,
            "spill_load_bytes": 0,
            "threads_per_block": 2048,
            "shared_memory_bytes": 300 * 1024,
        },
    ]
    assert kernel_resources.problems(rows, h100) == [
        "a: 464 bytes of registers spilled",
        "b: 2048 threads per block (limit 1024)",
        f"b: {300 * 1024} bytes of shared memory (limit {227 * 1024})",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("gpu", ["h100", "a100-80gb"])
@pytest.mark.parametrize("layout", PAPER_LAYOUTS)
def test_the_attention_kernels_compile_with_no_spills_at_every_paper_layout(gpu, layout):
    """bf16, attention dropout, most_used's usage: the four kernels, each with 0 spilled bytes,
    at most 1024 threads and within the GPU's shared memory; at PG-19 on an H100 the forward
    holds two programs per SM."""
    run = run_script(
        "gpu_kernels.py", gpu, PAPER_LAYOUTS[layout], env=compiler_env(), timeout=COMPILE_TIMEOUT
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    kernels = {k["kernel"]: k for k in report["kernels"]}
    assert set(kernels) == {
        "relative_attention_forward_gpu",
        "relative_attention_key_usage_gpu",
        "relative_attention_key_value_gradient_gpu",
        "relative_attention_query_gradient_gpu",
    }
    assert report["problems"] == []
    for kernel in kernels.values():
        assert (
            kernel["spill_store_bytes"] == 0
            and kernel["registers"] <= 255
            and kernel["programs_per_sm"] >= 1
        )
    if (gpu, layout) == ("h100", "pg19"):
        assert kernels["relative_attention_forward_gpu"]["programs_per_sm"] == 2


@pytest.mark.slow
def test_a_tile_too_large_for_shared_memory_fails_the_check_in_one_line():
    run = run_script(
        "gpu_kernels.py",
        "h100",
        PAPER_LAYOUTS["pg19"],
        "--stages_of_forward=8",
        env=compiler_env(),
        timeout=COMPILE_TIMEOUT,
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert (
        "KernelLimitError: a kernel asks for" in last
        and "bytes of shared memory per block and the h100 has 232448" in last
    )


@pytest.mark.slow
def test_the_demo_training_chunk_compiles_for_an_h100_with_a_full_report():
    """auto resolves for the H100 (pallas_gpu), memory against jax's share of its 80 GB, each
    kernel's resources, and the roofline estimate labelled as one."""
    run = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--compile_only",
        "--topology=h100",
        "--config.model.attention_impl=auto",
        env=compiler_env(),
        timeout=COMPILE_TIMEOUT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["attention"] == "pallas_gpu" and report["chip"] == "NVIDIA H100 80GB HBM3"
    assert report["fits"] is True and report["hbm_gib"] == pytest.approx(
        report["gpu"]["usable_memory_gib"]
    )
    assert 0 < report["per_device_memory_estimate_gib"] < 1
    assert {k["kernel"] for k in report["kernels"]} == {
        "relative_attention_forward_gpu",
        "relative_attention_key_value_gradient_gpu",
        "relative_attention_query_gradient_gpu",
    }
    assert report["kernel_problems"] == []
    estimate = report["estimate"]
    assert (
        estimate["label"].startswith("roofline estimate")
        and "not a measurement" in estimate["label"]
    )
    assert estimate["step_seconds_from"] == "per_operation_roofline" and 0 < estimate["mfu"] < 1
    assert estimate["xla_flops_per_step"] > estimate["model_flops_per_step"] * 0.5
    summary = run.stderr
    assert "h100 (NVIDIA H100 80GB HBM3): fits at per-chip batch 16" in summary
    assert "relative_attention_forward_gpu: " in summary and "program(s) per SM" in summary


@pytest.mark.slow
def test_an_unknown_gpu_on_the_command_line_exits_2_in_one_line():
    run = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--compile_only",
        "--topology=h100x",
        env=compiler_env(),
        timeout=COMPILE_TIMEOUT,
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --topology=h100x is not a GPU ctx knows; known GPUs")
    )


@pytest.mark.slow
def test_cudnn_without_cudnn_is_one_line_not_a_traceback():
    run = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--compile_only",
        "--topology=h100",
        "--config.model.attention_impl=cudnn",
        "--config.model.dropout=0.0",
        env=compiler_env(),
        timeout=COMPILE_TIMEOUT,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert (
        "model.attention_impl='cudnn' cannot be compiled for h100 here: cuDNN not found"
        in run.stderr
    )


def test_the_cudnn_attention_is_picked_by_the_lowering_platform(monkeypatch):
    """With cuDNN loadable, the same function lowers to cuDNN's custom call for CUDA and to XLA
    ops for the CPU; without it, to XLA ops (jax cannot trace the cuDNN call)."""
    from jax._src.cudnn import fused_attention_stablehlo

    H, B, N, T, K = 2, 1, 16, 48, 64
    args = [
        jnp.zeros(s, jnp.bfloat16)
        for s in ((H, B, N, K), (H, K), (H, B, T, K), (H, B, T, K), (H, 2, K), (H, T + N, K))
    ] + [jnp.ones((B, 1, N, T), bool)]

    def lowered(platform):
        attention.cudnn_found.cache_clear()
        fn = jax.jit(lambda *a: attention.cudnn_attention(*a, n_cmem=16))
        return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()

    assert "cudnn" not in lowered("cpu").lower()
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    try:
        cuda = lowered("cuda")
        assert "__cudnn$fmha" in cuda
        assert "__cudnn$fmha" not in lowered("cpu")
    finally:
        monkeypatch.undo()
        attention.cudnn_found.cache_clear()


@pytest.mark.slow
def test_what_a_gpu_runs_log_says_of_its_kernels():
    """ctx.train on a GPU prints these lines (aot.attention_kernel_lines for the local GPU);
    here for a deviceless H100 at the demo's layout with pallas_gpu, and nothing for xla."""
    code = (
        "import dataclasses; from ctx import aot; from ctx.config import ModelConfig; "
        "from experiments import demo; cfg = ModelConfig.from_config(demo.get_config().model); "
        "target = aot.Target.gpu_node('h100'); print(aot.attention_kernel_lines(cfg, target)); "
        "gpu_cfg = dataclasses.replace(cfg, attention_impl='pallas_gpu'); "
        "print('\\n'.join(aot.attention_kernel_lines(gpu_cfg, target)))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=compiler_env(),
        timeout=COMPILE_TIMEOUT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "[]"  # the xla attention has no kernels of ctx's
    assert lines[1] == "Pallas kernels on NVIDIA H100 80GB HBM3 (ptxas and XLA's launch):"
    kernels = sorted(line.split(":")[0].strip() for line in lines[2:])
    assert kernels == [
        "relative_attention_forward_gpu",
        "relative_attention_key_value_gradient_gpu",
        "relative_attention_query_gradient_gpu",
    ]
    assert all(" 0 B spilled" in line and "program(s) per SM" in line for line in lines[2:])


def test_without_the_cuda_plugin_the_error_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(gpu_topology, "compiler_installed", lambda: False)
    with pytest.raises(
        ConfigError, match=r"--topology=h100-8 needs jax's CUDA plugin .*'\.\[gpu-compile\]'"
    ):
        gpu_topology.compile_devices(gpu_topology.resolve("h100-8"))
