"""Figures: the training/validation loss curve (train stage, report) and the metric chart (report, notebook)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prodtune.io import atomic_path
from prodtune.metrics import LOWER_IS_BETTER

BASE_COLOR, TUNED_COLOR = "#8c8c8c", "#2f6fb0"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and Colab workers
    import matplotlib.pyplot as plt

    return plt


def loss_series(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) for the training loss and the validation loss from train/log.jsonl rows."""
    series: dict[str, tuple[list[int], list[float]]] = {"train": ([], []), "validation": ([], [])}
    for row in rows:
        for key, name in (("loss", "train"), ("eval_loss", "validation")):
            if row.get(key) is not None:
                series[name][0].append(int(row["step"]))
                series[name][1].append(float(row[key]))
    return series


def loss_figure(rows: Iterable[dict[str, Any]], title: str = "Loss") -> Any:
    """A matplotlib figure of training and validation loss against the optimizer step."""
    plt = _pyplot()
    series = loss_series(rows)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps, values = series["train"]
    if steps:
        ax.plot(steps, values, label="train", color="tab:blue", linewidth=1.2, alpha=0.9)
    steps, values = series["validation"]
    if steps:
        ax.plot(steps, values, label="validation", color="tab:orange", marker="o", linewidth=1.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(rows: Iterable[dict[str, Any]], out_png: str | Path, title: str = "Loss") -> Path:
    """Draw training and validation loss against the optimizer step and save it as a PNG."""
    fig = loss_figure(rows, title)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return out_png


def metrics_figure(metrics: dict[str, Any]) -> Any:
    """A figure with one small panel per metric of metrics.json: base and tuned with their 95% intervals."""
    plt = _pyplot()
    names = list(metrics["base"])
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for x, (key, color) in enumerate((("base", BASE_COLOR), ("tuned", TUNED_COLOR))):
            entry = metrics[key][name]
            lo, hi = entry["ci95"]
            mean = entry["mean"]
            err = [[max(mean - lo, 0)], [max(hi - mean, 0)]] if math.isfinite(lo) else None
            ax.bar(x, mean, color=color, width=0.6)
            if err is not None:
                ax.errorbar(x, mean, yerr=err, color="black", capsize=4, lw=1)
        ax.set_xticks([0, 1], ["base", "tuned"])
        ax.set_title(name + (" (lower is better)" if name in LOWER_IS_BETTER else ""), fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def png_base64(fig: Any, dpi: int = 110) -> str:
    """The figure as a base64 PNG (for a data: URL in a self-contained page), and closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
