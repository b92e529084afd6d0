"""The dataset folder, owned in one place: its file names and CSV columns, writing it, reading its label index and splits.

A dataset folder is what ``utils/create_classification_dataset.py`` writes (and each active-learning
round's ``dataset/``): ``classification_ds.csv`` (``DATASET_COLUMNS``, paths relative to the crops
folder), ``label_index.json`` (``{"0": "agouti", ...}``, names sorted), ``splits.json`` (``{"train":
[[dataset, location], ...], ...}``), ``split_report.json``, ``classification_cct.json`` and the
per-split ``{train,val,test}_cct.json``. Training, prediction and active learning read it by these
names; ``samples`` turns it into samples.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pandas as pd

from classification.data.cct import CCT, name_key
from classification.data.splits import SPLIT_NAMES, read_splits
from classification.errors import DataError, UserError
from classification.io import read_json_object, read_string_csv, shown_json, shown_value, write_csv_atomic, write_json_atomic

__all__ = [
    "CROPS_CCT_JSON",
    "DATASET_COLUMNS",
    "DATASET_CSV",
    "LABEL_INDEX_JSON",
    "SPLITS_JSON",
    "SPLIT_REPORT_JSON",
    "class_number",
    "crops_cct",
    "dataset_split_names",
    "is_dataset_folder",
    "label_index",
    "read_dataset_csv",
    "read_label_index",
    "read_split_keys",
    "split_cct_name",
    "write_dataset_folder",
    "write_split_ccts",
]

DATASET_CSV = "classification_ds.csv"
LABEL_INDEX_JSON = "label_index.json"
SPLITS_JSON = "splits.json"
SPLIT_REPORT_JSON = "split_report.json"
CROPS_CCT_JSON = "classification_cct.json"
DATASET_COLUMNS = ["path", "dataset", "location", "dataset_class", "confidence", "label"]


def split_cct_name(split: str) -> str:
    """``<split>_cct.json``: the crops CCT of one split."""
    return f"{split}_cct.json"


def is_dataset_folder(data_root: Path) -> bool:
    """True for a folder made by ``create_classification_dataset.py``, False for an image folder.

    Anything named ``classification_ds.csv`` counts (a folder, a broken link): reading it then says what is wrong
    with it, where taking the dataset for an image folder would blame a split it lacks."""
    csv_path = data_root / DATASET_CSV
    return csv_path.exists() or csv_path.is_symlink()


def label_index(labels: Collection[str]) -> dict[str, str]:
    """``{"0": name, ...}`` in sorted name order; two labels that differ only by case or spaces are refused
    (one class twice: ``Deer`` and ``deer `` from a hand-made manifest or CSV)."""
    names = sorted(set(labels))
    first: dict[str, str] = {}
    for name in names:
        other = first.setdefault(name_key(name), name)
        if other != name:
            raise DataError(f"labels {shown_value(other)!r} and {shown_value(name)!r} differ only by case or spaces "
                            "(one class twice: merge them with a category map or fix the labels)")
    return {str(i): name for i, name in enumerate(names)}


def class_number(key: str, path: Path) -> int:
    """A ``label_index.json`` key: a class number written plainly (``"0"``, ``"12"``; not ``"01"``, ``"-1"``, ``"x"``)."""
    if not (key.isascii() and key.isdigit() and str(int(key)) == key):
        raise DataError(f'{path}: {shown_json(key)}: expected a class number "0", "1", ... as the key')
    return int(key)


def read_label_index(path: Path) -> dict[int, str]:
    """``label_index.json`` (``{"0": "agouti", "1": "bird_spec", ...}``) as ``{0: "agouti", ...}``, checked: keys
    ``"0".."n-1"`` without gaps, each a distinct class name; anything else is one line naming the file and the key."""
    raw = read_json_object(path)
    if not raw:
        raise DataError(f'{path}: no classes (expected {{"0": "<class name>", "1": ...}})')
    index: dict[int, str] = {}
    key_of: dict[str, str] = {}
    for key, name in raw.items():
        number = class_number(key, path)
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: {shown_json(key)}: expected a class name (text), got {shown_json(name)}")
        if name in key_of:
            raise DataError(f"{path}: {shown_json(key)}: class name {shown_json(name)} is also class {shown_json(key_of[name])}")
        index[number], key_of[name] = name, key
    missing = next((i for i in range(len(index)) if i not in index), None)
    if missing is not None:
        raise DataError(f'{path}: class numbers must be 0..{len(index) - 1} without gaps: "{missing}" is missing')
    return dict(sorted(index.items()))


def read_dataset_csv(path: Path) -> pd.DataFrame:
    """A ``classification_ds.csv``."""
    return read_string_csv(path, DATASET_COLUMNS)


def dataset_split_names(data_root: Path) -> list[str]:
    """The split names of a dataset folder's ``splits.json``, in file order."""
    return list(read_splits(data_root / SPLITS_JSON))


def read_split_keys(path: Path, split: str) -> set[tuple[str, str]]:
    """The ``(dataset, location)`` pairs of ``split`` in ``splits.json``."""
    splits = read_splits(path)
    if split not in splits:
        raise UserError(f"{path}: no split {split!r} (available: {', '.join(splits) or 'none'})")
    return set(splits[split])


def write_dataset_folder(output_dir: Path, table: pd.DataFrame, label_names: Sequence[str],
                         splits: Mapping[str, list]) -> None:
    """The files training reads: ``classification_ds.csv`` (``DATASET_COLUMNS``), ``label_index.json``
    (``label_names`` in class order) and ``splits.json``, each written atomically."""
    write_csv_atomic(Path(output_dir) / DATASET_CSV, table[DATASET_COLUMNS])
    write_json_atomic(Path(output_dir) / LABEL_INDEX_JSON, {str(i): name for i, name in enumerate(label_names)})
    write_json_atomic(Path(output_dir) / SPLITS_JSON, dict(splits))


def crops_cct(frame: pd.DataFrame, labels: dict[str, str]) -> CCT:
    """``classification_cct.json``: a CCT whose images are the crops, one annotation each."""
    ids = {name: int(i) for i, name in labels.items()}
    images, annotations = [], []
    for row in frame.itertuples(index=False):
        image = {"id": row.crop_path, "file_name": row.crop_path, "dataset": row.dataset, "location": row.location}
        for key in ("seq_id", "datetime"):
            value = getattr(row, key, "")
            if isinstance(value, str) and value:
                image[key] = value
        images.append(image)
        annotations.append({"id": row.crop_path, "image_id": row.crop_path, "category_id": ids[row.label]})
    categories = [{"id": int(i), "name": name} for i, name in labels.items()]
    return {"info": {"description": "crops of the classification dataset"}, "images": images,
            "annotations": annotations, "categories": categories}


def write_split_ccts(output_dir: Path, frame: pd.DataFrame, labels: dict[str, str], splits: dict[str, list]) -> None:
    """``{train,val,test}_cct.json``: the crops CCT cut by split (animl-ml's notebook, as a function)."""
    keys = list(zip(frame["dataset"], frame["location"]))
    for split in SPLIT_NAMES:
        members = {tuple(pair) for pair in splits[split]}
        rows = frame[[key in members for key in keys]]
        write_json_atomic(output_dir / split_cct_name(split), crops_cct(rows, labels))
