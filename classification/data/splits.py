"""Location-disjoint train/val/test splits: the problem, its conventions, and the splits files.

Every ``(dataset, location)`` goes to exactly one split, so a classifier is never tested on
backgrounds it was trained on. ``SplitProblem`` holds the crops per (location, label), the only
input of the searches (``split_search``) and of the report (``split_report``); this module also
reads and writes ``splits.json`` and checks a user's own (``--splits-file``).

Conventions (documented once here, relied on everywhere):

- Splits are numbered ``0 = train, 1 = val, 2 = test`` (:data:`SPLIT_NAMES`).
- ``fixed`` is an ``(M,)`` int8 array: ``UNPINNED`` (-1) marks a location the search places,
  ``0..2`` pins a location to that split. A split that holds a pinned location is *closed*:
  unpinned locations never go to it. This is ``--match-test``: the old test locations are pinned
  to test and no other location may join them, so unpinned locations are shared between train and
  val only, by the targets renormalised over the open splits (``f_train / (f_train + f_val)``, ...).
  A split whose target fraction is 0 is closed too.
- Empty splits: the held-out term ``Σ_y (N_sy/N_s − p_y)²`` is undefined when ``N_s = 0``
  (the references divide by zero). An empty held-out split scores the largest value the
  term can take for any non-empty split, ``1 + Σ_y p_y² − 2·min_y p_y``, so emptiness is
  never preferred. A held-out split with target 0 is meant to be empty: its term is dropped.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from classification.errors import DataError, UserError
from classification.io import JSON_KINDS, read_json_object, shown_json, shown_value

log = logging.getLogger(__name__)

__all__ = [
    "SPLIT_NAMES",
    "TEST",
    "TRAIN",
    "UNPINNED",
    "VAL",
    "SplitProblem",
    "SplitResult",
    "assignment_from_splits",
    "check_fixed",
    "check_fractions",
    "location_entry",
    "open_splits",
    "pin_test_locations",
    "read_splits",
    "splits_to_json",
    "target_fractions",
]

SPLIT_NAMES = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
UNPINNED = -1  # a location of ``fixed`` that the search places (not pinned to a split)


@dataclass(frozen=True, eq=False)
class SplitProblem:
    """Crops per (location, label): everything the split search needs, and nothing else."""

    locations: list[tuple[str, str]]  # (dataset, location) keys, sorted; always strings
    labels: list[str]  # sorted
    counts: np.ndarray  # int64 (M, Y): crops of label y at location k

    def __post_init__(self) -> None:
        counts = np.array(self.counts, copy=True)
        if counts.shape != (len(self.locations), len(self.labels)):
            raise ValueError(f"counts has shape {counts.shape}, expected {(len(self.locations), len(self.labels))}")
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"counts must be integers, got {counts.dtype}")
        counts = counts.astype(np.int64)
        if (counts < 0).any():
            raise ValueError("counts must not be negative")
        if list(self.locations) != sorted(set(self.locations)):
            raise ValueError("locations must be sorted and unique")
        if list(self.labels) != sorted(set(self.labels)):
            raise ValueError("labels must be sorted and unique")
        if counts.size and (counts.sum(axis=0) == 0).any():
            raise ValueError(f"label {shown_value(repr(self.labels[int(np.argmin(counts.sum(axis=0)))]))} has no crops")
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)

    @property
    def n_locations(self) -> int:
        """Number of (dataset, location) keys, ``M``."""
        return len(self.locations)

    @property
    def n_labels(self) -> int:
        """Number of labels, ``Y``."""
        return len(self.labels)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> SplitProblem:
        """Count crops per (dataset, location) and label; one row of ``frame`` is one crop.

        A null or empty dataset, location or label raises ``DataError``: the references drop
        such rows silently, here the caller resolves missing locations first.
        """
        missing = [column for column in ("dataset", "location", "label") if column not in frame.columns]
        if missing:
            raise DataError(f"the crop table has no column {', '.join(missing)} (needs dataset, location, label)")
        if len(frame) == 0:
            raise DataError("the crop table is empty: no crops to split")
        dataset_codes, dataset_names = _text_codes(frame, "dataset")
        location_codes, location_names = _text_codes(frame, "location")
        columns, label_names = _text_codes(frame, "label")
        # Codes are ranks in sorted order, so sorted pair codes are the (dataset, location) keys in sorted order.
        pairs, rows = np.unique(dataset_codes * len(location_names) + location_codes, return_inverse=True)
        location_keys = [(dataset_names[p // len(location_names)], location_names[p % len(location_names)]) for p in pairs]
        flat = np.bincount(rows * len(label_names) + columns, minlength=len(location_keys) * len(label_names))
        return cls(location_keys, label_names, flat.reshape(len(location_keys), len(label_names)))


def _text_codes(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str]]:
    """Each row's code into the column's sorted distinct texts; nulls, blanks and non-text values raise ``DataError``.

    Integers become their decimal text; floats are refused, because a location read as a
    float (``1.0``) has already lost its spelling (``"001"``): read CSVs with ``dtype=str``.
    Values are checked once per distinct value, so a million crops cost a hash each.
    """
    series = frame[column]
    null = series.isna().to_numpy()
    if null.any():
        first = frame.index[np.flatnonzero(null)[0]]
        raise DataError(
            f"{int(null.sum())} crop(s) have no {column} (first at row {first!r}); "
            f"resolve missing {column}s before building splits"
        )
    codes, distinct = pd.factorize(series.to_numpy(dtype=object), sort=False)
    texts = [_as_text(value, column) for value in distinct]
    if any(not text.strip() for text in texts):
        raise DataError(f"a crop has an empty {column}; resolve missing {column}s before building splits")
    names = sorted(set(texts))  # 1 and "1" are one text
    rank = {text: i for i, text in enumerate(names)}
    return np.array([rank[text] for text in texts], dtype=np.int64)[codes], names


def _as_text(value: object, column: str) -> str:
    """A str (subclass) or an integer as text; anything else is a ``DataError``."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(value)
    raise DataError(
        f"{column} {shown_value(repr(value))} is a {type(value).__name__}, expected text "
        "(read CSV files with dtype=str so that '001' stays '001')"
    )


@dataclass(frozen=True, eq=False)
class SplitResult:
    """One assignment of every location to a split, with its score and how it was found."""

    assignment: np.ndarray  # (M,) int8 in {0, 1, 2}
    score: float
    method: str
    candidates: int
    improved_moves: int


def target_fractions(val_frac: float, test_frac: float) -> np.ndarray:
    """The targets ``[1 − v − t, v, t]``; a bad ``--val-frac``/``--test-frac`` is a ``UserError``."""
    for flag, value in (("--val-frac", val_frac), ("--test-frac", test_frac)):
        if not np.isfinite(value) or value < 0 or value >= 1:
            raise UserError(f"{flag} must be at least 0 and below 1, got {value}")
    if val_frac + test_frac >= 1:
        raise UserError(f"--val-frac + --test-frac must be below 1 (train needs a share), got {val_frac} + {test_frac}")
    return np.array([1.0 - val_frac - test_frac, val_frac, test_frac], dtype=np.float64)


def check_fractions(fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fractions as a float array of three non-negative values summing to 1."""
    target = np.asarray(fractions, dtype=np.float64)
    if target.shape != (3,) or not np.isfinite(target).all() or (target < 0).any() or abs(target.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    return target


def check_fixed(problem: SplitProblem, fixed: np.ndarray | None) -> np.ndarray:
    """``fixed`` as an (M,) int8 array in {-1, 0, 1, 2}; ``None`` means every location is unpinned."""
    if fixed is None:
        return np.full(problem.n_locations, UNPINNED, dtype=np.int8)
    array = np.asarray(fixed)
    if array.shape != (problem.n_locations,) or (array.size and (array.min() < UNPINNED or array.max() > TEST)):
        raise ValueError(f"fixed must be an ({problem.n_locations},) array of -1 (free) or a split 0..2")
    return array.astype(np.int8)


def open_splits(fixed: np.ndarray, fractions: Sequence[float] | np.ndarray) -> tuple[int, ...]:
    """Splits that unpinned locations may join: target above 0 and no pinned location (see module doc)."""
    target = check_fractions(fractions)
    pinned = {int(s) for s in np.unique(np.asarray(fixed)) if s != UNPINNED}
    result = tuple(s for s in (TRAIN, VAL, TEST) if target[s] > 0 and s not in pinned)
    if not result and (np.asarray(fixed) == UNPINNED).any():
        raise UserError("every split is pinned or has a target of 0: the free locations have nowhere to go")
    return result


def pin_test_locations(problem: SplitProblem, test_locations: Iterable[Sequence[str]]) -> np.ndarray:
    """The ``fixed`` array for ``--match-test``: the given locations pinned to test, all others unpinned.

    Test locations that are not in the data are logged and ignored.
    """
    index = {key: i for i, key in enumerate(problem.locations)}
    fixed = np.full(problem.n_locations, UNPINNED, dtype=np.int8)
    absent = []
    for entry in test_locations:
        key = (str(entry[0]), str(entry[1]))
        if key in index:
            fixed[index[key]] = TEST
        else:
            absent.append(key)
    if absent:
        log.warning("%d test location(s) to match are not in the data, e.g. %s", len(absent), absent[:5])
    return fixed


def splits_to_json(problem: SplitProblem, assignment: np.ndarray) -> dict[str, list[list[str]]]:
    """``{"train": [[dataset, location], ...], "val": [...], "test": [...]}``, each list sorted."""
    assignment = np.asarray(assignment)
    return {
        name: [[dataset, location] for (dataset, location), s in zip(problem.locations, assignment) if s == split]
        for split, name in enumerate(SPLIT_NAMES)
    }


def location_entry(entry: object, where: str, numbers: bool = False) -> tuple[str, str]:
    """One ``[dataset, location]`` entry of a splits file, checked. ``numbers``: a whole number is read as its text
    (MegaDetector's CCT files may hold number locations, and its splits.json then lists them as numbers)."""
    allowed = (str, int) if numbers else (str,)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(
            isinstance(v, allowed) and not isinstance(v, bool) for v in entry):
        raise DataError(f"{where}: expected a [dataset, location] pair of strings, got {shown_json(entry)}")
    return str(entry[0]), str(entry[1])


def read_splits(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``splits.json`` (``{"train": [[dataset, location], ...], "val": [...], ...}``) with every entry checked: a split
    that is not a list, or an entry that is not a pair (``"ab"`` would unpack as ``("a", "b")``), is one line naming
    the file, the split and the entry, as is a location in two splits. Split names are not checked here: a config may
    name its own. Number locations of older files are read as their text, as this reader always did."""
    splits = read_json_object(path)
    checked = {}
    split_of: dict[tuple[str, str], str] = {}
    for name, entries in splits.items():
        if not isinstance(entries, list):
            kind = JSON_KINDS.get(type(entries), type(entries).__name__)
            raise DataError(f"{path}: {name}: expected a list of [dataset, location] pairs, found {kind}")
        checked[name] = [location_entry(entry, f"{path}: {name}[{i}]", numbers=True) for i, entry in enumerate(entries)]
        for key in checked[name]:
            if split_of.setdefault(key, name) != name:
                raise DataError(f"{path}: location {shown_json(list(key))} is in both {split_of[key]} and {name}: a camera location "
                                "must be in one split only, or its images leak from training into evaluation")
    return checked


def assignment_from_splits(problem: SplitProblem, splits: Mapping[str, object], source: str) -> np.ndarray:
    """Check a user's ``splits.json`` (``--splits-file``) against the data and return its (M,) assignment.

    Every location of the data must be in exactly one split; locations of the file that are
    not in the data are allowed (the data may have been filtered) and logged as a warning.
    """
    if not isinstance(splits, Mapping):
        raise DataError(f"{source}: expected an object with keys train, val, test")
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    absent_keys = [name for name in SPLIT_NAMES if name not in splits]
    if unknown or absent_keys:
        problems = [f"unknown split(s) {unknown}"] * bool(unknown) + [f"missing split(s) {absent_keys}"] * bool(absent_keys)
        raise DataError(f"{source}: {'; '.join(problems)} (keys must be train, val, test)")
    index = {key: i for i, key in enumerate(problem.locations)}
    assignment = np.full(problem.n_locations, UNPINNED, dtype=np.int8)
    seen: dict[tuple[str, str], str] = {}
    extra: list[tuple[str, str]] = []
    for split, name in enumerate(SPLIT_NAMES):
        entries = splits[name]
        if not isinstance(entries, list):
            raise DataError(f"{source}: {name}: expected a list of [dataset, location] pairs")
        for i, entry in enumerate(entries):
            key = location_entry(entry, f"{source}: {name}[{i}]")
            if key in seen and seen[key] != name:
                raise DataError(f"{source}: location {shown_value(repr(list(key)))} is in both {seen[key]} and {name}")
            seen[key] = name
            if key in index:
                assignment[index[key]] = split
            elif key not in extra:
                extra.append(key)
    uncovered = [problem.locations[i] for i in np.flatnonzero(assignment == UNPINNED)]
    if uncovered:
        shown = ", ".join(str(list(key)) for key in uncovered[:5])
        more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
        raise DataError(f"{source}: {len(uncovered)} location(s) of the data are in no split: {shown_value(shown, 400)}{more}")
    if extra:
        log.warning("%s: %d location(s) are not in the data and are ignored, e.g. %s", source, len(extra),
                    shown_value(repr(extra[:5]), 400))
    return assignment
