import pytest

import ctx
from ctx.config import ConfigError, ModelConfig, validate
from experiments import demo
from tests.helpers import run_script


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(segment_length=6, compression_rate=4),
            r"segment_length \(6\) must be a multiple of model.compression_rate \(4\)",
        ),
        (dict(d_model=30, n_heads=4), r"d_model \(30\) must be divisible by model.n_heads \(4\)"),
        (dict(memory_length=-1), r"model.memory_length must not be negative"),
        (dict(n_layers=0), r"model.n_layers must be positive"),
        (dict(segment_length=0), r"model.segment_length must be positive"),
        (dict(compression_rate=0), r"model.compression_rate must be positive"),
        (dict(compression="zip"), r"model.compression='zip' is unknown; choose one of"),
        (dict(compression_loss="l1"), r"model.compression_loss='l1' is unknown"),
        (dict(layer_norm="sandwich"), r"model.layer_norm='sandwich' is unknown"),
        (dict(dtype="float16"), r"model.dtype='float16' is unknown"),
        (dict(remat="some"), r"model.remat='some' is unknown"),
        (dict(vocab_size=1), r"model.vocab_size must be at least 2"),
        (dict(dropout=1.0), r"model.dropout must be in \[0, 1\)"),
        (
            dict(attention_dropout=-0.1),
            r"model.attention_dropout must be in \[0, 1\), or None for model.dropout's rate",
        ),
        (
            dict(scan_unroll=-2),
            r"model.scan_unroll must be a non-negative integer \(layers per scan iteration, "
            r"0 = auto\), got -2",
        ),
        (
            dict(compression="max", compression_loss="autoencoder"),
            r"'autoencoder' needs a learned compression",
        ),
        (dict(compression="conv", compression_loss="none"), r"would never be trained"),
    ],
)
def test_model_config_errors_name_the_fields(overrides, message):
    cfg = ctx.model_config(**overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    with pytest.raises(ConfigError, match=message):  # the model validates too
        ModelConfig.from_config(cfg)


def test_d_model_must_be_even():
    with pytest.raises(ConfigError, match=r"d_model \(9\) must be even"):
        validate(ctx.model_config(d_model=9, n_heads=3))


def test_wrong_types_are_named():
    # ConfigDict refuses type changes itself; plain mappings are checked by validate.
    cfg = dict(ctx.model_config().to_dict(), n_heads=2.5)
    with pytest.raises(ConfigError, match=r"model.n_heads must be an integer, got 2.5"):
        validate(cfg)


def test_unknown_and_missing_fields():
    cfg = ctx.model_config()
    cfg.unlock()
    cfg.n_layer = 3
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['n_layer'\]"):
        validate(cfg)


def test_transformer_xl_ignores_compression_rate_divisibility():
    # Without compressed memory nothing is compressed, so n_s need not divide by c.
    validate(ctx.model_config(compressed_length=0, segment_length=6, compression_rate=4))


def test_full_config_sections_are_checked():
    cfg = demo.get_config()
    validate(cfg)
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError, match=r"train.batch_size must be positive"):
        validate(cfg)
    cfg = demo.get_config()
    cfg.train.num_steps = -3
    with pytest.raises(ConfigError, match=r"train.num_steps must be a non-negative integer"):
        validate(cfg)


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        (
            "train",
            "peak_lr",
            float("nan"),
            r"train.peak_lr must be a finite non-negative number, got nan",
        ),
        ("train", "end_lr", float("inf"), r"train.end_lr must be a finite non-negative number"),
        ("train", "b2", 1.0, r"train.b2 must be below 1"),
        (
            "eval",
            "batch_size",
            -2,
            r"eval.batch_size must be a non-negative integer \(0 = the training value\)",
        ),
    ],
)
def test_optimizer_and_eval_fields_are_checked_before_any_work(section, field, value, message):
    cfg = demo.get_config()
    cfg[section][field] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_demo_variants():
    assert demo.get_config("txl").model.compressed_length == 0
    ct, txl = demo.get_config("ct").model, demo.get_config("txl").model
    assert txl.memory_length == ct.memory_length + ct.compressed_length  # same attention length
    with pytest.raises(ValueError, match="unknown variant"):
        demo.get_config("nope")


@pytest.mark.parametrize("task", ["pg19", "enwik8", "wt103"])
def test_paper_configs_validate_and_txl_keeps_attention_length(task):
    import importlib

    module = importlib.import_module(f"experiments.{task}")
    ct, txl = module.get_config(), module.get_config("txl")
    validate(ct)
    validate(txl)
    assert txl.model.compressed_length == 0
    assert txl.model.memory_length == ct.model.memory_length + ct.model.compressed_length
    assert ct.train.peak_lr == 3e-4 and ct.train.grad_clip == 0.1 and ct.train.accumulate_every == 4


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(compression="dilated_conv", compressed_length=8),
        dict(compressed_length=0),
        dict(layer_norm="post"),
    ],
)
def test_parameter_count_matches_the_model(overrides):
    import jax
    import jax.numpy as jnp

    from ctx.flops import parameter_count

    cfg = ctx.ModelConfig.from_config(ctx.model_config(**overrides))
    model = ctx.CompressiveTransformer(cfg)
    shapes = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, cfg.segment_length), jnp.int32),
        ctx.init_memory(cfg, 1),
    )["params"]
    counted = parameter_count(cfg)
    assert counted["total"] == sum(x.size for x in jax.tree.leaves(shapes))
    compress = shapes["layers"].get("compress", {})
    assert counted["compression"] == sum(x.size for x in jax.tree.leaves(compress))


def test_full_scale_parameter_counts_match_the_papers():
    from experiments.reproduce import config_rows, markdown

    rows = {r["config"]: r for r in config_rows()}
    assert rows["enwik8:txl"]["parameters"] == pytest.approx(
        277e6, rel=0.01
    )  # TXL paper, 24 layers
    # The compression network: c * d^2 per layer, ~75M for 24 layers of d = 1024, c = 3 (docs/paper-notes.md §4).
    assert rows["enwik8:ct"]["compression_parameters"] == 24 * 3 * 1024 * 1024
    assert rows["pg19:ct"]["train_gflops_per_token"] > rows["pg19:txl"]["train_gflops_per_token"]
    assert "| enwik8:txl | 24 | 1024 | 1920 / 0 |" in markdown(list(rows.values()))


def test_per_device_batch_sets_the_global_batch():
    from ctx.config import default_config, with_global_batch

    cfg = default_config()
    assert with_global_batch(cfg, 8) is cfg  # not set: batch_size is the global batch
    cfg.train.per_device_batch_size = 3
    resolved = with_global_batch(cfg, 8)
    assert resolved.train.batch_size == 24 and cfg.train.batch_size == 8  # a copy
    cfg.train.per_device_batch_size = -1
    with pytest.raises(
        ConfigError, match="train.per_device_batch_size must be a non-negative integer"
    ):
        validate(cfg)


def _parsed_model(*overrides):
    """The model section the CLIs build from --config=experiments/pg19.py and the overrides."""
    done = run_script(
        "print_model_config.py", "--config=experiments/pg19.py", *overrides, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_attention_dropout_starts_unset_and_is_settable_from_the_command_line():
    line = _parsed_model()
    assert line.startswith("None ModelConfig(") and "dropout=0.1, attention_dropout=None" in line
    line = _parsed_model(
        "--config.model.attention_dropout=0", "--config.model.attention_impl=cudnn"
    )
    assert line.startswith("0.0 ") and "dropout=0.1, attention_dropout=0.0" in line
