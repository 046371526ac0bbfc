"""PNG figures of an evaluation: the discrepancy matrix as a heatmap (the paper's Figure 2) and
accuracy by strategy, Z beside CM+Z.

Figures are built as ``matplotlib.figure.Figure`` objects and saved by the Agg renderer, without
pyplot: no display, no global backend switch, nothing left open between figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from runner.bank import MemoryBank
from runner.labels import readable

_MAX_TICK_LABELS = 40  # past this many labels, name every n-th so the names stay legible
Z_COLOUR, CM_COLOUR = "#9ecae1", "#08519c"


def row_normalised(bank: MemoryBank) -> np.ndarray:
    """Counts of (answer Y', truth Y), each answer's row divided by its total: p(Y | Y') on the user split.

    Rows of answers the model never gave are NaN (drawn blank), not zero: there is no evidence there.
    """
    index = {label: i for i, label in enumerate(bank.labels)}
    counts = np.zeros((len(bank.labels), len(bank.labels)))
    for (answer, truth), count in bank.counts.items():
        counts[index[answer], index[truth]] = count
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def discrepancy_heatmap(bank: MemoryBank, path: Path, title: str | None = None) -> Path:
    matrix = row_normalised(bank)
    n = len(bank.labels)
    side = min(max(6.0, 0.28 * n + 2.5), 26.0)
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.subplots()
    # zero is white so the few confusions stand out among 150 labels; never-answered rows are grey
    colours = matplotlib.colormaps["Blues"].with_extremes(bad="#d9d9d9")
    image = axes.imshow(matrix, cmap=colours, vmin=0, vmax=1, interpolation="nearest")
    step = max(1, math.ceil(n / _MAX_TICK_LABELS))
    ticks = list(range(0, n, step))
    names = [readable(bank.labels[i]) for i in ticks]
    axes.set_xticks(ticks, names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, names, fontsize=8)
    axes.set_xlabel("user's label Y (truth)")
    axes.set_ylabel("model's answer Y'")
    answered = int(np.isfinite(matrix[:, 0]).sum())
    axes.set_title(
        title or f"{bank.dataset}: {bank.model}, {bank.strategy}",
        fontsize=11,
    )
    figure.text(
        0.01,
        0.005,
        f"{bank.n_samples} user samples; {answered} of {n} labels ever answered (grey rows: never).\n"
        "Each row: the user's labels behind the model's answer Y', p(Y | Y'); the diagonal is agreement.",
        fontsize=8,
    )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02, label="share of the row")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    _save(figure, path)
    return path


def accuracy_chart(summary: pl.DataFrame, path: Path, title: str) -> Path:
    """One panel per dataset: for each strategy, Z and CM+Z accuracy (mean over seeds, std as a whisker).

    ``summary`` has columns dataset, strategy, method, accuracy_mean, accuracy_std (one model, one budget).
    """
    datasets: Sequence[str] = summary["dataset"].unique(maintain_order=True).to_list()
    strategies: Sequence[str] = summary["strategy"].unique(maintain_order=True).to_list()
    columns = min(3, len(datasets))
    rows = math.ceil(len(datasets) / columns)
    width = max(4.5, 1.3 * len(strategies) + 1.5)
    figure = Figure(figsize=(width * columns, 3.8 * rows))
    grid = figure.subplots(rows, columns, squeeze=False)
    positions = np.arange(len(strategies))
    for axes, dataset in zip(grid.flat, datasets, strict=False):
        for offset, method, colour in ((-0.2, "Z", Z_COLOUR), (0.2, "CM+Z", CM_COLOUR)):
            values, errors = [], []
            for strategy in strategies:
                row = summary.filter(
                    (pl.col("dataset") == dataset) & (pl.col("strategy") == strategy) & (pl.col("method") == method)
                )
                values.append(
                    100 * row["accuracy_mean"][0] if row.height and row["accuracy_mean"][0] is not None else 0
                )
                errors.append(100 * (row["accuracy_std"][0] or 0) if row.height else 0)
            whiskers = errors if any(errors) else None  # one seed: no spread to show
            bars = axes.bar(positions + offset, values, 0.4, yerr=whiskers, color=colour, label=method, capsize=3)
            axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        axes.set_title(dataset, fontsize=10)
        axes.set_xticks(positions, [s.replace(" (", "\n(") for s in strategies], fontsize=7)
        axes.set_ylabel("accuracy (%)")
        axes.set_ylim(0, max(5.0, axes.get_ylim()[1] * 1.15))
        axes.grid(axis="y", alpha=0.3)
    for axes in list(grid.flat)[len(datasets) :]:
        axes.set_visible(False)
    grid.flat[0].legend(fontsize=8, loc="upper left")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    _save(figure, path)
    return path


def prevalence_chart(prevalence: dict[str, Any], path: Path, top: int = 30) -> Path:
    """The largest labels' shares: PPI++ interval and estimate beside the gold-only interval and the raw share.

    ``prevalence`` is metrics.json's (``runner.report.prevalence_metrics``), labels largest first.
    """
    labels = list(prevalence["labels"].items())[:top]
    figure = Figure(figsize=(7, max(2.5, 0.32 * len(labels) + 1.4)))
    axes = figure.subplots()
    rows = np.arange(len(labels))[::-1]  # largest at the top
    for row, (_, entry) in zip(rows, labels, strict=True):
        gold = entry["gold_only"]
        axes.plot([gold["low"], gold["high"]], [row - 0.18] * 2, color=Z_COLOUR, linewidth=3, solid_capstyle="butt")
        axes.plot([entry["low"], entry["high"]], [row + 0.18] * 2, color=CM_COLOUR, linewidth=3, solid_capstyle="butt")
    axes.plot([e["estimate"] for _, e in labels], rows + 0.18, "|", color="black", markersize=9, label="PPI++ estimate")
    axes.plot([e["raw_share"] for _, e in labels], rows, "x", color="#e6550d", markersize=5, label="raw share (y_hat)")
    axes.plot([], [], color=CM_COLOUR, linewidth=3, label="PPI++ interval")
    axes.plot([], [], color=Z_COLOUR, linewidth=3, label="gold-only interval (user split)")
    axes.set_yticks(rows, [readable(label) for label, _ in labels], fontsize=8)
    axes.set_xlim(0, None)
    axes.set_xlabel("share of the corpus")
    more = (
        f"; the largest {len(labels)} of {len(prevalence['labels'])} labels" if len(prevalence["labels"]) > top else ""
    )
    axes.set_title(f"{100 * prevalence['confidence_level']:.0f}% intervals, jointly over labels{more}", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    _save(figure, path)
    return path


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)  # attaches the Agg renderer to the figure
    figure.savefig(path, dpi=110, format="png")  # the path may be a temp file's, whose suffix says nothing
