"""Which attention a config runs where: `resolve_attention` turns attention_impl='auto' into
the fused kernel the platform and chip run at the config's layout, and refuses in one line a
kernel asked for by name that cannot run there (rather than leaving it to the compiler). The
kernels' own limits stay beside them (`pallas_tpu.FIRST_TPU_GENERATION`,
`pallas_gpu.layout_problem`); this module reads no process state: the entry points pass the
device (`ctx.backend.resolve_attention_here`).
"""

from __future__ import annotations

import dataclasses
import re

from ctx.config import ConfigError, ModelConfig
from ctx.nn import pallas_gpu
from ctx.nn.pallas_tpu import FIRST_TPU_GENERATION


def tpu_generation(device_kind: str) -> int | None:
    """The generation of a TPU device kind ('TPU v4' -> 4, 'TPU v5 lite' -> 5, 'TPU7x' -> 7)."""
    found = re.search(r"TPU\s*v?(\d+)", device_kind)
    return int(found.group(1)) if found else None


def _is_amd(device_kind: str) -> bool:
    return any(name in device_kind for name in ("AMD", "Radeon", "Instinct"))


def resolve_attention(cfg: ModelConfig, platform: str, device_kind: str = "") -> ModelConfig:
    """`cfg` with attention_impl='auto' replaced by what runs on `platform` ('cpu', 'gpu', 'tpu')
    and its `device_kind` (jax's, e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3'): the platform's
    fused kernel where the config and the chip allow it, else 'xla'. On NVIDIA GPUs that is
    'pallas_gpu', else 'cudnn' where the config needs neither attention dropout nor most_used.
    A kernel asked for by name that cannot run here is refused in one line rather than by the
    compiler: 'pallas_tpu' on a TPU older than it supports, 'pallas_gpu' on a TPU, an AMD GPU
    or at a layout Triton cannot tile."""
    generation = tpu_generation(device_kind) if platform == "tpu" else None
    too_old = generation is not None and generation < FIRST_TPU_GENERATION
    if cfg.attention_impl == "pallas_tpu" and too_old:
        raise ConfigError(
            f"model.attention_impl='pallas_tpu' needs TPU v{FIRST_TPU_GENERATION} or later (its "
            f"strided lane rotation does not lower on {device_kind}); use attention_impl='xla' or 'auto'"
        )
    gpu_problem = pallas_gpu.layout_problem(cfg)
    if cfg.attention_impl == "pallas_gpu":
        if platform == "tpu" or (platform == "gpu" and _is_amd(device_kind)):
            raise ConfigError(
                f"model.attention_impl='pallas_gpu' is a Triton kernel for NVIDIA GPUs, and this is "
                f"{device_kind or platform}; use attention_impl='auto'"
            )
        if platform == "gpu" and gpu_problem:
            raise ConfigError(
                f"model.attention_impl='pallas_gpu' cannot run this config: {gpu_problem}; use "
                "attention_impl='xla' or 'auto'"
            )
    if cfg.attention_impl != "auto":
        return cfg
    if platform == "gpu":
        if not gpu_problem and not _is_amd(device_kind):
            fused = "pallas_gpu"
        elif cfg.attention_dropout_rate or cfg.compression == "most_used":
            fused = "xla"
        else:
            fused = "cudnn"
    else:
        fused = {"tpu": "xla" if too_old else "pallas_tpu"}.get(platform, "xla")
    return dataclasses.replace(cfg, attention_impl=fused)
