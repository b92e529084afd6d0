"""Tables and figures for looking at data: CCT files before cleaning, datasets after splitting.

The notebooks (``notebooks/clean_and_combine_datasets.ipynb``, ``notebooks/inspect_dataset.ipynb``)
only call these functions. Figures are built with ``matplotlib.figure.Figure`` directly (no
pyplot, no GUI backend), so they render headless and are not kept alive by pyplot's registry;
in Jupyter, ``%matplotlib inline`` displays a returned figure as a PNG.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from classification.data.cct import CCT, Problem, normalize_location
from classification.data.dataset_folder import read_dataset_csv, read_label_index
from classification.data.figures import Thumbnail, plot_thumbnail_grid
from classification.data.images import read_thumbnail as read_thumbnail  # re-exported: the notebooks' thumbnails
from classification.data.splits import SPLIT_NAMES, SplitProblem, assignment_from_splits, read_splits
from classification.errors import DataError, UserError, did_you_mean
from classification.io import read_json_object

NO_LOCATION = "(no location)"  # never a normalised location: those have no spaces
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}


# --- datasets built by utils/create_classification_dataset.py --------------------------------


@dataclass(frozen=True, eq=False)
class DatasetView:
    """A classification dataset as read from its folder; ``crops`` has one row per crop and its ``split``."""

    root: Path
    crops: pd.DataFrame  # classification_ds.csv columns (all strings) + split (categorical, NaN without splits.json)
    label_index: dict[str, str]
    splits: dict[str, list[tuple[str, str]]] | None
    split_report: dict[str, Any] | None

    @property
    def labels(self) -> list[str]:
        """Class names in label-index order."""
        return [self.label_index[key] for key in sorted(self.label_index, key=int)]

    def summary(self) -> str:
        """One line: crops, classes, locations, and whether splits were found."""
        n_locations = len(self.crops[["dataset", "location"]].drop_duplicates())
        splits = "with splits" if self.splits is not None else "no splits.json"
        return f"{self.root}: {len(self.crops)} crops, {len(self.label_index)} classes, {n_locations} locations, {splits}"


def _read_label_index(path: Path) -> dict[str, str]:
    """``label_index.json``, checked (``read_label_index``), keyed as in the file: ``{"0": "agouti", ...}``."""
    return {str(i): name for i, name in read_label_index(path).items()}


def _assign_splits(crops: pd.DataFrame, splits: Mapping[str, Any], source: str) -> pd.Categorical:
    """Each crop's split from its (dataset, location); a location in no split or two is a ``DataError``."""
    problem = SplitProblem.from_frame(crops[["dataset", "location", "label"]])
    assignment = assignment_from_splits(problem, splits, source)
    position = {key: i for i, key in enumerate(problem.locations)}
    codes = [int(assignment[position[key]]) for key in zip(crops["dataset"], crops["location"])]
    return pd.Categorical.from_codes(codes, categories=list(SPLIT_NAMES))


def load_dataset(dataset_dir: str | Path) -> DatasetView:
    """Read ``classification_ds.csv`` (as strings), ``label_index.json``, and ``splits.json``/``split_report.json`` if present."""
    root = Path(dataset_dir)
    crops = read_dataset_csv(root / "classification_ds.csv")
    label_index = _read_label_index(root / "label_index.json")
    unknown = sorted(set(crops["label"]) - set(label_index.values()))
    if unknown:
        raise DataError(f"{root / 'classification_ds.csv'}: labels not in label_index.json: {', '.join(unknown[:5])}")
    splits_path, report_path = root / "splits.json", root / "split_report.json"
    splits = read_splits(splits_path) if splits_path.exists() else None  # a folder or a bad entry there is one line
    if splits is not None and len(crops):
        crops["split"] = _assign_splits(crops, splits, str(splits_path))
    else:
        crops["split"] = pd.Categorical([None] * len(crops), categories=list(SPLIT_NAMES))
    report = read_json_object(report_path, optional=True) or None
    return DatasetView(root=root, crops=crops, label_index=label_index, splits=splits, split_report=report)


def class_counts_by_split(view: DatasetView) -> pd.DataFrame:
    """Crops per class (rows, label-index order) and split (columns ``train, val, test, total``)."""
    counts = pd.crosstab(view.crops["label"], view.crops["split"], dropna=False)
    counts = counts.reindex(index=view.labels, columns=list(SPLIT_NAMES), fill_value=0)
    counts["total"] = view.crops["label"].value_counts().reindex(view.labels, fill_value=0)
    counts.index.name, counts.columns.name = "class", None
    return counts.astype("int64")


def class_fractions_by_split(view: DatasetView) -> pd.DataFrame:
    """Each class's share of its crops in each split, with the targets as a last row when the report has them."""
    counts = class_counts_by_split(view)
    fractions = counts[list(SPLIT_NAMES)].div(counts["total"].where(counts["total"] > 0), axis=0).round(3)
    if view.split_report and "targets" in view.split_report:
        fractions.loc["(target)"] = [view.split_report["targets"][name] for name in SPLIT_NAMES]
    return fractions


def locations_by_split(view: DatasetView) -> pd.DataFrame:
    """Per split: locations and crops with their fraction of all crops, and the target when known."""
    crops = view.crops
    grouped = crops.groupby("split", observed=False)
    table = pd.DataFrame(
        {
            "n_locations": grouped[["dataset", "location"]].apply(lambda g: len(g.drop_duplicates())),
            "n_crops": grouped.size(),
        }
    ).reindex(list(SPLIT_NAMES), fill_value=0)
    table["crop_fraction"] = (table["n_crops"] / max(len(crops), 1)).round(3)
    targets = (view.split_report or {}).get("targets", {})
    table["target"] = [targets.get(name, np.nan) for name in SPLIT_NAMES]
    table.index.name = "split"
    return table.astype({"n_locations": "int64", "n_crops": "int64"})


def location_table(view: DatasetView) -> pd.DataFrame:
    """One row per (dataset, location): its split, crops and classes; biggest first within each split."""
    grouped = view.crops.groupby(["dataset", "location"], observed=True)
    table = grouped.agg(split=("split", "first"), n_crops=("path", "size"), n_classes=("label", "nunique"))
    table = table.reset_index().sort_values(["split", "n_crops", "dataset", "location"], ascending=[True, False, True, True])
    return table.reset_index(drop=True)


def _new_axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    """``ax``, or the axes of a new pyplot-free figure of ``size`` inches."""
    return ax if ax is not None else Figure(figsize=size, layout="constrained").subplots()


def plot_class_counts(view: DatasetView, ax: Axes | None = None) -> Axes:
    """Horizontal bars of crops per class, stacked by split (readable with a hundred classes)."""
    counts = class_counts_by_split(view)
    ax = _new_axes(ax, (7.0, max(2.5, 0.32 * len(counts) + 1.2)))
    y = np.arange(len(counts))
    left = np.zeros(len(counts))
    for name in SPLIT_NAMES:
        ax.barh(y, counts[name], left=left, color=SPLIT_COLOURS[name], label=name)
        left += counts[name].to_numpy()
    ax.set_yticks(y, counts.index)
    ax.invert_yaxis()
    ax.set_xlabel("crops")
    ax.set_title("crops per class and split")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def plot_locations_by_split(view: DatasetView) -> Figure:
    """Two bar charts: locations per split and crops per split, each bar labelled with its count."""
    table = locations_by_split(view)
    figure = Figure(figsize=(8.0, 3.0), layout="constrained")
    colours = [SPLIT_COLOURS[name] for name in SPLIT_NAMES]
    for ax, column, title in zip(figure.subplots(1, 2), ("n_locations", "n_crops"), ("locations", "crops")):
        bars = ax.bar(list(SPLIT_NAMES), table[column], color=colours)
        ax.bar_label(bars)
        ax.set_title(f"{title} per split")
        ax.margins(y=0.15)
    return figure


def sample_crops(view: DatasetView, per_class: int = 6, seed: int = 0) -> pd.DataFrame:
    """Up to ``per_class`` random crops of each class, spread over its locations (round-robin), seeded."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in view.labels:
        group = view.crops[view.crops["label"] == label]
        shuffled = group.iloc[rng.permutation(len(group))]
        rank = shuffled.groupby(["dataset", "location"], observed=True).cumcount()
        picked.append(shuffled.assign(_rank=rank.to_numpy()).sort_values("_rank", kind="stable").head(per_class))
    return pd.concat(picked).drop(columns="_rank") if picked else view.crops.iloc[:0]


def _short(text: str, width: int = 20) -> str:
    """``text`` cut in the middle to ``width`` characters: both ends of a location name tell."""
    return text if len(text) <= width else f"{text[: width // 2 - 1]}…{text[-(width - width // 2):]}"


def plot_sample_grid(
    view: DatasetView, crops_dir: str | Path, per_class: int = 6, seed: int = 0, classes: Sequence[str] | None = None
) -> Figure:
    """A grid of sample crops: one row per class (``classes`` or all), titled with split and location.

    A crop that is missing or unreadable gets a labelled empty cell instead of stopping the figure.
    """
    if per_class < 1:
        raise UserError(f"per_class must be at least 1, got {per_class}")
    rows = list(classes) if classes is not None else view.labels
    unknown = [name for name in rows if name not in view.labels]
    if unknown:
        raise UserError(f"classes not in the dataset: {', '.join(unknown)}")
    samples = sample_crops(view, per_class, seed)
    totals = view.crops["label"].value_counts()
    grid = []
    for label in rows:
        chosen = samples[samples["label"] == label]
        cells = [Thumbnail(Path(crops_dir) / path, f"{split if isinstance(split, str) else '-'} · {_short(location)}")
                 for path, split, location in zip(chosen["path"], chosen["split"], chosen["location"])]
        grid.append((f"{label}\n({int(totals.get(label, 0))} crops)", cells[:per_class]))
    return plot_thumbnail_grid(grid, per_class, f"sample crops per class (seed {seed})",
                               figsize=(1.5 * per_class + 1.0, 1.6 * max(len(rows), 1)))


# --- CCT files before cleaning -----------------------------------------------------------------


def category_summary(cct: CCT) -> pd.DataFrame:
    """Per category: annotations, boxes, images and (named) locations; most annotated first."""
    locations = {image["id"]: normalize_location(image.get("location")) for image in cct["images"]}
    rows = {c["id"]: {"category_id": c["id"], "name": c["name"], "n_annotations": 0, "n_boxes": 0,
                      "images": set(), "locations": set()} for c in cct["categories"]}
    for annotation in cct["annotations"]:
        row = rows[annotation["category_id"]]
        row["n_annotations"] += 1
        row["n_boxes"] += annotation.get("bbox") is not None
        row["images"].add(annotation["image_id"])
        if locations.get(annotation["image_id"]) is not None:
            row["locations"].add(locations[annotation["image_id"]])
    table = pd.DataFrame(
        [{**{k: v for k, v in row.items() if k not in ("images", "locations")},
          "n_images": len(row["images"]), "n_locations": len(row["locations"])} for row in rows.values()],
        columns=["category_id", "name", "n_annotations", "n_boxes", "n_images", "n_locations"],
    )
    return table.sort_values(["n_annotations", "name"], ascending=[False, True]).reset_index(drop=True)


def location_summary(cct: CCT) -> pd.DataFrame:
    """Per (dataset, normalised location): images, annotations, sequences, categories; images without one last."""
    names = {c["id"]: c["name"] for c in cct["categories"]}
    per_image: dict[Any, list[str]] = {}
    for annotation in cct["annotations"]:
        per_image.setdefault(annotation["image_id"], []).append(names.get(annotation["category_id"], "?"))
    records = []
    for image in cct["images"]:
        location = normalize_location(image.get("location"))
        labels = per_image.get(image["id"], [])
        records.append({"dataset": str(image.get("dataset") or ""), "location": location or NO_LOCATION,
                        "missing": location is None, "image_id": image["id"], "seq_id": image.get("seq_id"),
                        "n_annotations": len(labels), "labels": labels})
    columns = ["dataset", "location", "missing", "n_images", "n_annotations", "n_sequences", "n_categories"]
    if not records:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(records)
    table = frame.groupby(["dataset", "location", "missing"]).agg(
        n_images=("image_id", "size"),
        n_annotations=("n_annotations", "sum"),
        n_sequences=("seq_id", "nunique"),
        n_categories=("labels", lambda lists: len({name for labels in lists for name in labels})),
    ).reset_index()
    table = table.sort_values(["missing", "n_images", "dataset", "location"], ascending=[True, False, True, True])
    return table[columns].reset_index(drop=True)


def problem_summary(problems: Iterable[Problem]) -> pd.DataFrame:
    """Validation problems grouped by severity and field (``images[*].location``), with a count and an example."""
    rows = [{"severity": p.severity, "field": re.sub(r"\[\d+\]", "[*]", p.path), "example": str(p)} for p in problems]
    if not rows:
        return pd.DataFrame(columns=["severity", "field", "count", "example"])
    frame = pd.DataFrame(rows)
    table = frame.groupby(["severity", "field"], sort=False).agg(count=("example", "size"), example=("example", "first"))
    table = table.reset_index()
    order = table["severity"].map({"error": 0, "warning": 1})
    return table.assign(_order=order).sort_values(["_order", "count"], ascending=[True, False]).drop(columns="_order").reset_index(drop=True)


def edit_category_map(
    rows: list[dict[str, Any]], drop: Iterable[str] = (), convert: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """A copy of a category map with ``drop`` names set to ``keep: false`` and ``convert`` names renamed.

    A name that is not in the map raises a ``UserError`` with the closest match, so a typo
    never silently leaves a category in.
    """
    names = [row["name"] for row in rows]
    convert = dict(convert or {})
    for name in [*drop, *convert]:
        if name not in names:
            raise UserError(f"category {name!r} is not in the category map{did_you_mean(name, names, quote=True)}")
    dropped = set(drop)
    edited = []
    for row in rows:
        row = dict(row)
        if row["name"] in dropped:
            row["keep"] = False
        if row["name"] in convert:
            row["convert_to"] = convert[row["name"]]
        edited.append(row)
    return edited
