"""The benchmark command runs and reports every figure (no speed is asserted here)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("train_tokens_per_sec", "eval_tokens_per_sec", "step_seconds", "compile_seconds", "peak_rss_mib",
        "flops_per_token", "matmul_flops_per_sec", "mfu")


def test_bench_prints_one_json_object_with_all_figures():
    tiny = ["--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.n_heads=2",
            "--config.model.d_ff=64", "--config.model.segment_length=16", "--config.model.memory_length=16",
            "--config.model.compressed_length=16", "--config.train.segments_per_call=2"]
    out = subprocess.run([sys.executable, "-m", "ctx.bench", "--config=experiments/bench.py", *tiny, "--chunks=2"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert report[key] > 0, key
    assert report["step_seconds_min"] <= report["step_seconds"] <= report["step_seconds_max"]
    assert report["steps_timed"] == 4 and 0 < report["mfu"] < 2
