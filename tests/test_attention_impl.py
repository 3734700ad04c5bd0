"""model.attention_impl: the fused paths, with the shifted position term as an additive bias,
equal the XLA reference in everything a segment produces and in every parameter's gradient,
with the same parameters. 'cudnn' is jax.nn.dot_product_attention (on CPU the same call's XLA
version); 'pallas_tpu' and 'pallas_gpu' are ctx's Pallas kernels, here in interpret mode (the
kernels a TPU and a GPU run)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctx
from ctx import diagnostics, evaluate
from ctx.backend import attention_line
from ctx.config import ConfigError, ModelConfig, validate_model
from ctx.nn.attention_policy import resolve_attention
from ctx.nn.memory import reset_rows
from ctx.nn.pallas_launch import KERNEL_INPUTS
from tests.helpers import build, random_tokens, tiny_model_config

CASES = [
    dict(),  # Compressive Transformer
    dict(compressed_length=0, memory_length=8),  # Transformer-XL
    dict(layer_norm="post", compression="mean", compression_loss="none"),
    dict(
        compression="dilated_conv",
        compression_loss="autoencoder",
        memory_length=6,
        compressed_length=6,
    ),
]


FUSED = ["cudnn", "pallas_tpu", "pallas_gpu"]
PALLAS = ["pallas_tpu", "pallas_gpu"]
# 'most_used' ranks the evicted memories by the attention they received: the Pallas kernels
# return it (cuDNN returns nothing of the kind, and refuses it).
MOST_USED = dict(compression="most_used", compression_loss="none")


@pytest.mark.parametrize(
    "kernel, overrides",
    [(kernel, case) for kernel in FUSED for case in CASES]
    + [(kernel, MOST_USED) for kernel in PALLAS],
)
def test_fused_attention_equals_xla_in_outputs_and_every_gradient(overrides, kernel):
    reference, variables, memory = build(tiny_model_config(**overrides), batch_size=3)
    fused = ctx.CompressiveTransformer(tiny_model_config(attention_impl=kernel, **overrides))
    assert fused.config.fused_attention and not reference.config.fused_attention
    cfg = reference.config
    tokens = jnp.asarray(random_tokens(cfg, 3, 4)).reshape(3, 4, cfg.segment_length)
    weights = jnp.asarray(
        np.random.default_rng(2).normal(size=(3, cfg.segment_length, cfg.vocab_size)), jnp.float32
    )

    def loss(params, model, memory, segment):
        logits, new_memory, aux = model.apply({"params": params}, segment, memory)
        return (logits * weights).sum() + aux.compression_loss, (
            logits,
            new_memory,
            aux.compression_loss_per_layer,
            aux.attention_mass,
        )

    step_x, step_f = (
        jax.jit(jax.grad(lambda p, m, t, model=model: loss(p, model, m, t), has_aux=True))
        for model in (reference, fused)
    )
    for s in range(4):
        if s == 2:  # row 1 starts a new document: its memory is empty, then partly filled
            memory = reset_rows(memory, jnp.asarray([False, True, False]))
        grads_x, (logits_x, next_x, loss_x, mass_x) = step_x(
            variables["params"], memory, tokens[:, s]
        )
        grads_f, (logits_f, next_f, loss_f, mass_f) = step_f(
            variables["params"], memory, tokens[:, s]
        )
        if kernel in PALLAS:  # from the kernel's row statistics; cuDNN gives none
            np.testing.assert_allclose(mass_f, mass_x, rtol=1e-5, atol=1e-6)
        else:
            assert mass_f is None
        np.testing.assert_allclose(logits_f, logits_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss_f, loss_x, rtol=1e-5, atol=1e-7)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), next_f, next_x
        )
        for (path, g_f), g_x in zip(
            jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads_x)
        ):
            np.testing.assert_allclose(
                g_f, g_x, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
            )
        memory = next_x


@pytest.mark.parametrize("kernel", FUSED)
def test_evaluation_carries_keys_values_through_the_fused_attention_too(kernel):
    reference, variables, memory = build(tiny_model_config(), batch_size=2)
    fused = ctx.CompressiveTransformer(tiny_model_config(attention_impl=kernel))
    cfg = reference.config
    tokens = random_tokens(cfg, 2, 3).reshape(2, 3, cfg.segment_length).transpose(1, 0, 2)
    chunk = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=-1)),
        "weights": jnp.ones(tokens.shape),
        "reset": jnp.asarray([[True, True], [False, True], [False, False]]),
    }
    _, nll_x = evaluate.make_eval_chunk_fn(reference)(
        variables["params"], jax.tree.map(jnp.copy, memory), chunk
    )
    _, nll_f = evaluate.make_eval_chunk_fn(fused)(
        variables["params"], jax.tree.map(jnp.copy, memory), chunk
    )
    np.testing.assert_allclose(nll_f, nll_x, rtol=1e-5, atol=1e-5)


def test_what_cudnn_cannot_run_is_a_clear_config_error_and_pallas_runs_all_of_it():
    with pytest.raises(
        ValueError,
        match="attention_impl='cudnn' has no attention dropout, and "
        r"model.attention_dropout is 0.1 \(model.dropout, which it follows while unset\); "
        "set --config.model.attention_dropout=0",
    ):
        validate_model(tiny_model_config(attention_impl="cudnn", dropout=0.1))
    with pytest.raises(ValueError, match=r"model.attention_dropout is 0.2 \(set there\)"):
        validate_model(tiny_model_config(attention_impl="cudnn", attention_dropout=0.2))
    validate_model(tiny_model_config(attention_impl="cudnn", dropout=0.1, attention_dropout=0.0))
    with pytest.raises(
        ValueError,
        match="most_used.*which cuDNN's fused kernel does not return; use "
        "attention_impl='pallas_gpu' \\(NVIDIA GPUs\\), 'pallas_tpu'",
    ):
        validate_model(tiny_model_config(attention_impl="cudnn", **MOST_USED))
    validate_model(tiny_model_config(attention_impl="pallas_tpu", dropout=0.1, **MOST_USED))
    validate_model(tiny_model_config(attention_impl="pallas_gpu", dropout=0.1, **MOST_USED))
    with pytest.raises(ValueError, match="attention_impl='flash' is unknown"):
        validate_model(tiny_model_config(attention_impl="flash"))


def test_diagnostics_read_probabilities_of_a_fused_model():
    model, variables, memory = build(tiny_model_config(attention_impl="cudnn"), batch_size=2)
    tokens = jnp.zeros((2, model.config.segment_length), jnp.int32)
    report = diagnostics.inspect_segment(model, variables["params"], tokens, memory)
    assert report["attention_mass"].shape == (2, 3) and np.allclose(
        report["attention_mass"].sum(-1), 1.0
    )


@pytest.mark.parametrize("kernel", FUSED)
def test_bfloat16_fused_attention_agrees_with_xla_to_bf16_precision(kernel):
    """In bf16 the paths round differently (the fused ones add the mask to a bf16 bias):
    logits agree to 0.05 absolute on values of order 1."""
    reference, variables, memory = build(tiny_model_config(dtype="bfloat16"), batch_size=2)
    fused = ctx.CompressiveTransformer(tiny_model_config(dtype="bfloat16", attention_impl=kernel))
    tokens = jnp.asarray(random_tokens(reference.config, 2, 1))
    for _ in range(2):
        logits_x, memory_x, _ = reference.apply(variables, tokens, memory)
        logits_f, _, _ = fused.apply(variables, tokens, memory)
        np.testing.assert_allclose(np.asarray(logits_f), np.asarray(logits_x), atol=5e-2)
        memory = memory_x


def test_the_run_log_says_which_attention_it_uses():
    assert attention_line(ModelConfig(), "xla", "cpu") == "xla (model.attention_impl=xla)"
    line = attention_line(ModelConfig(attention_impl="cudnn"), "cudnn", "cpu")
    assert line.startswith("fused, jax.nn.dot_product_attention") and "no cuDNN here" in line
    line = attention_line(ModelConfig(attention_impl="pallas_tpu"), "pallas_tpu", "cpu")
    assert line.startswith(
        "fused, ctx's Pallas flash kernel for TPUs (Pallas interpret mode on cpu"
    )
    line = attention_line(
        resolve_attention(ModelConfig(attention_impl="auto", dropout=0.1), "gpu"), "auto", "gpu"
    )
    assert (
        line
        == "fused, ctx's Pallas flash kernel for GPUs (Triton; model.attention_impl=auto on gpu)"
    )
    head_dim_24 = ModelConfig(attention_impl="auto", d_model=48, n_heads=2)
    line = attention_line(
        resolve_attention(dataclasses.replace(head_dim_24, dropout=0.1), "gpu"), "auto", "gpu"
    )
    assert line.startswith(
        "xla (model.attention_impl=auto on gpu (the Pallas GPU kernel cannot run here: its head "
        "dimension (d_model / n_heads = 24) must be a power of two"
    ), line
    assert line.endswith("; cuDNN cannot drop attention weights or report most_used's usage))")
    line = attention_line(
        resolve_attention(dataclasses.replace(head_dim_24, dropout=0.0), "gpu"), "auto", "gpu"
    )
    assert line.startswith(
        "fused, jax.nn.dot_product_attention (cuDNN; model.attention_impl=auto on gpu (the "
        "Pallas GPU kernel cannot run here: its head dimension"
    ), line


def test_auto_picks_a_fused_attention_only_for_a_config_it_can_run():
    def resolved(platform, **fields):
        return resolve_attention(
            ModelConfig(attention_impl="auto", **fields), platform
        ).attention_impl

    assert resolved("cpu") == "xla"
    assert (
        resolved("gpu") == resolved("gpu", dropout=0.1) == "pallas_gpu"
    )  # the Pallas kernel runs every config
    assert resolved("gpu", dropout=0.0, compression="most_used") == "pallas_gpu"
    # Where Triton cannot tile the layout (head dim 24), cuDNN, unless the config needs what it lacks.
    assert resolved("gpu", d_model=48, n_heads=2) == "cudnn"
    assert resolved("gpu", d_model=48, n_heads=2, dropout=0.1) == "xla"  # attention_dropout follows
    assert resolved("gpu", d_model=48, n_heads=2, dropout=0.1, attention_dropout=0.0) == "cudnn"
    assert resolved("gpu", d_model=48, n_heads=2, dropout=0.0, compression="most_used") == "xla"
    assert resolved("tpu", dropout=0.1) == "pallas_tpu"  # the Pallas kernel runs every config
    assert resolved("tpu", dropout=0.0, compression="most_used") == "pallas_tpu"
    assert (
        resolve_attention(ModelConfig(attention_impl="cudnn"), "tpu").attention_impl == "cudnn"
    )  # as asked


def test_the_model_refuses_an_unresolved_or_untyped_config():
    tokens, memory = jnp.zeros((1, 4), jnp.int32), ctx.init_memory(tiny_model_config(), 1)
    with pytest.raises(ConfigError, match="attention_impl resolved for the platform, not 'auto'"):
        ctx.CompressiveTransformer(
            ModelConfig(
                segment_length=4, memory_length=4, compressed_length=4, attention_impl="auto"
            )
        ).init(jax.random.key(0), tokens, memory)
    with pytest.raises(
        ConfigError,
        match="takes the run's ModelConfig, not a ConfigDict: make it once where the "
        "run starts: ctx.backend.model_config_for_run",
    ):
        ctx.CompressiveTransformer(ctx.model_config()).init(jax.random.key(0), tokens, memory)


def _training_step(model, variables, memory, tokens, seed):
    """Logits and every parameter's gradient of one training-mode (dropout) step."""

    def loss(params):
        logits, _, aux = model.apply(
            {"params": params},
            tokens,
            memory,
            deterministic=False,
            rngs={"dropout": jax.random.key(seed)},
        )
        return (logits**2).mean() + aux.compression_loss, logits

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("kernel", FUSED)
def test_fused_attention_trains_with_dropout_everywhere_but_the_weights_like_xla(kernel):
    """With attention_dropout=0 the fused paths keep model.dropout on the embeddings, residuals
    and position table, drawing the very masks the XLA path draws."""
    overrides = dict(dropout=0.3, attention_dropout=0.0)
    reference, variables, memory = build(tiny_model_config(**overrides), batch_size=2)
    fused = ctx.CompressiveTransformer(tiny_model_config(attention_impl=kernel, **overrides))
    tokens = jnp.asarray(random_tokens(reference.config, 2, 1))
    grads_x, logits_x = _training_step(reference, variables, memory, tokens, seed=5)
    grads_f, logits_f = _training_step(fused, variables, memory, tokens, seed=5)
    evaluation, _, _ = reference.apply(variables, tokens, memory)
    assert np.abs(np.asarray(logits_x - evaluation)).max() > 1e-2  # dropout did drop
    np.testing.assert_allclose(logits_f, logits_x, rtol=1e-5, atol=1e-5)
    for (path, g_f), g_x in zip(
        jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads_x)
    ):
        np.testing.assert_allclose(
            g_f, g_x, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize(
    "dropout, attention_dropout, drops",
    [
        (0.0, 0.5, True),  # only the attention weights: the XLA path drops them
        (0.0, None, False),  # follows dropout: nothing is dropped anywhere
        (0.0, 0.0, False),
    ],
)
def test_attention_dropout_has_a_rate_of_its_own(dropout, attention_dropout, drops):
    cfg = tiny_model_config(dropout=dropout, attention_dropout=attention_dropout)
    model, variables, memory = build(cfg, batch_size=2)
    tokens = jnp.asarray(random_tokens(model.config, 2, 1))
    _, training = _training_step(model, variables, memory, tokens, seed=3)
    evaluation, _, _ = model.apply(variables, tokens, memory)
    assert (np.abs(np.asarray(training - evaluation)).max() > 1e-3) == drops
    assert ModelConfig(dropout=0.2).attention_dropout_rate == 0.2
    assert ModelConfig(dropout=0.2, attention_dropout=0.0).attention_dropout_rate == 0.0


@pytest.mark.parametrize("kernel", PALLAS)
def test_the_pallas_kernels_drop_attention_weights_in_training_with_the_models_dropout_rng(kernel):
    """attention_dropout > 0 with a Pallas kernel: training-mode logits differ from
    evaluation's, the same dropout rng gives the same step, another rng another one, gradients
    are finite (the mask against naive attention: tests/test_fused_attention.py), and both
    kernels give the same training step."""
    cfg = tiny_model_config(attention_impl=kernel, dropout=0.0, attention_dropout=0.5)
    model, variables, memory = build(cfg, batch_size=2)
    tokens = jnp.asarray(random_tokens(model.config, 2, 1))
    grads, logits = _training_step(model, variables, memory, tokens, seed=3)
    again = _training_step(model, variables, memory, tokens, seed=3)[1]
    other = _training_step(model, variables, memory, tokens, seed=4)[1]
    evaluation, _, _ = model.apply(variables, tokens, memory)
    assert np.abs(np.asarray(logits - evaluation)).max() > 1e-2
    np.testing.assert_array_equal(logits, again)
    assert np.abs(np.asarray(logits - other)).max() > 1e-2
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    tpu = ctx.CompressiveTransformer(dataclasses.replace(cfg, attention_impl="pallas_tpu"))
    tpu_grads, tpu_logits = _training_step(tpu, variables, memory, tokens, seed=3)
    np.testing.assert_allclose(logits, tpu_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(tpu_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_config_cannot_exist_invalid_however_it_is_made():
    """ModelConfig validates itself: a hand-made one, a replaced one and a converted section are
    all refused with the field and the fix (cudnn has no attention dropout to give)."""
    message = (
        r"model.attention_impl='cudnn' has no attention dropout, and model.attention_dropout is 0.1"
    )
    with pytest.raises(ConfigError, match=message):
        ModelConfig(attention_impl="cudnn", dropout=0.1)
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(ModelConfig(attention_impl="cudnn"), dropout=0.1)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_config(ctx.model_config(attention_impl="cudnn", dropout=0.1))
    with pytest.raises(
        ConfigError, match=r"model.d_model \(30\) must be divisible by model.n_heads \(4\)"
    ):
        ModelConfig(d_model=30)
    assert (
        ModelConfig(
            attention_impl="cudnn", dropout=0.1, attention_dropout=0.0
        ).attention_dropout_rate
        == 0.0
    )
    assert ModelConfig(dilation_rates=[1, 2]).dilation_rates == (1, 2)  # hashable, as Flax needs


def test_auto_picks_the_pallas_kernel_only_on_tpu_generations_that_run_it():
    def resolved(kind, impl="auto"):
        return resolve_attention(ModelConfig(attention_impl=impl), "tpu", kind).attention_impl

    assert [
        resolved(kind) for kind in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU7x")
    ] == ["xla", "pallas_tpu", "pallas_tpu", "pallas_tpu", "pallas_tpu"]
    with pytest.raises(ConfigError, match=r"pallas_tpu' needs TPU v5 or later .* on TPU v4\); use"):
        resolved("TPU v4", "pallas_tpu")
    assert (
        resolve_attention(ModelConfig(attention_impl="pallas_tpu"), "cpu", "cpu").attention_impl
        == "pallas_tpu"
    )


@pytest.mark.parametrize(
    "kernel, forward_name, backward_name",
    [
        ("pallas_tpu", "relative_attention_forward", "relative_attention_backward"),
        ("pallas_gpu", "relative_attention_forward_gpu", "relative_attention_query_gradient_gpu"),
    ],
)
def test_remat_dots_keeps_the_pallas_kernels_outputs_instead_of_running_its_forward_twice(
    kernel, forward_name, backward_name
):
    """Under model.remat='dots' (the paper configs) a training gradient holds one forward and one
    backward kernel per layer, as without remat; 'full' recomputes the forward. The same holds for
    the attention-reconstruction loss's kernels, which layers with the TPU kernel use. Same gradients."""
    names = (
        forward_name,
        backward_name,
        "reconstruction_reads_forward",
        "reconstruction_reads_backward",
    )

    def kernels_and_gradients(remat):
        model, variables, memory = build(tiny_model_config(attention_impl=kernel, remat=remat))
        tokens = jnp.asarray(random_tokens(model.config, 2, 1))

        def loss(params):
            logits, _, aux = model.apply({"params": params}, tokens, memory)
            return logits.sum() + aux.compression_loss

        text = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
        counts = tuple(text.count(f"name={name}\n") for name in names)
        # The kernel's head-major q, k and v (named once in the layer scan's body), which 'dots'
        # keeps rather than building them again for the backward.
        return counts + (text.count(f"name={KERNEL_INPUTS}]"),), jax.grad(loss)(variables["params"])

    (plain, grads), (dots, remat_grads), (full, _) = (
        kernels_and_gradients(r) for r in ("none", "dots", "full")
    )
    fused_loss = kernel == "pallas_tpu"
    assert plain == dots == (2, 2) + (2 * fused_loss,) * 2 + (3,)  # two layers
    assert full == (4, 2) + (4 * fused_loss, 2 * fused_loss) + (6,)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
