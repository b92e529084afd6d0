"""Build the classification dataset and its location-disjoint splits.

Input: crops and their metadata, from the crops manifest that
``utils/crop_detections.py`` writes, or (the seed's interface) from the CCT file the
crops were made from; without the ``csv`` mode, from an existing
``<output_dir>/classification_ds.csv`` alone (as MegaDetector's script: re-splitting with
another seed, or a user's own CSV). Output, in the formats MegaDetector's and animl-ml's tools read:
``classification_ds.csv``, ``label_index.json``, ``splits.json``,
``classification_cct.json``, ``{train,val,test}_cct.json`` and ``split_report.json``.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from classification.data.cct import CCT, MissingLocationRule, category_names, load_cct, resolve_missing_locations
from classification.data.crop_manifest import MANIFEST_NAME, crop_file_name
from classification.data.dataset_folder import (
    CROPS_CCT_JSON,
    DATASET_CSV,
    LABEL_INDEX_JSON,
    SPLIT_REPORT_JSON,
    SPLITS_JSON,
    crops_cct,
    label_index,
    read_dataset_csv,
    read_label_index,
    write_split_ccts,
)
from classification.data.split_report import build_split_report, format_split_report
from classification.data.split_search import improve_locally, random_search, score_assignments, smallest_first
from classification.data.splits import (
    SPLIT_NAMES,
    SplitProblem,
    SplitResult,
    assignment_from_splits,
    pin_test_locations,
    read_splits,
    splits_to_json,
    target_fractions,
)
from classification.data.time_splits import (
    NO_SPLIT,
    MissingDatetimeRule,
    TimeRule,
    time_report,
    time_split_of_crops,
    time_warnings,
)
from classification.errors import DataError, UserError
from classification.io import (
    ensure_folder,
    read_json,
    read_string_csv,
    shown_value,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "SPLIT_BY",
    "DatasetOptions",
    "DatasetReport",
    "SplitBy",
    "SplitMethod",
    "check_crop_paths",
    "create_classification_dataset",
    "crops_frame_from_cct",
    "find_crops_manifest",
    "read_crops_manifest",
    "read_manifests",
]

MODES = ("csv", "cct", "splits")
SplitMethod = Literal["random", "smallest_first"]
SplitBy = Literal["location", "time", "location-time"]
SPLIT_BY = ("location", "time", "location-time")


@dataclass(frozen=True)
class DatasetOptions:
    """Everything ``create_classification_dataset`` needs besides the output folder."""

    crops_dir: Path | None = None  # needed to build the CSV; optional when splitting an existing one
    cct_json: Path | None = None
    crops_manifests: tuple[Path, ...] = ()  # default: CROPS_DIR/crops_manifest.csv; several: crop runs in folders under CROPS_DIR
    modes: Collection[str] = MODES
    min_locs: int = 1
    val_frac: float = 0.2
    test_frac: float = 0.1
    method: SplitMethod = "random"
    seed: int = 123
    candidates: int = 10_000
    improve: bool = True
    match_test: tuple[Path, Path] | None = None
    splits_file: Path | None = None
    missing_locations: MissingLocationRule = "sequence"
    split_by: SplitBy = "location"  # what is held out: locations, time (per location), or both
    test_last: str | None = None  # e.g. "3M": the last 3 months of every location to test
    val_last: str | None = None
    test_period: str | None = None  # e.g. "2011-06..2011-08": a calendar period to test
    val_period: str | None = None
    missing_datetimes: MissingDatetimeRule = "drop"
    datetime_format: str | None = None  # strptime syntax of the datetimes; None: ISO 8601 / EXIF only

    def time_rule(self) -> TimeRule:
        """The time part of the options (``--split-by time`` or ``location-time``)."""
        return TimeRule(test_frac=self.test_frac, val_frac=self.val_frac, test_last=self.test_last,
                        val_last=self.val_last, test_period=self.test_period, val_period=self.val_period,
                        missing=self.missing_datetimes, datetime_format=self.datetime_format)

    def datetime_source(self) -> str:
        """The file the datetimes come from, for a one-line error: the CCT or the crops manifest(s)."""
        if self.cct_json is not None:
            return str(self.cct_json)
        if self.crops_manifests:
            return ", ".join(map(str, self.crops_manifests))
        return str(Path(self.crops_dir or ".") / MANIFEST_NAME)


@dataclass
class TimeSplit:
    """Each crop's split by time (``--split-by time``/``location-time``) and the report's ``time`` section."""

    split: np.ndarray  # (crops,) int8 split per row of the dataset frame
    method: str
    report: dict[str, Any]


@dataclass
class DatasetReport:
    """What went into the dataset and what was left out, and why."""

    crops: int = 0
    missing_crop_files: int = 0
    unlabelled_crops: int = 0
    dropped_labels: dict[str, int] = field(default_factory=dict)
    split_report: dict[str, Any] | None = None


def read_crops_manifest(path: Path) -> pd.DataFrame:
    """The crops manifest written by ``utils/crop_detections.py``."""
    hint = " (run utils/crop_detections.py first, or pass --cct-json)"
    frame = read_string_csv(path, ("crop_path", "dataset", "location", "label"), hint)
    if frame.empty:
        raise DataError(f"{path}: lists no crops (a header and no rows); did utils/crop_detections.py find any boxes?")
    check_crop_paths(frame["crop_path"], path)
    return frame


def check_crop_paths(crop_paths: pd.Series, path: Path) -> None:
    """Every ``crop_path`` is relative, stays inside the crops folder, and is listed once (after ``./`` and
    ``a/../`` are resolved): a crop listed twice would count twice, one outside would be read from anywhere."""
    normalised = crop_paths.map(lambda text: posixpath.normpath(text.replace("\\", "/")))
    outside = normalised.map(lambda text: text.startswith("/") or text == ".." or text.startswith("../") or text == ".")
    if outside.any():
        row = int(outside.to_numpy().argmax())
        raise DataError(f"{path}: line {row + 2}: crop_path {shown_value(crop_paths.iloc[row])!r} is not a path inside the crops "
                        "folder (crop paths are relative to the manifest's folder)")
    repeated = normalised.duplicated()
    if repeated.any():
        row = int(repeated.to_numpy().argmax())
        first = int((normalised == normalised.iloc[row]).to_numpy().argmax())
        raise DataError(f"{path}: line {row + 2}: crop_path {shown_value(crop_paths.iloc[row])!r} is the crop of line {first + 2} "
                        "again (each crop is listed once)")


def read_manifests(paths: Sequence[Path], crops_dir: Path) -> pd.DataFrame:
    """Several crop runs as one table: each manifest's ``crop_path`` made relative to ``crops_dir``, which holds
    their folders (``crops/animl``, ``crops/lila``), so one dataset and one ``crops_dir`` serve them all."""
    frames = []
    root = crops_dir.resolve()
    for path in paths:
        frame = read_crops_manifest(path)
        try:
            prefix = path.parent.resolve().relative_to(root)
        except ValueError:
            raise UserError(f"--crops-manifest {path}: not under --crops-dir {crops_dir} (crop paths are made relative to it)") from None
        if prefix.parts:
            frame["crop_path"] = [(prefix / crop).as_posix() for crop in frame["crop_path"]]
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    repeated = frame["crop_path"].duplicated()
    if repeated.any():
        raise DataError(f"--crops-manifest: {frame['crop_path'][repeated].iloc[0]} is listed twice (the same manifest given twice?)")
    return frame.fillna("")


def find_crops_manifest(crops_dir: str | Path) -> Path | None:
    """``<crops_dir>/crops_manifest.csv`` when it exists (the crops' images, sequences and boxes), else None;
    whatever is there is read (a folder in its place is one line, not a dataset without sequences)."""
    path = Path(crops_dir) / MANIFEST_NAME
    return path if path.exists() else None


def crops_frame_from_cct(data: CCT, crops_dir: Path, dataset: str) -> pd.DataFrame:
    """One row per boxed annotation, in the manifest's columns, whether or not its crop exists."""
    names = category_names(data)
    images = {image["id"]: image for image in data["images"]}
    rows = []
    for annotation in data["annotations"]:
        if annotation.get("bbox") is None:
            continue
        image = images[annotation["image_id"]]
        rows.append(
            {
                "crop_path": crop_file_name(image["file_name"], str(annotation["id"])),
                "image_id": str(image["id"]),
                "annotation_id": str(annotation["id"]),
                "dataset": str(image.get("dataset") or dataset),
                "location": image["location"],
                "seq_id": str(image.get("seq_id") or ""),
                "datetime": str(image.get("datetime") or ""),
                "label": names[annotation["category_id"]],
                "confidence": "",
            }
        )
    return pd.DataFrame(rows, columns=["crop_path", "image_id", "annotation_id", "dataset", "location",
                                       "seq_id", "datetime", "label", "confidence"], dtype=str)


def load_crops(options: DatasetOptions, report: DatasetReport) -> pd.DataFrame:
    """Crops with labels and locations, from the CCT (seed interface) or the crops manifest."""
    if options.crops_dir is None:
        raise UserError("--crops-dir is needed to build classification_ds.csv (--mode csv)")
    if options.cct_json is not None:
        data, location_report = resolve_missing_locations(load_cct(options.cct_json), options.missing_locations)
        log.info("%s: %s", options.cct_json, location_report.summary())
        frame = crops_frame_from_cct(data, options.crops_dir, options.cct_json.stem)
    else:
        frame = read_manifests(options.crops_manifests or (options.crops_dir / MANIFEST_NAME,), options.crops_dir)
        if (frame["location"] == "").any():
            raise DataError("crops manifest: rows without a location (re-run utils/crop_detections.py)")
    return drop_unusable_rows(frame, options.crops_dir, report)


def load_dataset_rows(path: Path, crops_dir: Path | None, report: DatasetReport) -> pd.DataFrame:
    """An existing ``classification_ds.csv`` (ours, MegaDetector's or a user's own: ``path``, ``dataset``,
    ``location`` and ``label`` are needed) as crop rows; crop files are checked only when ``crops_dir`` is given."""
    hint = " (build it with --mode csv, or write your own: path,dataset,location,label)"
    frame = read_string_csv(path, ("path", "dataset", "location", "label"), hint).rename(columns={"path": "crop_path"})
    if frame.empty:
        raise DataError(f"{path}: lists no crops (a header and no rows)")
    empty = frame["location"].str.strip() == ""
    if empty.any():
        raise DataError(f"{path}: {int(empty.sum())} rows without a location (line {int(empty.idxmax()) + 2});"
                        " every crop needs one to be split by location")
    return drop_unusable_rows(frame, crops_dir, report)


def drop_unusable_rows(frame: pd.DataFrame, crops_dir: Path | None, report: DatasetReport) -> pd.DataFrame:
    """Leave out (and count, with a warning) crops whose file is missing under ``crops_dir`` and crops without a label."""
    if crops_dir is not None:
        exists = np.array([(crops_dir / path).is_file() for path in frame["crop_path"]], dtype=bool)
        report.missing_crop_files = int((~exists).sum())
        if report.missing_crop_files:
            examples = ", ".join(frame.loc[~exists, "crop_path"].head(3))
            log.warning("%d crops listed but not found under %s (e.g. %s): left out; run utils/crop_detections.py",
                        report.missing_crop_files, crops_dir, examples)
        frame = frame[exists]
    labelled = frame["label"].str.strip() != ""
    report.unlabelled_crops = int((~labelled).sum())
    if report.unlabelled_crops:
        log.warning("%d crops have no label (MegaDetector output without --labels-cct): left out", report.unlabelled_crops)
    return frame[labelled].reset_index(drop=True)


def drop_rare_labels(frame: pd.DataFrame, min_locs: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop labels seen at fewer than ``min_locs`` (dataset, location) pairs; report each one."""
    if frame.empty:
        return frame, {}
    locations_per_label = frame.groupby("label")[["dataset", "location"]].apply(lambda g: len(g.drop_duplicates()))
    rare = locations_per_label[locations_per_label < min_locs]
    for label, n_locations in rare.items():
        n_crops = int((frame["label"] == label).sum())
        log.warning("label %r: %d crops at %d locations < --min-locs %d: dropped", label, n_crops, n_locations, min_locs)
    return frame[~frame["label"].isin(rare.index)].reset_index(drop=True), {str(k): int(v) for k, v in rare.items()}


def warn_split_sequences(frame: pd.DataFrame) -> None:
    """Warn when one sequence spans several locations: splitting by location would cut it."""
    if "seq_id" not in frame:  # a classification_ds.csv has no sequences
        return
    with_seq = frame[frame["seq_id"].fillna("") != ""]
    spans = with_seq.groupby(["dataset", "seq_id"])["location"].nunique()
    if (spans > 1).any():
        log.warning("%d sequences span more than one location (e.g. %s): check the locations",
                    int((spans > 1).sum()), spans[spans > 1].index[0])


def dataset_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``classification_ds.csv``: path, dataset, location, dataset_class, confidence, label."""
    return pd.DataFrame(
        {
            "path": frame["crop_path"],
            "dataset": frame["dataset"],
            "location": frame["location"],
            "dataset_class": frame["label"],
            "confidence": 1.0,
            "label": frame["label"],
        }
    )


def fixed_test_locations(problem: SplitProblem, match_test: tuple[Path, Path], frame: pd.DataFrame) -> np.ndarray:
    """``--match-test CSV SPLITS``: pin an earlier run's test locations to test, and only those.

    Earlier test crops that this dataset lacks are counted and reported.
    """
    old_csv, old_splits_path = match_test
    old_splits = read_splits(old_splits_path)
    if "test" not in old_splits:
        raise DataError(f"{old_splits_path}: no test split (expected {{\"test\": [[dataset, location], ...], ...}})")
    fixed = pin_test_locations(problem, old_splits["test"])
    old_test = set(old_splits["test"])
    old = read_dataset_csv(old_csv)
    is_old_test = [(d, loc) in old_test for d, loc in zip(old["dataset"], old["location"])]
    missing = set(old.loc[is_old_test, "path"]) - set(frame["crop_path"])
    if missing:
        log.warning("--match-test: %d of the earlier test crops are not in this dataset (e.g. %s)", len(missing), sorted(missing)[0])
    return fixed


def choose_splits(problem: SplitProblem, frame: pd.DataFrame, options: DatasetOptions) -> SplitResult:
    """Search (or read) the split assignment of every location."""
    fractions = target_fractions(options.val_frac, options.test_frac)
    if options.splits_file is not None:
        assignment = assignment_from_splits(problem, read_json(options.splits_file), str(options.splits_file))
        score = float(score_of(problem, assignment, fractions))
        return SplitResult(assignment=assignment, score=score, method="file", candidates=0, improved_moves=0)
    fixed = fixed_test_locations(problem, options.match_test, frame) if options.match_test else None
    if options.method == "random":
        result = random_search(problem, fractions, n_candidates=options.candidates, seed=options.seed, fixed=fixed)
    elif options.method == "smallest_first":
        result = smallest_first(problem, fractions, fixed=fixed)
    else:
        raise UserError(f"--method: unknown method {options.method!r} (random or smallest_first)")
    if options.improve:
        result = improve_locally(problem, result, fractions, fixed=fixed)
    return result


def check_split_by(options: DatasetOptions) -> None:
    """Refuse, before any work, time-held-out options that cannot work together."""
    if options.split_by not in SPLIT_BY:
        raise UserError(f"--split-by: unknown value {options.split_by!r} (choose from {', '.join(SPLIT_BY)})")
    if options.split_by == "location":
        return
    if not {"csv", "splits"} <= set(options.modes):
        raise UserError(f"--split-by {options.split_by} needs --mode csv and splits (the datetimes come from the CCT"
                        " or the crops manifest, not from classification_ds.csv)")
    if options.splits_file or options.match_test:
        raise UserError(f"--split-by {options.split_by}: --splits-file and --match-test hold out locations only")
    if options.split_by == "time" and options.method != "random":  # it searches locations, which time splits do not
        raise UserError(f"--split-by time: --method {options.method} chooses location splits (use --split-by location-time)")
    options.time_rule().check()


def hold_out_in_time(frame: pd.DataFrame, options: DatasetOptions) -> tuple[pd.DataFrame, TimeSplit]:
    """``--split-by time``: every crop's split by its time at its location, and the location column
    renamed ``<location>@<split>`` (the unit ``splits.json`` lists); ``location-time``: only the crops
    whose location split (the usual search) and time split agree. Crops left out are counted."""
    split, times, counts = time_split_of_crops(frame, options.time_rule(), options.datetime_source())
    keep = split != NO_SPLIT
    if options.split_by == "location-time":
        located = location_split_of_crops(frame[keep], options)
        agree = np.zeros(len(frame), dtype=bool)
        agree[np.flatnonzero(keep)] = located == split[keep]
        counts["outside_both_splits_dropped"] = int(keep.sum() - agree.sum())
        log.warning("--split-by location-time: %d crops whose location and time splits differ: left out",
                    counts["outside_both_splits_dropped"])
        keep = agree
    report = time_report(frame["dataset"] + "/" + frame["location"], times, np.where(keep, split, NO_SPLIT), counts)
    frame, split = frame[keep].reset_index(drop=True), split[keep]
    if options.split_by == "time":
        frame = frame.assign(location=frame["location"] + "@" + pd.Series(SPLIT_NAMES)[split].to_numpy())
    return frame, TimeSplit(split, options.split_by, report)


def location_split_of_crops(frame: pd.DataFrame, options: DatasetOptions) -> np.ndarray:
    """Per crop, the split of its location chosen by the usual search (``--method``, ``--seed``, ...)."""
    problem = SplitProblem.from_frame(frame[["dataset", "location", "label"]])
    result = choose_splits(problem, frame, options)
    split_of = dict(zip(problem.locations, result.assignment))
    return np.array([split_of[key] for key in zip(frame["dataset"], frame["location"])], dtype=np.int8)


def time_split_result(problem: SplitProblem, frame: pd.DataFrame, time_split: TimeSplit,
                      fractions: np.ndarray) -> SplitResult:
    """The assignment of ``problem``'s locations that the crops' time splits imply (one split per location)."""
    split_of = dict(zip(zip(frame["dataset"], frame["location"]), time_split.split))
    assignment = np.array([split_of[key] for key in problem.locations], dtype=np.int8)
    return SplitResult(assignment, score_of(problem, assignment, fractions), time_split.method, 0, 0)


def score_of(problem: SplitProblem, assignment: np.ndarray, fractions: np.ndarray) -> float:
    """The score of one assignment."""
    return float(score_assignments(problem, assignment[None, :], fractions)[0])


def create_classification_dataset(output_dir: Path, options: DatasetOptions) -> DatasetReport:
    """Write the dataset files that ``options.modes`` ask for into ``output_dir``."""
    unknown = sorted(set(options.modes) - set(MODES))
    if unknown:
        raise UserError(f"--mode: unknown mode {unknown[0]!r} (choose from {', '.join(MODES)})")
    check_split_by(options)
    if options.seed < 0:  # numpy's generators take none (a ValueError deep in the split search)
        raise UserError(f"--seed must be 0 or more, got {options.seed}")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder (the dataset's output folder)")
    report = DatasetReport()
    if "csv" in options.modes:
        frame = load_crops(options, report)
    else:
        if options.cct_json is not None or options.crops_manifests:
            log.warning("--cct-json and --crops-manifest are read only with --mode csv;"
                        " the input is %s", output_dir / DATASET_CSV)
        frame = load_dataset_rows(output_dir / DATASET_CSV, options.crops_dir, report)
    frame, report.dropped_labels = drop_rare_labels(frame, options.min_locs)
    if frame.empty:
        raise DataError("no labelled crops left to build a dataset from (see the warnings above)")
    time_split = None
    if options.split_by != "location":
        frame, time_split = hold_out_in_time(frame, options)
        if frame.empty:
            raise DataError("no crops left after holding out in time (see the warnings above)")
    report.crops = len(frame)
    warn_split_sequences(frame)
    ensure_folder(output_dir)
    labels = label_index(frame["label"]) if "csv" in options.modes else existing_label_index(output_dir, frame)
    if "csv" in options.modes:
        write_csv_atomic(output_dir / DATASET_CSV, dataset_table(frame))
        write_json_atomic(output_dir / LABEL_INDEX_JSON, labels)
    if "cct" in options.modes:
        write_json_atomic(output_dir / CROPS_CCT_JSON, crops_cct(frame, labels))
    if "splits" in options.modes:
        problem = SplitProblem.from_frame(frame[["dataset", "location", "label"]])
        fractions = target_fractions(options.val_frac, options.test_frac)
        if time_split is None:
            result = choose_splits(problem, frame, options)
        else:
            result = time_split_result(problem, frame, time_split, fractions)
        report.split_report = build_split_report(problem, result.assignment, fractions, report.dropped_labels)
        report.split_report.update(method=result.method, candidates=result.candidates,
                                   improved_moves=result.improved_moves, seed=options.seed, split_by=options.split_by)
        if time_split is not None:
            report.split_report["time"] = time_split.report
            report.split_report["warnings"] += time_warnings(time_split.report, options.split_by == "time")
        splits = splits_to_json(problem, result.assignment)
        write_json_atomic(output_dir / SPLITS_JSON, splits)
        write_json_atomic(output_dir / SPLIT_REPORT_JSON, report.split_report)
        if "cct" in options.modes:
            write_split_ccts(output_dir, frame, labels, splits)
        log.info("%s", format_split_report(report.split_report))
    return report


def existing_label_index(output_dir: Path, frame: pd.DataFrame) -> dict[str, str]:
    """``label_index.json`` of a dataset being re-split: read when it exists (and checked to name every
    label of the CSV), else made from the CSV's labels and written (a user's own CSV becomes trainable)."""
    path = output_dir / LABEL_INDEX_JSON
    if not path.exists():
        labels = label_index(frame["label"])
        write_json_atomic(path, labels)
        log.info("%s: written from classification_ds.csv's labels", path)
        return labels
    labels = {str(i): name for i, name in read_label_index(path).items()}
    unknown = sorted(set(frame["label"]) - set(labels.values()))
    if unknown:
        raise DataError(f"{path}: does not name labels of classification_ds.csv ({', '.join(unknown[:3])});"
                        " delete it to have it made from the CSV, or rebuild with --mode csv")
    return labels
