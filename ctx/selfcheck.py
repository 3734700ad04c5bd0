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
`ctx.evaluate` run this at start-up when the resolved attention is a fused one; a passing
result is cached per (jax, libtpu or CUDA version, device kind, implementation, layout).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ctx.backend import resolve_attention_here
from ctx.cli import FLAGS, define_config_flags, run_main
from ctx.config import FUSED_ATTENTION_IMPLS, ModelConfig
from ctx.distributed import any_process
from ctx.errors import UserError
from ctx.nn.attention import cudnn_attention
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
        return cls(cfg.attention_impl, cfg.segment_length, cfg.memory_length, cfg.compressed_length, cfg.head_dim,
                   cfg.dtype, cfg.attention_dropout_rate if cfg.attention_impl in PALLAS_KERNELS else 0.0,
                   cfg.compresses and cfg.compression == "most_used",
                   cfg.slots_per_segment if cfg.fused_reconstruction_loss else 0)

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
    return draw_operands(p.n_cmem, p.n_mem, p.n_queries, p.head_dim, p.dtype, seed, position_dominant, HEADS, ROWS)


def fused_attention(p: Problem) -> Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None]]:
    """The implementation under check at the kernels' calling convention: (output [H,B,N,K],
    range masses [H,B,N,3] or None, usage [H,B,keys] or None)."""
    if p.impl in PALLAS_KERNELS:
        def pallas(q, u, k, v, vb, r, visible, dropout=0.0, seed=None):
            return flash_attention(PALLAS_KERNELS[p.impl], AttentionOperands(q, u, k, v, vb, r, visible),
                                   n_cmem=p.n_cmem, n_mem=p.n_mem, usage_keys=p.usage_keys, dropout=dropout,
                                   dropout_seed=seed)
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
            return reference_attention(*args, visible, p.n_cmem, p.n_mem, dropout, seed)
    return run


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def _check(error: float, tolerance: float) -> dict[str, Any]:
    return {"ok": bool(np.isfinite(error) and error <= tolerance), "max_error": float(error),
            "tolerance": float(tolerance)}


def run_self_check(cfg: ModelConfig) -> dict[str, Any]:
    """Every check of the config's (resolved) fused attention on this process's default device.
    A kernel that does not compile or run here fails the check 'compiles_and_runs' (with the
    error's first line) rather than crashing the run that asked, so 'auto' can fall back."""
    p = Problem.of(cfg)
    start = time.perf_counter()
    checks: dict[str, dict[str, Any]] = {}
    try:
        _run_checks(p, checks)
    except Exception as error:  # noqa: BLE001 - any failure of the kernel here is the verdict
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        checks["compiles_and_runs"] = {"ok": False, "max_error": float("inf"), "tolerance": 0.0,
                                       "error": f"{type(error).__name__}: {first_line}"}
    return {"impl": p.impl, "ok": all(c["ok"] for c in checks.values()), "checks": checks,
            "layout": dataclasses.asdict(p), "device": _device_kind(), "versions": _versions(),
            "seconds": round(time.perf_counter() - start, 2)}


def _run_checks(p: Problem, checks: dict[str, dict[str, Any]]) -> None:
    kernel, reference = fused_attention(p), _reference(p)
    out_tol, grad_tol = OUTPUT_TOLERANCE[p.dtype], GRADIENT_TOLERANCE[p.dtype]
    seed = jnp.int32(PROBE_SEEDS[0])
    forward = jax.jit(kernel, static_argnames="dropout")
    reference_forward = jax.jit(reference, static_argnames="dropout")
    finite = []

    for name, position_dominant in (("output_position_dominant", True), ("output_content_dominant", False)):
        inputs = _draw(p, 1 if position_dominant else 2, position_dominant)
        out, mass, usage = forward(*inputs)
        want, probs = reference_forward(*inputs)
        checks[name] = _check(_relative_error(out, want), out_tol)
        finite.append(out)
        if position_dominant:
            if mass is not None:
                checks["attention_mass"] = _check(float(jnp.abs(mass - range_masses(probs, p.n_cmem, p.n_mem)).max()),
                                                  MASS_TOLERANCE)
            if usage is not None:
                received = probs[..., p.n_cmem:p.n_cmem + p.n_queries].sum(axis=2)
                checks["usage"] = _check(_relative_error(usage, received), out_tol)
            again, _, _ = forward(*inputs)
            checks["two_runs_equal"] = _check(float(jnp.abs(again.astype(jnp.float32) - out.astype(jnp.float32)).max()),
                                              0.0)

    inputs = _draw(p, 1, True)
    weights = jax.random.normal(jax.random.key(3), inputs[0].shape, jnp.float32)
    for label, dropout in (("", 0.0),) + ((("_dropout", p.dropout),) if p.dropout else ()):
        got = _gradients(lambda *a: kernel(*a, dropout=dropout, seed=seed)[0], inputs, weights)
        want = _gradients(lambda *a: reference(*a, dropout=dropout, seed=seed)[0], inputs, weights)
        for argument, g, w in zip(("q", "u", "k", "v", "v_biases", "tables"), got, want):
            checks[f"gradient_{argument}{label}"] = _check(_relative_error(g, w), grad_tol)
        finite.extend(got)
    if p.dropout:
        out, _, _ = forward(*inputs, dropout=p.dropout, seed=seed)
        want, _ = reference_forward(*inputs, dropout=p.dropout, seed=seed)
        checks["output_dropout"] = _check(_relative_error(out, want), out_tol)
        undropped, _, _ = forward(*inputs)
        # Dropping weights must move the output by well over the tolerance: the error is the
        # tolerance as a share of that move.
        checks["dropout_changes_output"] = _check(out_tol / max(_relative_error(out, undropped), 1e-12), 1 / 3)
        finite.append(out)
        checks.update(_dropout_probe(p, forward, reference_forward))
    if p.compressed:
        finite.extend(_reconstruction_checks(p, checks))
    checks["finite"] = _check(float(sum(int(not np.isfinite(np.asarray(x, np.float32)).all()) for x in finite)), 0.0)


def _reconstruction_checks(p: Problem, checks: dict[str, dict[str, Any]]) -> tuple[jax.Array, ...]:
    """The attention-reconstruction loss's kernel against the XLA loss at full float32
    precision: the two reads' difference, and the gradients of the compressed keys and values
    (the only ones it has). Returns what it computed, for the finiteness check."""
    C, N, E, K = p.n_cmem, p.n_queries, p.compressed, p.head_dim
    shapes = [(HEADS, ROWS, N, K)] + [(HEADS, ROWS, p.n_keys, K)] * 2 + [(HEADS, ROWS, E, K)] * 2
    scales = [K ** -0.25, K ** -0.25, 1.0, K ** -0.25, 1.0]  # unit-variance logits, unit values
    q, k, v, kc, vc = (scale * jax.random.normal(key, shape, jnp.float32)
                       for key, shape, scale in zip(jax.random.split(jax.random.key(4), 5), shapes, scales))
    q, k, v, kc, vc = (x.astype(p.dtype) for x in (q, k, v, kc, vc))

    def reference(kc, vc):
        with jax.default_matmul_precision("highest"):
            full = [x.astype(jnp.float32) for x in (q, k, v)]
            return losses.reconstruction_difference(*full, C, N, kc.astype(jnp.float32), vc.astype(jnp.float32))

    def gradients(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(kc, vc)

    out = jax.jit(lambda kc, vc: reconstruction_difference(q, k, v, C, N, kc, vc))(kc, vc)
    checks["reconstruction_difference"] = _check(_relative_error(out, jax.jit(reference)(kc, vc)),
                                                 OUTPUT_TOLERANCE[p.dtype])
    got = gradients(lambda kc, vc: reconstruction_loss(q, k, v, C, N, kc, vc))
    want = gradients(lambda kc, vc: losses.attention_reconstruction_loss(reference(kc, vc)))
    for name, g, w in zip(("k", "v"), got, want):
        checks[f"reconstruction_gradient_compressed_{name}"] = _check(_relative_error(g, w),
                                                                      GRADIENT_TOLERANCE[p.dtype])
    return (out, *got)


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
    zeros = [jnp.zeros(shape, jnp.float32) for shape in
             [(HEADS, ROWS, p.n_queries, p.head_dim), (HEADS, p.head_dim), (HEADS, ROWS, p.n_keys, p.head_dim)]]
    one_hot = jax.nn.one_hot(jnp.arange(p.n_keys) % p.head_dim, p.head_dim, dtype=jnp.float32)
    v = jnp.broadcast_to(one_hot, (HEADS, ROWS, p.n_keys, p.head_dim))
    vb = jnp.zeros((HEADS, 2 if p.n_cmem else 1, p.head_dim), jnp.float32)
    r = jnp.zeros((HEADS, f32.table_rows, p.head_dim), jnp.float32)
    visible = jnp.ones((ROWS, p.n_keys), bool)
    n_visible = (p.n_cmem + p.n_mem + 1 + np.arange(p.n_queries))[None, None, :, None]

    def counts(attention, seed):
        out = attention(zeros[0], zeros[1], zeros[2], v, vb, r, visible, dropout=p.dropout, seed=jnp.int32(seed))[0]
        return np.asarray(out, np.float64) * n_visible * (1 - p.dropout)

    got = [counts(forward, s) for s in PROBE_SEEDS]
    want = [np.round(counts(reference_forward, s)) for s in PROBE_SEEDS]
    same = lambda a, b: float(np.mean(np.round(a) == np.round(b)))  # noqa: E731
    # Two independent masks give equal counts in a minority of entries (the reference's share);
    # a repeated mask (a seed read as zero, or ignored) in all of them. The error is the share
    # of equal counts, allowed up to halfway between the two.
    allowed = (1 + max(same(want[0], want[1]), same(want[0][:, 0], want[0][:, 1]))) / 2
    return {"dropout_mask_probe": _check(max(float(np.abs(g - w).max()) for g, w in zip(got, want)), PROBE_TOLERANCE),
            "dropout_seeds_differ": _check(same(got[0], got[1]), allowed),
            "dropout_rows_differ": _check(same(got[0][:, 0], got[0][:, 1]), allowed)}


def _device_kind() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


def _versions() -> dict[str, str]:
    versions = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}
    for package in ("libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    with contextlib.suppress(Exception):  # a backend that cannot say its runtime's version
        versions["runtime"] = jax.devices()[0].client.platform_version.strip().replace("\n", " ")
    return versions


def cache_path(cfg: ModelConfig) -> str:
    """Where a passing result for this layout, device and software is kept."""
    key = json.dumps({"problem": dataclasses.asdict(Problem.of(cfg)), "device": _device_kind(),
                      "versions": _versions()}, sort_keys=True)
    folder = os.path.join(os.environ.get("CTX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ctx"),
                          "selfcheck")
    return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def cached_self_check(cfg: ModelConfig) -> dict[str, Any]:
    """The self-check's result, from the cache when this exact check passed before here."""
    path = cache_path(cfg)
    try:
        with open(path) as f:
            return {**json.load(f), "cached": True}
    except (OSError, ValueError):
        pass
    result = run_self_check(cfg)
    if result["ok"]:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + f".{os.getpid()}", "w") as f:
                json.dump(result, f)
            os.replace(path + f".{os.getpid()}", path)
        except OSError:
            pass  # an unwritable cache only costs the next run the check again
    return {**result, "cached": False}


def checked_attention(cfg: ModelConfig, requested: str, command: str) -> ModelConfig:
    """`cfg` (attention resolved) after its fused attention passed the self-check on every
    process. A failure refuses the run when the config named the implementation, and falls back
    to 'xla' (same parameters and checkpoints) with a warning under 'auto'."""
    if cfg.attention_impl not in FUSED_ATTENTION_IMPLS:
        return cfg
    result = cached_self_check(cfg)
    failed = [f"{name}: {c['error']}" if "error" in c else f"{name}: error {c['max_error']:.3g} > {c['tolerance']:.3g}"
              for name, c in result["checks"].items() if not c["ok"]]
    anywhere = any_process(bool(failed))
    where = f"{result['device']} (jax {result['versions']['jax']})"
    is_main = jax.process_index() == 0
    if not anywhere:
        if is_main:
            print(f"{command}: attention self-check passed: {cfg.attention_impl} on {where}, "
                  f"{len(result['checks'])} checks{' (cached)' if result['cached'] else ''}", flush=True)
        return cfg
    reason = "; ".join(failed[:3]) if failed else "it failed on another process"
    if requested == "auto":
        if is_main:
            print(f"warning: the {cfg.attention_impl} attention failed its self-check on {where} ({reason}); "
                  "model.attention_impl=auto falls back to xla", file=sys.stderr, flush=True)
        return dataclasses.replace(cfg, attention_impl="xla")
    raise SelfCheckFailed(f"the {cfg.attention_impl} attention failed its self-check on {where} ({reason}); "
                          "nothing was started: run with --config.model.attention_impl=xla (same parameters and "
                          f"checkpoints); `python -m ctx.selfcheck --config=...` shows every check")


def main() -> None:
    cfg = resolve_attention_here(ModelConfig.from_config(FLAGS.config.model))
    if cfg.attention_impl not in FUSED_ATTENTION_IMPLS:
        result = {"impl": cfg.attention_impl, "ok": True, "checks": {}, "device": _device_kind(),
                  "note": "the xla attention is the reference itself; nothing to check"}
    else:
        result = run_self_check(cfg)
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)



if __name__ == "__main__":
    define_config_flags()
    run_main(main)
