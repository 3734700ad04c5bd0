"""Plots a person would rather look at than read (matplotlib, headless)."""
from __future__ import annotations

from typing import Any, Sequence


def plot_loss_by_position(reports: Sequence[dict[str, Any]], path: str, labels: Sequence[str] | None = None) -> None:
    """Mean NLL against token position in the document (log x), one line per report.

    Overlaying a Compressive Transformer and a Transformer-XL report shows where the
    compressed memory pays off: late in long documents.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, report in enumerate(reports):
        buckets = report["by_position"]
        x = [max(b["start"], 1) * (2 ** 0.5) if b["end"] - b["start"] > 1 else max(b["start"], 0.7) for b in buckets]
        label = labels[i] if labels else _label(report)
        ax.plot(x, [b["mean_nll"] for b in buckets], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("token position in document (log-spaced buckets)")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title(f"Loss by position — {reports[0].get('split', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(report: dict[str, Any]) -> str:
    model = report.get("model", {})
    kind = "TXL" if model.get("compressed_length", 1) == 0 else "CT"
    return (f"{kind} n_m={model.get('memory_length')} n_cm={model.get('compressed_length')} "
            f"step {report.get('step')}")
