"""Cloud TPU slices by the names users type, and libtpu's compile-only devices for them.

Cloud accelerator types count differently per generation: `v4-N` and `v5p-N` count
TensorCores (two per chip, which JAX drives as one device: "megacore"), `v5litepod-N` /
`v5e-N` and `v6e-N` count chips. libtpu describes a slice by its chip layout instead
(`v5p:4x4x8`). `resolve` accepts both and returns one `TpuSlice`; `compile_devices` asks
libtpu for devices that XLA's TPU compiler can target from any machine, no TPU needed.

    python -m ctx.topology v5p-256      # the slice's facts as JSON (launch/tpu.sh reads them)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from typing import Mapping

from ctx.config import ConfigError
from ctx.distributed import system_accelerators

LIBTPU_INSTALL = "pip install -e '.[tpu]'  (libtpu pinned to the installed jax)"

# Chip layouts of the power-of-two slices; other layouts are given in libtpu's own form.
CUBE_LAYOUTS = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
PLANE_LAYOUTS = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its Cloud names count, and what one chip has."""

    name: str  # libtpu's prefix (v5p:4x4x8)
    cloud_prefixes: tuple[str, ...]  # accelerator types are PREFIX-N
    name_counts_per_chip: int  # 2: N counts TensorCores (v4, v5p); 1: N counts chips
    hbm_gib: float  # what XLA's TPU compiler lets one program use per chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip, datasheet
    hbm_bytes_per_sec: float  # per chip, datasheet
    runtime_version: str  # the TPU VM image Google documents for the generation
    chip_config: str  # libtpu: 'megacore' drives a chip's two TensorCores as one device
    layouts: Mapping[int, str]  # chips -> chip layout of the Cloud names

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which the chip is compute-bound (roofline)."""
        return self.peak_bf16_flops / self.hbm_bytes_per_sec


GENERATIONS = (
    Generation(
        "v4", ("v4",), 2, 30.75, 275e12, 1.2e12, "tpu-ubuntu2204-base", "megacore", CUBE_LAYOUTS
    ),
    Generation(
        "v5e",
        ("v5litepod", "v5e"),
        1,
        15.75,
        197e12,
        0.819e12,
        "v2-alpha-tpuv5-lite",
        "default",
        PLANE_LAYOUTS,
    ),
    Generation(
        "v5p", ("v5p",), 2, 95.74, 459e12, 2.765e12, "v2-alpha-tpuv5", "megacore", CUBE_LAYOUTS
    ),
    Generation(
        "v6e", ("v6e",), 1, 31.25, 918e12, 1.64e12, "v2-alpha-tpuv6e", "default", PLANE_LAYOUTS
    ),
)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    generation: Generation
    layout: tuple[int, ...]  # chips along each axis of the slice

    @property
    def chips(self) -> int:
        n = 1
        for size in self.layout:
            n *= size
        return n

    @property
    def topology(self) -> str:
        """libtpu's name, e.g. v5p:4x4x8."""
        return f"{self.generation.name}:{'x'.join(map(str, self.layout))}"

    @property
    def accelerator_type(self) -> str:
        """The Cloud name, e.g. v5p-256 (gcloud's --accelerator-type)."""
        return f"{self.generation.cloud_prefixes[0]}-{self.chips * self.generation.name_counts_per_chip}"

    def describe(self) -> dict:
        g = self.generation
        return {
            "accelerator_type": self.accelerator_type,
            "topology": self.topology,
            "chips": self.chips,
            "generation": g.name,
            "hbm_gib": g.hbm_gib,
            "peak_bf16_tflops": g.peak_bf16_flops / 1e12,
            "hbm_gb_per_sec": g.hbm_bytes_per_sec / 1e9,
            "ridge_flops_per_byte": g.ridge_flops_per_byte,
            "runtime_version": g.runtime_version,
        }


def valid_forms() -> str:
    cloud = ", ".join(f"{p}-N" for g in GENERATIONS for p in g.cloud_prefixes)
    examples = ", ".join(
        f"{g.cloud_prefixes[0]}-{max(g.layouts) * g.name_counts_per_chip}" for g in GENERATIONS
    )
    return (
        f"Cloud accelerator types ({cloud}; e.g. {examples}; v4 and v5p count TensorCores, two per "
        f"chip, v5e and v6e count chips) or libtpu layouts (v4:2x2x4, v5e:4x4, v5p:4x4x8, v6e:8x8)"
    )


def resolve(name: str, flag: str = "--topology") -> TpuSlice:
    """A Cloud accelerator type (v5p-256) or a libtpu layout (v5p:4x4x8) as a TpuSlice; errors
    name `flag`, where the user typed it."""
    text = (name or "").strip().lower()
    by_libtpu = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
    if by_libtpu:
        generation = _generation(lambda g: g.name == by_libtpu.group(1), name, flag)
        layout = tuple(int(s) for s in by_libtpu.group(2).split("x"))
        dims = 3 if generation.layouts is CUBE_LAYOUTS else 2
        if len(layout) != dims or min(layout) < 1:
            raise ConfigError(
                f"{flag}={name}: {generation.name} slices have {dims} layout axes "
                f"(e.g. {generation.name}:{generation.layouts[max(generation.layouts)]}); "
                f"valid forms: {valid_forms()}"
            )
        return TpuSlice(generation, layout)
    by_cloud = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if by_cloud:
        generation = _generation(lambda g: by_cloud.group(1) in g.cloud_prefixes, name, flag)
        count = int(by_cloud.group(2))
        chips, remainder = divmod(count, generation.name_counts_per_chip)
        if remainder or chips not in generation.layouts:
            sizes = ", ".join(
                str(c * generation.name_counts_per_chip) for c in sorted(generation.layouts)
            )
            axes = "AxBxC" if generation.layouts is CUBE_LAYOUTS else "AxB"
            raise ConfigError(
                f"{flag}={name}: {by_cloud.group(1)}-N takes N in {sizes} here; give other "
                f"slices as a libtpu layout ({generation.name}:{axes})"
            )
        return TpuSlice(generation, tuple(int(s) for s in generation.layouts[chips].split("x")))
    raise ConfigError(f"{flag}={name} is not a TPU slice name; valid forms: {valid_forms()}")


def _generation(matches, name: str, flag: str) -> Generation:
    for generation in GENERATIONS:
        if matches(generation):
            return generation
    raise ConfigError(f"{flag}={name}: unknown TPU generation; valid forms: {valid_forms()}")


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def compile_devices(tpu: TpuSlice) -> list:
    """libtpu's compile-only devices for the slice (one per chip): XLA's TPU compiler targets
    them from any machine."""
    if not libtpu_installed():
        raise ConfigError(
            f"--topology={tpu.accelerator_type} needs libtpu to compile for TPUs: {LIBTPU_INSTALL}"
        )
    from jax.experimental import topologies

    if not system_accelerators()["tpu"]:
        # No TPU here: tell libtpu what it would ask the (absent) TPU VM metadata server, so it
        # does not print warnings, and let several compile-only processes load it at once
        # (its one-process lock guards chips, and compiling opens none).
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    layout3 = tuple(tpu.layout) + (1,) * (3 - len(tpu.layout))
    # Libtpu's default hosts hold 2x2x1 chips; a single chip is a host of its own.
    per_host = tuple(min(size, bound) for size, bound in zip(layout3, (2, 2, 1)))
    # Slices of whole 4-chip-long rings wrap around (a torus); smaller ones are open meshes.
    if tpu.generation.layouts is CUBE_LAYOUTS:
        wrap = (min(layout3) >= 4,) * 3
    else:
        wrap = tuple(size >= 16 for size in layout3[:2]) + (False,)
    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=tpu.topology,
            chip_config_name=tpu.generation.chip_config,
            chips_per_host_bounds=per_host,
            num_slices=1,
            wrap=wrap,
        )
    except Exception as error:  # noqa: BLE001 - libtpu's errors are plain runtime errors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--topology={tpu.topology}: libtpu cannot describe this slice ({first}); "
            f"valid forms: {valid_forms()}"
        ) from None
    return list(description.devices)


def describe_main(argv: list[str], resolve_name, usage: str) -> int:
    """`python -m MODULE NAME [FLAG_NAME]`: the named accelerator's facts as one JSON line, or
    one error line (exit 2); shared by this module and ctx.gpu_topology."""
    if len(argv) not in (2, 3):
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(resolve_name(argv[1], *argv[2:]).describe()))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    return describe_main(
        argv,
        resolve,
        "python -m ctx.topology ACCELERATOR_TYPE [FLAG_NAME]   "
        "(e.g. v5p-256, v5litepod-16, v6e:8x8)",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
