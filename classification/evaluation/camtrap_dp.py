"""Write predictions as a Camtrap DP 1.0.2 package: machine observations beside the source package's deployments and media.

Every row of ``predictions.csv`` becomes a media-level observation of the medium it came
from (through the crops manifest for crops: ``crop_path`` -> ``image_id`` = ``mediaID``,
with the crop's box normalised by the image's size; or the image's file name for
predictions on whole images): ``observationType`` animal with the class as
``scientificName`` (blank, empty, human, person, vehicle and unknown classes become those
types), ``classificationMethod`` machine, ``classifiedBy`` the model and run,
``classificationProbability`` the prediction's confidence. Each event (``eventID``) with
predictions also gets one event-level observation per class that is some crop's top-1: its
probability is the mean of that class's probability over the event's crops (0 where it is
not in a crop's top-k), its count the most crops of that class in any one image of the event
(none for predictions on whole images).
Deployments and media are the source package's (local media files are hard-linked, else
copied, so relative ``filePath`` values stay valid; a medium that is a symbolic link out of the
package, or no regular file, is refused, never linked or copied); ``datapackage.json`` keeps the
source's metadata with a new ``created``, ``title``, ``observationLevel`` and ``taxonomic`` coverage.
Observation IDs are ``media:<mediaID>:machine<n>`` and ``event:<eventID>:machine<n>``: unique
whatever the source's IDs are. The package is written to a staging folder beside ``--output-dir``
and validated offline there (``validate_camtrap_dp``); only a valid one is moved into place, so an
invalid package is never left at ``--output-dir``. Problems that the source package has too (the
standard's own example has 3 ``exifData`` cells that are not one JSON object) are reported apart,
as inherited, not as ours. An ``--output-dir`` that holds a package is replaced only with
``overwrite``; one that holds other files, or any of the inputs, never.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from classification.data.camtrap_dp import CamtrapPackage, image_size, instant, media_events, media_times, read_package
from classification.data.camtrap_dp_media import is_url, local_media, media_file_name
from classification.data.camtrap_dp_schema import PROFILE_URL, TABLES, column_names, resource_descriptor, validate_camtrap_dp
from classification.data.dataset import find_crops_manifest, read_crops_manifest
from classification.errors import DataError, UserError
from classification.evaluation.report import read_prediction_info, read_predictions, topk_of
from classification.io import copy_file_atomic, ensure_folder, link_atomic, temporary_name, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

TYPE_OF_CLASS = {"blank": "blank", "empty": "blank", "human": "human", "person": "human", "vehicle": "vehicle",
                 "unknown": "unknown", "unclassified": "unclassified"}
MIN_BOX_SIDE = 1e-6  # the standard's bboxWidth/bboxHeight must be above 0


@dataclass
class ExportReport:
    """What ``export_predictions`` wrote, what it could not place, and what the validation found."""

    output_dir: Path
    media_observations: int = 0
    event_observations: int = 0
    unmatched: list[str] = field(default_factory=list)
    boxes_without_size: int = 0
    linked_media: int = 0
    problems: list[str] = field(default_factory=list)  # what makes the package written invalid, and the source valid
    inherited: list[str] = field(default_factory=list)  # problems the source package has too (its own media.csv, ...)

    def lines(self) -> list[str]:
        """A short summary for the log."""
        lines = [f"{self.media_observations} media-level and {self.event_observations} event-level observations "
                 f"in {self.output_dir / 'observations.csv'}"]
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} predictions are of no medium of the package (e.g. {self.unmatched[0]}): left out")
        if self.boxes_without_size:
            lines.append(f"{self.boxes_without_size} crops without a box (the image's size is unknown)")
        if self.inherited:
            lines.append(f"{len(self.inherited)} problems copied from the source package as they are, "
                         f"e.g. {self.inherited[0]}")
        lines.append(("valid Camtrap DP 1.0.2 (checked offline)" + (" but for those" if self.inherited else ""))
                     if not self.problems else f"NOT valid Camtrap DP: {len(self.problems)} problems, e.g. {self.problems[0]}")
        return lines


# ---------------------------------------------------------------- inputs


def default_classified_by(info: dict[str, Any]) -> str:
    """``<architecture> <experiment>/<checkpoint>``, e.g. ``efficientnet_lite0 demo/best.pt``."""
    checkpoint = Path(str(info.get("checkpoint") or ""))
    run = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.parent.name
    parts = [str(info.get("architecture") or "classifier"), f"{run}/{checkpoint.name}".strip("/")]
    return " ".join(part for part in parts if part)


def manifest_path_of(info: dict[str, Any], given: Path | None) -> Path | None:
    """The crops manifest to map crops to media: the one given, else the one in the predictions' images folder."""
    if given is not None:
        return Path(given)
    root = info.get("images_root")
    return find_crops_manifest(str(root)) if root else None


def normalised_box(crop: dict[str, Any], size: tuple[int, int] | None, where: str) -> list[float] | None:
    """A manifest's pixel box as Camtrap DP fractions ``[x, y, w, h]`` clipped to the image, or None; a box with no
    part on the image is refused (clipped, it would become a sliver at the image's edge)."""
    try:
        x, y, w, h = (float(crop[key]) for key in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    except (KeyError, TypeError, ValueError):
        return None
    if size is None:
        return None
    width, height = size
    left, top = min(max(x / width, 0.0), 1.0), min(max(y / height, 0.0), 1.0)
    right, bottom = min(max((x + w) / width, 0.0), 1.0), min(max((y + h) / height, 0.0), 1.0)
    if not (right > left and bottom > top):  # NaN fails this too
        raise DataError(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies wholly outside its {width}x{height} image")
    return [left, top, max(right - left, MIN_BOX_SIDE), max(bottom - top, MIN_BOX_SIDE)]


@dataclass
class MatchedPrediction:
    """One prediction placed on a medium of the package."""

    media_id: str
    probabilities: dict[str, float]
    label: str
    confidence: float
    box: list[float] | None
    is_crop: bool


def class_probabilities(row: Any, topk: int) -> dict[str, float]:
    """The top-k classes of a prediction row with their probabilities."""
    return {str(row[f"top{k}_label"]): float(row[f"top{k}_prob"]) for k in range(1, topk + 1)
            if str(row[f"top{k}_label"]) and row[f"top{k}_prob"] == row[f"top{k}_prob"]}


def check_labels(predictions: pd.DataFrame, path: Path) -> None:
    """Refuse an empty ``pred_label``: it would be exported as an animal without a name, and no class of a model is
    empty (a photo of nothing is the class ``blank``, exported as ``observationType`` blank)."""
    empty = predictions.index[predictions["pred_label"].astype(str).str.strip() == ""]
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 2}: pred_label: empty (which class is it? an empty photo is the class 'blank')")


def match_predictions(predictions: pd.DataFrame, package: CamtrapPackage, manifest: pd.DataFrame | None,
                      files: dict[str, Path], report: ExportReport) -> list[MatchedPrediction]:
    """Each prediction's medium (and box, for a crop, sized by its medium's file in ``files``); predictions of no medium
    of the package are listed in the report."""
    media_ids = set(package.media["mediaID"])
    by_file = {media_file_name(row): row["mediaID"] for row in package.media.to_dict("records")}
    crops = {row["crop_path"]: row for row in manifest.to_dict("records")} if manifest is not None else {}
    topk = topk_of(predictions)
    sizes: dict[Path, tuple[int, int] | None] = {}
    matched = []
    for row in predictions.to_dict("records"):
        crop = crops.get(str(row["path"]))
        media_id = str(crop.get("image_id", "")) if crop is not None else by_file.get(str(row["path"]), "")
        if media_id not in media_ids:
            report.unmatched.append(str(row["path"]))
            continue
        box = None
        if crop is not None:
            box = normalised_box(crop, image_size(files.get(media_id), sizes), f"crops manifest: crop {row['path']}")
            report.boxes_without_size += box is None
        matched.append(MatchedPrediction(media_id, class_probabilities(row, topk), str(row["pred_label"]),
                                         float(row["confidence"]), box, crop is not None))
    return matched


# ---------------------------------------------------------------- observations


def number(value: float) -> str:
    """A number for the CSV: at most 6 decimals, no trailing zeros."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def classification(label: str, probability: float, classified_by: str, timestamp: str) -> dict[str, str]:
    """The type, name and classification columns of a machine observation of class ``label``."""
    kind = TYPE_OF_CLASS.get(label.strip().lower(), "animal")
    return {"observationType": kind, "scientificName": label if kind == "animal" else "",
            "classificationMethod": "machine", "classifiedBy": classified_by, "classificationTimestamp": timestamp,
            "classificationProbability": number(probability)}


def media_observation_rows(matched: list[MatchedPrediction], media: dict[str, dict[str, str]], events: dict[str, str],
                           classified_by: str, timestamp: str) -> list[dict[str, str]]:
    """One media-level observation per prediction, numbered per medium."""
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = defaultdict(int)
    for prediction in matched:
        medium = media[prediction.media_id]
        seen[prediction.media_id] += 1
        row = {"observationID": f"media:{prediction.media_id}:machine{seen[prediction.media_id]}",
               "deploymentID": medium["deploymentID"], "mediaID": prediction.media_id,
               "eventID": events.get(prediction.media_id, ""), "eventStart": medium["timestamp"],
               "eventEnd": medium["timestamp"], "observationLevel": "media",
               "count": "1" if prediction.is_crop and prediction.label.lower() not in TYPE_OF_CLASS else ""}
        row.update(classification(prediction.label, prediction.confidence, classified_by, timestamp))
        if prediction.box is not None:
            row.update(zip(("bboxX", "bboxY", "bboxWidth", "bboxHeight"), map(number, prediction.box)))
        rows.append(row)
    return rows


def event_span(media_ids: list[str], media: dict[str, dict[str, str]], times: dict[str, datetime]) -> tuple[str, str]:
    """The first and last timestamps (as written in media.csv) of an event's media."""
    ordered = sorted(media_ids, key=lambda m: instant(times[m]))
    return media[ordered[0]]["timestamp"], media[ordered[-1]]["timestamp"]


def event_observation_rows(matched: list[MatchedPrediction], media: dict[str, dict[str, str]], events: dict[str, str],
                           times: dict[str, datetime], classified_by: str, timestamp: str) -> list[dict[str, str]]:
    """Per event, one event-level observation per class that is the top-1 of some prediction of the event."""
    members: dict[str, list[str]] = defaultdict(list)
    for media_id, event_id in events.items():
        members[event_id].append(media_id)
    by_event: dict[str, list[MatchedPrediction]] = defaultdict(list)
    for prediction in matched:
        if prediction.media_id in events:
            by_event[events[prediction.media_id]].append(prediction)
    rows = []
    for event_id, predictions in by_event.items():
        start, end = event_span(members[event_id], media, times)
        labels = list(dict.fromkeys(p.label for p in predictions))
        counted = all(p.is_crop for p in predictions)  # one crop is one individual; a whole image's count is not known
        for number_in_event, label in enumerate(labels, start=1):
            probability = sum(p.probabilities.get(label, 0.0) for p in predictions) / len(predictions)
            per_image: dict[str, int] = defaultdict(int)
            for p in predictions:
                per_image[p.media_id] += p.label == label
            row = {"observationID": f"event:{event_id}:machine{number_in_event}", "deploymentID": media[predictions[0].media_id]["deploymentID"],
                   "eventID": event_id, "eventStart": start, "eventEnd": end, "observationLevel": "event",
                   "count": str(max(per_image.values())) if counted and label.lower() not in TYPE_OF_CLASS else ""}
            row.update(classification(label, probability, classified_by, timestamp))
            rows.append(row)
    return rows


# ---------------------------------------------------------------- writing


def package_descriptor(source: dict[str, Any], levels: list[str], names: set[str], classified_by: str, created: str) -> dict[str, Any]:
    """The new ``datapackage.json``: the source's metadata, its three tables ours, our levels and taxa."""
    descriptor = copy.deepcopy(source)
    inline = [r for r in source.get("resources") or [] if isinstance(r, dict) and r.get("name") not in TABLES and "data" in r]
    descriptor["resources"] = [resource_descriptor(table) for table in TABLES] + inline
    descriptor["profile"] = PROFILE_URL
    descriptor["created"] = created
    descriptor.pop("id", None)  # the source's identifier is not this package's
    descriptor["name"] = re.sub(r"[^a-z0-9._-]+", "-", f"{source.get('name') or 'camtrap-dp'}-predictions".lower())
    descriptor["title"] = f"Predictions of {classified_by} on: {source.get('title') or source.get('name') or 'a Camtrap DP package'}"
    project = source.get("project")
    descriptor["project"] = {**(project if isinstance(project, dict) else {}), "observationLevel": levels}
    known = {t["scientificName"]: t for t in source.get("taxonomic") or [] if isinstance(t, dict) and t.get("scientificName")}
    descriptor["taxonomic"] = [known.get(name, {"scientificName": name}) for name in sorted(names)]
    return descriptor


def place_media(package: CamtrapPackage, files: dict[str, Path], output_dir: Path) -> int:
    """Hard-link (else copy) the package's local media files (``files``: checked by ``local_media``, so none leads out
    of the package) into the new package under the same relative paths."""
    placed = 0
    for media_id, file_path in zip(package.media["mediaID"], package.media["filePath"]):
        source = files.get(media_id)
        if source is None or is_url(file_path):
            continue
        target = output_dir / file_path
        ensure_folder(target.parent)
        if not link_atomic(source, target):
            copy_file_atomic(source, target)
        placed += 1
    return placed


def write_package(package: CamtrapPackage, observations: list[dict[str, str]], output_dir: Path, classified_by: str,
                  created: str) -> None:
    """The three tables and ``datapackage.json``."""
    ensure_folder(output_dir)
    write_csv_atomic(output_dir / "deployments.csv", package.deployments)
    write_csv_atomic(output_dir / "media.csv", package.media)
    write_csv_atomic(output_dir / "observations.csv", pd.DataFrame(observations, columns=column_names("observations"), dtype=object).fillna(""))
    levels = sorted({row["observationLevel"] for row in observations}) or ["media"]
    names = {row["scientificName"] for row in observations if row["scientificName"]}
    write_json_atomic(output_dir / "datapackage.json", package_descriptor(package.descriptor, levels, names, classified_by, created))


def check_output_folder(output_dir: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """Refuse, before any work, an ``--output-dir`` that is a file, that holds one of the ``inputs`` (it would be
    replaced), that holds files but no package, or that holds a package when not ``overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"--output-dir {output_dir}: exists and is not a folder (an output folder is needed here)")
    target = output_dir.resolve()
    for name, path in inputs.items():
        if path.resolve() == target and name == "--package":
            raise UserError(f"--output-dir {output_dir}: is the source package; its observations.csv would be replaced "
                            "(choose another folder)")
        if path.resolve().is_relative_to(target):
            raise UserError(f"--output-dir {output_dir}: holds {name} {path}, which writing the package there would replace "
                            "(choose another folder)")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not (output_dir / "datapackage.json").is_file():
        raise UserError(f"--output-dir {output_dir}: holds files but no Camtrap DP package; nothing there is replaced "
                        "(choose a new or empty folder)")
    if not overwrite:
        raise UserError(f"--output-dir {output_dir}: holds a Camtrap DP package already; pass --overwrite to replace it, "
                        "or choose another folder")


def process_alive(pid: int) -> bool:
    """True while process ``pid`` runs (signal 0 asks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(output_dir: Path) -> list[Path]:
    """Remove the staging folders (``.<name>.<process>-<thread>.tmp``) that exports to ``output_dir`` killed mid-write
    left beside it; a folder of a process still running (an export in progress) is left alone. A package moved aside
    (``...tmp.old``) by an export killed before the new one was in place is moved back."""
    removed = []
    for path in sorted(output_dir.parent.glob(f".{glob.escape(output_dir.name)}.*-*.tmp*")):
        pid = path.name[len(output_dir.name) + 2:].split("-")[0]
        if not (pid.isdigit() and path.suffix in (".tmp", ".old") and path.is_dir() and not path.is_symlink()) or process_alive(int(pid)):
            continue
        if path.suffix == ".old" and not output_dir.exists():
            os.replace(path, output_dir)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def publish_package(staging: Path, output_dir: Path) -> None:
    """Move the validated package from ``staging`` to ``output_dir``; a package there (checked by
    ``check_output_folder``) is moved aside first and removed once the new one is in place."""
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        os.replace(staging, output_dir)  # a missing or empty folder
        return
    old = Path(temporary_name(output_dir) + ".old")
    os.replace(output_dir, old)
    os.replace(staging, output_dir)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old)


def validate_staged(report: ExportReport, package: CamtrapPackage, staging: Path, output_dir: Path) -> None:
    """Validate the package in ``staging``; problems the source package has too are inherited, the others refused."""
    source_problems = set(validate_camtrap_dp(package.root))
    problems = validate_camtrap_dp(staging)
    report.problems = [p for p in problems if p not in source_problems]
    report.inherited = [p for p in problems if p in source_problems]
    if report.problems:
        raise DataError(f"{output_dir}: not written: the package would not be valid Camtrap DP 1.0.2: {report.problems[0]}"
                        + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""))


def export_predictions(predictions_path: str | Path, package_path: str | Path, output_dir: str | Path,
                       classified_by: str | None = None, crops_manifest: Path | None = None, images_dir: Path | None = None,
                       timestamp: str | None = None, overwrite: bool = False) -> ExportReport:
    """Write ``predictions_path`` as a Camtrap DP package in ``output_dir`` (see the module docstring), validated first."""
    predictions_path, output_dir = Path(predictions_path), Path(output_dir)
    predictions = read_predictions(predictions_path)
    check_labels(predictions, predictions_path)
    package = read_package(package_path)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"--images-dir {images_dir}: folder not found")
    info = read_prediction_info(predictions_path)
    manifest_path = manifest_path_of(info, crops_manifest)
    inputs = {"--package": package.root, "--predictions": predictions_path, "--crops-manifest": manifest_path,
              "--images-dir": Path(images_dir) if images_dir else None}
    remove_stale_staging(output_dir)  # first: a package an export killed mid-way moved aside is back before the checks
    check_output_folder(output_dir, overwrite, {name: path for name, path in inputs.items() if path is not None})
    classified_by = classified_by or default_classified_by(info)
    timestamp = timestamp or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = read_crops_manifest(manifest_path) if manifest_path is not None else None
    files = local_media(package.media, package.root, package.paths["media"])  # no link out of the package, no FIFO
    sized = files if images_dir is None else local_media(package.media, Path(images_dir), package.paths["media"])
    report = ExportReport(output_dir)
    matched = match_predictions(predictions, package, manifest, sized, report)
    if not matched:
        raise DataError(f"{predictions_path}: no prediction is of a medium of {package.root} (e.g. {report.unmatched[:1]}); "
                        "pass the crops manifest with --crops-manifest, or predict on the CCT made by utils/camtrap_dp_to_cct.py")
    times = media_times(package)
    events = media_events(package, times)
    media = {row["mediaID"]: row for row in package.media.to_dict("records")}
    media_rows = media_observation_rows(matched, media, events, classified_by, timestamp)
    event_rows = event_observation_rows(matched, media, events, times, classified_by, timestamp)
    staging = Path(temporary_name(ensure_folder(output_dir.parent) / output_dir.name))
    try:
        write_package(package, media_rows + event_rows, staging, classified_by, timestamp)
        report.linked_media = place_media(package, files, staging)
        report.media_observations, report.event_observations = len(media_rows), len(event_rows)
        validate_staged(report, package, staging, output_dir)
        publish_package(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
