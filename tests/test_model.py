"""The model end to end: reference numerics, causality, memory contents, range, isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctx
from ctx.config import UNROLL_LAYERS_UP_TO, ModelConfig
from ctx.diagnostics import dependence_by_distance, derived_temporal_range, measured_temporal_range
from ctx.nn import losses
from tests import reference
from tests.helpers import build, random_tokens, run_segments, tiny_model_config


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # CT: conv + attention loss, pre-LN
        dict(compressed_length=0, memory_length=8),  # Transformer-XL
        dict(compressed_length=0, memory_length=0),  # vanilla transformer
        dict(layer_norm="post", compression="mean", compression_loss="none", memory_length=6),
        dict(compression="max", compression_loss="attention", compressed_length=6),
    ],
)
def test_model_matches_brute_force_over_segments(overrides):
    cfg = tiny_model_config(**overrides)
    model, variables, memory = build(cfg, batch_size=2)
    mcfg = model.config
    tokens = random_tokens(mcfg, 2, 4)
    n_s = mcfg.segment_length
    apply = jax.jit(model.apply)
    for s in range(4):
        segment = tokens[:, s * n_s : (s + 1) * n_s]
        ref_logits, ref_mem, ref_cmem, ref_loss = reference.forward(
            variables["params"], segment, memory, mcfg
        )
        logits, memory, aux = apply(variables, jnp.asarray(segment), memory)
        np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(np.asarray(memory.mem), ref_mem, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(memory.cmem), ref_cmem, rtol=1e-4, atol=1e-5)
        # The attention-reconstruction loss reuses the attention's keys of the evicted rows.
        if mcfg.compresses and mcfg.compression_loss == "attention":
            np.testing.assert_allclose(
                np.asarray(aux.compression_loss_per_layer), ref_loss, rtol=1e-4, atol=1e-9
            )
            assert (
                s < 2 or ref_loss.min() > 0
            )  # real memories are evicted from the third segment on


def expected_memory(emb_BTD, n_m, n_cm, c):
    """mem = the last n_m entries; cmem = newest n_cm pair means of the evicted stream."""
    B, T, d = emb_BTD.shape
    evicted = np.concatenate([np.zeros((B, n_m, d)), emb_BTD[:, : T - n_m]], axis=1)
    return emb_BTD[:, -n_m:], evicted.reshape(B, -1, c, d).mean(2)[:, -n_cm:]


def test_memory_holds_expected_slots_in_order():
    """Post-LN layer 0 stores the raw embeddings, and mean pooling is hand-computable: after
    k segments mem holds the last n_m embeddings and cmem the newest n_cm means of c
    consecutive evicted entries (the evicted stream starts with n_m empty slots)."""
    n_s, n_m, n_cm, c, k = 4, 6, 4, 2, 5
    cfg = tiny_model_config(
        layer_norm="post",
        compression="mean",
        compression_loss="none",
        segment_length=n_s,
        memory_length=n_m,
        compressed_length=n_cm,
        compression_rate=c,
    )
    model, variables, memory = build(cfg, batch_size=2)
    tokens = random_tokens(model.config, 2, k + 1)
    embedding = np.asarray(variables["params"]["embed"]["embedding"])
    _, memory = run_segments(model, variables, memory, tokens[:, : k * n_s])
    mem, cmem = expected_memory(embedding[tokens[:, : k * n_s]], n_m, n_cm, c)
    np.testing.assert_allclose(np.asarray(memory.mem[0]), mem, atol=1e-6)
    np.testing.assert_allclose(np.asarray(memory.cmem[0]), cmem, atol=1e-6)
    assert np.asarray(memory.mem_mask).all() and np.asarray(memory.cmem_mask).all()

    # After two segments only 2 real entries have been evicted: one valid compressed slot.
    _, early = run_segments(model, variables, ctx.init_memory(cfg, 2), tokens[:, : 2 * n_s])
    np.testing.assert_array_equal(np.asarray(early.cmem_mask[0]), [False, False, False, True])
    np.testing.assert_array_equal(np.asarray(early.mem_mask[0]), [True] * n_m)

    # A reset clears only its row: row 0 starts afresh, row 1 carries on.
    _, after, _ = jax.jit(model.apply)(
        variables, jnp.asarray(tokens[:, k * n_s :]), memory, reset=jnp.array([True, False])
    )
    np.testing.assert_array_equal(
        np.asarray(after.mem_mask[0]), [False, False, True, True, True, True]
    )
    np.testing.assert_array_equal(np.asarray(after.cmem_mask[0]), [False] * n_cm)
    np.testing.assert_allclose(
        np.asarray(after.mem[0, 0, 2:]), embedding[tokens[0, k * n_s :]], atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(after.mem[0, 0, :2]), 0.0)
    assert np.asarray(after.mem_mask[1]).all() and np.asarray(after.cmem_mask[1]).all()
    mem1, cmem1 = expected_memory(embedding[tokens[1:]], n_m, n_cm, c)
    np.testing.assert_allclose(np.asarray(after.mem[0, 1]), mem1[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(after.cmem[0, 1]), cmem1[0], atol=1e-6)


def test_causality_within_and_across_segments():
    cfg = tiny_model_config()
    model, variables, memory = build(cfg, batch_size=1)
    tokens = random_tokens(model.config, 1, 4)
    base, _ = run_segments(model, variables, memory, tokens)
    n_s = model.config.segment_length
    for t in (1, n_s + 2, 2 * n_s):  # inside segment 0, inside segment 1, at a segment start
        perturbed = tokens.copy()
        perturbed[0, t] = (perturbed[0, t] + 1) % cfg.vocab_size
        logits, _ = run_segments(model, variables, memory, perturbed)
        diff = np.abs(np.asarray(logits - base)).max(-1)[0]
        assert diff[:t].max(initial=0.0) == 0.0, f"token {t} changed earlier logits"
        assert diff[t] > 1e-4  # its own prediction changes
        assert diff[-1] > 1e-6, f"token {t} did not reach the last segment through memory"


def test_reset_row_equals_a_fresh_start():
    cfg = tiny_model_config()
    model, variables, memory = build(cfg, batch_size=2)
    tokens = random_tokens(model.config, 2, 4)
    _, memory = run_segments(model, variables, memory, tokens[:, :12])
    segment = jnp.asarray(tokens[:, 12:])
    apply = jax.jit(model.apply)
    logits, _, _ = apply(variables, segment, memory, reset=jnp.array([True, False]))
    fresh, _, _ = apply(variables, segment, ctx.init_memory(cfg, 2))
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(fresh[0]), atol=1e-6)
    assert np.abs(np.asarray(logits[1] - fresh[1])).max() > 1e-4  # row 1 still uses its memory


@pytest.mark.parametrize("n_m, n_cm", [(4, 4), (8, 0), (6, 0), (2, 2)])
def test_temporal_range_matches_derived_bound(n_m, n_cm):
    """Derivation. Let R = n_m + c*n_cm. A query at position p of the segment starting at
    S = n_s*floor(p/n_s) sees, in its layer: the segment up to p, the n_m memories
    [S-n_m, S), and n_cm compressed slots. The evicted stream (n_m empty slots, then the
    positions in order) has lost n_s entries per segment, so cmem holds the newest n_cm*c
    evicted entries: positions [S-R, S-n_m); a conv slot depends on all c of its entries.
    So one layer reaches back to f(p) = S - R, and because f is non-decreasing, the oldest
    token reaching position p through l layers is f^l(p). For the last position of a
    segment, p = S + n_s - 1, and R a multiple of n_s, f^l(p) = S - l*R: the range is
    n_s - 1 + l*(n_m + c*n_cm), against n_s - 1 + l*n_m for Transformer-XL.
    """
    n_s, c, layers = 4, 2, 2
    cfg = tiny_model_config(
        n_layers=layers,
        segment_length=n_s,
        memory_length=n_m,
        compressed_length=n_cm,
        compression_rate=c,
    )
    R = n_m + c * n_cm
    # R not a multiple of n_s: layer 1 reaches S - R, which lies in the segment starting at
    # S - n_s*ceil(R/n_s), so layer 2 reaches back from that segment's start.
    bound = n_s - 1 + layers * R if R % n_s == 0 else n_s - 1 + R + n_s * -(-R // n_s)
    assert derived_temporal_range(cfg) == bound
    depends = dependence_by_distance(cfg)
    assert depends[: bound + 1].all(), "every token within the range must matter"
    assert not depends[bound + 1 :].any()
    assert measured_temporal_range(cfg) == bound


def _split_compress(grads):
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]

    def is_compress(path):
        return any(getattr(k, "key", None) == "compress" for k in path)

    compress = [np.abs(np.asarray(g)).max() for p, g in flat if is_compress(p)]
    other = [np.abs(np.asarray(g)).max() for p, g in flat if not is_compress(p)]
    return compress, other


@pytest.mark.parametrize("compression", ["conv", "dilated_conv"])
@pytest.mark.parametrize("compression_loss", ["attention", "autoencoder"])
def test_gradient_isolation(compression, compression_loss):
    cfg = tiny_model_config(
        compression=compression, compression_loss=compression_loss, dilation_rates=(1, 2)
    )
    model, variables, memory = build(cfg, batch_size=2)
    tokens = random_tokens(model.config, 2, 2)
    n_s = model.config.segment_length
    _, memory, _ = jax.jit(model.apply)(
        variables, jnp.asarray(tokens[:, :n_s]), memory
    )  # fill memory
    segment = jnp.asarray(tokens[:, n_s:])

    def lm_loss(params):
        logits, _, _ = model.apply({"params": params}, segment, memory)
        return losses.weighted_mean_nll(
            logits[:, :-1], segment[:, 1:], jnp.ones_like(segment[:, 1:])
        )

    def compression_loss_fn(params):
        return model.apply({"params": params}, segment, memory)[2].compression_loss

    both = jax.jit(lambda p: (jax.grad(lm_loss)(p), jax.grad(compression_loss_fn)(p)))
    lm_grads, compression_grads = both(variables["params"])
    compress, other = _split_compress(lm_grads)
    assert compress and all(g == 0.0 for g in compress)
    assert max(other) > 0.0
    compress, other = _split_compress(compression_grads)
    assert all(g == 0.0 for g in other)
    assert all(g > 0.0 for g in compress), "every compression parameter must be trained"


def test_bfloat16_forward_agrees_with_float32():
    """bf16 compute (fp32 params) stays within 0.15 of fp32 logits of scale ~1."""
    cfg32 = tiny_model_config(d_model=32, n_heads=4)
    model32, variables, memory = build(cfg32, batch_size=2)
    cfg16 = tiny_model_config(d_model=32, n_heads=4, dtype="bfloat16")
    model16 = ctx.CompressiveTransformer(cfg16)
    shapes = jax.eval_shape(
        model16.init, jax.random.key(0), jnp.zeros((2, 4), jnp.int32), ctx.init_memory(cfg16, 2)
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    tokens = random_tokens(model32.config, 2, 3)
    logits32, mem32 = run_segments(model32, variables, memory, tokens)
    logits16, mem16 = run_segments(model16, variables, ctx.init_memory(cfg16, 2), tokens)
    assert mem16.mem.dtype == jnp.bfloat16
    scale = np.abs(np.asarray(logits32)).max()
    err = np.abs(np.asarray(logits16, np.float32) - np.asarray(logits32)).max()
    assert err < 0.15 * max(scale, 1.0), (err, scale)
    # And the prediction is the same almost everywhere.
    agree = (np.asarray(logits16).argmax(-1) == np.asarray(logits32).argmax(-1)).mean()
    assert agree > 0.9


@pytest.mark.parametrize("compression", ["most_used", "max"])
def test_parameter_free_compressions_have_no_parameters(compression):
    cfg = tiny_model_config(compression=compression, compression_loss="none")
    _, variables, _ = build(cfg)
    assert "compress" not in variables["params"]["layers"]


def test_most_used_keeps_the_most_attended_entries_in_time_order():
    from ctx.nn.compression import Compressor

    cfg = ModelConfig.from_config(
        tiny_model_config(
            compression="most_used", compression_loss="none", segment_length=6, compression_rate=3
        )
    )
    evicted = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1) * jnp.ones((1, 6, 16))
    usage = jnp.array([[0.1, 0.5, 0.0, 0.05, 0.3, 0.05]])
    out = Compressor(cfg).apply({}, evicted, usage)
    np.testing.assert_array_equal(
        np.asarray(out[0, :, 0]), [1.0, 4.0]
    )  # top-2 by usage, in time order


@pytest.mark.parametrize(
    "variant",
    [
        dict(remat="full"),
        dict(remat="dots"),
        dict(remat="dots", scan_unroll=1),
        dict(scan_unroll=0),
        dict(scan_unroll=5),
    ],
)
def test_remat_and_unrolled_layers_give_the_same_gradients(variant):
    """Rematerialisation and unrolling the layer scan change the schedule, not the maths
    (and keep the parameter tree, so checkpoints move between them)."""
    cfg = tiny_model_config(scan_unroll=1)
    model, variables, memory = build(cfg)
    remat_model = ctx.CompressiveTransformer(tiny_model_config(**variant))
    tokens = jnp.asarray(random_tokens(model.config, 2, 1))

    def loss(m, params):
        logits, _, aux = m.apply({"params": params}, tokens, memory)
        return logits.mean() + aux.compression_loss

    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(variables["params"])
    g2 = jax.jit(jax.grad(lambda p: loss(remat_model, p)))(variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_shallow_layer_stacks_unroll_and_deep_ones_scan():
    """scan_unroll=0 (auto, the default) leaves no loop over layers in a stack of up to
    UNROLL_LAYERS_UP_TO layers and scans a deeper one a layer per iteration."""

    def loops_over_layers(**overrides):
        model, variables, memory = build(tiny_model_config(**overrides))
        tokens = jnp.zeros((2, model.config.segment_length), jnp.int32)
        return (
            jax.jit(lambda v: model.apply(v, tokens, memory)[0])
            .lower(variables)
            .as_text()
            .count("stablehlo.while")
        )

    assert loops_over_layers(n_layers=UNROLL_LAYERS_UP_TO) == 0
    assert loops_over_layers(n_layers=UNROLL_LAYERS_UP_TO + 1) == 1
    assert loops_over_layers(n_layers=2, scan_unroll=1) == 1

    def per_iteration(**overrides):
        return tiny_model_config(**overrides).layers_per_scan_iteration

    assert per_iteration(n_layers=3) == 3 and per_iteration(n_layers=36) == 1
    assert per_iteration(n_layers=36, scan_unroll=3) == 3


def test_dropout_is_random_in_training_and_off_in_evaluation():
    cfg = tiny_model_config(dropout=0.3)
    model, variables, memory = build(cfg)
    tokens = jnp.asarray(random_tokens(model.config, 2, 1))
    train = jax.jit(
        lambda key: model.apply(
            variables, tokens, memory, deterministic=False, rngs={"dropout": key}
        )[0]
    )
    a, b = train(jax.random.key(1)), train(jax.random.key(2))
    evaluate = jax.jit(lambda: model.apply(variables, tokens, memory)[0])
    c, d = evaluate(), evaluate()
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_wrong_token_shape_is_a_clear_error():
    cfg = tiny_model_config()
    model, variables, memory = build(cfg)
    with pytest.raises(ValueError, match=r"tokens must be int \[batch, segment_length=4\]"):
        model.apply(variables, jnp.zeros((2, 5), jnp.int32), memory)


def test_compression_convolutions_match_lax_conv():
    """The GEMM forms of the strided and causal dilated convolutions equal XLA's conv."""
    from ctx.nn.compression import causal_dilated_conv, strided_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    dims = ("NWC", "WIO", "NWC")
    expected = jax.lax.conv_general_dilated(x, kernel, (3,), "VALID", dimension_numbers=dims)
    np.testing.assert_allclose(strided_conv(x, kernel), expected, rtol=1e-5, atol=1e-5)
    kernel2 = jnp.asarray(rng.normal(size=(2, 5, 5)), jnp.float32)
    expected = jax.lax.conv_general_dilated(
        x, kernel2, (1,), ((2, 0),), rhs_dilation=(2,), dimension_numbers=dims
    )
    np.testing.assert_allclose(causal_dilated_conv(x, kernel2, 2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(compressed_length=0, memory_length=8)])
def test_carried_keys_values_stay_the_projection_of_the_memory(overrides):
    """Memory's optional keys/values are always what projecting its memories gives: after a
    segment that advanced them, after a reset and after row selection (evaluation's batch
    shrinking), all handled by the Memory functions in one place."""
    cfg = tiny_model_config(**overrides)
    model, variables, memory = build(cfg, batch_size=3)
    tokens = random_tokens(model.config, 3, 3)
    n_s = model.config.segment_length

    def project(m):
        return model.apply(variables, m.without_keys_values(), method=model.with_memory_keys_values)

    def assert_projected(m):
        again = project(m)
        np.testing.assert_allclose(np.asarray(m.keys), np.asarray(again.keys), atol=1e-5)
        np.testing.assert_allclose(np.asarray(m.values), np.asarray(again.values), atol=1e-5)

    for s in range(2):
        _, memory, _ = model.apply(
            variables, jnp.asarray(tokens[:, s * n_s : (s + 1) * n_s]), memory
        )
    carried = project(memory)
    assert carried.carries_keys_values and carried.keys.shape[2] == 3  # [L, H, B, S, K]
    _, advanced, _ = model.apply(
        variables,
        jnp.asarray(tokens[:, 2 * n_s :]),
        carried,
        reset=jnp.asarray([False, True, False]),
    )
    assert advanced.carries_keys_values
    assert_projected(advanced)
    cleared = ctx.nn.memory.reset_rows(carried, jnp.asarray([True, False, False]))
    assert_projected(cleared)
    assert not np.asarray(cleared.keys[:, :, 0]).any() and not np.asarray(cleared.mem_mask[0]).any()
    chosen = ctx.nn.memory.select_rows(carried, (2, 0))
    assert_projected(chosen)
    np.testing.assert_array_equal(np.asarray(chosen.keys), np.asarray(carried.keys)[:, :, [2, 0]])
    np.testing.assert_array_equal(np.asarray(chosen.mem_mask), np.asarray(carried.mem_mask)[[2, 0]])
