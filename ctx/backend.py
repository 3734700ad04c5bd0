"""Which devices a run uses, said at start-up, and a warning when the machine has
accelerators that JAX does not drive (with the CPU-only jaxlib on a GPU node, ctx would
otherwise train on the host CPU in silence)."""
from __future__ import annotations

import os
import sys

import jax

from ctx.config import ModelConfig, pallas_gpu_layout_problem, resolve_attention
from ctx.distributed import system_accelerators

INSTALL_HINT = {"gpu": "pip install -e '.[cuda]' (jax's CUDA 12 plugin)",
                "tpu": "pip install -e '.[tpu]' (libtpu)"}


def backend_line() -> str:
    kinds = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"jax {jax.__version__} on {jax.default_backend()}: {jax.device_count()} device(s) ({kinds}) "
            f"in {jax.process_count()} process(es)")


def unused_accelerators(platform: str, found: dict[str, int]) -> str | None:
    """A warning when the system has GPUs or TPUs and JAX runs on something else; None when
    the user chose the platform (JAX_PLATFORMS) or nothing is unused."""
    if os.environ.get("JAX_PLATFORMS"):
        return None
    for kind, label in (("gpu", "NVIDIA GPU(s)"), ("tpu", "TPU chip(s)")):
        if found[kind] and platform != kind:
            return (f"warning: this machine has {found[kind]} {label} but JAX runs on {platform}; install "
                    f"the {kind.upper()} build: {INSTALL_HINT[kind]}, then check python -c "
                    f"'import jax; print(jax.devices())'")
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
            why = pallas_gpu_layout_problem(cfg) or "it is for NVIDIA GPUs"
            asked += f" (the Pallas GPU kernel cannot run here: {why}" + (
                "; cuDNN cannot drop attention weights or report most_used's usage)" if kernel == "xla" else ")")
    if kernel == "xla":
        return f"xla ({asked})"
    if kernel in ("pallas_tpu", "pallas_gpu"):
        compiled = {"pallas_tpu": ("tpu", "Mosaic"), "pallas_gpu": ("gpu", "Triton")}[kernel]
        how = compiled[1] if platform == compiled[0] else f"Pallas interpret mode on {platform}: slow, for tests"
        return f"fused, ctx's Pallas flash kernel for {compiled[0].upper()}s ({how}; {asked})"
    how = "cuDNN" if platform == "gpu" else f"XLA ops on {platform}, no cuDNN here"
    return f"fused, jax.nn.dot_product_attention ({how}; {asked})"
