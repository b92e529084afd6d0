"""Try active learning on a dataset that is already labelled: hide most of its train split in a pool.

``carve_pool`` keeps a stratified ``labelled_fraction`` of the train split as the labelled
start, copies the rest of the train crops (without labels) into a pool folder, and writes
a new dataset folder whose train split is the labelled start and whose val and test
splits are the original ones (so held-out figures stay comparable). The hidden labels go
to ``<output dataset>/pool_answers.csv`` (``path,label``; never inside the pool), which ``answer_requests`` turns into the
export a person would have made in Timelapse: a way to run the whole loop unattended,
in the demo and the tests. The pool keeps the crops' folders (relative paths), so two
cameras' equal file names never collide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classification.active_learning.labels import normalize_path
from classification.active_learning.timelapse import timelapse_row
from classification.data.dataset_folder import DATASET_CSV, SPLITS_JSON, read_split_keys, write_dataset_folder
from classification.data.samples import load_label_index
from classification.errors import DataError, UserError
from classification.io import copy_file_atomic, link_atomic, read_json, read_string_csv, write_csv_atomic

ANSWERS_FILE = "pool_answers.csv"


@dataclass(frozen=True)
class CarvedPool:
    """The new dataset folder, the pool folder and how many crops went where."""

    dataset_dir: Path
    pool_dir: Path
    answers: Path
    labelled: int
    pooled: int


def stratified_mask(labels: Sequence[Any] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded ``fraction`` of each label's items (at least one of each label), as a boolean mask."""
    values = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(values), dtype=bool)
    for label in sorted(set(values.tolist())):
        members = np.flatnonzero(values == label)
        count = max(1, int(round(fraction * len(members))))
        chosen[rng.choice(members, size=min(count, len(members)), replace=False)] = True
    return chosen


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (an atomic copy across file systems); an existing target is kept."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if not link_atomic(source, target):
        copy_file_atomic(source, target)


def carve_pool(dataset_dir: Path, crops_dir: Path, output_dir: Path, pool_dir: Path, labelled_fraction: float = 0.2,
               seed: int = 0, train_split: str = "train") -> CarvedPool:
    """Split the train split of ``dataset_dir`` into a labelled start (new dataset) and an unlabelled pool."""
    if not 0 < labelled_fraction < 1:
        raise UserError(f"--labelled-fraction must be between 0 and 1, got {labelled_fraction}")
    if seed < 0:  # numpy's generators take none
        raise UserError(f"--seed must be 0 or more, got {seed}")
    frame = read_string_csv(Path(dataset_dir) / DATASET_CSV, ("path", "dataset", "location", "label"))
    train_keys = read_split_keys(Path(dataset_dir) / SPLITS_JSON, train_split)
    in_train = np.array([key in train_keys for key in zip(frame["dataset"], frame["location"])], dtype=bool)
    if not in_train.any():
        raise DataError(f"{dataset_dir}: the {train_split} split has no crops to carve a pool from")
    keep = np.ones(len(frame), dtype=bool)
    keep[in_train] = stratified_mask(frame["label"][in_train].tolist(), labelled_fraction, seed)
    pooled = frame[~keep]
    for path in pooled["path"]:
        source = Path(crops_dir) / path
        if not source.is_file():
            raise DataError(f"{source}: crop listed in {Path(dataset_dir) / DATASET_CSV} not found (check --crops-dir)")
        link_or_copy(source, Path(pool_dir) / path)
    kept = frame[keep].copy()
    kept["path"] = [str((Path(crops_dir) / path).resolve()) for path in kept["path"]]
    output_dir = Path(output_dir)
    index = load_label_index(Path(dataset_dir))
    write_dataset_folder(output_dir, kept, [index[i] for i in range(len(index))], read_json(Path(dataset_dir) / SPLITS_JSON))
    answers = output_dir / ANSWERS_FILE
    write_csv_atomic(answers, pooled[["path", "label"]].reset_index(drop=True))
    return CarvedPool(output_dir, Path(pool_dir), answers, int(keep[in_train].sum()), len(pooled))


def answer_requests(request_csv: Path, answers_csv: Path, output_csv: Path, label_column: str = "Species") -> int:
    """A Timelapse export (``File, RelativePath, <label column>``) answering a request CSV from known labels."""
    request = read_string_csv(Path(request_csv), ("File", "RelativePath"))
    answers = read_string_csv(Path(answers_csv), ("path", "label"))
    truth = dict(zip(answers["path"].map(normalize_path), answers["label"]))
    rows = []
    for file_name, folder in zip(request["File"], request["RelativePath"]):
        path = normalize_path(f"{folder}/{file_name}")
        if path not in truth:
            raise DataError(f"{answers_csv}: no answer for {path} (requested in {request_csv})")
        rows.append([*timelapse_row(path), truth[path]])
    write_csv_atomic(Path(output_csv), pd.DataFrame(rows, columns=["File", "RelativePath", label_column]))
    return len(rows)
