"""What the active-learning loop keeps on disk, and how it reads it back.

``runs/<model>/<experiment>/active_learning/``:

- ``labels.csv`` — every label a person gave, **append-only**: ``path, label, annotator,
  source, round, imported_utc``. A row is added only when its label differs from the
  latest one stored for that image and annotator, so importing the same export twice
  adds nothing, and a later, different label is a new row that wins (``source`` names
  the kept copy of the export it came from). The file is rewritten atomically with the old
  rows first, so a crash leaves either the previous file or the new one, never less.
- ``round_<k>/`` — ``selection.csv`` (what was picked and why; written last, it marks
  the selection as made), ``selection.json``, the hand-off files for the label tool,
  ``imports/`` (a copy of every export read, kept before its labels are stored),
  ``dataset/`` and ``model/`` (the retrained model), ``evaluation/`` and ``metrics.json``
  (held-out figures). Round 0 is the experiment's own model.
- ``history.csv`` — one row per evaluated round: labels used and held-out figures.

The state of a round is read from these files (nothing else to keep in sync).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from classification.active_learning.labels import ReceivedLabel
from classification.io import read_json_object, read_string_csv, write_csv_atomic

LABELS_FILE = "labels.csv"
LABEL_COLUMNS = ["path", "label", "annotator", "source", "round", "imported_utc"]
SELECTION_FILE = "selection.csv"
SELECTION_COLUMNS = ["rank", "path", "score", "distance", "cluster", "predicted", "confidence", "reason"]
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
DONE_FILE = "done.json"
ROUND_NAME = re.compile(r"^round_(\d+)$")


def utc_now() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- labels


def read_labels(path: Path) -> pd.DataFrame:
    """Every stored label row (strings), or an empty table when nothing was imported yet (a folder in its place is
    an error, not an empty store)."""
    if not path.exists():
        return pd.DataFrame(columns=LABEL_COLUMNS, dtype=str)
    return read_string_csv(path, LABEL_COLUMNS)[LABEL_COLUMNS]


def effective_labels(rows: pd.DataFrame) -> dict[str, str]:
    """``{path: label}``: the latest row of each image wins."""
    return dict(zip(rows["path"], rows["label"]))


def labels_up_to(rows: pd.DataFrame, round_number: int) -> dict[str, str]:
    """``{path: label}`` as it stood for round ``round_number``: the latest row of each image among those imported
    for rounds up to it (a later round's labels, or changes, are not that round's)."""
    # a boolean Series, not a list: on an empty table a list selects columns and drops them all
    return effective_labels(rows[rows["round"].astype(int) <= round_number])


def append_labels(path: Path, received: Sequence[ReceivedLabel], round_number: int) -> int:
    """Add each label that differs from the latest one stored for its image and annotator; returns how many."""
    rows = read_labels(path)
    latest = {(p, annotator): label for p, label, annotator in zip(rows["path"], rows["label"], rows["annotator"])}
    stamp = utc_now()
    new = []
    for label in received:
        if latest.get((label.path, label.annotator)) != label.label:
            latest[(label.path, label.annotator)] = label.label
            new.append([label.path, label.label, label.annotator, label.source, str(round_number), stamp])
    if new:
        write_csv_atomic(path, pd.concat([rows, pd.DataFrame(new, columns=LABEL_COLUMNS)], ignore_index=True))
    return len(new)


# ---------------------------------------------------------------- rounds


@dataclass(frozen=True)
class RoundFiles:
    """The files of one round under ``active_learning/round_<k>/``."""

    root: Path
    number: int

    @property
    def selection(self) -> Path:
        return self.root / SELECTION_FILE

    @property
    def selection_info(self) -> Path:
        return self.root / "selection.json"

    @property
    def imports(self) -> Path:
        return self.root / "imports"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def done(self) -> Path:
        return self.model / DONE_FILE

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def label_studio(self) -> Path:
        return self.root / "label_studio.json"

    def is_selected(self) -> bool:
        """Whether ``selection.csv`` was written (anything in its place counts: reading it then says what is wrong)."""
        return self.selection.exists()

    def selected_paths(self) -> list[str]:
        """The relative paths picked in this round, in rank order ([] before the selection)."""
        if not self.is_selected():
            return []
        return read_string_csv(self.selection, SELECTION_COLUMNS)["path"].tolist()


def round_files(al_root: Path, number: int) -> RoundFiles:
    """``active_learning/round_<number>``."""
    return RoundFiles(al_root / f"round_{number}", number)


def round_numbers(al_root: Path) -> list[int]:
    """The rounds that have a folder, in order (round 0 always counts)."""
    found = {0}
    if al_root.is_dir():
        found |= {int(m.group(1)) for p in al_root.iterdir() if p.is_dir() and (m := ROUND_NAME.match(p.name))}
    return sorted(found)


def requested_paths(al_root: Path, up_to: int | None = None) -> list[str]:
    """Every path selected in any round (up to round ``up_to``), in round and rank order, each once."""
    paths: dict[str, None] = {}
    for number in round_numbers(al_root):
        if up_to is None or number <= up_to:
            paths.update(dict.fromkeys(round_files(al_root, number).selected_paths()))
    return list(paths)


def read_metrics(files: RoundFiles) -> dict | None:
    """A round's ``metrics.json``, or None before its evaluation."""
    if not files.metrics.exists():
        return None
    return read_json_object(files.metrics)


def write_history(al_root: Path, rows: Iterable[dict]) -> Path:
    """``history.csv``: one row per evaluated round."""
    path = al_root / HISTORY_FILE
    write_csv_atomic(path, pd.DataFrame(list(rows)))
    return path
