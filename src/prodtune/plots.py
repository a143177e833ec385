"""Figures written as PNG files: the training/validation loss curve (train stage and report)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prodtune.io import atomic_path


def loss_series(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) for the training loss and the validation loss from train/log.jsonl rows."""
    series: dict[str, tuple[list[int], list[float]]] = {"train": ([], []), "validation": ([], [])}
    for row in rows:
        for key, name in (("loss", "train"), ("eval_loss", "validation")):
            if row.get(key) is not None:
                series[name][0].append(int(row["step"]))
                series[name][1].append(float(row[key]))
    return series


def plot_loss(rows: Iterable[dict[str, Any]], out_png: str | Path, title: str = "Loss") -> Path:
    """Draw training and validation loss against the optimizer step and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and Colab workers
    import matplotlib.pyplot as plt

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
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
