"""Where a run runs and what it can reach, said before any work: the backend line, the warning
for accelerators JAX does not drive, and remote (gs://) paths that cannot be reached."""

import jax
import pytest

from ctx import backend, distributed, remote
from ctx.data.datasets import check_data_config
from tests.helpers import tiny_train_config


def test_system_accelerators_counts_gpu_and_tpu_device_files(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "accel0", "null"):
        (tmp_path / name).touch()
    (tmp_path / "vfio").mkdir()
    for name in ("0", "1", "vfio"):
        (tmp_path / "vfio" / name).touch()
    assert distributed.system_accelerators(str(tmp_path)) == {"gpu": 2, "tpu": 3}
    assert distributed.system_accelerators(str(tmp_path / "absent")) == {"gpu": 0, "tpu": 0}


def test_unused_accelerators_are_warned_about_with_the_install_command(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    gpu = backend.unused_accelerators("cpu", {"gpu": 8, "tpu": 0})
    assert gpu.startswith("warning: this machine has 8 NVIDIA GPU(s) but JAX runs on cpu")
    assert "pip install -e '.[cuda]'" in gpu
    assert "pip install -e '.[tpu]'" in backend.unused_accelerators("cpu", {"gpu": 0, "tpu": 4})
    assert backend.unused_accelerators("gpu", {"gpu": 8, "tpu": 0}) is None
    assert backend.unused_accelerators("cpu", {"gpu": 0, "tpu": 0}) is None
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the user chose the CPU
    assert backend.unused_accelerators("cpu", {"gpu": 8, "tpu": 0}) is None


def test_announce_names_the_backend_and_devices(capsys):
    backend.announce("ctx.train")
    out = capsys.readouterr().out
    assert (
        out
        == f"ctx.train: jax {jax.__version__} on cpu: {jax.device_count()} device(s) (cpu) in 1 process(es)\n"
    )


def test_local_paths_pass_and_other_schemes_are_refused():
    remote.check_reachable(
        "/no/such/local/path", "data.path"
    )  # local paths are checked where they are read
    with pytest.raises(ValueError, match=r"data.path=s3://b/x: the s3:// scheme is not supported"):
        remote.check_reachable("s3://b/x", "data.path")


def test_an_unreachable_bucket_is_one_line_naming_the_field(monkeypatch):
    monkeypatch.setitem(
        remote.ENDPOINTS, "gs", "storage.ctx-test.invalid"
    )  # never resolves (RFC 6761)
    with pytest.raises(
        ValueError,
        match=r"^--workdir=gs://b/run cannot be reached: no connection to "
        r"storage.ctx-test.invalid",
    ) as error:
        remote.check_reachable("gs://b/run", "--workdir", must_exist=False)
    assert "\n" not in str(error.value)
    cfg = tiny_train_config()
    cfg.data.dataset, cfg.data.path = "pg19", "gs://BUCKET/pg19"
    with pytest.raises(ValueError, match=r"^data.path=gs://BUCKET/pg19 cannot be reached"):
        check_data_config(cfg.data, "train")
