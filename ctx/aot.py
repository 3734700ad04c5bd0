"""Ahead-of-time compilation of the training chunk: does a run fit its chips, and what does
XLA's cost model expect it to cost. No accelerator is needed to ask.

    python -m ctx.train --config=experiments/pg19.py --compile_only --topology=v5p-256 [--search_batch]
    python -m ctx.train --config=experiments/pg19.py --compile_only --topology=h100

`compile_report` compiles the real training chunk (the jitted scan over `segments_per_call`
segments) for the local devices, for a TPU slice that libtpu describes (ctx.topology) or for
NVIDIA GPUs that XLA's own device descriptions describe (ctx.gpu_topology), and returns one
JSON-ready dict: memory per chip by kind against the chip's memory, whether it fits (an
out-of-memory compile is a report with XLA's numbers, not a crash), optionally the largest
per-chip batch that fits (bisection, one compile per try), a cost estimate and, for GPUs,
each Pallas kernel's registers, spills, shared memory and threads (ctx.kernel_resources).

The cost estimate, corrected for loop trip counts: XLA's `cost_analysis()` counts the body
of a `while` loop once, and the chunk has two (the scan over segments and, for deep stacks,
the scan over layers). So two more programs are compiled with one segment per call and the
layers unrolled, one with 1 layer and one with 2, which contain no loop; their difference is
one layer, the rest is what lies outside the layers (embedding, output layer, loss,
optimizer), and a step of L layers is outside + L x layer. That holds for FLOPs, HBM bytes
and XLA's own step-time estimate (`optimal_seconds`). Everything derived from it is labelled
as XLA's estimate: it is not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ctx import gpu_topology, kernel_resources, roofline
from ctx import topology as tpu_topology
from ctx.backend import resolve_attention_here
from ctx.config import ModelConfig, validate, with_global_batch
from ctx.errors import InputError
from ctx.flops import train_flops_per_token
from ctx.nn import pallas_gpu
from ctx.nn.attention_policy import resolve_attention
from ctx.nn.fused_attention import AttentionOperands, flash_attention
from ctx.nn.attention import cudnn_found
from ctx.selfcheck import Problem
from ctx.sharding import batch_sharding, make_mesh
from ctx.trainer import Trainer

ESTIMATE_LABEL = "XLA's TPU cost-model estimate from an ahead-of-time compile, not a measurement"
ROOFLINE_LABEL = (
    "roofline estimate from an ahead-of-time compile (per operation the larger of FLOPs at peak and "
    "HBM bytes at bandwidth, summed), not a measurement"
)
ESTIMATE_METHOD = (
    "loop-free compiles with 1 and 2 layers unrolled and 1 segment per call: "
    "step = (1-layer cost - layer) + n_layers x layer, layer = 2-layer cost - 1-layer cost"
)
MEMORY_KINDS = {
    "arguments": "argument_size_in_bytes",
    "outputs": "output_size_in_bytes",
    "temporaries": "temp_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
    "aliased": "alias_size_in_bytes",
}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """The chips a program is compiled for, and what one of them has."""

    devices: list
    hbm_gib: float | None
    peak_flops: float | None = None  # dense bf16 FLOP/s per chip
    hbm_bytes_per_sec: float | None = None
    slice: tpu_topology.TpuSlice | None = None
    gpu: gpu_topology.GpuNode | None = None
    compile_only: bool = False  # libtpu's or XLA:GPU's devices without the chips

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def lowering_platforms(self) -> tuple[str, ...] | None:
        return ("cuda",) if self.gpu else None

    def compile(self, lowered: Any) -> Any:
        return self.compile_with_kernels(lowered)[0]

    def compile_with_kernels(self, lowered: Any) -> tuple[Any, list[dict[str, Any]] | None]:
        """The compiled program, and for NVIDIA GPUs its Pallas kernels' resources (else None)."""
        with self._no_cache_writes():
            if self.gpu is None:
                return lowered.compile(), None
            with tempfile.TemporaryDirectory(prefix="ctx-gpu-compile-") as dump:
                try:
                    compiled = lowered.compile(
                        compiler_options=kernel_resources.compile_options(dump)
                    )
                except Exception as error:  # noqa: BLE001 - a kernel over the GPU's limits is one line
                    raise kernel_resources.refused(error, self.gpu.name) or error from None
                return compiled, kernel_resources.read(dump, compiled.as_text(), self.gpu.model)

    @contextlib.contextmanager
    def _no_cache_writes(self):
        """For compile-only devices nothing is written to JAX's persistent compilation cache,
        whose entries would need a TPU or GPU client to be read back (JAX decides once per
        process whether the cache is used, so its write threshold is raised instead)."""
        if not self.compile_only:
            yield
            return
        key = "jax_persistent_cache_min_compile_time_secs"
        previous = getattr(jax.config, key)
        jax.config.update(key, float("inf"))
        try:
            yield
        finally:
            jax.config.update(key, previous)

    @classmethod
    def local(cls) -> "Target":
        """This machine's devices; HBM from the runtime (GPUs) or host memory shared by the
        local devices (CPU). NVIDIA GPUs ctx knows (or of a known compute capability) also
        report their kernels' resources."""
        devices = jax.devices()
        stats = devices[0].memory_stats() or {}
        if "bytes_limit" in stats:
            model = gpu_topology.model_of(devices[0]) if devices[0].platform == "gpu" else None
            if model is None:
                return cls(devices, stats["bytes_limit"] / GIB)
            return cls(
                devices,
                stats["bytes_limit"] / GIB,
                model.peak_bf16_flops,
                model.hbm_bytes_per_sec,
                gpu=gpu_topology.GpuNode(model, len(devices)),
            )
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(devices, host / jax.local_device_count() / GIB)

    @classmethod
    def tpu(cls, name: str) -> "Target":
        tpu = tpu_topology.resolve(name)
        g = tpu.generation
        return cls(
            tpu_topology.compile_devices(tpu),
            g.hbm_gib,
            g.peak_bf16_flops,
            g.hbm_bytes_per_sec,
            tpu,
            compile_only=True,
        )

    @classmethod
    def gpu_node(cls, name: str) -> "Target":
        node = gpu_topology.resolve(name)
        return cls(
            gpu_topology.compile_devices(node),
            node.usable_memory_gib,
            node.model.peak_bf16_flops,
            node.model.hbm_bytes_per_sec,
            gpu=node,
            compile_only=True,
        )

    @classmethod
    def named(cls, topology: str) -> "Target":
        """A TPU slice (v5p-256, v5p:4x4x8) or NVIDIA GPUs (h100, h100-8) by --topology's name."""
        return (
            cls.gpu_node(topology) if gpu_topology.looks_like_gpu(topology) else cls.tpu(topology)
        )


def variant(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of config with section.field values replaced (keys like 'model.n_layers')."""
    config = config.copy_and_resolve_references()
    for key, value in fields.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _lower(
    config: ml_collections.ConfigDict,
    target: Target,
    lowering_platforms: tuple[str, ...] | None = None,
):
    """The training chunk lowered for the target's mesh, with abstract (shape-only) inputs;
    `lowering_platforms` (e.g. ('cuda',)) lowers it for other platforms than the target's, as
    far as StableHLO (how a CPU machine checks a GPU program short of compiling it)."""
    config = with_global_batch(config, len(target.devices))
    mesh = make_mesh(config.mesh, target.devices)
    # Resolved for the target's chips; the self-check needs the chips themselves.
    trainer = Trainer(
        config,
        resolve_attention_here(ModelConfig.from_config(config.model), target.devices[0]),
        mesh,
    )
    abstract = trainer.abstract_checkpoint()
    G, B, N = (
        config.train.segments_per_call,
        config.train.batch_size,
        trainer.model_config.segment_length,
    )
    rows = batch_sharding(trainer.mesh, 1, 3)
    chunk = {
        "tokens": jax.ShapeDtypeStruct((G, B, N), jnp.int32, sharding=rows),
        "targets": jax.ShapeDtypeStruct((G, B, N), jnp.int32, sharding=rows),
        "weights": jax.ShapeDtypeStruct((G, B, N), jnp.float32, sharding=rows),
        "reset": jax.ShapeDtypeStruct(
            (G, B), jnp.bool_, sharding=batch_sharding(trainer.mesh, 1, 2)
        ),
    }
    traced = trainer.train_chunk.trace(
        abstract["train_state"], abstract["memory"], abstract["rng"], chunk
    )
    return trainer, traced.lower(lowering_platforms=lowering_platforms or target.lowering_platforms)


def compiled_memory(compiled: Any) -> dict[str, Any]:
    """XLA's ahead-of-time per-device memory: arguments + outputs + temporaries + code, less
    what outputs alias from arguments (the donated state). Empty where the backend has no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"per_device_bytes": {}, "per_device_memory_estimate_gib": None, "memory_gib": {}}
    per_device = {field: int(getattr(stats, field, 0) or 0) for field in MEMORY_KINDS.values()}
    estimate = (
        sum(per_device[f] for f in list(MEMORY_KINDS.values())[:4])
        - per_device["alias_size_in_bytes"]
    )
    return {
        "per_device_bytes": per_device,
        "per_device_memory_estimate_gib": estimate / GIB,
        "memory_gib": {kind: per_device[field] / GIB for kind, field in MEMORY_KINDS.items()},
    }


def out_of_memory(error: BaseException) -> dict[str, Any] | None:
    """XLA's compile-time out-of-memory, as numbers; None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next(
        (s.strip() for s in text.splitlines() if "memory" in s.lower()),
        text.strip().splitlines()[0],
    )
    report: dict[str, Any] = {"message": line}
    needed = re.search(r"required for ([^()]+?) \(([\d.]+)([KMGT])\)", line)
    available = re.search(r"available HBM \(([\d.]+)([KMGT])\)", line)
    scale = {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}
    if needed:
        report["required_gib"] = float(needed.group(2)) * scale[needed.group(3)]
        report["required_for"] = needed.group(1)
    if available:
        report["available_gib"] = float(available.group(1)) * scale[available.group(2)]
    return report


def fit(config: ml_collections.ConfigDict, target: Target) -> dict[str, Any]:
    """Compile the real chunk: memory by kind and whether it fits the chip's HBM."""
    trainer, lowered = _lower(config, target)
    start = time.perf_counter()
    try:
        compiled, kernels = target.compile_with_kernels(lowered)
    except Exception as error:  # noqa: BLE001 - only XLA's out-of-memory becomes a report
        oom = out_of_memory(error)
        if oom is None:
            raise
        per_chip = trainer.config.train.batch_size // trainer.mesh.size
        if oom.get("required_gib") and oom.get("available_gib") and per_chip > 1:
            # A first guess that takes the whole requirement to grow with the batch; the fixed
            # part (parameters, optimizer state) makes the true answer smaller: --search_batch.
            oom["guess_per_chip_batch"] = max(
                1, int(per_chip * oom["available_gib"] / oom["required_gib"])
            )
        return {
            "compile_seconds": time.perf_counter() - start,
            "fits": False,
            "oom": oom,
            "per_device_bytes": {},
            "per_device_memory_estimate_gib": None,
            "memory_gib": {},
            "kernels": None,
            "trainer": trainer,
        }
    memory = compiled_memory(compiled)
    total = memory["per_device_memory_estimate_gib"]
    fits = None if total is None or target.hbm_gib is None else total <= target.hbm_gib
    return {
        "compile_seconds": time.perf_counter() - start,
        "fits": fits,
        "oom": None,
        **memory,
        "kernels": kernels,
        "trainer": trainer,
    }


def largest_by_bytes(hlo_text: str, top: int = 12, layers: int = 1) -> list[dict[str, Any]]:
    """The operations of a compiled one-layer step that move the most bytes per step of a
    `layers`-layer model (ctx.roofline's operations: operands read plus results written, what
    XLA's cost analysis counts as bytes accessed), times `layers` for the layer's own operations
    (their source op lies under `layers.`), largest first, with the source op that made it."""
    found = []
    for op in roofline.operations(hlo_text, pallas_gpu.declared_cost):
        times = layers if "/layers." in op["op_name"] else 1
        found.append(
            {
                "name": op["name"],
                "opcode": op["opcode"],
                "bytes": op["bytes"],
                "times_per_step": times,
                "bytes_per_step": times * op["bytes"],
                "op_name": op["op_name"],
            }
        )
    return sorted(found, key=lambda f: -f["bytes_per_step"])[:top]


def cost_estimate(config: ml_collections.ConfigDict, target: Target) -> dict[str, Any] | None:
    """XLA's per-chip cost of one training step (one segment), corrected for loop trip counts
    (module docstring): XLA's cost analysis where the backend has one (TPU), else ctx.roofline's."""
    costs, texts = [], []
    for layers in (1, 2):
        loop_free = variant(
            config,
            **{"model.n_layers": layers, "model.scan_unroll": 0, "train.segments_per_call": 1},
        )
        compiled = target.compile(_lower(loop_free, target)[1])
        text = compiled.as_text()
        if re.search(r"\bwhile\(", text):
            raise RuntimeError("the cost estimate's loop-free program still holds a while loop")
        # XLA's own analysis where the backend has one (TPU); the roofline on every backend.
        analysis = dict(compiled.cost_analysis() or {})
        own = roofline.program_cost(
            text, target.peak_flops, target.hbm_bytes_per_sec, pallas_gpu.declared_cost
        )
        if "flops" not in analysis:
            analysis = {"flops": own["flops"], "bytes accessed": own["bytes"]}
        analysis["roofline_seconds"] = own["seconds"]
        costs.append(analysis)
        texts.append(text)
    n_layers = config.model.n_layers

    def per_step(key: str) -> float | None:
        if key not in costs[0]:
            return None
        layer = costs[1][key] - costs[0][key]
        return costs[0][key] - layer + n_layers * layer

    global_config = with_global_batch(config, len(target.devices))
    B, N, chips = global_config.train.batch_size, config.model.segment_length, len(target.devices)
    flops, hbm_bytes, seconds = (
        per_step("flops"),
        per_step("bytes accessed"),
        per_step("optimal_seconds"),
    )
    per_operation = per_step("roofline_seconds")
    model_flops = train_flops_per_token(ModelConfig.from_config(config.model), B) * B * N / chips
    whole_step_roofline = (
        max(flops / target.peak_flops, hbm_bytes / target.hbm_bytes_per_sec)
        if target.peak_flops and hbm_bytes
        else None
    )
    # XLA's step time is its own model of the chip; where it is missing, not positive (large
    # programs overflow it) or below half the roofline, the roofline of XLA's own FLOPs and bytes
    # stands in, and `step_seconds_from` says which.
    plausible = (
        seconds is not None
        and all(c.get("optimal_seconds", 0) > 0 for c in costs)
        and (whole_step_roofline is None or seconds >= 0.5 * whole_step_roofline)
    )
    estimate = {
        "label": ESTIMATE_LABEL if seconds is not None else ROOFLINE_LABEL,
        "method": ESTIMATE_METHOD,
        "xla_flops_per_step": flops,
        "model_flops_per_step": model_flops,
        "xla_over_model_flops": flops / model_flops,
        # With remat the excess is the recomputed forward; without, the non-matmul work.
        "excess_flops_per_step": flops - model_flops,
        "excess_flops_are": (
            "recomputation (model.remat=" + config.model.remat + ") and non-matmul work"
            if config.model.remat != "none"
            else "non-matmul work (no remat)"
        ),
        "hbm_bytes_per_step": hbm_bytes,
        "arithmetic_intensity": flops / hbm_bytes if hbm_bytes else None,
        "xla_optimal_seconds_per_step": seconds,
        "roofline_step_seconds": whole_step_roofline,
        # ctx.roofline: per operation, so a memory-bound op and a compute-bound one both count.
        "per_operation_roofline_seconds_per_step": per_operation,
        "per_operation_roofline_over_xla": per_operation / seconds if seconds else None,
        # Without XLA's model (GPUs) the per-operation roofline; where XLA's is implausible, the
        # whole step's roofline of XLA's own FLOPs and bytes.
        "step_seconds": seconds
        if plausible
        else whole_step_roofline
        if seconds is not None
        else per_operation,
        "step_seconds_from": (
            "xla_optimal_seconds"
            if plausible
            else "roofline"
            if seconds is not None
            else "per_operation_roofline"
        ),
        # Where the bytes go: the one-layer step's largest operations (a layer's repeat per layer).
        "largest_by_bytes": largest_by_bytes(texts[0], layers=n_layers),
    }
    step = estimate["step_seconds"]
    estimate["tokens_per_sec_per_chip"] = B * N / chips / step if step else None
    if target.peak_flops:
        ridge = target.peak_flops / target.hbm_bytes_per_sec
        estimate["ridge_flops_per_byte"] = ridge
        estimate["bound"] = "memory" if estimate["arithmetic_intensity"] < ridge else "compute"
        estimate["mfu"] = model_flops / step / target.peak_flops if step else None
    return estimate


def _fit_for_gpu(config: ml_collections.ConfigDict, target: Target) -> dict[str, Any]:
    """`fit` for a GPU without one: the cuDNN attention needs cuDNN on this machine to be traced
    and compiled, and where it cannot be, that is the user's one line."""
    if (
        resolve_attention(
            ModelConfig.from_config(config.model), "gpu", target.devices[0].device_kind
        ).attention_impl
        != "cudnn"
    ):
        return fit(config, target)
    if not cudnn_found():
        raise InputError(
            f"model.attention_impl='cudnn' cannot be compiled for {target.gpu.name} here: cuDNN not "
            "found (pip install nvidia-cudnn-cu12 beside the CUDA plugin); compile "
            "attention_impl='pallas_gpu' or 'xla' instead"
        )
    try:
        return fit(config, target)
    except Exception as error:  # noqa: BLE001 - XLA's and cuDNN's own errors, as one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"model.attention_impl='cudnn' cannot be compiled for {target.gpu.name} on this machine "
            f"({first[:300]}); compile attention_impl='pallas_gpu' or 'xla' instead"
        ) from None


def attention_kernels(cfg: ModelConfig, target: Target, rows: int = 2) -> list[dict[str, Any]]:
    """The GPU attention's kernels at the config's layout (forward, the evicted keys' usage
    where most_used asks for it, both backward), compiled for the target's first GPU: what
    each asks of the GPU (ctx.kernel_resources). `rows` batch rows; the resources do not
    depend on them, nor on the heads."""
    p = Problem.of(dataclasses.replace(cfg, attention_impl="pallas_gpu"))
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(target.devices[:1], ("x",)), jax.sharding.PartitionSpec()
    )
    shapes = [
        (cfg.n_heads, rows, p.n_queries, p.head_dim),
        (cfg.n_heads, p.head_dim),
        (cfg.n_heads, rows, p.n_keys, p.head_dim),
        (cfg.n_heads, rows, p.n_keys, p.head_dim),
        (cfg.n_heads, 2 if p.n_cmem else 1, p.head_dim),
        (cfg.n_heads, p.table_rows, p.head_dim),
    ]
    abstract = [
        jax.ShapeDtypeStruct(shape, jnp.dtype(p.dtype), sharding=sharding) for shape in shapes
    ]
    abstract.append(jax.ShapeDtypeStruct((rows, p.n_keys), jnp.bool_, sharding=sharding))

    def loss(*args):
        out, _, usage = flash_attention(
            pallas_gpu.KERNELS,
            AttentionOperands(*args),
            p.n_cmem,
            p.n_mem,
            p.usage_keys,
            p.dropout,
            jnp.int32(7),
        )
        return jnp.sum(out.astype(jnp.float32)), usage

    lowered = (
        jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
        .trace(*abstract)
        .lower(lowering_platforms=("cuda",))
    )
    return target.compile_with_kernels(lowered)[1] or []


def attention_kernel_lines(cfg: ModelConfig, target: Target) -> list[str]:
    """What a GPU run's log says of its Pallas kernels: one line each, and a warning for each
    spill or limit; nothing where the attention is not pallas_gpu or the GPU is not one ctx knows."""
    if cfg.attention_impl != "pallas_gpu" or target.gpu is None:
        return []
    return kernel_resources.report_lines(attention_kernels(cfg, target), target.gpu.model)


def largest_fitting_batch(
    config: ml_collections.ConfigDict,
    target: Target,
    per_chip: int,
    fits: bool,
    max_compiles: int = 6,
) -> dict[str, Any]:
    """Bisection over the per-chip batch (doubling first when the given one fits); each try
    is one full compile. Returns the largest batch that fitted (0: none) and the tries."""
    low, high = (per_chip, None) if fits else (0, per_chip)
    tries = []
    while len(tries) < max_compiles and (high is None or high - low > 1):
        candidate = low * 2 if high is None else (low + high) // 2
        result = fit(variant(config, **{"train.per_device_batch_size": candidate}), target)
        tries.append(
            {
                "per_chip_batch": candidate,
                "fits": bool(result["fits"]),
                "memory_gib": result["per_device_memory_estimate_gib"],
            }
        )
        low, high = (candidate, high) if result["fits"] else (low, candidate)
    return {
        "largest_fitting_per_chip_batch": low,
        "exact": high is not None and high - low <= 1,
        "batch_search": tries,
    }


def compile_report(
    config: ml_collections.ConfigDict,
    topology: str | None = None,
    search_batch: bool = False,
    estimate: bool = True,
) -> dict[str, Any]:
    """Compile the training chunk ahead of time for the local devices or a TPU slice
    (`topology`: v5p-256, v5litepod-16, v5p:4x4x8, ...) and report memory, fit and XLA's
    cost estimate per chip (module docstring)."""
    validate(config)
    target = Target.named(topology) if topology else Target.local()
    result = _fit_for_gpu(config, target) if target.gpu else fit(config, target)
    trainer = result.pop("trainer")
    chips = trainer.mesh.size
    per_chip = trainer.config.train.batch_size // chips
    report = {
        "platform": target.platform,
        "devices": chips,
        "mesh": dict(trainer.mesh.shape),
        "segments_per_call": trainer.config.train.segments_per_call,
        "batch_size": trainer.config.train.batch_size,
        "per_chip_batch": per_chip,
        "chip": target.devices[0].device_kind,
        # model.attention_impl as compiled: 'auto' resolved for the target's chips, not this host
        "attention": trainer.model_config.attention_impl,
        **(
            {"topology": target.slice.topology, "accelerator_type": target.slice.accelerator_type}
            if target.slice
            else {}
        ),
        **({"topology": target.gpu.name} if target.gpu and target.compile_only else {}),
        **({"gpu": target.gpu.describe()} if target.gpu else {}),
        "hbm_gib": target.hbm_gib,
        **result,
        "headroom_gib": (
            target.hbm_gib - result["per_device_memory_estimate_gib"]
            if result["per_device_memory_estimate_gib"] is not None and target.hbm_gib
            else None
        ),
    }
    if search_batch:
        report.update(largest_fitting_batch(config, target, per_chip, bool(result["fits"])))
    if target.gpu:
        report["kernel_problems"] = kernel_resources.problems(
            result["kernels"] or [], target.gpu.model
        )
    # The estimate needs a chip's figures (TPU: XLA's cost model; GPU: the roofline) and a program that fits.
    report["estimate"] = (
        cost_estimate(config, target) if estimate and target.peak_flops and result["fits"] else None
    )
    report["estimated_mfu"] = (report["estimate"] or {}).get("mfu")
    return report


def summary(report: dict[str, Any]) -> str:
    """Two or three lines for a person; the JSON line carries everything."""
    where = report.get("accelerator_type") or (
        report["gpu"]["gpu"] + f" ({report['chip']})"
        if "gpu" in report
        else f"{report['devices']} {report['platform']} device(s)"
    )
    if report["oom"]:
        oom = report["oom"]
        lines = [
            f"{where}: does NOT fit at per-chip batch {report['per_chip_batch']}: {oom['message']}"
        ]
        if "guess_per_chip_batch" in oom and "largest_fitting_per_chip_batch" not in report:
            lines.append(
                f"try a per-chip batch of at most {oom['guess_per_chip_batch']} "
                "(--config.train.per_device_batch_size; --search_batch finds the largest that fits)"
            )
    elif report["per_device_memory_estimate_gib"] is not None:
        hbm = f" of {report['hbm_gib']:.2f} GiB" if report["hbm_gib"] else ""
        verdict = "fits" if report["fits"] else "does NOT fit"
        lines = [
            f"{where}: {verdict} at per-chip batch {report['per_chip_batch']}: "
            f"{report['per_device_memory_estimate_gib']:.2f} GiB per chip{hbm}"
        ]
    else:
        lines = [f"{where}: compiled; the backend reports no memory analysis"]
    lines[0] += f" ({report['attention']} attention)"
    if "largest_fitting_per_chip_batch" in report:
        bound = "" if report["exact"] else " (at least; more compiles would tell)"
        lines.append(
            f"largest per-chip batch that fits: {report['largest_fitting_per_chip_batch']}{bound}"
        )
    e = report.get("estimate")
    if e and e["step_seconds"]:
        lines.append(
            f"{e['label']} ({e['step_seconds_from'].replace('_', ' ')}): "
            f"{e['step_seconds'] * 1e3:.1f} ms per step, "
            f"{e['tokens_per_sec_per_chip']:,.0f} tokens/s per chip, MFU {e['mfu']:.1%}, "
            f"{e['arithmetic_intensity']:.0f} FLOP/byte (ridge {e['ridge_flops_per_byte']:.0f})"
        )
    if report.get("kernels"):
        lines.extend(
            kernel_resources.report_lines(
                report["kernels"], gpu_topology.resolve(report["gpu"]["gpu"]).model
            )
        )
    return "\n".join(lines)
