"""Which devices a run uses, said at start-up, and a warning when the machine has
accelerators that JAX does not drive (with the CPU-only jaxlib on a GPU node, ctx would
otherwise train on the host CPU in silence)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, TextIO

import jax
import ml_collections

from ctx import selfcheck
from ctx.config import FUSED_ATTENTION_IMPLS, ModelConfig
from ctx.distributed import any_process, system_accelerators
from ctx.nn import pallas_gpu
from ctx.nn.attention_policy import resolve_attention

INSTALL_HINT = {
    "gpu": "pip install -e '.[cuda]' (jax's CUDA 12 plugin)",
    "tpu": "pip install -e '.[tpu]' (libtpu)",
}


def backend_line() -> str:
    kinds = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"jax {jax.__version__} on {jax.default_backend()}: {jax.device_count()} device(s) ({kinds}) "
        f"in {jax.process_count()} process(es)"
    )


def unused_accelerators(platform: str, found: dict[str, int]) -> str | None:
    """A warning when the system has GPUs or TPUs and JAX runs on something else; None when
    the user chose the platform (JAX_PLATFORMS) or nothing is unused."""
    if os.environ.get("JAX_PLATFORMS"):
        return None
    for kind, label in (("gpu", "NVIDIA GPU(s)"), ("tpu", "TPU chip(s)")):
        if found[kind] and platform != kind:
            return (
                f"warning: this machine has {found[kind]} {label} but JAX runs on {platform}; install "
                f"the {kind.upper()} build: {INSTALL_HINT[kind]}, then check python -c "
                f"'import jax; print(jax.devices())'"
            )
    return None


def announce(command: str) -> None:
    """Process 0 says where `command` runs (stdout) and warns about unused accelerators (stderr)."""
    if jax.process_index() != 0:
        return
    print(f"{command}: {backend_line()}", flush=True)
    warning = unused_accelerators(jax.default_backend(), system_accelerators())
    if warning:
        print(warning, file=sys.stderr, flush=True)


def resolve_attention_here(cfg: ModelConfig, device: jax.Device | None = None) -> ModelConfig:
    """`cfg` with attention_impl resolved for `device` (default: this process's first device)."""
    device = device or jax.devices()[0]
    return resolve_attention(cfg, device.platform, device.device_kind)


def attention_line(cfg: ModelConfig, requested: str, platform: str) -> str:
    """Which attention a run's segments use on `platform`, and why: `cfg` has
    model.attention_impl resolved, `requested` is what the config asked for (e.g. 'auto')."""
    kernel, asked = cfg.attention_impl, f"model.attention_impl={requested}"
    if requested == "auto":
        asked += f" on {platform}"
        if platform == "gpu" and kernel != "pallas_gpu":
            why = pallas_gpu.layout_problem(cfg) or "it is for NVIDIA GPUs"
            asked += f" (the Pallas GPU kernel cannot run here: {why}" + (
                "; cuDNN cannot drop attention weights or report most_used's usage)"
                if kernel == "xla"
                else ")"
            )
    if kernel == "xla":
        return f"xla ({asked})"
    if kernel in ("pallas_tpu", "pallas_gpu"):
        compiled = {"pallas_tpu": ("tpu", "Mosaic"), "pallas_gpu": ("gpu", "Triton")}[kernel]
        how = (
            compiled[1]
            if platform == compiled[0]
            else f"Pallas interpret mode on {platform}: slow, for tests"
        )
        return f"fused, ctx's Pallas flash kernel for {compiled[0].upper()}s ({how}; {asked})"
    how = "cuDNN" if platform == "gpu" else f"XLA ops on {platform}, no cuDNN here"
    return f"fused, jax.nn.dot_product_attention ({how}; {asked})"


def cache_path(cfg: ModelConfig) -> str:
    """Where a passing result for this layout, device and software is kept."""
    key = json.dumps(
        {
            "problem": dataclasses.asdict(selfcheck.Problem.of(cfg)),
            "device": selfcheck.device_kind(),
            "versions": selfcheck.versions(),
        },
        sort_keys=True,
    )
    folder = os.path.join(
        os.environ.get("CTX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ctx"),
        "selfcheck",
    )
    return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def cached_self_check(cfg: ModelConfig) -> dict[str, Any]:
    """The self-check's result, from the cache when this exact check passed before here."""
    path = cache_path(cfg)
    try:
        with open(path) as f:
            return {**json.load(f), "cached": True}
    except (OSError, ValueError):
        pass
    result = selfcheck.run_self_check(cfg)
    if result["ok"]:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + f".{os.getpid()}", "w") as f:
                json.dump(result, f)
            os.replace(path + f".{os.getpid()}", path)
        except OSError:
            pass  # an unwritable cache only costs the next run the check again
    return {**result, "cached": False}


def checked_attention(
    cfg: ModelConfig, requested: str, command: str, log: TextIO | None = None
) -> ModelConfig:
    """`cfg` (attention resolved) after its fused attention passed the self-check on every
    process. A failure refuses the run when the config named the implementation, and falls back
    to 'xla' (same parameters and checkpoints) with a warning under 'auto'."""
    if cfg.attention_impl not in FUSED_ATTENTION_IMPLS:
        return cfg
    result = cached_self_check(cfg)
    failed = [
        f"{name}: {c['error']}"
        if "error" in c
        else f"{name}: error {c['max_error']:.3g} > {c['tolerance']:.3g}"
        for name, c in result["checks"].items()
        if not c["ok"]
    ]
    anywhere = any_process(bool(failed))
    where = f"{result['device']} (jax {result['versions']['jax']})"
    is_main = jax.process_index() == 0
    if not anywhere:
        if is_main:
            print(
                f"{command}: attention self-check passed: {cfg.attention_impl} on {where}, "
                f"{len(result['checks'])} checks{' (cached)' if result['cached'] else ''}",
                file=log or sys.stdout,
                flush=True,
            )
        return cfg
    reason = "; ".join(failed[:3]) if failed else "it failed on another process"
    if requested == "auto":
        if is_main:
            print(
                f"warning: the {cfg.attention_impl} attention failed its self-check on {where} ({reason}); "
                "model.attention_impl=auto falls back to xla",
                file=sys.stderr,
                flush=True,
            )
        return dataclasses.replace(cfg, attention_impl="xla")
    raise selfcheck.SelfCheckFailed(
        f"the {cfg.attention_impl} attention failed its self-check on {where} ({reason}); nothing was started: run "
        "with --config.model.attention_impl=xla (same parameters and checkpoints); `python -m ctx.selfcheck "
        "--config=...` shows every check"
    )


def model_config_for_run(
    config: ml_collections.ConfigDict,
    command: str,
    device: jax.Device | None = None,
    check: bool = True,
    evaluation: bool = False,
    log: TextIO | None = None,
) -> ModelConfig:
    """The run's ModelConfig, made once where a command starts: config.model converted (it
    validates itself), attention_impl resolved for `device` (default: this process's first),
    the choice said on process 0 (to `log`, default stdout), and a fused attention self-checked
    on this device (`check`). Evaluation drops no weights, so its check leaves attention
    dropout out."""
    device = device or jax.devices()[0]
    requested = config.model.attention_impl
    cfg = resolve_attention_here(ModelConfig.from_config(config.model), device)
    if jax.process_index() == 0:
        print(
            f"{command}: attention {attention_line(cfg, requested, device.platform)}",
            file=log or sys.stdout,
            flush=True,
        )
    if not check:
        return cfg
    if evaluation:
        checked = checked_attention(
            dataclasses.replace(cfg, attention_dropout=0.0), requested, command, log
        )
        return dataclasses.replace(checked, attention_dropout=cfg.attention_dropout)
    return checked_attention(cfg, requested, command, log)
