"""Checks of the paper's configurations that need no accelerator.

    python -m experiments.reproduce --suite=configs [--output=configs.json]

`configs`: parameter counts (whole model and compression network) and training FLOPs per
token for the enwik8, WikiText-103 and PG-19 configs and their Transformer-XL variants,
next to the figures the papers give (TXL paper: 277M for 24-layer enwik8, 257M for
18-layer WikiText-103 with a 267K-word adaptive vocabulary; ctx's WT103 config uses a 32k
subword vocabulary, so its count differs by design).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from ctx.flops import parameter_count, train_flops_per_token

PAPER_PARAMETERS = {("enwik8", "txl"): 277e6, ("wt103", "txl"): 257e6}


def config_rows() -> list[dict]:
    rows = []
    for task in ("enwik8", "wt103", "pg19"):
        module = importlib.import_module(f"experiments.{task}")
        for variant in ("ct", "txl"):
            m = module.get_config(variant).model
            counts = parameter_count(m)
            rows.append({"config": f"{task}:{variant}", "layers": m.n_layers, "d_model": m.d_model,
                         "memory": m.memory_length, "compressed": m.compressed_length,
                         "parameters": counts["total"], "compression_parameters": counts["compression"],
                         "train_gflops_per_token": train_flops_per_token(m) / 1e9,
                         "paper_parameters": PAPER_PARAMETERS.get((task, variant))})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | layers | d | n_m / n_cm | parameters | of which compression | paper | train GFLOP/token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_parameters'] / 1e6:.0f}M" if r["paper_parameters"] else "-"
        lines.append(f"| {r['config']} | {r['layers']} | {r['d_model']} | {r['memory']} / {r['compressed']} | "
                     f"{r['parameters'] / 1e6:.1f}M | {r['compression_parameters'] / 1e6:.1f}M | {paper} | "
                     f"{r['train_gflops_per_token']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["configs"], default="configs")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = config_rows()
    print(markdown(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
