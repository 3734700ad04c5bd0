"""The small reproduction suite's outputs: results.json, results.md and the plots."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from ctx.plots import plot_loss_by_position


def _pm(stats: dict[str, float], digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def recall_markdown(recall: dict[str, Any]) -> list[str]:
    ct, txl = recall["ct"], recall["txl"]
    describe = {
        v: "n_m={memory_length}, n_cm={compressed_length}, c={compression_rate}".format(
            **recall[v]["model"]
        )
        for v in ("ct", "txl")
    }
    lines = [
        f"CT ({describe['ct']}) against TXL ({describe['txl']}), one layer, n_s = "
        f"{ct['model']['segment_length']}; accuracy at the query positions (chance "
        f"{recall['chance_accuracy']:.3f}), mean ± std over {ct['rows'][0]['accuracy']['n']} seeds.",
        "",
        "| episode (segments) | payload distance k | CT accuracy | TXL accuracy | in CT reach | in TXL reach |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(ct["rows"], txl["rows"]):
        lines.append(
            f"| {a['segments']} | {a['k_min']}–{a['k_max']} | {_pm(a['accuracy'], 2)} | "
            f"{_pm(b['accuracy'], 2)} | {'yes' if a['reachable'] else 'no'} | "
            f"{'yes' if b['reachable'] else 'no'} |"
        )
    return lines


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), count and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def paired_difference(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """row - reference, seed by seed: seed s trains on the same data order in every entry, so the
    paired difference removes the seed-to-seed spread that the plain std still carries."""
    return mean_std(
        [
            a - b
            for a, b in zip(row["bits_per_byte"]["values"], reference["bits_per_byte"]["values"])
        ]
    )


def ablation_markdown(rows: list[dict[str, Any]]) -> list[str]:
    reference = next((r for r in rows if r["compression"] == "txl"), None)
    lines = [
        f"Validation bits/byte on the demo corpus, mean ± std over {rows[0]['bits_per_byte']['n']} seeds "
        "(lower is better)"
        + (
            "; the last column is the difference to Transformer-XL paired by seed "
            "(negative: compression helps)."
            if reference
            else "."
        ),
        "",
        "| compression | compression loss | bits/byte |"
        + (" − TXL, paired |" if reference else ""),
        "|---|---|---|" + ("---|" if reference else ""),
    ]
    for row in sorted(rows, key=lambda r: r["bits_per_byte"]["mean"]):
        name = (
            "Transformer-XL (no compression)" if row["compression"] == "txl" else row["compression"]
        )
        loss = "-" if row["compression"] == "txl" else row["loss"]
        paired = f" {_pm(paired_difference(row, reference), 4)} |" if reference else ""
        lines.append(f"| {name} | {loss} | {_pm(row['bits_per_byte'], 4)} |{paired}")
    return lines


def prose_markdown(prose: dict[str, Any]) -> list[str]:
    lines = [
        "| model | n_m | n_cm | c | steps | validation bits/byte (seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in ("ct", "txl"):
        p = prose[variant]
        lines.append(
            f"| {variant.upper()} | {p['memory_length']} | {p['compressed_length']} | "
            f"{p['compression_rate'] if p['compressed_length'] else '-'} | {p['steps']} | "
            f"{_pm(p['bits_per_byte'], 4)} ({p['bits_per_byte']['n']}) |"
        )
    diff = paired_difference(prose["ct"], prose["txl"])
    lines += [
        "",
        f"CT − TXL, paired by seed: {_pm(diff, 4)} bits/byte over {diff['n']} seed(s) "
        "(negative: the compressed memory helps).",
    ]
    return lines


def range_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| config | l | n_s | n_m | n_cm | c | derived | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['layers']} | {r['segment_length']} | {r['memory_length']} | "
            f"{r['compressed_length']} | {r['compression_rate']} | {r['derived']} | {r['measured']} |"
        )
    return lines


def plot_recall(recall: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, label in (("ct", "Compressive Transformer"), ("txl", "Transformer-XL")):
        rows = recall[variant]["rows"]
        x = [(r["k_min"] + r["k_max"]) / 2 for r in rows]
        ax.errorbar(
            x,
            [r["accuracy"]["mean"] for r in rows],
            yerr=[r["accuracy"]["std"] for r in rows],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.axhline(recall["chance_accuracy"], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("distance from payload to query k (tokens)")
    ax.set_ylabel("recall accuracy")
    ax.set_title("Recall at equal attention length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["bits_per_byte"]["mean"])
    labels = [
        "TXL" if r["compression"] == "txl" else f"{r['compression']}\n{r['loss']}" for r in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.bar(
        range(len(rows)),
        [r["bits_per_byte"]["mean"] for r in rows],
        yerr=[r["bits_per_byte"]["std"] for r in rows],
        capsize=4,
        color="tab:blue",
        alpha=0.8,
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    low = min(r["bits_per_byte"]["mean"] - r["bits_per_byte"]["std"] for r in rows)
    high = max(r["bits_per_byte"]["mean"] + r["bits_per_byte"]["std"] for r in rows)
    ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
    ax.set_ylabel("validation bits/byte")
    ax.set_title("Compression function × loss (Table 5 at tiny scale)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], output_dir: str) -> None:
    hw = results["hardware"]
    lines = [
        f"# Small-scale reproduction ({results['scale']} scale)",
        "",
        f"Hardware: {hw['cpu_count']} CPU cores ({hw['processor']}), JAX {hw['jax']} on {hw['backend']}; "
        f"wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    if "recall" in results:
        lines += (
            ["## Long-range recall", ""]
            + recall_markdown(results["recall"])
            + ["", "![recall](recall.png)", ""]
        )
        plot_recall(results["recall"], os.path.join(output_dir, "recall.png"))
    if "ablation" in results:
        lines += ["## Compression function × loss", ""] + ablation_markdown(results["ablation"])
        lines += ["", "![ablation](ablation.png)", ""]
        plot_ablation(results["ablation"], os.path.join(output_dir, "ablation.png"))
    if "prose" in results:
        prose = results["prose"]
        lines += ["## CT against TXL on prose", ""] + prose_markdown(prose)
        lines += ["", "![loss by position](loss_by_position.png)", ""]
        reports = [
            {"by_position": prose[v]["by_position"], "split": "validation (mean over seeds)"}
            for v in ("ct", "txl")
        ]
        plot_loss_by_position(
            reports,
            os.path.join(output_dir, "loss_by_position.png"),
            labels=[
                f"CT n_m={prose['ct']['memory_length']} n_cm={prose['ct']['compressed_length']}",
                f"TXL n_m={prose['txl']['memory_length']}",
            ],
        )
    if "range" in results:
        lines += (
            [
                "## Temporal range",
                "",
                "Tokens back from the last position of a segment that still change its "
                "logits (measured by perturbing each earlier token), against the derived reach: "
                "n_s - 1 + l(n_m + c n_cm) when n_m + c n_cm is a multiple of n_s "
                "(ctx.diagnostics.derived_temporal_range).",
                "",
            ]
            + range_markdown(results["range"])
            + [""]
        )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
