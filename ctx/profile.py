"""Where a compiled step spends its time: a jax.profiler trace summed by source operation.

`python -m ctx.bench ... --trace_dir=DIR` traces one training chunk and writes
DIR/op_time.json. Each traced HLO instruction (a fusion, a GEMM, a copy) is mapped, through the
compiled program's metadata, to the JAX operation that produced it (for example
`layers/attention/bnhk,bthk->bhnt/dot_general`), split into forward and backward (the
backward is what JAX's transpose generated), and summed per process of the trace (host
threads on CPUs; the device stream on GPUs, where host events are only launches).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any

from ctx.errors import MissingInput

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", re.MULTILINE
)
_CALLER = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?calls=%?([\w.\-]+)", re.MULTILINE)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}", re.MULTILINE | re.DOTALL)
_WRAPPER = re.compile(
    r"^(while|body|cond|closed_call|eval_jaxpr|checkpoint|rematted_computation|"
    r"(jit|jvp|transpose|vmap|remat)\(.*\))$"
)
# Flax names a call of a module's method `module.method` (`layers.segment`, `attention._residual`;
# the root module by its class): ops are named by the modules that own them (`layers/attention/...`).
_METHOD_FRAME = re.compile(r"^([A-Za-z_]\w*)\.\w+$")


def _source_path(op_name: str) -> str:
    parts: list[str] = []
    for part in op_name.split("/"):
        if _WRAPPER.match(part):
            continue
        frame = _METHOD_FRAME.match(part)
        if frame:
            if frame.group(1)[0].isupper():  # the root module
                continue
            part = frame.group(1)
        if not parts or parts[-1] != part:
            parts.append(part)
    return "/".join(parts)


def instruction_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'F ' or 'B ' + the JAX op path without call wrappers. A fusion
    without metadata of its own takes that of its fused computation's root. GPU kernels are
    named after their fusion with '_' for '.', so both spellings are keys."""
    op_names = dict(_INSTRUCTION.findall(hlo_text))
    for computation, body in _COMPUTATION.findall(hlo_text):
        root = re.search(r"^\s*ROOT [^\n]*?op_name=\"([^\"]*)\"", body, re.MULTILINE)
        if root:
            op_names.setdefault(computation, root.group(1))
    for caller, computation in _CALLER.findall(hlo_text):
        if computation in op_names:
            op_names.setdefault(caller, op_names[computation])
    sources = {}
    for name, op_name in op_names.items():
        direction = "B " if "transpose(jvp(" in op_name else "F "
        sources[name] = sources[name.replace(".", "_")] = direction + (
            _source_path(op_name) or "(loop or call plumbing)"
        )
    return sources


def load_trace_events(trace_dir: str) -> tuple[list[dict], dict[int, str]]:
    """Complete ('X') events of the newest perfetto trace under trace_dir, and process names."""
    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise MissingInput(
            f"no *.trace.json.gz under {trace_dir} (was the trace made with "
            "create_perfetto_trace=True?)"
        )
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    names = {
        e["pid"]: e.get("args", {}).get("name", str(e["pid"]))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return [e for e in events if e.get("ph") == "X"], names


def summarize(
    events: list[dict],
    process_names: dict[int, str],
    sources: dict[str, str],
    steps: int,
    top: int = 40,
) -> dict[str, Any]:
    """Per process: milliseconds per step by source op, for events that name an HLO instruction
    (a loop's own event spans its body, so 'while' ops overlap the rest), and the events that
    name none (runtime work, library kernels) by their own name."""
    mapped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unmapped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in events:
        args = event.get("args", {})
        instruction = args.get("hlo_op") or event["name"]
        process = process_names.get(event["pid"], str(event["pid"]))
        source = sources.get(instruction)
        if source is not None:
            mapped[process][source] += event["dur"] / 1e3 / steps
        else:
            unmapped[process][event["name"][:120]] += event["dur"] / 1e3 / steps

    def rows(times):
        return [{"op": op, "ms": ms} for op, ms in times.most_common(top)]

    return {
        process: {
            "total_ms_per_step": sum(mapped[process].values()),
            "top_ms_per_step": rows(mapped[process]),
            "unmapped_ms_per_step": rows(unmapped[process]),
        }
        for process in set(mapped) | set(unmapped)
    }


def write_summary(trace_dir: str, hlo_text: str, steps: int) -> str:
    """Summarize the trace in trace_dir into trace_dir/op_time.json; returns its path."""
    events, process_names = load_trace_events(trace_dir)
    summary = summarize(events, process_names, instruction_sources(hlo_text), steps)
    path = os.path.join(trace_dir, "op_time.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return path
