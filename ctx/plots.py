"""Plots a person would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from etils import epath

from ctx.nn.memory import KEY_KINDS

# One colour per memory kind in every panel, so one legend can serve several.
KIND_COLORS = {kind: f"C{i}" for i, kind in enumerate(KEY_KINDS)}


def _pyplot(headless: bool = False):
    """matplotlib, imported on first use (it is slow to import and only plots need it); files
    written by the CLI render without a display."""
    import matplotlib

    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_by_position(
    reports: Sequence[dict[str, Any]], path: str, labels: Sequence[str] | None = None
) -> None:
    """Mean NLL against token position in the document (log x), one line per report.

    Overlaying a Compressive Transformer and a Transformer-XL report shows where the
    compressed memory pays off: late in long documents.
    """
    plt = _pyplot(headless=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, report in enumerate(reports):
        buckets = report["by_position"]
        x = [
            max(b["start"], 1) * (2**0.5) if b["end"] - b["start"] > 1 else max(b["start"], 0.7)
            for b in buckets
        ]
        label = labels[i] if labels else _label(report)
        ax.plot(x, [b["mean_nll"] for b in buckets], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("token position in document (log-spaced buckets)")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title(f"Loss by position — {reports[0].get('split', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:  # a local or gs:// path
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _label(report: dict[str, Any]) -> str:
    model = report.get("model", {})
    kind = "TXL" if model.get("compressed_length", 1) == 0 else "CT"
    return (
        f"{kind} n_m={model.get('memory_length')} n_cm={model.get('compressed_length')} "
        f"step {report.get('step')}"
    )


def plot_attention_mass(
    attention_mass: np.ndarray,
    ax=None,
    title: str = "Attention mass per layer",
    legend: bool = True,
):
    """Stacked bars: share of each layer's attention on compressed memory, memory, segment."""
    plt = _pyplot()

    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    layers = np.arange(attention_mass.shape[0])
    bottom = np.zeros(len(layers))
    for k, kind in enumerate(KEY_KINDS):
        ax.bar(layers, attention_mass[:, k], bottom=bottom, label=kind, color=KIND_COLORS[kind])
        bottom += attention_mass[:, k]
    ax.set_xticks(layers)  # one tick per layer, whole numbers
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
    ax.set_ylabel("attention mass")
    ax.set_title(title)
    if legend:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0
        )  # beside the bars, not over them
    return ax


def plot_attention_by_age(report: dict[str, Any], layer: int = 0, ax=None, legend: bool = True):
    """Attention mass against key age (tokens back), one line per memory kind."""
    plt = _pyplot()

    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for kind in KEY_KINDS:
        ages, mass = report["mean_age_tokens"][kind], report["attention_by_age"][kind][layer]
        if len(ages):
            ax.plot(np.maximum(ages, 0.5), mass, marker="o", label=kind, color=KIND_COLORS[kind])
    ax.set_xscale("log")
    ax.set_xlabel("key age (tokens back)")
    ax.set_ylabel("attention mass")
    ax.set_title(f"Layer {layer}: attention by age")
    if legend:
        ax.legend()
    return ax


def plot_attention(report: dict[str, Any], layer: int = 0):
    """The attention mass per layer beside one layer's attention by age, with one legend for
    both below them (a legend beside the bars sat on the neighbouring panel)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_attention_mass(report["attention_mass"], ax=axes[0], legend=False)
    plot_attention_by_age(report, layer, ax=axes[1], legend=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend below the panels
    fig.legend(
        handles=[Patch(color=KIND_COLORS[kind], label=kind) for kind in KEY_KINDS],
        loc="lower center",
        ncol=len(KEY_KINDS),
        frameon=False,
    )
    return fig


def plot_losses(metrics: list[dict[str, Any]], ax=None):
    """Training loss (and compression loss on a second axis) against step from metrics rows."""
    plt = _pyplot()

    own_figure = ax is None
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    rows = [r for r in metrics if "split" not in r and "loss" in r]  # training rows
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="LM loss (nats/token)")
    valid = [r for r in metrics if r.get("split") == "validation"]
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot(
        [r["step"] for r in rows],
        [r["compression_loss"] for r in rows],
        color="tab:gray",
        alpha=0.6,
        label="compression loss (right axis)",
    )
    twin.set_ylabel("compression loss", color="tab:gray")
    lines = ax.get_lines() + twin.get_lines()  # one legend for both axes
    ax.legend(
        lines,
        [line.get_label() for line in lines],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=len(lines),
        fontsize="small",
    )  # below the axes, clear of the curves
    if own_figure:
        ax.figure.tight_layout()  # the legend inside the figure
    return ax
