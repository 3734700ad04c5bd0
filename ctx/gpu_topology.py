"""NVIDIA GPUs by the names users type, and XLA's compile-only devices for them: the GPU
counterpart of ctx.topology, so `--compile_only --topology=h100` compiles the real program
for an H100 from a machine that has none.

Each GPU is XLA's own device description (a GpuTargetConfig text proto, shipped in
ctx/gpu_specs/ with its origin in each file's header). With jax's CUDA plugin and the nvcc
wheel installed (`pip install -e '.[gpu-compile]'`), XLA's GPU compiler runs its whole
pipeline (Triton, PTX, ptxas) for that device without a GPU. The plugin must not try to
drive a GPU in a process that compiles this way, so the CPU platform is chosen before JAX
starts its backends (`compile_devices` does it where they have not started yet).

    python -m ctx.gpu_topology h100-8      # the GPU's facts as JSON
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import os
import re
import shutil
import sys

from ctx.config import ConfigError
from ctx.topology import describe_main

GPU_COMPILE_INSTALL = (
    "pip install -e '.[gpu-compile]'  (jax's CUDA plugin and nvcc, for compiling without a GPU)"
)
# jax's GPU allocator takes this share of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
DEFAULT_MEMORY_FRACTION = 0.75
# A node's GPUs as XLA's deviceless topology can describe them: one host with N devices.
LARGEST_NODE = 8


# A GpuModel's device facts, and the GpuTargetConfig fields they are read from.
_SPEC_FIELDS = {
    "device_memory_bytes": "device_memory_size",
    "hbm_bytes_per_sec": "memory_bandwidth",
    "shared_memory_per_block": "shared_memory_per_block_optin",  # the most a kernel may ask for
    "shared_memory_per_core": "shared_memory_per_core",
    "registers_per_core": "registers_per_core_limit",
    "threads_per_core": "threads_per_core_limit",
    "threads_per_block": "threads_per_block_limit",
    "cores": "core_count",
}
# name on the command line, XLA's description in ctx/gpu_specs/, the datasheet's dense bf16 peak
# (the description has no such figure).
_MODELS = (
    ("h100", "h100_sxm.txtpb", 989.4e12),
    ("h200", "h200.txtpb", 989.4e12),
    ("a100-80gb", "a100_sxm_80.txtpb", 312e12),
    ("a100-40gb", "a100_sxm_40.txtpb", 312e12),
)


def _field(text: str, field: str) -> str:
    match = re.search(rf"^\s*{field}: \"?([^\"\n]+)\"?$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"the GPU description has no {field}")
    return match.group(1)


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One GPU model: what XLA's description of it says, and its peak."""

    name: str
    spec_text: str  # the GpuTargetConfig text proto XLA's compiler takes
    peak_bf16_flops: float
    device_kind: str
    compute_capability: str
    ptx_arch: (
        str  # ptxas's -arch for the code XLA generates (Hopper's accelerated features: sm_90a)
    )
    device_memory_bytes: int
    hbm_bytes_per_sec: int
    shared_memory_per_block: int
    shared_memory_per_core: int
    registers_per_core: int
    threads_per_core: int
    threads_per_block: int
    cores: int

    @classmethod
    def load(cls, name: str, spec_file: str, peak_bf16_flops: float) -> "GpuModel":
        text = importlib.resources.files("ctx").joinpath("gpu_specs", spec_file).read_text()
        capability = re.search(r"cuda_compute_capability \{([^}]*)\}", text).group(1)
        major = re.search(r"major: (\d+)", capability).group(1)
        minor = re.search(r"minor: (\d+)", capability)
        minor = minor.group(1) if minor else "0"
        accelerated = "a" if "ACCELERATED_FEATURES" in capability else ""
        return cls(
            name,
            text,
            peak_bf16_flops,
            _field(text, "device_description_str"),
            f"{major}.{minor}",
            f"sm_{major}{minor}{accelerated}",
            **{fact: int(float(_field(text, field))) for fact, field in _SPEC_FIELDS.items()},
        )


@functools.cache
def gpus() -> tuple[GpuModel, ...]:
    """The GPUs ctx knows, their descriptions read on first use (nothing happens at import)."""
    return tuple(GpuModel.load(*model) for model in _MODELS)


def model_of(device) -> GpuModel | None:
    """The known model of a jax GPU device: by its name, else one of the same compute
    capability (whose limits it shares); None for others."""
    same_capability = [
        m for m in gpus() if m.compute_capability == getattr(device, "compute_capability", None)
    ]
    return next((m for m in gpus() if m.device_kind == device.device_kind), None) or next(
        iter(same_capability), None
    )


@dataclasses.dataclass(frozen=True)
class GpuNode:
    """`count` GPUs of one model in one host, as `--topology=h100-8` names them."""

    model: GpuModel
    count: int

    @property
    def name(self) -> str:
        return self.model.name if self.count == 1 else f"{self.model.name}-{self.count}"

    @property
    def memory_fraction(self) -> float:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEMORY_FRACTION))

    @property
    def usable_memory_gib(self) -> float:
        """What jax's allocator lets one program use per GPU (its share of the memory)."""
        return self.model.device_memory_bytes * self.memory_fraction / 2**30

    def describe(self) -> dict:
        m = self.model
        return {
            "gpu": self.name,
            "gpus": self.count,
            "device_kind": m.device_kind,
            "compute_capability": m.compute_capability,
            "ptx_arch": m.ptx_arch,
            "device_memory_gib": m.device_memory_bytes / 2**30,
            "memory_fraction": self.memory_fraction,
            "usable_memory_gib": self.usable_memory_gib,
            "peak_bf16_tflops": m.peak_bf16_flops / 1e12,
            "hbm_gb_per_sec": m.hbm_bytes_per_sec / 1e9,
            "ridge_flops_per_byte": m.peak_bf16_flops / m.hbm_bytes_per_sec,
            "shared_memory_per_block_kib": m.shared_memory_per_block / 1024,
            "cores": m.cores,
        }


def known_names() -> str:
    names = ", ".join(name for name, _, _ in _MODELS)
    return f"{names} (one GPU; NAME-N for N of a node, N up to {LARGEST_NODE}, e.g. h100-8)"


def looks_like_gpu(name: str) -> bool:
    """Whether `name` is meant as a GPU (an NVIDIA model prefix), known or not."""
    return re.match(r"(h|a|b|l|v|gb|rtx)\d{2,3}", (name or "").strip().lower()) is not None


def resolve(name: str, flag: str = "--topology") -> GpuNode:
    """'h100', 'h100-8', 'a100-40gb-4' as a GpuNode; anything else is one line listing the known ones."""
    text = (name or "").strip().lower()
    for model in gpus():
        if text == model.name:
            return GpuNode(model, 1)
        count = re.fullmatch(re.escape(model.name) + r"-(\d+)", text)
        if count and 1 <= int(count.group(1)) <= LARGEST_NODE:
            return GpuNode(model, int(count.group(1)))
    raise ConfigError(f"{flag}={name} is not a GPU ctx knows; known GPUs: {known_names()}")


def compiler_installed() -> bool:
    return (
        importlib.util.find_spec("jax_plugins") is not None
        and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    )


def ptxas_path() -> str | None:
    """ptxas from the nvcc wheel (what XLA itself uses here), or from PATH."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(root, "bin", "ptxas")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("ptxas")


def compile_devices(node: GpuNode) -> list:
    """XLA's compile-only devices for the node's GPUs (one per GPU)."""
    if not compiler_installed():
        raise ConfigError(
            f"--topology={node.name} needs jax's CUDA plugin to compile for GPUs: {GPU_COMPILE_INSTALL}"
        )
    import jax
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # the plugin compiles; it must not look for a GPU
    try:
        description = topologies.get_topology_desc(
            platform="cuda",
            topology_name=node.model.name,
            topology=f"1x1x{node.count}",
            target_config=node.model.spec_text,
        )
    except NotImplementedError:
        raise ConfigError(
            f"--topology={node.name}: jax started its backends before the GPU compiler could be set "
            "up; run with JAX_PLATFORMS=cpu"
        ) from None
    return list(description.devices)


def main(argv: list[str]) -> int:
    return describe_main(
        argv, resolve, f"python -m ctx.gpu_topology GPU [FLAG_NAME]   ({known_names()})"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
