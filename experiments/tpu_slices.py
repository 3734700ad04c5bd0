"""Every paper config on the TPU slice it is meant for, or on an H100 and an A100, compiled ahead
of time on this machine.

    python -m experiments.tpu_slices [--output=docs/tpu_slices.json]    # needs libtpu: pip install -e '.[tpu]'
    python -m experiments.tpu_slices --gpus [--output=docs/gpus.json]  # pip install -e '.[gpu-compile]'

Each row is what `python -m ctx.train --config=CONFIG --compile_only --topology=TARGET`
reports (ctx.aot): GiB per chip against the chip's memory, and the cost estimate of tokens/s and
MFU per chip (XLA's cost model on TPUs, ctx.roofline on GPUs), an estimate, not a measurement;
for GPUs also the Pallas kernels' registers and spills. Prints a Markdown table.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

from absl import app, flags

from ctx import aot

# (config, slice): the global batch of each config on a slice whose chips share it evenly.
ROWS = [
    ("experiments/pg19.py", "v5p-256"),
    ("experiments/pg19.py:txl", "v5p-256"),
    ("experiments/wt103.py", "v6e-64"),
    ("experiments/wt103.py:txl", "v6e-64"),
    ("experiments/enwik8.py", "v5litepod-64"),
    ("experiments/enwik8.py:txl", "v5litepod-64"),
]

# (config, GPU, fields): one GPU of a node (a global batch of 512 is many GPUs' worth) at a
# per-GPU batch of 32, with the attention `auto` picks there (the Pallas kernel).
GPU_FIELDS = {"train.per_device_batch_size": 32, "model.attention_impl": "auto"}
GPU_ROWS = [
    (config, gpu, GPU_FIELDS)
    for config in ("experiments/pg19.py", "experiments/wt103.py", "experiments/enwik8.py")
    for gpu in ("h100", "a100-80gb")
]

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "", "Also write the reports as JSON here.")
flags.DEFINE_multi_string("row", [], "CONFIG@SLICE rows to compile instead of the paper's six.")
flags.DEFINE_bool(
    "gpus", False, "Compile the paper configs for one H100 and one A100 (GPU_ROWS) instead."
)


def load_config(path: str):
    """experiments/NAME.py[:variant] -> that file's get_config(variant)."""
    file, _, variant = path.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return module.get_config(variant) if variant else module.get_config()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config | target (chips) | global batch (per chip) | fits | GiB per chip / HBM | "
        "est. tokens/s per chip | est. MFU | kernels: most registers, spilled bytes | compile here (s) | "
        "command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["report"]
        e = r["estimate"] or {}
        gib = (
            f"{r['per_device_memory_estimate_gib']:.1f} / {r['hbm_gib']:.1f}"
            if r["per_device_memory_estimate_gib"] is not None
            else f"needs {r['oom'].get('required_gib', float('nan')):.1f} / {r['hbm_gib']:.1f}"
        )
        tokens = f"{e['tokens_per_sec_per_chip']:,.0f}" if e.get("tokens_per_sec_per_chip") else "—"
        mfu = f"{r['estimated_mfu']:.1%}" if r["estimated_mfu"] else "—"
        kernels = r.get("kernels") or []
        registers = "—"
        if kernels:
            spilled = sum(k.get("spill_store_bytes", 0) for k in kernels)
            registers = f"{max(k.get('registers', 0) for k in kernels)}, {spilled}"
        fields = "".join(
            f" --config.{key}={value}" for key, value in (row.get("fields") or {}).items()
        )
        fits = "yes" if r["fits"] else "**no**"
        lines.append(
            f"| `{row['config'].removeprefix('experiments/')}` | "
            f"{r.get('accelerator_type') or r['topology']} ({r['devices']}) | {r['batch_size']} "
            f"({r['per_chip_batch']}) | {fits} | {gib} | {tokens} | {mfu} | {registers} | "
            f"{row['seconds']:.0f} | `python -m ctx.train --config={row['config']} --compile_only "
            f"--topology={row['slice']}{fields}` |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    rows = [(*r.split("@"), None) for r in FLAGS.row] or (
        GPU_ROWS if FLAGS.gpus else [(*r, None) for r in ROWS]
    )
    results = []
    for config_path, target, fields in rows:
        start = time.perf_counter()
        report = aot.compile_report(aot.variant(load_config(config_path), **(fields or {})), target)
        results.append(
            {
                "config": config_path,
                "slice": target,
                "fields": fields,
                "report": report,
                "seconds": time.perf_counter() - start,
            }
        )
        print(aot.summary(report), file=sys.stderr, flush=True)
        if FLAGS.output:
            with open(FLAGS.output, "w") as f:
                json.dump(results, f, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
