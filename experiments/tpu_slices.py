"""Every paper config on the TPU slice it is meant for, compiled ahead of time on this machine.

    python -m experiments.tpu_slices [--output=docs/tpu_slices.json]    # needs libtpu: pip install -e '.[tpu]'

Each row is what `python -m ctx.train --config=CONFIG --compile_only --topology=SLICE`
reports (ctx.aot): GiB per chip against the chip's HBM, and XLA's cost-model estimate of
tokens/s and MFU per chip, which is an estimate, not a measurement. Prints a Markdown table.
"""
from __future__ import annotations

import importlib
import json
import sys
import time

from absl import app, flags

from ctx import aot

# (config, slice): the global batch of each config on a slice whose chips share it evenly.
ROWS = [("experiments/pg19.py", "v5p-256"), ("experiments/pg19.py:txl", "v5p-256"),
        ("experiments/wt103.py", "v6e-64"), ("experiments/wt103.py:txl", "v6e-64"),
        ("experiments/enwik8.py", "v5litepod-64"), ("experiments/enwik8.py:txl", "v5litepod-64")]

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "", "Also write the reports as JSON here.")
flags.DEFINE_multi_string("row", [], "CONFIG@SLICE rows to compile instead of the paper's six.")


def load_config(path: str):
    """experiments/NAME.py[:variant] -> that file's get_config(variant)."""
    file, _, variant = path.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return module.get_config(variant) if variant else module.get_config()


def markdown(rows: list[dict]) -> str:
    lines = ["| config | slice (chips) | global batch (per chip) | fits | GiB per chip / HBM | "
             "XLA est. tokens/s per chip | XLA est. MFU | compile here (s) | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["report"]
        e = r["estimate"] or {}
        gib = (f"{r['per_device_memory_estimate_gib']:.1f} / {r['hbm_gib']:.1f}" if r["per_device_memory_estimate_gib"]
               is not None else f"needs {r['oom'].get('required_gib', float('nan')):.1f} / {r['hbm_gib']:.1f}")
        tokens = f"{e['tokens_per_sec_per_chip']:,.0f}" if e.get("tokens_per_sec_per_chip") else "—"
        mfu = f"{r['estimated_mfu']:.1%}" if r["estimated_mfu"] else "—"
        lines.append(f"| `{row['config'].removeprefix('experiments/')}` | {r['accelerator_type']} ({r['devices']}) | "
                     f"{r['batch_size']} ({r['per_chip_batch']}) | {'yes' if r['fits'] else '**no**'} | {gib} | "
                     f"{tokens} | {mfu} | {row['seconds']:.0f} | `python -m ctx.train --config={row['config']} "
                     f"--compile_only --topology={row['slice']}` |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    rows = [tuple(r.split("@")) for r in FLAGS.row] or ROWS
    results = []
    for config_path, tpu_slice in rows:
        start = time.perf_counter()
        report = aot.compile_report(load_config(config_path), tpu_slice)
        results.append({"config": config_path, "slice": tpu_slice, "report": report,
                        "seconds": time.perf_counter() - start})
        print(aot.summary(report), file=sys.stderr, flush=True)
        if FLAGS.output:
            with open(FLAGS.output, "w") as f:
                json.dump(results, f, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
