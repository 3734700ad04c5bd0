"""Launch scripts: shellcheck-clean, and the exact commands their dry runs print; the
ahead-of-time compile check on simulated devices."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import simulated_devices_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu.sh", "launch/slurm_gpu.sbatch", "launch/local.sh", "experiments/gpu_bench.sh"]


def bash(*args):
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT)


def test_scripts_pass_shellcheck():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    out = subprocess.run([shellcheck, "--severity=style", *SCRIPTS], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout


def test_tpu_dry_run_prints_the_gcloud_commands():
    out = bash("launch/tpu.sh", "--name=ct", "--zone=us-east5-a", "--project=p1", "--accelerator=v5p-256", "--spot",
               "--workdir=gs://bucket/run", "--dry_run", "--", "--config=experiments/pg19.py:txl",
               "--config.train.batch_size=512")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    where = "--zone=us-east5-a --project=p1"
    assert lines[0] == (f"gcloud compute tpus queued-resources create ct --node-id=ct {where} "
                        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --spot")
    assert lines[1] == "git archive --format=tar.gz -o /tmp/ctx-src.tar.gz HEAD"
    assert lines[2] == f"gcloud compute tpus tpu-vm scp /tmp/ctx-src.tar.gz ct: --worker=all {where}"
    assert lines[3].startswith(f"gcloud compute tpus tpu-vm ssh ct --worker=all {where} --command=")
    assert "pip\\ install" in lines[3] and "jax\\[tpu\\]" in lines[3]
    assert lines[4].startswith(f"gcloud compute tpus tpu-vm ssh ct --worker=all {where} --command=nohup")
    assert "python3\\ -m\\ ctx.train\\ --workdir=gs://bucket/run\\ --config=experiments/pg19.py:txl" in lines[4]
    assert "--config.train.batch_size=512" in lines[4]
    assert lines[5].startswith(f"gcloud compute tpus tpu-vm ssh ct --worker=0 {where}") and "tail" in lines[5]
    assert lines[6] == f"gcloud compute tpus queued-resources delete ct {where} --force --quiet"
    assert len(lines) == 7
    evaluate = bash("launch/tpu.sh", "--name=ct", "--zone=z", "--workdir=gs://b/r", "--mode=evaluate", "--dry_run",
                    "--", "--config=experiments/pg19.py", "--split=test")
    assert "ctx.evaluate\\ --workdir=gs://b/r\\ --config=experiments/pg19.py\\ --split=test" in evaluate.stdout
    missing = bash("launch/tpu.sh", "--zone=z", "--dry_run")
    assert missing.returncode == 2 and "--name, --zone and --workdir are required" in missing.stderr


def test_slurm_and_local_dry_runs():
    out = bash("launch/slurm_gpu.sbatch", "--dry_run", "--workdir=/shared/run", "--", "--config=experiments/pg19.py")
    assert out.stdout.strip() == ("srun --kill-on-bad-exit=1 python3 -m ctx.train --distributed=on "
                                  "--workdir=/shared/run --config=experiments/pg19.py")
    out = bash("launch/local.sh", "--processes=2", "--port=4000", "--dry_run", "--", "python3", "-m", "ctx.train",
               "--workdir=w")
    assert out.stdout.strip().splitlines() == [
        f"python3 -m ctx.train --workdir=w --coordinator_address=127.0.0.1:4000 --num_processes=2 --process_id={i}"
        for i in (0, 1)]


@pytest.mark.parametrize("fsdp", [1, 2])
def test_compile_only_reports_memory_for_a_simulated_mesh(fsdp):
    env = simulated_devices_env(8)
    out = subprocess.run([sys.executable, "-m", "ctx.train", "--config=experiments/demo.py", "--compile_only",
                          f"--config.mesh.fsdp={fsdp}", "--config.train.segments_per_call=2",
                          f"--config.train.per_device_batch_size={fsdp}"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
    assert report["batch_size"] == 8 * fsdp  # per-device batch x devices
    assert report["per_device_bytes"]["argument_size_in_bytes"] > 0
    assert 0 < report["per_device_memory_estimate_gib"] < 1


def test_compile_only_for_a_tpu_topology_without_libtpu_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "ctx.train", "--config=experiments/demo.py", "--compile_only",
                          "--topology=v5p-8"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and "needs libtpu" in out.stderr and "Traceback" not in out.stderr
