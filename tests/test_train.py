"""Training: metrics contract, exact resume, device-count invariance, bad input."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ctx import train
from ctx.optim import learning_rate, make_optimizer
from tests.helpers import (
    ROOT,
    read_metrics,
    resolved,
    run_script,
    simulated_devices_env,
    tiny_train_config,
)

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow


def train_rows(workdir):
    return [r for r in read_metrics(workdir) if "split" not in r]


def params_of(workdir, step=None, cfg=None):
    from ctx.checkpoint import Checkpointer

    cfg = cfg or tiny_train_config()
    trainer = train.Trainer(cfg, resolved(cfg))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 10)
    state, data, _ = ckpt.restore(step or ckpt.latest_step(), trainer.abstract_checkpoint())
    ckpt.close()
    return jax.device_get(state), data


def test_train_writes_metrics_checkpoints_and_validation(tmp_path):
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(tiny_train_config(), workdir)
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in (
        "loss",
        "compression_loss",
        "tokens_per_sec",
        "num_devices",
        "grad_norm",
        "learning_rate",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["num_devices"] == 1
    assert abs(rows[0]["loss"] - np.log(256)) < 1.0  # starts near uniform over bytes
    assert rows[1]["compression_loss"] > 0  # memory filled after the first segment
    validation = [r for r in read_metrics(workdir) if r.get("split") == "validation"]
    assert (
        len(validation) == 1 and validation[0]["step"] == 8 and validation[0]["bits_per_byte"] > 0
    )
    assert sorted(
        int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()
    ) == [4, 8]
    assert result["validation"]["bits_per_byte"] == validation[0]["bits_per_byte"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.train_and_evaluate(tiny_train_config(num_steps=4), "runs/relative")
    assert (tmp_path / "runs" / "relative" / "checkpoints" / "4").is_dir()


def txl(cfg):
    """The Transformer-XL variant: no compressed memory (zero-size cmem arrays in the state)."""
    cfg.model.memory_length, cfg.model.compressed_length = 16, 0
    return cfg


@pytest.mark.parametrize("variant", [lambda cfg: cfg, txl], ids=["ct", "txl"])
def test_resume_follows_the_same_trajectory_bitwise(tmp_path, variant):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.train_and_evaluate(variant(tiny_train_config(num_steps=8)), straight)
    train.train_and_evaluate(variant(tiny_train_config(num_steps=4)), split)
    train.train_and_evaluate(
        variant(tiny_train_config(num_steps=8)), split
    )  # a larger num_steps continues
    a, b = train_rows(straight), train_rows(split)
    assert [r["step"] for r in b] == list(range(1, 9))  # the resumed run appended
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["compression_loss"] for r in a] == [r["compression_loss"] for r in b]
    (sa, da), (sb, db) = (
        params_of(straight, cfg=variant(tiny_train_config())),
        params_of(split, cfg=variant(tiny_train_config())),
    )
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    assert da == db


def test_learning_rate_schedule_and_accumulation():
    cfg = tiny_train_config(
        init_lr=1e-6, peak_lr=3e-4, end_lr=1e-6, warmup_steps=10, decay_steps=100
    )
    lr = learning_rate(cfg.train, cfg.train.peak_lr)
    assert (
        np.isclose(lr(0), 1e-6)
        and np.isclose(lr(10), 3e-4)
        and np.isclose(lr(110), 1e-6, rtol=1e-3)
    )
    assert lr(5) < lr(10) and lr(60) < lr(10)
    # Accumulation: one update per segment until accumulate_after, then every 4 segments.
    cfg.train.accumulate_after, cfg.train.accumulate_every = 2, 4
    tx = make_optimizer(cfg.train)
    params = {"w": np.ones(3, np.float32), "compress": {"k": np.ones(2, np.float32)}}
    state = tx.init(params)
    changes = []
    for _ in range(10):
        updates, state = tx.update(jax.tree.map(np.ones_like, params), state, params)
        changes.append(bool(np.abs(updates["w"]).max() > 0))
    assert changes == [True, True, False, False, False, True, False, False, False, True]


def test_compression_branch_has_its_own_clip():
    cfg = tiny_train_config(accumulate_after=10**9, grad_clip=0.1, compress_grad_clip=0.1)
    tx = make_optimizer(cfg.train)
    params = {"w": np.ones(3, np.float32), "compress": {"k": np.ones(2, np.float32)}}
    small = {"w": np.full(3, 1e-3, np.float32), "compress": {"k": np.full(2, 1e-3, np.float32)}}
    huge = {"w": small["w"], "compress": {"k": np.full(2, 1e6, np.float32)}}
    u_small, _ = tx.update(small, tx.init(params), params)
    u_huge, _ = tx.update(huge, tx.init(params), params)
    np.testing.assert_array_equal(u_small["w"], u_huge["w"])  # main update unaffected


def run_subprocess(name, devices, *args):
    env = simulated_devices_env(devices, PYTHONPATH=ROOT)
    out = run_script(name, *args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """8 steps of the tiny run on one device: the reference for both 8-device meshes."""
    workdir = str(tmp_path_factory.mktemp("one") / "run")
    train.train_and_evaluate(tiny_train_config(num_steps=8), workdir)
    return workdir


@pytest.mark.parametrize("fsdp", [1, 2])
def test_eight_devices_give_the_same_losses_and_resume_on_one(tmp_path, one_device_run, fsdp):
    one, eight = one_device_run, str(tmp_path / "eight")
    run_subprocess("train_run.py", 8, eight, "4", str(fsdp))
    rows8 = train_rows(eight)
    assert rows8[0]["num_devices"] == 8
    # Saved on 8 devices, resumed here on 1.
    train.train_and_evaluate(tiny_train_config(num_steps=8), eight)
    rows1, rows8 = train_rows(one), train_rows(eight)
    assert [r["step"] for r in rows8] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in rows8], [r["loss"] for r in rows1], rtol=1e-5)
    np.testing.assert_allclose(
        [r["compression_loss"] for r in rows8],
        [r["compression_loss"] for r in rows1],
        rtol=1e-4,
        atol=1e-7,
    )


def test_bad_input_leaves_no_workdir(tmp_path):
    workdir = tmp_path / "never"
    cfg = tiny_train_config()
    cfg.model.segment_length = 7
    with pytest.raises(ValueError, match="segment_length"):
        train.train_and_evaluate(cfg, str(workdir))
    cfg = tiny_train_config()
    cfg.data.dataset = "nope"
    with pytest.raises(ValueError, match="data.dataset='nope'"):
        train.train_and_evaluate(cfg, str(workdir))
    cfg = tiny_train_config(batch_size=3)
    cfg.mesh.fsdp = 2
    with pytest.raises(ValueError, match="mesh"):
        train.train_and_evaluate(cfg, str(workdir))
    assert not workdir.exists()
    afile = tmp_path / "file"
    afile.write_text("keep me")
    with pytest.raises(ValueError, match="not a directory"):
        train.train_and_evaluate(tiny_train_config(), str(afile))
    assert afile.read_text() == "keep me"


def test_resuming_with_a_different_model_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_train_config(num_steps=4), workdir)
    before = sorted(os.listdir(workdir))
    cfg = tiny_train_config(num_steps=8)
    cfg.model.d_model = 64
    with pytest.raises(ValueError, match=r"model.d_model: checkpoint 32, config 64"):
        train.train_and_evaluate(cfg, workdir)
    assert sorted(os.listdir(workdir)) == before and len(train_rows(workdir)) == 4


@pytest.mark.parametrize("field, value", [("train.batch_size", 4), ("model.memory_length", 16)])
def test_resuming_into_another_memory_or_batch_shape_is_refused_and_the_checkpoint_kept(
    tmp_path, field, value
):
    """A changed batch or memory length is not damage: one line names the field and the fix, and
    on_corrupt_checkpoint=previous moves nothing aside (it used to rename good checkpoints)."""
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_train_config(num_steps=4), workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    cfg = tiny_train_config(num_steps=8, on_corrupt_checkpoint="previous")
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(
        ValueError,
        match=rf"{field}: checkpoint 8, config {value}\); resume with --config.{field}=8",
    ):
        train.train_and_evaluate(cfg, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_cli_reports_bad_config_in_one_line(tmp_path):
    workdir = tmp_path / "cli"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, expected in [
        (
            ["--config.model.n_heads=3"],
            "model.d_model (128) must be divisible by model.n_heads (3)",
        ),
        (["--config.model.no_such_field=3"], "no_such_field"),
        ([], "--workdir is required"),
    ]:
        cmd = [sys.executable, "-m", "ctx.train", "--config=experiments/demo.py", *args]
        if args:
            cmd.append(f"--workdir={workdir}")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2, out.stderr
        assert expected in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert not workdir.exists()
