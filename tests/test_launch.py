"""Launch scripts: shellcheck-clean, and the exact commands their dry runs print; the
ahead-of-time compile check on simulated devices."""

import json
import os
import subprocess
import sys

import jax
import pytest

from tests.helpers import ROOT, run_module, simulated_devices_env

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow

SCRIPTS = [
    "launch/tpu.sh",
    "launch/slurm_gpu.sbatch",
    "launch/local.sh",
    "experiments/gpu_bench.sh",
]


def bash(*args, **env):
    # The launchers run ctx's Python (CTX_PYTHON) for the slice table and the compile check.
    return subprocess.run(
        ["bash", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CTX_PYTHON": sys.executable, **env},
    )


def test_scripts_pass_shellcheck():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    out = subprocess.run(
        [shellcheck, "--severity=style", *SCRIPTS], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout


def test_tpu_dry_run_prints_every_step():
    out = bash(
        "launch/tpu.sh",
        "--name=ct",
        "--zone=us-east5-a",
        "--project=p1",
        "--accelerator=v5p-256",
        "--spot",
        "--workdir=gs://bucket/run",
        "--dry_run",
        "--",
        "--config=experiments/pg19.py:txl",
        "--config.train.batch_size=512",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    where = "--zone=us-east5-a --project=p1"
    # First the compile check for the slice, here, before anything is created.
    assert lines[0] == (
        f"{sys.executable} -m ctx.train --compile_only --topology=v5p-256 "
        "--config=experiments/pg19.py:txl --config.train.batch_size=512"
    )
    assert lines[1] == (
        f"gcloud compute tpus queued-resources create ct --node-id=ct {where} "
        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --spot"
    )
    assert lines[2] == "git archive --format=tar.gz -o /tmp/ctx-src.tar.gz HEAD"
    assert (
        lines[3] == f"gcloud compute tpus tpu-vm scp /tmp/ctx-src.tar.gz ct: --worker=all {where}"
    )
    install = lines[4]
    assert install.startswith(f"gcloud compute tpus tpu-vm ssh ct --worker=all {where} --command=")
    # Python 3.11 from uv on every worker (the image's is 3.10), ctx[tpu] at this jax's version.
    assert "uv\\ venv" in install and "--python\\ 3.11\\ ~/ctx-venv" in install
    assert f"jax\\[tpu\\]=={jax.__version__}" in install and "./ctx\\[tpu\\]" in install
    assert lines[5].startswith(
        f"gcloud compute tpus tpu-vm ssh ct --worker=all {where} --command=nohup"
    )
    assert (
        "~/ctx-venv/bin/python\\ -m\\ ctx.train\\ --workdir=gs://bucket/run\\ "
        "--config=experiments/pg19.py:txl"
    ) in lines[5]
    assert "--config.train.batch_size=512" in lines[5]
    assert (
        lines[6].startswith(f"gcloud compute tpus tpu-vm ssh ct --worker=0 {where}")
        and "tail" in lines[6]
    )
    assert lines[7] == f"gcloud compute tpus queued-resources delete ct {where} --force --quiet"
    assert len(lines) == 8
    evaluate = bash(
        "launch/tpu.sh",
        "--name=ct",
        "--zone=z",
        "--workdir=gs://b/r",
        "--mode=evaluate",
        "--dry_run",
        "--",
        "--config=experiments/pg19.py",
        "--split=test",
    )
    assert (
        "ctx.evaluate\\ --workdir=gs://b/r\\ --config=experiments/pg19.py\\ --split=test"
        in evaluate.stdout
    )
    assert "--compile_only" not in evaluate.stdout  # the check compiles the training step
    missing = bash("launch/tpu.sh", "--zone=z", "--dry_run")
    assert missing.returncode == 2 and "--name, --zone and --workdir are required" in missing.stderr


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5e-16", "v2-alpha-tpuv5-lite"),
        ("v6e-64", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_runtime_image_follows_the_generation(accelerator, runtime):
    out = bash(
        "launch/tpu.sh",
        "--name=ct",
        "--zone=z",
        f"--accelerator={accelerator}",
        "--workdir=gs://b/r",
        "--dry_run",
        "--skip_compile_check",
        "--",
        "--config=experiments/pg19.py",
    )
    assert out.returncode == 0, out.stderr
    create = out.stdout.splitlines()[0]
    assert f"--runtime-version={runtime}" in create and "--accelerator-type=" in create


def test_tpu_launcher_refuses_unknown_slices_and_missing_ctx_in_one_line():
    out = bash(
        "launch/tpu.sh",
        "--name=ct",
        "--zone=z",
        "--accelerator=v5p-7",
        "--workdir=gs://b/r",
        "--dry_run",
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert (
        "--accelerator=v5p-7" in out.stderr and "v5p-N takes N in" in out.stderr and not out.stdout
    )
    out = bash(
        "launch/tpu.sh",
        "--name=ct",
        "--zone=z",
        "--workdir=gs://b/r",
        "--dry_run",
        CTX_PYTHON="/bin/false",
    )
    assert out.returncode == 2 and "cannot import ctx" in out.stderr


def test_tpu_launcher_refuses_a_job_that_does_not_fit_before_creating_anything(tmp_path):
    # A stand-in for gcloud records whether anything was called; the compile check runs for real.
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'calls'}\n")
    gcloud.chmod(0o755)
    out = bash(
        "launch/tpu.sh",
        "--name=ct",
        "--zone=z",
        "--accelerator=v5litepod-1",
        "--workdir=gs://b/r",
        "--",
        "--config=experiments/demo.py",
        "--config.model.n_layers=16",
        "--config.model.d_model=2048",
        "--config.model.d_ff=8192",
        "--config.model.n_heads=16",
        "--config.train.segments_per_call=1",
        "--config.train.per_device_batch_size=1",
        PATH=f"{tmp_path}:{os.environ['PATH']}",
    )
    assert out.returncode == 3, out.stderr[-2000:]
    assert "does NOT fit" in out.stderr and "exceeds available HBM (15.75G)" in out.stderr
    assert "error: the job does not fit v5litepod-1" in out.stderr
    assert not (tmp_path / "calls").exists()


def test_slurm_and_local_dry_runs():
    out = bash(
        "launch/slurm_gpu.sbatch",
        "--dry_run",
        "--workdir=/shared/run",
        "--",
        "--config=experiments/pg19.py",
    )
    assert out.stdout.strip() == (
        f"srun --kill-on-bad-exit=1 {sys.executable} -m ctx.train --distributed=on "
        "--workdir=/shared/run --config=experiments/pg19.py"
    )
    out = bash(
        "launch/local.sh",
        "--processes=2",
        "--port=4000",
        "--dry_run",
        "--",
        "python3",
        "-m",
        "ctx.train",
        "--workdir=w",
    )
    assert out.stdout.strip().splitlines() == [
        f"python3 -m ctx.train --workdir=w --coordinator_address=127.0.0.1:4000 --num_processes=2 --process_id={i}"
        for i in (0, 1)
    ]


@pytest.mark.parametrize("fsdp", [1, 2])
def test_compile_only_reports_memory_for_a_simulated_mesh(fsdp):
    env = simulated_devices_env(8)
    out = run_module(
        "ctx.train",
        "--config=experiments/demo.py",
        "--compile_only",
        f"--config.mesh.fsdp={fsdp}",
        "--config.train.segments_per_call=2",
        f"--config.train.per_device_batch_size={fsdp}",
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first, *_, last = out.stdout.strip().splitlines()
    assert first == f"ctx.train: jax {jax.__version__} on cpu: 8 device(s) (cpu) in 1 process(es)"
    report = json.loads(last)
    assert report["devices"] == 8 and report["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
    # The host's memory, shared by the 8 simulated devices, is their "HBM"; no TPU cost model here.
    assert report["fits"] is True and 0 < report["hbm_gib"] and report["estimate"] is None
    assert report["batch_size"] == 8 * fsdp  # per-device batch x devices
    assert report["per_device_bytes"]["argument_size_in_bytes"] > 0
    assert 0 < report["per_device_memory_estimate_gib"] < 1


def test_slurm_script_restarts_a_failed_run_but_not_bad_input_or_a_preemption(tmp_path):
    """A fake srun on PATH exits with the statuses listed in a file, one per call: the script
    starts the run again after a failure (a lost node), up to --max_restarts times, and passes
    exit 2 (bad input) and 143 (SIGTERM; SLURM requeues) straight through."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/bash\necho call >> "$CALLS"\nstatus=$(head -n1 "$STATUSES")\n'
        'sed -i 1d "$STATUSES"\nexit "$status"\n'
    )
    fake.chmod(0o755)

    def slurm(statuses, *flags):
        (tmp_path / "statuses").write_text("".join(f"{s}\n" for s in statuses))
        (tmp_path / "calls").write_text("")
        out = bash(
            "launch/slurm_gpu.sbatch",
            "--workdir=/shared/run",
            *flags,
            "--",
            "--config=experiments/pg19.py",
            PATH=f"{fake.parent}:{os.environ['PATH']}",
            CALLS=str(tmp_path / "calls"),
            STATUSES=str(tmp_path / "statuses"),
        )
        return out, len((tmp_path / "calls").read_text().split())

    out, calls = slurm([134, 1, 0])
    assert (
        out.returncode == 0
        and calls == 3
        and "restarting from the last checkpoint (2/3)" in out.stderr
    )
    out, calls = slurm([1, 1], "--max_restarts=1")
    assert out.returncode == 1 and calls == 2 and "failed 2 times" in out.stderr
    for status in (2, 143):
        out, calls = slurm([status, 0])
        assert out.returncode == status and calls == 1
    assert slurm([0], "--max_restarts=x")[0].returncode == 2
