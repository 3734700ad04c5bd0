"""Which devices a run uses, said at start-up, and a warning when the machine has
accelerators that JAX does not drive (with the CPU-only jaxlib on a GPU node, ctx would
otherwise train on the host CPU in silence)."""
from __future__ import annotations

import os
import re
import sys

import jax

from ctx.config import ModelConfig

INSTALL_HINT = {"gpu": "pip install -e '.[cuda]' (jax's CUDA 12 plugin)",
                "tpu": "pip install -e '.[tpu]' (libtpu)"}


def system_accelerators(dev_dir: str = "/dev") -> dict[str, int]:
    """Accelerators the operating system shows, whatever JAX sees: NVIDIA GPUs
    (/dev/nvidiaN) and TPU chips (/dev/accelN on v4 and v5e, /dev/vfio/N on v5p and v6e)."""
    def matching(folder: str, pattern: str) -> int:
        try:
            return sum(bool(re.fullmatch(pattern, name)) for name in os.listdir(folder))
        except OSError:
            return 0
    return {"gpu": matching(dev_dir, r"nvidia\d+"),
            "tpu": matching(dev_dir, r"accel\d+") + matching(os.path.join(dev_dir, "vfio"), r"\d+")}


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


def attention_line(cfg: ModelConfig) -> str:
    """Which attention a run's segments use (model.attention_impl, 'auto' resolved here)."""
    kernel, backend = cfg.attention_kernel, jax.default_backend()
    if kernel == "xla":
        return f"xla (model.attention_impl={cfg.attention_impl})"
    if kernel == "pallas_tpu":
        how = "Mosaic" if backend == "tpu" else f"Pallas interpret mode on {backend}: slow, for tests"
        return f"fused, ctx's Pallas flash kernel ({how}; model.attention_impl={cfg.attention_impl})"
    how = "cuDNN" if backend == "gpu" else f"XLA ops on {backend}, no cuDNN here"
    return f"fused, jax.nn.dot_product_attention ({how}; model.attention_impl={cfg.attention_impl})"
