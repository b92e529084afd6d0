"""Evaluation figures: confusion matrix, per-class precision/recall, reliability diagram, mistakes, curves.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no GUI backend), as
in ``classification.data.inspect``: they render headless, and Jupyter displays a returned
figure. ``save_figure`` writes a PNG atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from classification.data.figures import Thumbnail, plot_thumbnail_grid
from classification.io import atomic_open

ANNOTATE_MAX_CLASSES = 25  # write the value in each cell of the confusion matrix up to this many classes


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def normalise_rows(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall of each true class on the diagonal); empty rows stay 0."""
    confusion = np.asarray(confusion, dtype=float)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def plot_confusion_matrix(confusion: Sequence[Sequence[float]], label_names: Sequence[str]) -> Figure:
    """The row-normalised confusion matrix (rows: true class, columns: predicted) with class names."""
    matrix = normalise_rows(np.asarray(confusion))
    n = len(label_names)
    side = min(4.0 + 0.45 * n, 30.0)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(n), label_names, rotation=90)
    ax.set_yticks(np.arange(n), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= ANNOTATE_MAX_CLASSES:
        for (row, column), value in np.ndenumerate(matrix):
            if value > 0:
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_title("confusion matrix (normalised by true class)")
    return figure


def plot_precision_recall(per_class: Mapping[str, Mapping[str, float]]) -> Figure:
    """Horizontal bars of precision and recall per class, each labelled with its support."""
    names = list(per_class)
    y = np.arange(len(names))
    figure = Figure(figsize=(7.0, max(2.5, 0.4 * len(names) + 1.2)), layout="constrained")
    ax = figure.subplots()
    ax.barh(y - 0.2, [per_class[n]["precision"] for n in names], height=0.4, label="precision", color="tab:blue")
    ax.barh(y + 0.2, [per_class[n]["recall"] for n in names], height=0.4, label="recall", color="tab:orange")
    ax.set_yticks(y, [f"{n} ({int(per_class[n]['support'])})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("score (support in brackets)")
    ax.set_title("precision and recall per class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


def plot_reliability_diagram(bins: Sequence[Mapping[str, float]], ece: float) -> Figure:
    """Accuracy against confidence per confidence bin, with the diagonal of perfect calibration.

    ``bins``: one dict per bin with ``lower``, ``upper``, ``count``, ``accuracy``, ``confidence``.
    """
    figure = Figure(figsize=(8.0, 4.0), layout="constrained")
    ax, counts_ax = figure.subplots(1, 2)
    lower = np.array([b["lower"] for b in bins], dtype=float)
    width = np.array([b["upper"] for b in bins], dtype=float) - lower
    filled = np.array([b["count"] for b in bins], dtype=float) > 0
    accuracy = np.array([b["accuracy"] for b in bins], dtype=float)
    ax.bar(lower[filled], accuracy[filled], width=width[filled], align="edge", edgecolor="black",
           color="tab:blue", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left", frameon=False)
    counts_ax.bar(lower, [b["count"] for b in bins], width=width, align="edge", edgecolor="black", color="tab:grey")
    counts_ax.set_xlim(0, 1)
    counts_ax.set_xlabel("confidence (top-1 probability)")
    counts_ax.set_ylabel("predictions")
    counts_ax.set_title("predictions per confidence bin")
    return figure


def plot_confident_mistakes(mistakes: pd.DataFrame, images_root: Path | None, per_class: int) -> Figure:
    """One row per true class: its most confident mistakes (real crops), titled with the prediction.

    ``mistakes`` has ``path``, ``true_label``, ``pred_label``, ``confidence`` (see
    ``report.most_confident_mistakes``); paths are relative to ``images_root`` when given.
    An unreadable image gets a labelled empty cell instead of stopping the figure.
    """
    rows = list(dict.fromkeys(mistakes["true_label"])) or ["(no mistakes)"]
    columns = max(1, min(per_class, int(mistakes["true_label"].value_counts().max()) if len(mistakes) else 1))
    grid = []
    for label in rows:
        chosen = mistakes[mistakes["true_label"] == label]
        cells = [Thumbnail(Path(path) if images_root is None else Path(images_root) / path, f"{pred} ({float(confidence):.2f})")
                 for path, pred, confidence in zip(chosen["path"], chosen["pred_label"], chosen["confidence"])]
        grid.append((f"true: {label}", cells[:columns]))
    return plot_thumbnail_grid(grid, columns, "most confident mistakes per true class\n(title: predicted label and confidence)",
                               figsize=(max(4.0, 1.7 * columns + 1.2), 1.8 * len(rows) + 0.4), cell_title_size=8, title_size=10)


def plot_training_curves(history: pd.DataFrame, metrics: Sequence[str] = ("loss", "top1")) -> Figure:
    """One panel per metric: ``train_<metric>`` and ``val_<metric>`` against ``epoch`` (from metrics.csv)."""
    figure = Figure(figsize=(4.5 * len(metrics), 3.5), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for split in ("train", "val"):
            column = f"{split}_{metric}"
            if column in history:
                values = pd.to_numeric(history[column], errors="coerce")
                ax.plot(pd.to_numeric(history["epoch"]), values, marker="o", markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend(frameon=False)
    return figure


def write_evaluation_plots(
    metrics: Mapping[str, Any], mistakes: pd.DataFrame, label_names: Sequence[str], output_dir: Path,
    images_root: Path | None, per_class: int,
) -> dict[str, Path]:
    """Write the four evaluation PNGs into ``output_dir``; return name -> path."""
    figures = {
        "confusion_matrix": plot_confusion_matrix(metrics["confusion"], label_names),
        "precision_recall": plot_precision_recall(metrics["per_class"]),
        "reliability": plot_reliability_diagram(metrics["calibration"]["bins"], metrics["ece"]),
        "confident_mistakes": plot_confident_mistakes(mistakes, images_root, per_class),
    }
    return {name: save_figure(figure, Path(output_dir) / f"{name}.png") for name, figure in figures.items()}
