"""The samples of a dataset: which image files, with which labels and locations, are in a split.

Two kinds of ``data_root``:

- a dataset folder written by ``utils/create_classification_dataset.py`` (its files are
  ``dataset_folder``'s): ``classification_ds.csv`` (paths relative to ``crops_dir``),
  ``label_index.json`` and ``splits.json``; a sample belongs to the split of its ``(dataset, location)``;
- an image folder with one sub-folder per class, either split into ``train/ val/ test/``
  sub-folders (``data_root/<split>/<class>/*.jpg``) or not split at all (the whole folder
  is the train split).

Reading samples needs no PyTorch (prediction from a model package imports none);
``training.data`` turns them into loaders.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from classification.data.dataset_folder import (
    DATASET_CSV,
    LABEL_INDEX_JSON,
    SPLITS_JSON,
    dataset_split_names,
    is_dataset_folder,
    read_label_index,
    read_split_keys,
)
from classification.data.splits import SPLIT_NAMES
from classification.errors import DataError, UserError
from classification.io import read_string_csv

if TYPE_CHECKING:
    from classification.config import ExperimentConfig

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "Sample",
    "available_splits",
    "build_samples",
    "class_folder_samples",
    "class_folders",
    "dataset_folder_samples",
    "image_files",
    "image_folder_root",
    "image_folder_samples",
    "load_label_index",
    "split_folders",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Sample:
    """One training image: its file, class index, and the location it was taken at."""

    path: Path
    label: int
    location: str
    dataset: str


# ---------------------------------------------------------------- samples


def split_folders(data_root: Path, train_split: str = "train") -> list[str]:
    """The split sub-folders (``train``, ``val``, ``test``, ``train_split``) of an image folder; empty when not split.

    A flat image folder whose classes include one named like a split is read as split.
    """
    names = dict.fromkeys((*SPLIT_NAMES, train_split))
    return [name for name in names if (data_root / name).is_dir()]


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``folder`` (hidden folders ignored)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{folder}: no class sub-folders (expected one folder of images per class)")
    return names


def image_folder_root(data_root: Path, split: str, train_split: str = "train") -> Path:
    """The folder holding the class folders of ``split`` in an image folder; UserError for a split it lacks."""
    available = split_folders(data_root, train_split)
    if available and (data_root / split).is_dir():
        return data_root / split
    if not available and split == train_split:
        return data_root
    shown = ", ".join(available) if available else f"{train_split} (the whole folder; it has no train/ val/ test/ sub-folders)"
    raise UserError(f"{data_root}: no split {split!r} in this image folder (available: {shown})")


def load_label_index(data_root: Path, train_split: str = "train") -> dict[int, str]:
    """``{0: "agouti", ...}`` from ``label_index.json``, or from the sorted class folders of an image folder."""
    data_root = Path(data_root)
    if not is_dataset_folder(data_root):
        return dict(enumerate(class_folders(image_folder_root(data_root, train_split, train_split))))
    return read_label_index(data_root / LABEL_INDEX_JSON)


def available_splits(config: ExperimentConfig) -> list[str]:
    """The split names ``build_samples`` accepts for this ``data_root``."""
    data_root = Path(config.data_root)
    if is_dataset_folder(data_root):
        return dataset_split_names(data_root)
    return split_folders(data_root, config.train_split) or [config.train_split]


def dataset_folder_samples(data_root: Path, crops_dir: Path, split: str) -> list[Sample]:
    """Samples of ``split`` from ``classification_ds.csv``, ``label_index.json`` and ``splits.json``."""
    csv_path = data_root / DATASET_CSV
    frame = read_string_csv(csv_path, ("path", "dataset", "location", "label"))
    name_to_index = {name: i for i, name in load_label_index(data_root).items()}
    unknown = sorted(set(frame["label"]) - set(name_to_index))
    if unknown:
        raise DataError(f"{csv_path}: label {unknown[0]!r} is not in {data_root / LABEL_INDEX_JSON}"
                        + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    keys = read_split_keys(data_root / SPLITS_JSON, split)
    in_split = pd.Series([key in keys for key in zip(frame["dataset"], frame["location"])], index=frame.index, dtype=bool)
    rows = frame[in_split]
    return [
        Sample(crops_dir / path, name_to_index[label], location, dataset)
        for path, label, location, dataset in zip(rows["path"], rows["label"], rows["location"], rows["dataset"])
    ]


def image_files(folder: Path) -> list[Path]:
    """Image files (jpg, jpeg, png; any case) under ``folder``, sorted, hidden files left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def class_folder_samples(folder: Path, name_to_index: Mapping[str, int], dataset: str, unknown: str,
                         where: str = "") -> list[Sample]:
    """Samples of ``folder/<class>/*.jpg`` (class folders and files sorted), labelled by ``name_to_index``.

    The one image-folder reader (training, prediction, Norouzzadeh's mode). A class folder that
    ``name_to_index`` lacks is a DataError: ``<where><folder>/<class>: class '<class>' <unknown>``.
    """
    samples = []
    for name in class_folders(folder):
        if name not in name_to_index:
            raise DataError(f"{where}{folder / name}: class {name!r} {unknown}")
        samples += [Sample(path, name_to_index[name], "", dataset) for path in image_files(folder / name)]
    return samples


def image_folder_samples(data_root: Path, split: str, train_split: str) -> list[Sample]:
    """Samples of ``split`` from ``data_root[/<split>]/<class>/*.jpg``; classes from the train split's folders."""
    label_index = load_label_index(data_root, train_split)
    name_to_index = {name: i for i, name in label_index.items()}
    train_root = image_folder_root(data_root, train_split, train_split)
    return class_folder_samples(image_folder_root(data_root, split, train_split), name_to_index, data_root.name,
                                f"has no folder in the {train_split} split ({train_root})")


def build_samples(config: ExperimentConfig, split: str) -> list[Sample]:
    """The samples of ``split`` (e.g. ``"train"``) of ``config.data_root``, in file order."""
    data_root = Path(config.data_root)
    if is_dataset_folder(data_root):
        samples = dataset_folder_samples(data_root, Path(config.resolved_crops_dir()), split)
    else:
        samples = image_folder_samples(data_root, split, config.train_split)
    if not samples:
        log.warning("%s: split %r has no images", data_root, split)
    return samples
