"""Results on disk and on screen: per-epoch CSV, JSON, Markdown tables, training-curve figures."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One line per row; the header is the union of the rows' keys in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_json(value: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats print with 4 decimals, NaN as a dash."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "—"
            return f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    histories: dict[str, dict[str, list[dict[str, Any]]]],
    metrics: Sequence[tuple[str, str]],
    path: Path,
    title: str,
) -> None:
    """Figure of training curves: one row per group, one column per metric, one line per variant.

    ``histories[group][variant]`` is a run's history (rows with ``epoch`` and the metric keys);
    ``metrics`` pairs a history key with its axis label. Written with the Agg backend (no display).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(histories)
    fig, axes = plt.subplots(
        len(groups),
        len(metrics),
        figsize=(4.2 * len(metrics), 3.2 * len(groups)),
        squeeze=False,
    )
    for r, group in enumerate(groups):
        for c, (key, label) in enumerate(metrics):
            ax = axes[r][c]
            for variant, history in histories[group].items():
                epochs = [row["epoch"] for row in history]
                ax.plot(epochs, [row[key] for row in history], marker=".", label=variant)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(f"{label} ({group})" if group else label)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_against(
    finals: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, path: Path, title: str
) -> None:
    """Final metric against a swept quantity (e.g. outlier ratio), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for variant, points in finals.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=variant)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
