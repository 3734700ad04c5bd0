"""What each Pallas (Triton) kernel of a compiled GPU program asks of the GPU: registers per
thread and spilled bytes (ptxas on the PTX XLA generated), shared memory and threads per
block (XLA's launch parameters), and how many programs fit on one SM at once.

XLA decides all of these when it compiles, with or without a GPU: a compile dumped to a folder
(`compile_options(dump_dir)`) leaves each kernel's PTX and its launch dimensions there, and
`read(dump_dir, hlo_text, gpu)` turns them into one row per kernel. Spills and more than 1024
threads per block are not refused by the compile (a launch would fail, or run slowly), so
`problems` names them.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from typing import Any

from ctx.gpu_topology import GpuModel, ptxas_path

TRITON_CALL = "__gpu$xla.gpu.triton"
# Registers are handed to warps in units of 256 (8 per thread).
_REGISTER_UNIT = 8
_LAUNCH = re.compile(
    r"kCustomKernel .*?\] (\w+) grid: \[([\d, ]+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
    r"shared_memory: (\d+) bytes"
)


class KernelLimitError(RuntimeError):
    """A kernel the GPU cannot launch: XLA refused it at compile time."""


def refused(error: BaseException, gpu_name: str) -> KernelLimitError | None:
    """XLA's refusal of a kernel over the GPU's shared memory, as one line; None for other errors."""
    found = re.search(
        r"Shared memory size limit exceeded: requested (\d+), available: (\d+)", str(error)
    )
    if found is None:
        return None
    return KernelLimitError(
        f"a kernel asks for {found.group(1)} bytes of shared memory per block and the {gpu_name} "
        f"has {found.group(2)}: its tile or pipeline is too large for this GPU "
        "(ctx.nn.pallas_gpu.compiler_params)"
    )


def compile_options(dump_dir: str) -> dict[str, str]:
    """XLA options that keep a compile's PTX and launch dimensions in `dump_dir`."""
    return {"xla_dump_to": dump_dir}


def triton_kernel_names(hlo_text: str) -> list[str]:
    """The Pallas (Triton) kernels' names in a compiled GPU program, each once."""
    names = []
    for line in hlo_text.splitlines():
        if TRITON_CALL in line:
            match = re.search(r'\bname = \\?"(\w+)\\?"', line)
            if match and match.group(1) not in names:
                names.append(match.group(1))
    return names


def _ptxas(ptx_file: str, arch: str) -> dict[str, int]:
    ptxas = ptxas_path()
    if ptxas is None:
        return {}
    out = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", ptx_file, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=300,
    )
    registers = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    stack = re.search(r"(\d+) bytes stack frame", out.stderr)
    if registers is None or spills is None:
        raise RuntimeError(
            f"ptxas -v on {ptx_file} printed no resource line: {out.stderr.strip()[-300:]}"
        )
    return {
        "registers": int(registers.group(1)),
        "spill_store_bytes": int(spills.group(1)),
        "spill_load_bytes": int(spills.group(2)),
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def programs_per_sm(registers: int, threads: int, shared_memory: int, gpu: GpuModel) -> int:
    """How many of the kernel's programs (thread blocks) one SM holds at once, by registers,
    shared memory and threads."""
    by_registers = gpu.registers_per_core // (
        -(-registers // _REGISTER_UNIT) * _REGISTER_UNIT * threads
    )
    by_shared = gpu.shared_memory_per_core // shared_memory if shared_memory else by_registers
    return max(0, min(by_registers, by_shared, gpu.threads_per_core // threads))


def read(dump_dir: str, hlo_text: str, gpu: GpuModel) -> list[dict[str, Any]]:
    """One row per Pallas kernel of the program compiled into `dump_dir`: launch (grid,
    threads, shared memory), ptxas's registers and spills (None without ptxas), programs per SM."""
    names = triton_kernel_names(hlo_text)
    launches = {}
    for sequence in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
        with open(sequence) as f:
            launched = _LAUNCH.findall(f.read())
        for name, grid, x, y, z, shared in launched:
            launches[name] = {
                "grid": [int(g) for g in grid.split(",")],
                "threads_per_block": int(x) * int(y) * int(z),
                "shared_memory_bytes": int(shared),
            }
    ptx = {}
    for ptx_file in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        with open(ptx_file) as f:
            entry = re.search(r"\.entry (\w+)\(", f.read())
        if entry and entry.group(1) in names and entry.group(1) not in ptx:
            ptx[entry.group(1)] = _ptxas(ptx_file, gpu.ptx_arch)
    rows = []
    for name in names:
        row = {"kernel": name, **launches.get(name, {}), **ptx.get(name, {})}
        if "registers" in row and "threads_per_block" in row:
            row["programs_per_sm"] = programs_per_sm(
                row["registers"], row["threads_per_block"], row["shared_memory_bytes"], gpu
            )
        rows.append(row)
    return rows


def problems(rows: list[dict[str, Any]], gpu: GpuModel) -> list[str]:
    """What would fail or slow a launch on the GPU: spills, too many threads, too much shared memory."""
    found = []
    for row in rows:
        if row.get("spill_store_bytes") or row.get("spill_load_bytes"):
            found.append(f"{row['kernel']}: {row['spill_store_bytes']} bytes of registers spilled")
        if row.get("threads_per_block", 0) > gpu.threads_per_block:
            found.append(
                f"{row['kernel']}: {row['threads_per_block']} threads per block "
                f"(limit {gpu.threads_per_block})"
            )
        if row.get("shared_memory_bytes", 0) > gpu.shared_memory_per_block:
            found.append(
                f"{row['kernel']}: {row['shared_memory_bytes']} bytes of shared memory "
                f"(limit {gpu.shared_memory_per_block})"
            )
    return found


def report_lines(rows: list[dict[str, Any]], gpu: GpuModel) -> list[str]:
    """For a person: a line per kernel, then a warning per spill or exceeded limit."""
    lines = [f"Pallas kernels on {gpu.device_kind} (ptxas and XLA's launch):"]
    for row in rows:
        registers = (
            f"{row['registers']} registers, {row['spill_store_bytes']} B spilled"
            if "registers" in row
            else "registers unknown (no ptxas)"
        )
        lines.append(
            f"  {row['kernel']}: {registers}, {row.get('threads_per_block', '?')} threads, "
            f"{row.get('shared_memory_bytes', 0) / 1024:.0f} KiB shared, "
            f"{row.get('programs_per_sm', '?')} program(s) per SM"
        )
    return lines + [f"warning: {problem}" for problem in problems(rows, gpu)]
