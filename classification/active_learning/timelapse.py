"""Timelapse round trip: a request CSV to mark the images to label, and the export read back.

Timelapse (saul.cpsc.ucalgary.ca/timelapse) names each image by ``File`` (the file name)
and ``RelativePath`` (its folder under the image set's root, with Windows ``\\``
separators; empty for the root itself). The request CSV has the columns
``File, RelativePath, Selected`` with ``Selected = true``: with a Flag field ``Selected``
in the template, importing it (*File > Export or import data to/from a CSV file*)
marks the requested images, and a custom selection ``Selected = true`` shows only them.
The person fills the label column (``Species`` by default) and exports the selection to
CSV; ``read_timelapse_export`` reads it: rows are matched on ``RelativePath`` + ``File``
(``\\`` or ``/``), an empty label is a skip, a row marked ``DeleteFlag = true`` too,
duplicated rows (Timelapse's way of recording two species) are votes, and labels are
matched to the label index ignoring case and surrounding spaces (reported in
``LabelImport.renamed``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

from classification.active_learning.labels import (
    LabelImport,
    LabelMatcher,
    PathMatcher,
    Vote,
    build_label_import,
    normalize_path,
)
from classification.errors import DataError
from classification.io import atomic_open, read_string_csv

REQUEST_COLUMNS = ("File", "RelativePath", "Selected")
TRUE_VALUES = {"true", "1", "yes"}


def timelapse_row(relative_path: str) -> tuple[str, str]:
    """``(File, RelativePath)`` for a relative POSIX path, with Windows separators as Timelapse writes them."""
    parts = normalize_path(relative_path).split("/")
    return parts[-1], "\\".join(parts[:-1])


def write_request_csv(path: str | Path, relative_paths: Iterable[str]) -> None:
    """Write the Timelapse request CSV (``File, RelativePath, Selected``) atomically."""
    rows = [timelapse_row(p) for p in dict.fromkeys(normalize_path(p) for p in relative_paths) if p]
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(REQUEST_COLUMNS)
        for file_name, folder in rows:
            writer.writerow([file_name, folder, "true"])


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a Timelapse CSV export, every value a string, read by the library's one CSV
    reader (``io.read_string_csv``: UTF-8 with or without a byte-order mark, a file cut short refused)."""
    frame = read_string_csv(path, required=())
    return [str(name) for name in frame.columns], frame.to_dict("records")


def _find_column(path: Path, header: list[str], wanted: str) -> str:
    """The header's name for column ``wanted`` (exact, else ignoring case/spaces); else a ``DataError``."""
    if wanted in header:
        return wanted
    for name in header:
        if name.strip().casefold() == wanted.strip().casefold():
            return name
    raise DataError(f"{path}: no column {wanted!r}; the columns are: {', '.join(header) or '(none)'}")


def read_timelapse_export(
    path: str | Path,
    label_names: Iterable[str] | Mapping[str, str],
    requested_paths: Iterable[str] | None,
    label_column: str = "Species",
) -> LabelImport:
    """Labels from a Timelapse CSV export for the requested relative paths."""
    path = Path(path)
    header, rows = _read_rows(path)
    file_column = _find_column(path, header, "File")
    folder_column = _find_column(path, header, "RelativePath")
    label_column = _find_column(path, header, label_column)
    delete_column = next((name for name in header if name.strip().casefold() == "deleteflag"), None)
    labels, paths = LabelMatcher(label_names), PathMatcher(requested_paths)
    votes: dict[str, list[Vote]] = {}
    no_choice: dict[str, str] = {}
    unmatched: list[str] = []
    for line, row in enumerate(rows, start=2):
        file_name = (row.get(file_column) or "").strip()
        folder = (row.get(folder_column) or "").strip()
        if not file_name:
            unmatched.append(f"line {line}: no {file_column}")
            continue
        relative = normalize_path(f"{folder}/{file_name}")
        matched = paths.match(relative)
        if matched is None:
            unmatched.append(relative)
            continue
        label = (row.get(label_column) or "").strip()
        deleted = delete_column is not None and (row.get(delete_column) or "").strip().lower() in TRUE_VALUES
        if not label or deleted:
            no_choice.setdefault(matched, "DeleteFlag set" if deleted else f"no {label_column}")
        else:
            votes.setdefault(matched, []).append((label, ""))
    return build_label_import(votes, no_choice, unmatched, f"timelapse:{path}", labels, paths)
