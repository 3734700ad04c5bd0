"""TPU slices from a CPU machine: the name table, ahead-of-time compiles with libtpu (memory,
fit, out-of-memory as a report, XLA's loop-corrected cost estimate); the Pallas kernel's own
compiles are in test_pallas_tpu.py.

Needs libtpu (the [tpu] extra, which the test set-up installs); no TPU."""

import json

import pytest

from ctx import aot, topology
from ctx.config import ConfigError
from experiments import demo
from tests.helpers import run_module

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow

# Hand-checked against Google's tables: v4 and v5p names count TensorCores (2 per chip).
DOCUMENTED = {
    "v4-8": ("v4:2x2x1", 4),
    "v4-32": ("v4:2x2x4", 16),
    "v4-128": ("v4:4x4x4", 64),
    "v4-4096": ("v4:8x16x16", 2048),
    "v5p-8": ("v5p:2x2x1", 4),
    "v5p-256": ("v5p:4x4x8", 128),
    "v5p-1024": ("v5p:8x8x8", 512),
    "v5litepod-1": ("v5e:1x1", 1),
    "v5litepod-16": ("v5e:4x4", 16),
    "v5e-16": ("v5e:4x4", 16),
    "v5litepod-256": ("v5e:16x16", 256),
    "v6e-8": ("v6e:2x4", 8),
    "v6e-64": ("v6e:8x8", 64),
    "v6e-256": ("v6e:16x16", 256),
}


def small_config(**train):
    cfg = demo.get_config()
    cfg.train.segments_per_call = 2
    cfg.train.update(train)
    return cfg


@pytest.mark.parametrize("name, expected", DOCUMENTED.items())
def test_cloud_names_map_to_libtpu_layouts(name, expected):
    tpu = topology.resolve(name)
    assert (tpu.topology, tpu.chips) == expected
    assert topology.resolve(tpu.topology) == tpu  # libtpu's own form names the same slice


def test_every_name_in_the_table_resolves_and_round_trips():
    for generation in topology.GENERATIONS:
        for chips in generation.layouts:
            for prefix in generation.cloud_prefixes:
                tpu = topology.resolve(f"{prefix}-{chips * generation.name_counts_per_chip}")
                assert tpu.chips == chips and tpu.generation is generation
                assert topology.resolve(tpu.accelerator_type) == tpu


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5p-7", "v5p-N takes N in 8, 16"),
        ("v5p-12", "v5p:AxBxC"),
        ("v3-8", "unknown TPU generation"),
        ("tpu-8", "unknown TPU generation"),
        ("v5e:2x2x2", "2 layout axes"),
        ("big", "not a TPU slice name"),
    ],
)
def test_unknown_names_list_the_valid_forms(name, message):
    with pytest.raises(ConfigError, match=message) as error:
        topology.resolve(name)
    assert "v4 and v5p count TensorCores" in str(error.value) or "libtpu layout" in str(error.value)


def test_compile_devices_are_one_per_chip():
    for name in ("v4-8", "v5p-8", "v5litepod-1", "v6e-8"):
        tpu = topology.resolve(name)
        devices = topology.compile_devices(tpu)
        assert len(devices) == tpu.chips and devices[0].platform == "tpu"


def test_without_libtpu_the_error_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"needs libtpu .*pip install -e '\.\[tpu\]'"):
        aot.compile_report(small_config(), "v5p-8")


@pytest.mark.parametrize("name, generation", [("v5litepod-4", "v5e"), ("v5p-8", "v5p")])
def test_a_small_config_compiles_for_a_tpu_slice_with_a_full_report(name, generation):
    report = aot.compile_report(small_config(), name)
    g = next(g for g in topology.GENERATIONS if g.name == generation)
    assert (
        report["platform"] == "tpu"
        and report["devices"] == 4
        and report["accelerator_type"] == name
    )
    assert report["per_chip_batch"] == report["batch_size"] // 4 and report["hbm_gib"] == g.hbm_gib
    assert report["fits"] is True and report["oom"] is None
    memory = report["memory_gib"]
    assert set(memory) == {"arguments", "outputs", "temporaries", "generated_code", "aliased"}
    total = (
        memory["arguments"]
        + memory["outputs"]
        + memory["temporaries"]
        + memory["generated_code"]
        - memory["aliased"]
    )
    assert report["per_device_memory_estimate_gib"] == pytest.approx(total)
    assert report["headroom_gib"] == pytest.approx(g.hbm_gib - total)
    e = report["estimate"]
    assert "not a measurement" in e["label"]
    # Without remat XLA's loop-corrected FLOPs are the analytic model FLOPs, within a few percent.
    assert e["xla_over_model_flops"] == pytest.approx(1.0, abs=0.03)
    assert (
        e["step_seconds"] >= e["roofline_step_seconds"] * 0.5 and e["tokens_per_sec_per_chip"] > 0
    )
    assert e["ridge_flops_per_byte"] == pytest.approx(g.peak_bf16_flops / g.hbm_bytes_per_sec)
    assert report["estimated_mfu"] == pytest.approx(
        e["model_flops_per_step"] / e["step_seconds"] / g.peak_bf16_flops
    )
    json.dumps(report)  # the --compile_only line


def test_the_estimate_counts_every_layer_and_with_remat_reports_the_recomputation():
    target = aot.Target.tpu("v5p-8")
    two = aot.cost_estimate(small_config(), target)
    cfg = small_config()
    cfg.model.n_layers = 6  # scanned one layer per iteration in the real chunk
    six = aot.cost_estimate(cfg, target)
    assert six["xla_over_model_flops"] == pytest.approx(1.0, abs=0.03)
    # Where the bytes go: a layer's operations count six times, the rest once, largest first.
    largest = six["largest_by_bytes"]
    assert len(largest) == 12 and [x["bytes_per_step"] for x in largest] == sorted(
        (x["bytes_per_step"] for x in largest), reverse=True
    )
    assert {x["times_per_step"] for x in largest} <= {1, 6} and any(
        "/layers." in x["op_name"] for x in largest
    )
    assert six["xla_flops_per_step"] > 2.5 * two["xla_flops_per_step"]
    cfg.model.remat = "full"
    remat = aot.cost_estimate(cfg, target)
    # The backward recomputes each layer's forward: about a third more than the model's FLOPs.
    assert 1.2 < remat["xla_over_model_flops"] < 1.45
    assert remat["excess_flops_per_step"] > 0 and "recomputation" in remat["excess_flops_are"]


def test_out_of_memory_is_a_one_line_report_with_numbers():
    args = [
        "--config.model.n_layers=16",
        "--config.model.d_model=2048",
        "--config.model.d_ff=8192",
        "--config.model.n_heads=16",
        "--config.train.segments_per_call=1",
        "--config.train.per_device_batch_size=1",
    ]
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--compile_only",
        "--topology=v5litepod-1",
        *args,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        report["fits"] is False and report["estimate"] is None and report["estimated_mfu"] is None
    )
    assert (
        report["oom"]["required_gib"] > report["oom"]["available_gib"] == report["hbm_gib"] == 15.75
    )
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if "does NOT fit" in line] == [
        f"v5litepod-1: does NOT fit at per-chip batch 1: {report['oom']['message']} (xla attention)"
    ]


def test_batch_search_bisects_down_from_a_batch_that_does_not_fit_and_doubles_up_from_one_that_does():
    # Real compiles, chosen to be quick: out-of-memory compiles stop early.
    target = aot.Target.tpu("v5litepod-1")
    big = small_config(segments_per_call=1)
    big.model.update(n_layers=16, d_model=2048, d_ff=8192, n_heads=16)  # > 15.75 GiB at any batch
    down = aot.largest_fitting_batch(big, target, per_chip=4, fits=False)
    assert [(t["per_chip_batch"], t["fits"]) for t in down["batch_search"]] == [
        (2, False),
        (1, False),
    ]
    assert down["largest_fitting_per_chip_batch"] == 0 and down["exact"] is True
    long = small_config(segments_per_call=1, per_device_batch_size=16)
    long.model.update(
        n_layers=8,
        d_model=2048,
        d_ff=8192,
        n_heads=16,
        segment_length=256,
        memory_length=256,
        compressed_length=256,
    )
    oom = aot.fit(long, target)["oom"]  # a first guess scaled by HBM / required, before any search
    assert oom["guess_per_chip_batch"] == int(16 * oom["available_gib"] / oom["required_gib"]) < 16
    up = aot.largest_fitting_batch(
        small_config(segments_per_call=1), target, per_chip=1, fits=True, max_compiles=1
    )
    assert [(t["per_chip_batch"], t["fits"]) for t in up["batch_search"]] == [(2, True)]
    assert (
        up["largest_fitting_per_chip_batch"] == 2 and up["exact"] is False
    )  # a lower bound, said so
    assert 0 < up["batch_search"][0]["memory_gib"] < target.hbm_gib


def test_compile_only_names_a_bad_topology_in_one_line():
    out = run_module(
        "ctx.train", "--config=experiments/demo.py", "--compile_only", "--topology=v5p-7"
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip().splitlines() == [out.stderr.strip()] and "--topology=v5p-7" in out.stderr
    )


def test_auto_is_resolved_for_the_slice_compiled_and_the_report_says_which_attention():
    """Compiling for a TPU slice from this CPU host, 'auto' means what the slice's chips would
    run (the Pallas kernel on v5 and later, xla on v4), not what the host runs."""
    args = [
        "--config=experiments/demo.py",
        "--compile_only",
        "--config.model.attention_impl=auto",
        "--config.train.segments_per_call=1",
    ]
    out = run_module("ctx.train", *args, "--topology=v5p-8")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["attention"] == "pallas_tpu" and "(pallas_tpu attention)" in out.stderr
    old = json.loads(
        run_module("ctx.train", *args, "--topology=v4-8").stdout.strip().splitlines()[-1]
    )
    assert old["attention"] == "xla" and old["chip"] == "TPU v4"


def test_an_explicit_pallas_attention_on_a_tpu_v4_is_refused_in_one_line():
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--compile_only",
        "--topology=v4-8",
        "--config.model.attention_impl=pallas_tpu",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: model.attention_impl='pallas_tpu' needs TPU v5 or later (its strided lane rotation does not lower "
        "on TPU v4); use attention_impl='xla' or 'auto'"
    ]


def test_largest_by_bytes_counts_operands_and_results_of_top_level_operations_only():
    hlo = """HloModule m
%fused_computation (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %big_inside = f32[4,8]{1,0} multiply(%p, %p)
}
ENTRY %main (a: f32[4,8], b: bf16[16]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[16]{0} parameter(1)
  %fusion = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation, metadata={op_name="f/layers.s/mul"}
  ROOT %copy = f32[4,8]{1,0} copy(%fusion), metadata={op_name="jit(f)/logits"}
}
"""
    found = aot.largest_by_bytes(hlo, layers=3)
    assert [(x["name"], x["bytes"], x["times_per_step"], x["bytes_per_step"]) for x in found] == [
        ("fusion", 256, 3, 768),
        ("copy", 256, 1, 256),
    ]  # 128 bytes read + 128 written each
