"""A fused attention checked on the device it will run on, at the config's own layout, against
the XLA reference (`ctx.nn.attention_reference`): the kernels cannot be tested on TPUs or GPUs
before a user's run, so the run tests them first.

    python -m ctx.selfcheck --config=experiments/pg19.py [--config.model.attention_impl=pallas_gpu]

prints one JSON line {"impl", "ok", "checks": {name: {"ok", "max_error", "tolerance"}}, ...}
and exits 0 when every check holds, 1 when one fails. The problem has the config's segment,
memory and compressed-memory lengths, head dimension, compute dtype and attention-dropout rate,
so the kernel runs with the very tiles, windows and shifts of training, with 2 heads and 2 rows:
row 0 with its oldest memory slots empty, row 1 with no valid memory at all. The first draw
makes the position term dominate the logits (a wrong skew, window or table moves the output
by O(1)), the second the content term. A dropout probe (uniform attention over one-hot values)
recovers, for every query, how many weights of each key class the kernel kept, which must equal
the reference's count exactly: one wrong keep-or-drop decision anywhere shows. Where the
attention-reconstruction loss runs as a kernel too (beside `pallas_tpu`), its reads' difference
and its gradients are checked against the XLA loss at the same layout. `ctx.train` and
`ctx.evaluate` (every entry point, through `ctx.backend.model_config_for_run`) run this at
start-up when the resolved attention is a fused one; a passing result is cached there per (jax,
libtpu or CUDA version, device kind, implementation, layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ctx.cli import FLAGS, define_config_flags, run_main
from ctx.config import FUSED_ATTENTION_IMPLS, ModelConfig
from ctx.errors import UserError
from ctx.nn.attention import cudnn_attention
from ctx.nn.attention_policy import resolve_attention
from ctx.nn.attention_reference import draw_operands, range_masses, reference_attention, visibility
from ctx.nn import losses, pallas_gpu, pallas_tpu
from ctx.nn.fused_attention import AttentionOperands, flash_attention
from ctx.nn.pallas_reconstruction import reconstruction_difference, reconstruction_loss

HEADS, ROWS = 2, 2
# Largest error relative to the reference's largest magnitude, by compute dtype (the kernels
# multiply in the compute dtype and accumulate in float32; the reference runs at full precision).
OUTPUT_TOLERANCE = {"float32": 5e-3, "bfloat16": 3e-2}
GRADIENT_TOLERANCE = {"float32": 1e-2, "bfloat16": 6e-2}
MASS_TOLERANCE = 1e-2  # absolute, on shares of attention in [0, 1]
# The probe recovers whole counts of kept weights: a quarter of one weight is far above rounding
# and far below one wrong decision.
PROBE_TOLERANCE = 0.25
PROBE_SEEDS = (12345, 12346)
# The draws' seeds: one per output check (the gradients and dropout reuse the first), the
# gradients' weights, the reconstruction loss's operands.
DRAW_SEEDS = {"output_position_dominant": 1, "output_content_dominant": 2}
GRADIENT_WEIGHTS_SEED, RECONSTRUCTION_SEED = 3, 4
# ctx's own kernels, which drop attention weights inside the tile.
PALLAS_KERNELS = {"pallas_tpu": pallas_tpu.KERNELS, "pallas_gpu": pallas_gpu.KERNELS}


class SelfCheckFailed(UserError):
    """A fused attention disagreed with the reference on this device: the run would train wrong."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """The config's attention layout, with HEADS heads and ROWS rows."""

    impl: str
    n_queries: int
    n_mem: int
    n_cmem: int
    head_dim: int
    dtype: str
    dropout: float
    usage: bool  # 'most_used': the attention each evicted memory receives
    compressed: int = 0  # slots per segment, where the reconstruction loss's reads run as a kernel

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Problem":
        return cls(
            cfg.attention_impl,
            cfg.segment_length,
            cfg.memory_length,
            cfg.compressed_length,
            cfg.head_dim,
            cfg.dtype,
            cfg.attention_dropout_rate if cfg.attention_impl in PALLAS_KERNELS else 0.0,
            cfg.compresses and cfg.compression == "most_used",
            cfg.slots_per_segment if cfg.fused_reconstruction_loss else 0,
        )

    @property
    def n_keys(self) -> int:
        return self.n_cmem + self.n_mem + self.n_queries

    @property
    def table_rows(self) -> int:
        return (self.n_cmem + self.n_queries if self.n_cmem else 0) + self.n_mem + self.n_queries

    @property
    def usage_keys(self) -> tuple[int, int] | None:
        return (self.n_cmem, self.n_cmem + self.n_queries) if self.usage else None


def _draw(p: Problem, seed: int, position_dominant: bool) -> AttentionOperands:
    return draw_operands(
        p.n_cmem,
        p.n_mem,
        p.n_queries,
        p.head_dim,
        p.dtype,
        seed,
        position_dominant=position_dominant,
        heads=HEADS,
        rows=ROWS,
    )


def fused_attention(
    p: Problem,
) -> Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None]]:
    """The implementation under check at the kernels' calling convention: (output [H,B,N,K],
    range masses [H,B,N,3] or None, usage [H,B,keys] or None)."""
    if p.impl in PALLAS_KERNELS:

        def pallas(q, u, k, v, vb, r, visible, dropout=0.0, seed=None):
            return flash_attention(
                PALLAS_KERNELS[p.impl],
                AttentionOperands(q, u, k, v, vb, r, visible),
                n_cmem=p.n_cmem,
                n_mem=p.n_mem,
                usage_keys=p.usage_keys,
                dropout=dropout,
                dropout_seed=seed,
            )

        return pallas
    if p.impl == "cudnn":

        def cudnn(q, u, k, v, vb, r, visible, dropout=0.0, seed=None):
            mask = visibility(visible, p.n_queries, p.n_cmem, p.n_mem)[:, None]
            read_BNHK = cudnn_attention(q, u, k, v, vb, r, mask, p.n_cmem)
            return jnp.transpose(read_BNHK, (2, 0, 1, 3)), None, None

        return cudnn
    raise ValueError(f"no fused attention named {p.impl!r}")


def _reference(p: Problem):
    """The reference at full float32 precision, compiled as programs of its own (they cannot
    share a miscompile with the kernel): output, undropped probabilities."""

    def run(q, u, k, v, vb, r, visible, dropout=0.0, seed=None):
        with jax.default_matmul_precision("highest"):
            args = [x.astype(jnp.float32) for x in (q, u, k, v, vb, r)]
            return reference_attention(
                *args, visible, n_cmem=p.n_cmem, n_mem=p.n_mem, dropout=dropout, seed=seed
            )

    return run


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def _check(error: float, tolerance: float) -> dict[str, Any]:
    return {
        "ok": bool(np.isfinite(error) and error <= tolerance),
        "max_error": float(error),
        "tolerance": float(tolerance),
    }


def run_self_check(cfg: ModelConfig) -> dict[str, Any]:
    """Every check of the config's (resolved) fused attention on this process's default device.
    A kernel that does not compile or run here fails the check 'compiles_and_runs' (with the
    error's first line) rather than crashing the run that asked, so 'auto' can fall back."""
    p = Problem.of(cfg)
    start = time.perf_counter()
    try:
        checks = _run_checks(p)
    except Exception as error:  # noqa: BLE001 - any failure of the kernel here is the verdict
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        checks = {
            "compiles_and_runs": {
                "ok": False,
                "max_error": float("inf"),
                "tolerance": 0.0,
                "error": f"{type(error).__name__}: {first_line}",
            }
        }
    return {
        "impl": p.impl,
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "layout": dataclasses.asdict(p),
        "device": device_kind(),
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 2),
    }


# What each check returns: its verdicts by name, and the arrays it computed (all must be finite).
Checked = tuple[dict[str, dict[str, Any]], list[jax.Array]]


@dataclasses.dataclass(frozen=True)
class _Subject:
    """The attention under check and its reference, each as the checks call it (jitted)."""

    p: Problem
    kernel: Callable
    reference: Callable

    @functools.cached_property
    def forward(self) -> Callable:
        return jax.jit(self.kernel, static_argnames="dropout")

    @functools.cached_property
    def reference_forward(self) -> Callable:
        return jax.jit(self.reference, static_argnames="dropout")


def _run_checks(p: Problem) -> dict[str, dict[str, Any]]:
    subject = _Subject(p, fused_attention(p), _reference(p))
    results = [output_checks(subject), gradient_checks(subject, 0.0)]
    if p.dropout:
        results += [gradient_checks(subject, p.dropout), dropout_checks(subject)]
    if p.compressed:
        results.append(reconstruction_checks(p))
    checks = {name: verdict for found, _ in results for name, verdict in found.items()}
    computed = [x for _, arrays in results for x in arrays]
    checks["finite"] = _check(
        float(sum(int(not np.isfinite(np.asarray(x, np.float32)).all()) for x in computed)), 0.0
    )
    return checks


def output_checks(subject: _Subject) -> Checked:
    """The output against the reference on a position-dominant draw (a wrong skew, window or
    table moves it by O(1)) and a content-dominant one; on the first also the range masses, the
    evicted keys' usage, and a second run equal to the first."""
    p, tolerance, checks, computed = subject.p, OUTPUT_TOLERANCE[subject.p.dtype], {}, []
    for name, position_dominant in (
        ("output_position_dominant", True),
        ("output_content_dominant", False),
    ):
        inputs = _draw(p, DRAW_SEEDS[name], position_dominant)
        out, mass, usage = subject.forward(*inputs)
        want, probs = subject.reference_forward(*inputs)
        checks[name] = _check(_relative_error(out, want), tolerance)
        computed.append(out)
        if position_dominant:
            if mass is not None:
                checks["attention_mass"] = _check(
                    float(jnp.abs(mass - range_masses(probs, p.n_cmem, p.n_mem)).max()),
                    MASS_TOLERANCE,
                )
            if usage is not None:
                received = probs[..., p.n_cmem : p.n_cmem + p.n_queries].sum(axis=2)
                checks["usage"] = _check(_relative_error(usage, received), tolerance)
            again, _, _ = subject.forward(*inputs)
            checks["two_runs_equal"] = _check(
                float(jnp.abs(again.astype(jnp.float32) - out.astype(jnp.float32)).max()), 0.0
            )
    return checks, computed


def gradient_checks(subject: _Subject, dropout: float) -> Checked:
    """The six gradients against the reference's, with the weights dropped at `dropout` by the
    probe's first seed (named with a '_dropout' suffix when dropping)."""
    inputs = _draw(subject.p, DRAW_SEEDS["output_position_dominant"], True)
    weights = jax.random.normal(jax.random.key(GRADIENT_WEIGHTS_SEED), inputs[0].shape, jnp.float32)
    seed, label = jnp.int32(PROBE_SEEDS[0]), "_dropout" if dropout else ""
    got = _gradients(lambda *a: subject.kernel(*a, dropout=dropout, seed=seed)[0], inputs, weights)
    want = _gradients(
        lambda *a: subject.reference(*a, dropout=dropout, seed=seed)[0], inputs, weights
    )
    checks = {
        f"gradient_{argument}{label}": _check(
            _relative_error(g, w), GRADIENT_TOLERANCE[subject.p.dtype]
        )
        for argument, g, w in zip(AttentionOperands._fields[:6], got, want)
    }
    return checks, list(got)


def dropout_checks(subject: _Subject) -> Checked:
    """With dropout: the output against the reference's with the same mask; dropping moves the
    output by well over the tolerance; and the probe's exact counts of kept weights."""
    p, tolerance = subject.p, OUTPUT_TOLERANCE[subject.p.dtype]
    inputs, seed = _draw(p, DRAW_SEEDS["output_position_dominant"], True), jnp.int32(PROBE_SEEDS[0])
    out, _, _ = subject.forward(*inputs, dropout=p.dropout, seed=seed)
    want, _ = subject.reference_forward(*inputs, dropout=p.dropout, seed=seed)
    undropped, _, _ = subject.forward(*inputs)
    checks = {
        "output_dropout": _check(_relative_error(out, want), tolerance),
        # The move must be at least 3 tolerances: the error is the tolerance as a share of it.
        "dropout_changes_output": _check(
            tolerance / max(_relative_error(out, undropped), 1e-12), 1 / 3
        ),
    }
    checks.update(_dropout_probe(p, subject.forward, subject.reference_forward))
    return checks, [out]


def reconstruction_checks(p: Problem) -> Checked:
    """The attention-reconstruction loss's kernel against the XLA loss at full float32
    precision: the two reads' difference, and the gradients of the compressed keys and values
    (the only ones it has)."""
    C, N, E, K = p.n_cmem, p.n_queries, p.compressed, p.head_dim
    shapes = [(HEADS, ROWS, N, K)] + [(HEADS, ROWS, p.n_keys, K)] * 2 + [(HEADS, ROWS, E, K)] * 2
    scales = [K**-0.25, K**-0.25, 1.0, K**-0.25, 1.0]  # unit-variance logits, unit values
    keys = jax.random.split(jax.random.key(RECONSTRUCTION_SEED), 5)
    q, k, v, kc, vc = (
        (scale * jax.random.normal(key, shape, jnp.float32)).astype(p.dtype)
        for key, shape, scale in zip(keys, shapes, scales)
    )

    def reference(kc, vc):
        with jax.default_matmul_precision("highest"):
            full = [x.astype(jnp.float32) for x in (q, k, v)]
            return losses.reconstruction_difference(
                *full, C, N, kc.astype(jnp.float32), vc.astype(jnp.float32)
            )

    def gradients(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(kc, vc)

    out = jax.jit(lambda kc, vc: reconstruction_difference(q, k, v, C, N, kc, vc))(kc, vc)
    checks = {
        "reconstruction_difference": _check(
            _relative_error(out, jax.jit(reference)(kc, vc)), OUTPUT_TOLERANCE[p.dtype]
        )
    }
    got = gradients(lambda kc, vc: reconstruction_loss(q, k, v, C, N, kc, vc))
    want = gradients(lambda kc, vc: losses.attention_reconstruction_loss(reference(kc, vc)))
    for name, g, w in zip(("k", "v"), got, want):
        checks[f"reconstruction_gradient_compressed_{name}"] = _check(
            _relative_error(g, w), GRADIENT_TOLERANCE[p.dtype]
        )
    return checks, [out, *got]


def _gradients(attention, inputs, weights) -> tuple[jax.Array, ...]:
    """The gradients of Σ weights·output with respect to q, u, k, v, the v biases and the tables."""
    *differentiable, visible = inputs

    def loss(*args):
        return jnp.sum(attention(*args, visible).astype(jnp.float32) * weights)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*differentiable)


def _dropout_probe(p: Problem, forward, reference_forward) -> dict[str, dict[str, Any]]:
    """Uniform attention (q, u, the tables and biases zero) over one-hot values v_j = e_(j mod K)
    in float32: output [i, c] · n_visible(i) · (1 - rate) is the number of weights query i kept
    among the keys j ≡ c (mod K). The counts must equal the reference's exactly, differ between
    seeds and between rows (a seed read as zero, or ignored, repeats the masks)."""
    f32 = dataclasses.replace(p, dtype="float32")
    zeros = [
        jnp.zeros(shape, jnp.float32)
        for shape in [
            (HEADS, ROWS, p.n_queries, p.head_dim),
            (HEADS, p.head_dim),
            (HEADS, ROWS, p.n_keys, p.head_dim),
        ]
    ]
    one_hot = jax.nn.one_hot(jnp.arange(p.n_keys) % p.head_dim, p.head_dim, dtype=jnp.float32)
    v = jnp.broadcast_to(one_hot, (HEADS, ROWS, p.n_keys, p.head_dim))
    vb = jnp.zeros((HEADS, 2 if p.n_cmem else 1, p.head_dim), jnp.float32)
    r = jnp.zeros((HEADS, f32.table_rows, p.head_dim), jnp.float32)
    visible = jnp.ones((ROWS, p.n_keys), bool)
    n_visible = (p.n_cmem + p.n_mem + 1 + np.arange(p.n_queries))[None, None, :, None]

    def counts(attention, seed):
        out = attention(
            zeros[0], zeros[1], zeros[2], v, vb, r, visible, dropout=p.dropout, seed=jnp.int32(seed)
        )[0]
        return np.asarray(out, np.float64) * n_visible * (1 - p.dropout)

    got = [counts(forward, s) for s in PROBE_SEEDS]
    want = [np.round(counts(reference_forward, s)) for s in PROBE_SEEDS]

    def same(a, b):
        return float(np.mean(np.round(a) == np.round(b)))

    # Two independent masks give equal counts in a minority of entries (the reference's share);
    # a repeated mask (a seed read as zero, or ignored) in all of them. The error is the share
    # of equal counts, allowed up to halfway between the two.
    allowed = (1 + max(same(want[0], want[1]), same(want[0][:, 0], want[0][:, 1]))) / 2
    return {
        "dropout_mask_probe": _check(
            max(float(np.abs(g - w).max()) for g, w in zip(got, want)), PROBE_TOLERANCE
        ),
        "dropout_seeds_differ": _check(same(got[0], got[1]), allowed),
        "dropout_rows_differ": _check(same(got[0][:, 0], got[0][:, 1]), allowed),
    }


def device_kind() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


def versions() -> dict[str, str]:
    versions = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}
    for package in ("libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    with contextlib.suppress(Exception):  # a backend that cannot say its runtime's version
        versions["runtime"] = jax.devices()[0].client.platform_version.strip().replace("\n", " ")
    return versions


def main() -> None:
    device = jax.devices()[0]
    cfg = resolve_attention(
        ModelConfig.from_config(FLAGS.config.model), device.platform, device.device_kind
    )
    if cfg.attention_impl not in FUSED_ATTENTION_IMPLS:
        result = {
            "impl": cfg.attention_impl,
            "ok": True,
            "checks": {},
            "device": device_kind(),
            "note": "the xla attention is the reference itself; nothing to check",
        }
    else:
        result = run_self_check(cfg)
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    define_config_flags()
    run_main(main)
