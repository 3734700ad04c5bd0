"""Sampling with memory equals a teacher-forced pass; sampling filters; the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctx
from ctx import sample
from ctx.sample import choose_token, generate
from tests.helpers import ROOT, build, tiny_model_config, tiny_train_config

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow


def teacher_forced_logprobs(model, variables, cfg, sequence):
    """log p(sequence[t+1] | sequence[:t+1]) from whole-segment passes, as in training."""
    n_s = cfg.segment_length
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    T = inputs.shape[1]
    padded = np.pad(inputs, ((0, 0), (0, (-T) % n_s)))
    memory, logprobs = ctx.init_memory(cfg, sequence.shape[0]), []
    apply = jax.jit(model.apply)
    for k in range(padded.shape[1] // n_s):
        logits, memory, _ = apply(
            variables, jnp.asarray(padded[:, k * n_s : (k + 1) * n_s], jnp.int32), memory
        )
        logprobs.append(jax.nn.log_softmax(logits))
    logprobs = np.asarray(jnp.concatenate(logprobs, axis=1))[:, :T]
    return np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize(
    "overrides, prompt_length",
    [
        (dict(), 6),  # CT: several segment boundaries and compressions
        (dict(compression="most_used", compression_loss="none", memory_length=6), 3),
        (dict(compressed_length=0, memory_length=8), 9),  # Transformer-XL
        (dict(layer_norm="post", dtype="float32"), 0),  # unconditional, from BOS alone
    ],
)
def test_sampling_logprobs_equal_teacher_forcing(overrides, prompt_length):
    cfg = tiny_model_config(**overrides)
    model, variables, _ = build(cfg, batch_size=2)
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, prompt_length))
    num_tokens = 17
    sample = generate(
        variables["params"], cfg, prompt, num_tokens, jax.random.PRNGKey(3), temperature=1.0
    )
    assert sample.tokens.shape == (2, num_tokens)
    sequence = np.concatenate([np.zeros((2, 1), int), prompt, sample.tokens], axis=1)
    forced = teacher_forced_logprobs(model, variables, model.config, sequence)[:, -num_tokens:]
    np.testing.assert_allclose(sample.logprobs, forced, atol=1e-4)


def test_generate_compiles_its_steps_once_per_model_config():
    cfg = tiny_model_config()
    _, variables, _ = build(cfg)
    args = (variables["params"], cfg, np.array([1, 2, 3, 4, 5]), 6, jax.random.PRNGKey(0))
    first = generate(*args)
    steps = sample._steps(ctx.ModelConfig.from_config(cfg))
    compiled = [step._cache_size() for step in steps]
    second = generate(*args)
    assert sample._steps(ctx.ModelConfig.from_config(cfg)) is steps
    assert [step._cache_size() for step in steps] == compiled and min(compiled) >= 1
    np.testing.assert_array_equal(first.tokens, second.tokens)


def test_choose_token_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    greedy = {int(choose_token(logits, k, 0.0, 0, 1.0)[0]) for k in keys[:5]}
    top2 = {int(choose_token(logits, k, 1.0, 2, 1.0)[0]) for k in keys}
    nucleus = {int(choose_token(logits, k, 1.0, 0, 0.7)[0]) for k in keys}
    free = {int(choose_token(logits, k, 1.0, 0, 1.0)[0]) for k in keys}
    assert greedy == {0} and top2 == {0, 1} and nucleus == {0, 1} and free == {0, 1, 2, 3}


def test_generate_rejects_bad_input():
    cfg = tiny_model_config()
    _, variables, _ = build(cfg)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 32\)"):
        generate(variables["params"], cfg, [1, 40], 3, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        generate(variables["params"], cfg, [1, 2], 0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_p"):
        generate(variables["params"], cfg, [1, 2], 3, jax.random.PRNGKey(0), top_p=0.0)


def test_sample_cli(tmp_path):
    from ctx import train

    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_train_config(num_steps=4), str(workdir))
    tiny = [
        "--config.model.d_model=32",
        "--config.model.n_heads=2",
        "--config.model.d_ff=64",
        "--config.model.segment_length=8",
        "--config.model.memory_length=8",
        "--config.model.compressed_length=8",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "ctx.sample",
        "--config=experiments/demo.py",
        *tiny,
        f"--workdir={workdir}",
        "--num_tokens=20",
    ]
    out = subprocess.run(
        cmd + ["--prompt=The with statement"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("The with statement") and len(out.stdout.encode()) > len(
        "The with statement"
    )
    for args, message in [
        (["--prompt="], "--prompt is empty"),
        (["--prompt=x", f"--workdir={tmp_path / 'none'}"], "has no checkpoints/ folder"),
        (["--prompt=x", "--config.model.d_model=64"], "model.d_model: checkpoint 32"),
    ]:
        out = subprocess.run(cmd + args, capture_output=True, text=True, cwd=ROOT, env=env)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (
            out.stderr
        )


def test_inspect_segment_reports_mass_by_kind_and_age():
    from ctx.diagnostics import inspect_segment

    cfg = tiny_model_config(memory_length=8, compressed_length=8)
    model, variables, memory = build(cfg, batch_size=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 4)), jnp.int32)
    for _ in range(6):
        report = inspect_segment(model, variables["params"], tokens, memory, buckets=2)
        memory = report["memory"]
    mass = report["attention_mass"]
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, rtol=1e-5)  # all attention accounted for
    for k, kind in enumerate(("compressed", "memory", "segment")):
        np.testing.assert_allclose(
            report["attention_by_age"][kind].sum(axis=1), mass[:, k], rtol=1e-5
        )
    ages = report["mean_age_tokens"]
    assert (
        ages["compressed"][0]
        > ages["compressed"][1]
        > ages["memory"][0]
        > ages["memory"][1]
        > ages["segment"][0]
    )
    assert (
        report["compression_loss_per_layer"].shape == (2,)
        and (report["compression_loss_per_layer"] > 0).all()
    )
    assert memory.cmem.shape == (2, 2, 8, 16) and np.asarray(memory.cmem_mask).all()
