"""Lightly's file formats, for users who keep selecting with Lightly.

Predictions (docs.lightly.ai, "Prediction Format"), under the Lightly datasource folder:

    .lightly/predictions/tasks.json               ["<task>", ...]
    .lightly/predictions/<task>/schema.json       {"task_type": "classification",
                                                   "categories": [{"id": 0, "name": ...}, ...]}
    .lightly/predictions/<task>/<file stem>.json  {"file_name": "sub/img.jpg",
                                                   "predictions": [{"category_id": k, "probabilities": [...]}]}

where ``file_name`` is the image's full relative path (its folders repeat under ``<task>/``)
and the probabilities follow the category ids. Embeddings: Lightly's ``embeddings.csv``
with ``filenames, embedding_0 .. embedding_{d-1}, labels`` (integer labels, 0 when
unknown), plus an ``al_score`` column after ``labels`` when scores are given (Lightly's
``check_embeddings(..., remove_additional_columns=True)`` drops such extra columns).
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from classification.active_learning.labels import label_name_list, normalize_path
from classification.errors import DataError, UserError
from classification.io import atomic_open, read_json, unreadable_file, write_json_atomic

PREDICTIONS_DIR = Path(".lightly") / "predictions"
EMBEDDING_COLUMN = re.compile(r"embedding_(\d+)")


def prediction_file(folder: str | Path, task_name: str, file_name: str) -> Path:
    """Where Lightly expects the prediction for ``file_name``: ``<task>/<folders>/<stem>.json``."""
    relative = PurePosixPath(normalize_path(file_name))
    if not relative.parts or ".." in relative.parts:
        raise UserError(f"Lightly predictions: file name {file_name!r} is not a relative path under the image root")
    return Path(folder) / PREDICTIONS_DIR / task_name / relative.with_suffix(".json")


def _check_task_name(task_name: str) -> None:
    """A task name is one folder name."""
    if not task_name or "/" in task_name or "\\" in task_name or task_name in (".", ".."):
        raise UserError(f"Lightly predictions: task name {task_name!r} must be a plain folder name")


def _write_tasks_json(path: Path, task_name: str) -> None:
    """Add ``task_name`` to ``tasks.json``, keeping the tasks already listed there."""
    tasks: list[str] = []
    if path.is_file():
        existing = read_json(path)
        if not isinstance(existing, list) or not all(isinstance(task, str) for task in existing):
            raise DataError(f"{path}: expected a list of task names")
        tasks = existing
    if task_name not in tasks:
        tasks.append(task_name)
    write_json_atomic(path, tasks)


def write_lightly_predictions(
    folder: str | Path,
    task_name: str,
    file_names: Sequence[str],
    probabilities: Any,
    label_names: Sequence[str],
) -> list[Path]:
    """Write Lightly classification predictions: tasks.json, schema.json and one JSON per image (returned)."""
    _check_task_name(task_name)
    names = label_name_list(label_names)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(file_names), len(names)):
        raise UserError(
            f"Lightly predictions: probabilities have shape {probs.shape}, expected "
            f"({len(file_names)} images, {len(names)} classes)"
        )
    if not np.isfinite(probs).all():
        raise UserError("Lightly predictions: probabilities contain NaN or infinite values")
    targets = [prediction_file(folder, task_name, name) for name in file_names]
    clashes = sorted(str(target) for target, count in Counter(targets).items() if count > 1)
    if clashes:
        raise UserError(f"Lightly predictions: several images map to the same prediction file: {clashes[0]}")
    root = Path(folder) / PREDICTIONS_DIR
    schema = {"task_type": "classification", "categories": [{"id": i, "name": name} for i, name in enumerate(names)]}
    write_json_atomic(root / task_name / "schema.json", schema)
    for file_name, target, row in zip(file_names, targets, probs):
        prediction = {"category_id": int(np.argmax(row)), "probabilities": [float(p) for p in row]}
        write_json_atomic(target, {"file_name": normalize_path(file_name), "predictions": [prediction]}, indent=None)
    _write_tasks_json(root / "tasks.json", task_name)
    return targets


@dataclass
class LightlyEmbeddings:
    """The contents of a Lightly ``embeddings.csv``."""

    file_names: list[str]
    embeddings: np.ndarray  # (n, d) float64
    labels: list[int]
    al_scores: np.ndarray | None = None  # (n,) float64 when the file has an al_score column


def write_embeddings_csv(
    path: str | Path,
    file_names: Sequence[str],
    embeddings: Any,
    labels: Sequence[int] | np.ndarray | None = None,
    al_scores: Sequence[float] | np.ndarray | None = None,
) -> None:
    """Write Lightly's ``embeddings.csv`` atomically (labels default to 0; ``al_score`` column when given)."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    n = len(file_names)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise UserError(f"{path}: embeddings have shape {vectors.shape}, expected ({n} images, d)")
    label_list = [0] * n if labels is None else [int(label) for label in labels]
    scores = None if al_scores is None else [float(score) for score in al_scores]
    if len(label_list) != n or (scores is not None and len(scores) != n):
        raise UserError(f"{path}: {n} file names but {len(label_list)} labels / {len(scores or [])} al_scores")
    header = ["filenames", *(f"embedding_{i}" for i in range(vectors.shape[1])), "labels"]
    header += ["al_score"] if scores is not None else []
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for i, file_name in enumerate(file_names):
            row = [normalize_path(file_name), *(repr(float(x)) for x in vectors[i]), str(label_list[i])]
            writer.writerow(row + ([repr(scores[i])] if scores is not None else []))


def _parse_float(path: Path, line: int, column: str, text: str) -> float:
    """A float from a CSV cell, else a one-line ``DataError`` naming the line and column."""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: line {line}: {column}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{path}: line {line}: {column}: not a finite number: {text!r}")
    return value


def _embedding_columns(path: Path, header: list[str]) -> list[int]:
    """Indices of the ``embedding_i`` columns, checked to run 0..d-1 between filenames and labels."""
    if not header or header[0] != "filenames" or "labels" not in header:
        raise DataError(
            f"{path}: not a Lightly embeddings.csv: expected columns filenames, embedding_0.., labels; "
            f"found {', '.join(header)}"
        )
    matches = [(i, match) for i, name in enumerate(header) if (match := EMBEDDING_COLUMN.fullmatch(name))]
    indices = [i for i, _ in matches]
    numbers = [int(match.group(1)) for _, match in matches]
    if not indices or numbers != list(range(len(numbers))):
        raise DataError(f"{path}: embedding columns must be embedding_0 .. embedding_{{d-1}} in order")
    return indices


def read_embeddings_csv(path: str | Path) -> LightlyEmbeddings:
    """Read a Lightly ``embeddings.csv`` (with an optional ``al_score`` column)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable_file(path, error, "a Lightly embeddings.csv") from None
    except csv.Error as error:  # e.g. a field larger than the csv module's limit
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    header = rows[0] if rows else []
    columns = _embedding_columns(path, header)
    label_at = header.index("labels")
    score_at = header.index("al_score") if "al_score" in header else None
    file_names: list[str] = []
    vectors: list[list[float]] = []
    labels: list[int] = []
    scores: list[float] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {line}: {len(row)} values, expected {len(header)}")
        file_names.append(row[0])
        vectors.append([_parse_float(path, line, header[i], row[i]) for i in columns])
        try:
            labels.append(int(row[label_at]))
        except ValueError:
            raise DataError(f"{path}: line {line}: labels: not an integer: {row[label_at]!r}") from None
        if score_at is not None:
            scores.append(_parse_float(path, line, "al_score", row[score_at]))
    embeddings = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), len(columns))
    return LightlyEmbeddings(file_names, embeddings, labels, np.asarray(scores) if score_at is not None else None)
