"""Results on disk and on screen: per-epoch CSV, JSON, Markdown tables, training-curve figures."""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_FILES = ("results.csv", "results.json", "table.md", "curves.png")
"""What every training example writes to its ``--out-dir`` (besides checkpoints)."""

EARLIER_RUN = (*RESULT_FILES, "vs_outliers.png", "*/checkpoint.pt")
"""The files that mark a folder as holding an earlier training run (see ``cli.results_folder``):
its results, figures and per-run checkpoints, never the cached stand-in data set."""


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


def write_results(
    out: Path,
    results: Sequence[dict[str, Any]],
    keys: Sequence[str],
    table: str,
    source: str,
    args: argparse.Namespace,
) -> None:
    """The run files of a training example in ``out``: ``results.csv`` (one row per run and
    epoch: the run's ``keys``, then its history row), ``results.json`` (the data ``source``, the
    flags ``args`` and every run) and ``table.md`` (``source`` and ``table``)."""
    rows = [{**{k: r[k] for k in keys}, **row} for r in results for row in r["history"]]
    write_csv(rows, out / "results.csv")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json({"data": source, "args": settings, "runs": results}, out / "results.json")
    (out / "table.md").write_text(f"Data: {source}\n\n{table}\n")


def done_message(table: str, out: Path) -> str:
    """The last lines a training example prints: its table and where the run files are."""
    return f"\n{table}\n\nresults in {out}/ ({', '.join(RESULT_FILES)})"


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
    plt = _pyplot()
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
    _save(fig, path)


def plot_against(
    finals: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, path: Path, title: str
) -> None:
    """Final metric against a swept quantity (e.g. outlier ratio), one line per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for variant, points in finals.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=variant)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
