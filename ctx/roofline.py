"""A roofline estimate of a compiled program, for chips whose compiler gives no cost model
(XLA:GPU's `cost_analysis()` returns None) and beside XLA's own model on TPUs: each operation
XLA launches costs the larger of its FLOPs at the chip's peak and its HBM bytes at the chip's
bandwidth, and a step is their sum. `operations` also tells where the bytes go.

What an operation costs is read off the compiled HLO: its bytes are its operands read plus its
results written (what XLA's own analysis counts as bytes accessed; inside a fusion nothing
reaches HBM), its FLOPs those of the dots and convolutions it holds (elementwise work is left
to the bytes, which bound it). A Pallas kernel is opaque to XLA: its cost is what the kernel
declares (a Mosaic kernel's pl.CostEstimate, in its backend config; for Triton kernels
`declared_cost(name, operands)`, from the operands' shapes). It is an estimate, not a
measurement: no overlap of operations, no launch latency, peak rates.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_ARRAY = re.compile(
    r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](?:\{([\d,]*)(?::[^}]*?T\(([\d,]+)\))?)?"
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{$")
# Operations that move no data of their own.
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
    "copy-done",
    "all-reduce-done",
    "all-gather-done",
    "collective-permute-done",
    "async-done",
    "opt-barrier",
}
# A Triton kernel's (FLOPs, bytes) from its name and operands' (itemsize, shape); None: unknown.
DeclaredCost = Callable[[str, list[tuple[int, tuple[int, ...]]]], tuple[float, float] | None]


def _stored(dims: tuple[int, ...], minor_to_major: str, tile: str) -> tuple[int, ...]:
    """The dimensions as memory holds them: a tiled layout (TPU's T(8,128)) pads the most
    minor dimensions to whole tiles, and those bytes move too."""
    if not tile or not minor_to_major:
        return dims
    stored = list(dims)
    for axis, size in zip(
        (int(a) for a in minor_to_major.split(",")), reversed([int(t) for t in tile.split(",")])
    ):
        stored[axis] = -(-stored[axis] // size) * size
    return tuple(stored)


def _arrays(text: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(dtype, dimensions, dimensions as stored) of each array in an HLO shape."""
    found = []
    for dtype, dims, minor_to_major, tile in _ARRAY.findall(text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        found.append((dtype, shape, _stored(shape, minor_to_major, tile)))
    return found


def _bytes(arrays: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> int:
    return sum(_BYTES[dtype] * math.prod(stored) for dtype, _, stored in arrays)


def _parse(hlo_text: str) -> dict[str, list[dict[str, Any]]]:
    """Computations by name, each a list of instructions (name, result arrays, opcode, operands, rest)."""
    computations: dict[str, list[dict[str, Any]]] = {}
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            header = _COMPUTATION.match(line)
            current = computations.setdefault(header.group(1), []) if header else None
            if header and line.startswith("ENTRY"):
                computations["__entry__"] = current
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, result, opcode, operands, rest = match.groups()
            names = [o.strip().split(" ")[-1].lstrip("%") for o in operands.split(",") if o.strip()]
            current.append(
                {
                    "name": name,
                    "result": _arrays(result),
                    "opcode": opcode,
                    "rest": rest,
                    "operands": names,
                }
            )
    return computations


def _dot_flops(instruction: dict[str, Any], shapes: dict[str, list]) -> float:
    """2 x output elements x contracted size, for a dot or a cuBLAS GEMM call."""
    out = math.prod(instruction["result"][0][1]) if instruction["result"] else 0
    lhs = shapes.get(instruction["operands"][0], [])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction["rest"]) or re.search(
        r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction["rest"]
    )
    if not lhs or contracting is None:
        return 0.0
    dims = [int(d.strip('" ')) for d in contracting.group(1).split(",") if d.strip('" ')]
    return 2.0 * out * math.prod(lhs[0][1][d] for d in dims)


def _window_hits(out_size: int, in_size: int, size: int, pad_low: int, stride: int) -> int:
    """(output position, window position) pairs of one spatial dimension that read an input
    element, not padding: XLA writes batch dimensions of a dot as padded windows this way."""
    return sum(
        1 for o in range(out_size) for w in range(size) if 0 <= o * stride + w - pad_low < in_size
    )


def _convolution_flops(instruction: dict[str, Any], shapes: dict[str, list]) -> float:
    """2 x output batch x output features x input features x the window positions that read
    input (TPU compilers write dots as convolutions, their batch dimensions as windows)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction["rest"])
    lhs, rhs = (shapes.get(name, [(None, ())])[0][1] for name in instruction["operands"][:2])
    if labels is None or not lhs or not rhs:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    out = instruction["result"][0][1]
    window = re.search(r"window=\{([^}]*)\}", instruction["rest"])
    fields = dict(item.split("=") for item in window.group(1).split()) if window else {}
    spatial = sorted(c for c in out_labels if c.isdigit())
    sizes = [int(x) for x in fields.get("size", "x".join("1" * len(spatial))).split("x")]
    pads = (
        [int(p.split("_")[0]) for p in fields["pad"].split("x")]
        if "pad" in fields
        else [0] * len(spatial)
    )
    strides = (
        [int(x) for x in fields["stride"].split("x")] if "stride" in fields else [1] * len(spatial)
    )
    hits = math.prod(
        _window_hits(out[out_labels.index(d)], lhs[lhs_labels.index(d)], size, pad, stride)
        for d, size, pad, stride in zip(spatial, sizes, pads, strides)
    )
    return (
        2.0
        * out[out_labels.index("b")]
        * out[out_labels.index("f")]
        * rhs[rhs_labels.index("i")]
        * hits
    )


def _in_config_cost(rest: str) -> tuple[float, float] | None:
    """(flops, bytes) a Pallas TPU call declares in its backend config, or None."""
    found = re.search(
        r'cost_estimate\\?":\{\\?"flops\\?":\\?"?(\d+).*?bytes_accessed\\?":\\?"?(\d+)', rest
    )
    return (float(found.group(1)), float(found.group(2))) if found else None


def _called(instruction: dict[str, Any]) -> list[str]:
    return re.findall(
        r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)",
        instruction["rest"],
    )


def operations(hlo_text: str, declared_cost: DeclaredCost | None = None) -> list[dict[str, Any]]:
    """The operations a compiled program launches (fused computations' insides are not
    operations of their own), each with its FLOPs, HBM bytes and the source op that made it."""
    computations = _parse(hlo_text)
    inner = {
        called
        for body in computations.values()
        for i in body
        if i["opcode"]
        in (
            "fusion",
            "reduce",
            "reduce-window",
            "scatter",
            "sort",
            "map",
            "select-and-scatter",
            "all-reduce",
            "reduce-scatter",
        )
        for called in _called(i)
    }
    shapes = {i["name"]: i["result"] for body in computations.values() for i in body}

    def fused_flops(name: str) -> float:
        total = 0.0
        for i in computations.get(name, []):
            if i["opcode"] == "dot":
                total += _dot_flops(i, shapes)
            elif i["opcode"] == "convolution":
                total += _convolution_flops(i, shapes)
            elif i["opcode"] == "fusion":
                total += sum(fused_flops(c) for c in _called(i))
        return total

    found = []
    for name, body in computations.items():
        if name == "__entry__" or name in inner:
            continue
        for i in body:
            if i["opcode"] in _FREE or i["opcode"] in ("while", "conditional", "call"):
                continue
            operands = [a for o in i["operands"] for a in shapes.get(o, [])]
            moved, flops, source = _bytes(operands) + _bytes(i["result"]), 0.0, "hlo"
            if i["opcode"] == "dot":
                flops = _dot_flops(i, shapes)
            elif i["opcode"] == "convolution":
                flops = _convolution_flops(i, shapes)
            elif i["opcode"] == "fusion":
                flops = sum(fused_flops(c) for c in _called(i))
            elif i["opcode"] == "custom-call":
                kernel = re.search(r'\bname = \\?"(\w+)\\?"', i["rest"])
                declared = _in_config_cost(i["rest"])  # Mosaic kernels carry their pl.CostEstimate
                if declared is None and kernel and declared_cost:
                    declared = declared_cost(
                        kernel.group(1), [(_BYTES[t], dims) for t, dims, _ in operands]
                    )
                if declared is not None:
                    (flops, moved), source = declared, "declared"
                elif 'custom_call_target="__cublas' in i["rest"]:  # cuBLAS GEMMs
                    flops = _dot_flops(i, shapes)
            op_name = re.search(r'op_name="([^"]*)"', i["rest"])
            found.append(
                {
                    "name": i["name"],
                    "opcode": i["opcode"],
                    "flops": flops,
                    "bytes": moved,
                    "cost_from": source,
                    "op_name": op_name.group(1) if op_name else "",
                }
            )
    return found


def program_cost(
    hlo_text: str,
    peak_flops: float,
    bytes_per_sec: float,
    declared_cost: DeclaredCost | None = None,
) -> dict[str, Any]:
    """FLOPs, bytes and roofline seconds of a loop-free compiled program, summed over the
    operations XLA launches; `operations` lists each with its cost, largest time first."""
    ops = [
        {**o, "seconds": max(o["flops"] / peak_flops, o["bytes"] / bytes_per_sec)}
        for o in operations(hlo_text, declared_cost)
    ]
    ops.sort(key=lambda o: -o["seconds"])
    return {
        "flops": sum(o["flops"] for o in ops),
        "bytes": sum(o["bytes"] for o in ops),
        "seconds": sum(o["seconds"] for o in ops),
        "operations": ops,
    }
