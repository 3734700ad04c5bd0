"""ctx.selfcheck: a fused attention checked against the XLA reference at the config's layout. It
passes for the real kernels (interpreted here), and it catches the faults it exists for: a skew
off by one column, a dropout seed read as zero, a mask that ignores the head; train and
evaluate run it before touching the workdir, refuse a failing kernel asked for by name and fall
back from one chosen by `auto`."""

import dataclasses
import json
import os

import jax.numpy as jnp
import pytest

from ctx import backend, selfcheck, train
from ctx.config import ModelConfig
from ctx.nn import fused_attention, pallas_gpu, pallas_reconstruction, pallas_tpu
from ctx.nn.fused_attention import FusedKernels
from tests.helpers import run_module, tiny_model_config, tiny_train_config

# Several key blocks, the compressed memory ending inside one (both tables in a tile), dropout.
LAYOUT = dict(segment_length=16, memory_length=24, compressed_length=8, d_model=32, n_heads=2)


def checked(**overrides) -> dict:
    return selfcheck.run_self_check(
        tiny_model_config(**{**LAYOUT, "attention_impl": "pallas_tpu", **overrides})
    )


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTX_CACHE_DIR", str(tmp_path / "cache"))


def test_the_pallas_kernel_passes_every_check_with_dropout_mass_and_usage():
    result = checked(dropout=0.2, compression="most_used", compression_loss="none")
    assert result["ok"], {k: v for k, v in result["checks"].items() if not v["ok"]}
    names = set(result["checks"])
    assert {
        f"gradient_{a}{d}"
        for a in ("q", "u", "k", "v", "v_biases", "tables")
        for d in ("", "_dropout")
    } <= names
    assert {
        "output_position_dominant",
        "output_content_dominant",
        "output_dropout",
        "dropout_changes_output",
        "dropout_mask_probe",
        "dropout_seeds_differ",
        "dropout_rows_differ",
        "attention_mass",
        "usage",
        "finite",
        "two_runs_equal",
    } <= names
    assert (
        result["checks"]["dropout_mask_probe"]["max_error"] < 1e-3
    )  # whole counts, recovered exactly
    assert result["layout"] == {
        "impl": "pallas_tpu",
        "n_queries": 16,
        "n_mem": 24,
        "n_cmem": 8,
        "head_dim": 16,
        "dtype": "float32",
        "dropout": 0.2,
        "usage": True,
        "compressed": 0,
    }


def test_without_dropout_or_most_used_those_checks_are_left_out_and_cudnn_passes_too():
    assert not any(name.startswith(("dropout", "usage")) for name in checked()["checks"])
    result = selfcheck.run_self_check(tiny_model_config(**LAYOUT, attention_impl="cudnn"))
    assert result["ok"] and "attention_mass" not in result["checks"]


def test_a_skew_off_by_one_column_fails_the_position_dominant_output(monkeypatch):
    skew = pallas_tpu._skew

    def off_by_one(band, lay):
        return jnp.roll(skew(band, lay), 1, axis=1)

    monkeypatch.setattr(pallas_tpu, "_skew", off_by_one)
    result = checked()
    assert not result["ok"] and not result["checks"]["output_position_dominant"]["ok"]
    assert result["checks"]["output_position_dominant"]["max_error"] > 0.1


def test_the_reconstruction_loss_kernel_is_checked_beside_the_tpu_kernel_and_its_faults_are_caught(
    monkeypatch,
):
    """The default compression (conv, attention-reconstruction loss) with pallas_tpu runs the
    loss's reads as a kernel too: checked, and caught reading the wrong evicted keys or
    returning a wrong gradient."""
    result = checked()
    names = (
        "reconstruction_difference",
        "reconstruction_gradient_compressed_k",
        "reconstruction_gradient_compressed_v",
    )
    assert result["ok"] and all(result["checks"][name]["max_error"] < 1e-4 for name in names)
    assert result["layout"]["compressed"] == 8
    assert not any(
        name.startswith("reconstruction")
        for name in checked(compression_loss="autoencoder")["checks"]
    )

    evicted_keys = pallas_reconstruction._evicted_keys
    monkeypatch.setattr(
        pallas_reconstruction,
        "_evicted_keys",
        lambda n_keys, first, count, K: evicted_keys(n_keys, first + 1, count, K),
    )
    result = checked()
    assert not result["ok"] and not result["checks"]["reconstruction_difference"]["ok"]
    monkeypatch.setattr(pallas_reconstruction, "_evicted_keys", evicted_keys)

    backward = pallas_reconstruction._backward_call

    def halved_key_gradient(*args, **kwargs):
        dk, dv = backward(*args, **kwargs)
        return dk / 2, dv

    monkeypatch.setattr(pallas_reconstruction, "_backward_call", halved_key_gradient)
    result = checked()
    failed = {name for name, check in result["checks"].items() if not check["ok"]}
    assert failed == {"reconstruction_gradient_compressed_k"}


def test_a_dropout_seed_read_as_zero_fails_the_probe_and_repeats_the_masks(monkeypatch):
    monkeypatch.setattr(
        fused_attention, "row_seeds", lambda seed, batch: jnp.zeros((batch,), jnp.int32)
    )
    result = checked(dropout=0.1)
    assert not result["checks"]["dropout_mask_probe"]["ok"]
    assert (
        not result["checks"]["dropout_seeds_differ"]["ok"]
        and not result["checks"]["dropout_rows_differ"]["ok"]
    )


def test_a_mask_that_ignores_the_head_fails_the_probe(monkeypatch):
    kept = fused_attention.kept_weights

    def head_blind(seed, head, query, key, rate):
        return kept(seed, 0, query, key, rate)

    monkeypatch.setattr(fused_attention, "kept_weights", head_blind)
    result = checked(dropout=0.1)
    assert not result["checks"]["dropout_mask_probe"]["ok"]
    assert result["checks"]["dropout_mask_probe"]["max_error"] >= 1  # at least one whole weight off


def test_a_failing_kernel_asked_for_by_name_refuses_the_run_and_writes_nothing(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(
        pallas_tpu, "_skew", lambda band, lay: jnp.zeros((lay.query_block, lay.key_block))
    )
    cfg = tiny_train_config()
    cfg.model.attention_impl = "pallas_tpu"
    with pytest.raises(
        selfcheck.SelfCheckFailed,
        match=r"the pallas_tpu attention failed its self-check on cpu:cpu "
        r"\(jax .*\) \(output_position_dominant: error .*\); nothing was started: run with "
        r"--config.model.attention_impl=xla",
    ):
        train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Under 'auto' the same failure falls back to xla, which has the same parameters.
    resolved = ModelConfig.from_config(cfg.model)
    assert backend.checked_attention(resolved, "auto", "ctx.train").attention_impl == "xla"
    assert not (tmp_path / "cache" / "selfcheck").exists()  # a failure is never cached


def test_a_passing_result_is_cached_per_layout_device_and_versions(tmp_path):
    cfg = tiny_model_config(**LAYOUT, attention_impl="pallas_tpu")
    first = backend.cached_self_check(cfg)
    assert first["ok"] and not first["cached"] and os.path.exists(backend.cache_path(cfg))
    assert backend.cached_self_check(cfg)["cached"]
    other = dataclasses.replace(cfg, segment_length=8)
    assert backend.cache_path(other) != backend.cache_path(cfg)


def test_the_command_prints_one_json_line_and_its_exit_status_says_the_verdict(tmp_path):
    out = run_module(
        "ctx.selfcheck",
        "--config=experiments/demo.py",
        "--config.model.attention_impl=pallas_tpu",
        "--config.model.dropout=0.1",
        "--config.model.segment_length=16",
        "--config.model.memory_length=16",
        "--config.model.compressed_length=16",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        result["impl"] == "pallas_tpu"
        and result["ok"] is True
        and result["layout"]["dropout"] == 0.1
    )
    assert all(
        set(check) == {"ok", "max_error", "tolerance"} for check in result["checks"].values()
    )
    out = run_module("ctx.selfcheck", "--config=experiments/demo.py")  # xla: the reference itself
    assert out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1])["checks"] == {}


def test_the_gpu_kernel_passes_and_its_faults_are_caught_too(monkeypatch):
    """The same checks hold the Pallas GPU kernel: it passes with dropout and most_used, and a
    band column off by one or a zero row seed fails them."""
    result = checked(
        attention_impl="pallas_gpu", dropout=0.2, compression="most_used", compression_loss="none"
    )
    assert result["ok"], {k: v for k, v in result["checks"].items() if not v["ok"]}
    assert {"dropout_mask_probe", "usage", "attention_mass", "gradient_tables_dropout"} <= set(
        result["checks"]
    )
    columns = pallas_gpu.band_columns
    monkeypatch.setattr(
        pallas_gpu, "band_columns", lambda query, key, lay: columns(query, key, lay) + 1
    )
    result = checked(attention_impl="pallas_gpu")
    assert result["checks"]["output_position_dominant"]["max_error"] > 0.1
    monkeypatch.setattr(pallas_gpu, "band_columns", columns)
    monkeypatch.setattr(
        fused_attention, "row_seeds", lambda seed, batch: jnp.zeros((batch,), jnp.int32)
    )
    result = checked(attention_impl="pallas_gpu", dropout=0.1)
    assert (
        not result["checks"]["dropout_mask_probe"]["ok"]
        and not result["checks"]["dropout_rows_differ"]["ok"]
    )


def test_a_kernel_that_does_not_compile_here_fails_its_check_and_auto_falls_back(
    monkeypatch, capsys
):
    """A Triton or Mosaic error on the user's device is the self-check's verdict, not a crash:
    the JSON says which error, 'auto' warns and runs xla, a kernel asked for by name refuses."""

    def broken(*args, **kwargs):
        raise RuntimeError("Triton compilation failed: out of shared memory\nmore detail")

    monkeypatch.setitem(
        selfcheck.PALLAS_KERNELS, "pallas_gpu", FusedKernels(forward=broken, backward=broken)
    )
    cfg = tiny_model_config(**LAYOUT, attention_impl="pallas_gpu")
    result = selfcheck.run_self_check(cfg)
    assert not result["ok"] and result["checks"]["compiles_and_runs"]["error"] == (
        "RuntimeError: Triton compilation failed: out of shared memory"
    )
    assert backend.checked_attention(cfg, "auto", "ctx.train").attention_impl == "xla"
    assert "the pallas_gpu attention failed its self-check on cpu:cpu" in capsys.readouterr().err
    with pytest.raises(
        selfcheck.SelfCheckFailed,
        match=r"\(compiles_and_runs: RuntimeError: Triton compilation "
        r"failed: out of shared memory\); nothing was started",
    ):
        backend.checked_attention(cfg, "pallas_gpu", "ctx.train")
