"""Figure pieces shared by the dataset inspection (``data/inspect.py``) and the evaluation plots.

The thumbnail grid lives here, in the data layer beside ``images.py``, so that
``evaluation/plots.py`` draws its grid without borrowing from ``data/inspect.py``. Figures are
built with ``matplotlib.figure.Figure`` directly (no pyplot, no GUI backend): they render
headless and are not kept alive by pyplot's registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from classification.data.images import read_thumbnail


@dataclass(frozen=True)
class Thumbnail:
    """One cell of a thumbnail grid: an image file and the title above it."""

    path: Path
    title: str


def draw_thumbnail(ax: Axes, path: Path) -> None:
    """Show the image's thumbnail in ``ax``; a missing or unreadable file gets a labelled empty cell instead."""
    try:
        ax.imshow(read_thumbnail(path))
    except OSError:
        reason = "cannot decode" if path.exists() else "file not found"
        ax.text(0.5, 0.5, f"unreadable\n{reason}", ha="center", va="center", fontsize=7, transform=ax.transAxes)


def plot_thumbnail_grid(rows: Sequence[tuple[str, Sequence[Thumbnail]]], columns: int, title: str,
                        figsize: tuple[float, float], cell_title_size: float = 7, title_size: float | None = None) -> Figure:
    """A grid of thumbnails, one row per ``(row label, thumbnails)``, ``columns`` wide.

    The row label stands left of the row's first cell; cells past a row's thumbnails are left
    blank; a file that cannot be read never stops the figure (``draw_thumbnail``).
    """
    figure = Figure(figsize=figsize, layout="constrained")
    axes = figure.subplots(max(len(rows), 1), columns, squeeze=False)
    for (label, cells), axes_row in zip(rows, axes):
        for c, ax in enumerate(axes_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
            if c >= len(cells):
                ax.set_frame_on(False)
                continue
            draw_thumbnail(ax, cells[c].path)
            ax.set_title(cells[c].title, fontsize=cell_title_size)
    figure.suptitle(title, **({} if title_size is None else {"fontsize": title_size}))
    return figure
