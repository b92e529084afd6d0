"""Read a Camtrap DP package (TDWG's camera-trap data standard) and convert it to a CCT file.

``deployments.csv`` gives each image its location (``locationID``, else ``locationName``,
else the deployment), ``media.csv`` the images (id, file, local time), and
``observations.csv`` the labels: media-level observations become annotations (with their
normalised ``bboxX/Y/Width/Height`` turned into pixels when the image's size can be read),
and a medium with none takes the labels of its event's event-level observations (image
level, no box). ``eventID`` becomes the sequence (``seq_id``, ``frame_num``,
``seq_num_frames``). The category of an animal is its ``scientificName``; of a blank,
human, vehicle or unknown observation, that type; ``unclassified`` observations are skipped
and counted. Everything downstream (validate, clean, crop, dataset, splits) then runs on
the CCT unchanged. A package is someone else's folder: what it cannot mean is refused in one
line naming the row (a medium or table that is a link out of the package or no regular file,
see ``camtrap_dp_media``; a date without a time or zone; a box not on its image).
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from classification.data.camtrap_dp_media import ConfinedFolder, check_media_paths, is_url, local_media, media_file_name
from classification.data.camtrap_dp_schema import TABLES
from classification.data.cct import CCT, load_cct, read_image_size
from classification.data.images import DECODE_ERRORS
from classification.errors import DataError
from classification.io import check_output_file, read_json, read_string_csv, write_json_atomic

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = {
    "deployments": ("deploymentID",),
    "media": ("mediaID", "deploymentID", "timestamp", "filePath"),
    "observations": ("observationID", "deploymentID", "mediaID", "eventID", "observationLevel", "observationType",
                     "scientificName"),
}
BOX_COLUMNS = ("bboxX", "bboxY", "bboxWidth", "bboxHeight")
TYPE_CATEGORIES = ("blank", "human", "vehicle", "unknown")  # observation types that are their own category
OBSERVATION_TYPES = ("animal", *TYPE_CATEGORIES, "unclassified")  # Camtrap DP 1.0's values
OBSERVATION_LEVELS = ("media", "event")
CCT_DATETIME = "%Y-%m-%d %H:%M:%S"  # local time, as camera-trap CCT files write it
BOX_TOLERANCE = 0.01


@dataclass
class CamtrapPackage:
    """The three tables of a Camtrap DP package (every column a string) and where they were read from."""

    root: Path
    descriptor: dict[str, Any]
    paths: dict[str, Path]
    deployments: pd.DataFrame
    media: pd.DataFrame
    observations: pd.DataFrame


@dataclass
class ConversionReport:
    """What ``camtrap_dp_to_cct`` made and what it could not use."""

    images: int = 0
    annotations: int = 0
    boxes: int = 0
    sequences: int = 0
    from_events: int = 0
    unclassified: int = 0
    boxes_without_size: int = 0
    media_without_labels: int = 0
    categories: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        """A short summary for the log."""
        lines = [f"{self.images} images, {self.annotations} annotations ({self.boxes} with a box), "
                 f"{self.sequences} sequences, {len(self.categories)} categories"]
        if self.from_events:
            lines.append(f"{self.from_events} image-level labels taken from event-level observations (media without their own)")
        if self.boxes_without_size:
            lines.append(f"{self.boxes_without_size} boxes kept as image-level labels: the image's size is unknown "
                         "(its file is not in the images folder; download the media and convert again)")
        if self.unclassified:
            lines.append(f"{self.unclassified} unclassified observations skipped (not labels)")
        if self.media_without_labels:
            lines.append(f"{self.media_without_labels} images have no label (no observation, or only unclassified ones)")
        return lines


# ---------------------------------------------------------------- reading


def package_root(path: str | Path) -> Path:
    """The package folder, given it or its ``datapackage.json``."""
    path = Path(path)
    if path.name == "datapackage.json":
        return path.parent
    if path.is_file():
        raise DataError(f"{path}: expected the package folder or its datapackage.json, got another file")
    return path


def resource_paths(root: Path, descriptor: Any) -> dict[str, Path]:
    """The CSV file of each of the three tables, from ``datapackage.json``'s ``resources``."""
    where = root / "datapackage.json"
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("resources"), list):
        raise DataError(f"{where}: resources: missing or not a list")
    named: dict[Any, Any] = {}
    for resource in descriptor["resources"]:
        if isinstance(resource, dict):
            if resource.get("name") in TABLES and resource.get("name") in named:
                raise DataError(f"{where}: resources: {resource.get('name')!r} is given twice")
            named[resource.get("name")] = resource
    paths = {}
    for table in TABLES:
        path = named.get(table, {}).get("path")
        if table not in named:
            raise DataError(f"{where}: resources: no {table!r} resource (a Camtrap DP package has deployments, media, observations)")
        if not isinstance(path, str) or "://" in path or PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise DataError(f"{where}: resources[{table}].path: expected a relative path inside the package, got {path!r}")
        paths[table] = root / path
    return paths


def check_unique(frame: pd.DataFrame, column: str, path: Path) -> None:
    """Refuse an empty or repeated identifier."""
    empty = frame.index[frame[column] == ""]
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 2}: {column}: empty")
    repeated = frame.index[frame[column].duplicated()]
    if len(repeated):
        raise DataError(f"{path}: row {repeated[0] + 2}: {column}: {frame[column][repeated[0]]!r} repeats an earlier row")


def check_references(frame: pd.DataFrame, column: str, known: pd.Series, path: Path, target: str) -> None:
    """Refuse a reference to a row another table does not have (an empty reference is allowed)."""
    unknown = frame.index[(frame[column] != "") & ~frame[column].isin(set(known))]
    if len(unknown):
        value = frame[column][unknown[0]]
        raise DataError(f"{path}: row {unknown[0] + 2}: {column}: {value!r} is not in {target}")


def check_observation_kinds(observations: pd.DataFrame, path: Path) -> None:
    """Refuse an ``observationLevel`` or ``observationType`` outside the standard's values, and a media-level observation
    without its ``mediaID``: each would otherwise be skipped without a word."""
    for column, allowed in (("observationLevel", OBSERVATION_LEVELS), ("observationType", OBSERVATION_TYPES)):
        wrong = observations.index[~observations[column].isin(allowed)]
        if len(wrong):
            raise DataError(f"{path}: row {wrong[0] + 2}: {column}: {observations[column][wrong[0]]!r} is not one of "
                            f"{', '.join(allowed)}")
    orphans = observations.index[(observations["observationLevel"] == "media") & (observations["mediaID"] == "")]
    if len(orphans):
        raise DataError(f"{path}: row {orphans[0] + 2}: mediaID: empty in a media-level observation (which medium is it of?)")


def confine_tables(root: Path, paths: dict[str, Path]) -> None:
    """Refuse a ``datapackage.json`` or table that is a symbolic link out of the package: the export copies their
    contents into the package it writes, so a link to another project's file would leak it."""
    confined = ConfinedFolder(root)
    for table, path in {"datapackage": root / "datapackage.json", **paths}.items():
        confined.inside(path.relative_to(root).as_posix(), f"{root / 'datapackage.json'}: resources[{table}].path"
                        if table != "datapackage" else str(root))


def read_package(path: str | Path) -> CamtrapPackage:
    """Read ``datapackage.json`` and the three tables, checking their columns, identifiers and references."""
    root = package_root(path)
    descriptor = read_json(root / "datapackage.json")
    paths = resource_paths(root, descriptor)
    confine_tables(root, paths)
    tables = {table: read_string_csv(paths[table], REQUIRED_COLUMNS[table]) for table in TABLES}
    deployments, media, observations = tables["deployments"], tables["media"], tables["observations"]
    check_unique(deployments, "deploymentID", paths["deployments"])
    check_unique(media, "mediaID", paths["media"])
    check_unique(observations, "observationID", paths["observations"])
    check_references(media, "deploymentID", deployments["deploymentID"], paths["media"], "deployments.csv")
    check_references(observations, "deploymentID", deployments["deploymentID"], paths["observations"], "deployments.csv")
    check_references(observations, "mediaID", media["mediaID"], paths["observations"], "media.csv")
    check_media_paths(media, paths["media"])
    check_observation_kinds(observations, paths["observations"])
    return CamtrapPackage(root, descriptor, paths, deployments, media, observations)


def parse_timestamp(value: str, path: Path, row: int, column: str) -> datetime:
    """An ISO 8601 date-time with a time zone, as Camtrap DP requires; a bad one is a one-line error naming file, row and
    field. A date alone would read as midnight, and a time without a zone as UTC: both place media in the wrong event."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise DataError(f"{path}: row {row + 2}: {column}: not an ISO 8601 date-time ({value!r})") from None
    if is_date(value.strip()):
        raise DataError(f"{path}: row {row + 2}: {column}: {value!r} is a date without a time "
                        "(Camtrap DP needs an ISO 8601 date-time with a time zone, e.g. 2020-05-30T04:57:37+02:00)")
    if moment.tzinfo is None:
        raise DataError(f"{path}: row {row + 2}: {column}: {value!r} has no time zone "
                        "(Camtrap DP needs one: Z or an offset such as +02:00)")
    try:
        instant(moment)
    except OverflowError:  # 0001-01-01T00:00+05:00 is before the first instant Python can hold in UTC
        raise DataError(f"{path}: row {row + 2}: {column}: {value!r} lies outside the years 1 to 9999 in UTC") from None
    return moment


def is_date(value: str) -> bool:
    """True for an ISO 8601 date alone (``2020-05-30``, ``2020-W22-6``)."""
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def instant(moment: datetime) -> datetime:
    """A comparable instant: aware times in UTC; naive ones taken as UTC."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------- events


def media_times(package: CamtrapPackage) -> dict[str, datetime]:
    """Every medium's timestamp, parsed (a bad one is an error naming its row)."""
    path = package.paths["media"]
    return {media_id: parse_timestamp(value, path, i, "timestamp")
            for i, (media_id, value) in enumerate(zip(package.media["mediaID"], package.media["timestamp"]))}


def event_windows(package: CamtrapPackage) -> dict[str, list[tuple[datetime, datetime, str]]]:
    """Per deployment, the event-level observations' ``(start, end, eventID)``, sorted by start."""
    path = package.paths["observations"]
    observations = package.observations
    windows: dict[str, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    if "eventStart" not in observations or "eventEnd" not in observations:
        return windows
    for i, row in observations[(observations["observationLevel"] == "event") & (observations["eventID"] != "")].iterrows():
        start = instant(parse_timestamp(row["eventStart"], path, int(i), "eventStart"))
        end = instant(parse_timestamp(row["eventEnd"], path, int(i), "eventEnd"))
        if end < start:  # its media would fall in no window and lose the event's labels without a word
            raise DataError(f"{path}: row {int(i) + 2}: eventEnd: {row['eventEnd']!r} is before eventStart {row['eventStart']!r}")
        windows[row["deploymentID"]].append((start, end, row["eventID"]))
    for spans in windows.values():
        spans.sort()
    return windows


def media_events(package: CamtrapPackage, times: dict[str, datetime]) -> dict[str, str]:
    """The event of every medium that has one: the ``eventID`` of its media-level observations, else that of the
    event-level observation of its deployment whose ``eventStart``..``eventEnd`` holds its timestamp."""
    events: dict[str, str] = {}
    observations = package.observations
    for media_id, event_id in zip(observations["mediaID"], observations["eventID"]):
        if media_id and event_id:
            events.setdefault(media_id, event_id)
    windows = event_windows(package)
    for media_id, deployment in zip(package.media["mediaID"], package.media["deploymentID"]):
        spans = windows.get(deployment)
        if media_id in events or not spans:
            continue
        moment = instant(times[media_id])
        k = bisect.bisect_right([start for start, _, _ in spans], moment) - 1
        while k >= 0 and spans[k][0] <= moment:
            if moment <= spans[k][1]:
                events[media_id] = spans[k][2]
                break
            k -= 1
    return events


# ---------------------------------------------------------------- conversion


def category_of(row: Any) -> str | None:
    """The category of an observation: an animal's scientific name (``animal`` when it has none), a blank, human,
    vehicle or unknown observation's type; ``None`` for an unclassified one."""
    kind = str(row["observationType"]).strip()
    if kind == "animal":
        return str(row["scientificName"]).strip() or "animal"
    if kind in TYPE_CATEGORIES:
        return kind
    return None


def location_of(deployment: Any) -> str:
    """A deployment's location: ``locationID``, else ``locationName``, else the deployment itself."""
    for column in ("locationID", "locationName"):
        value = str(deployment.get(column) or "").strip()
        if value:
            return value
    return str(deployment["deploymentID"])


def image_size(file: Path | None, cache: dict[Path, tuple[int, int] | None]) -> tuple[int, int] | None:
    """The displayed size of a medium's file (checked by ``local_media``), or None when it is not there or unreadable."""
    if file is None:
        return None
    if file not in cache:
        try:
            cache[file] = read_image_size(file)
        except DECODE_ERRORS:
            cache[file] = None
    return cache[file]


def normalised_box(row: Any, path: Path, line: int) -> list[float] | None:
    """An observation's ``[bboxX, bboxY, bboxWidth, bboxHeight]`` (fractions of the image), checked; None when it has none."""
    values = [str(row.get(column) or "").strip() for column in BOX_COLUMNS]
    if not any(values):
        return None
    box = []
    for column, value in zip(BOX_COLUMNS, values):
        try:
            number = float(value)
        except ValueError:
            raise DataError(f"{path}: row {line + 2}: {column}: expected a number from 0 to 1, got {value!r}") from None
        if not -BOX_TOLERANCE <= number <= 1 + BOX_TOLERANCE:
            raise DataError(f"{path}: row {line + 2}: {column}: {value} is outside 0..1 (boxes are fractions of the image)")
        box.append(number)
    return check_box_placement(box, path, line)


def check_box_placement(box: list[float], path: Path, line: int) -> list[float]:
    """Refuse a box of no area, or one that is not on the image (``bboxX=1.005, bboxWidth=0.005`` would be cropped
    from the image's edge): each would become a crop of something else."""
    x, y, width, height = box
    where = f"{path}: row {line + 2}"
    if width <= 0 or height <= 0:
        raise DataError(f"{where}: bboxWidth/bboxHeight: {width:g} x {height:g}: a box needs a width and height above 0")
    if x >= 1 or y >= 1 or x + width <= 0 or y + height <= 0:
        raise DataError(f"{where}: bbox: [{x:g}, {y:g}, {width:g}, {height:g}] lies wholly outside the image")
    if x + width > 1 + BOX_TOLERANCE or y + height > 1 + BOX_TOLERANCE:
        raise DataError(f"{where}: bbox: [{x:g}, {y:g}, {width:g}, {height:g}] runs past the image's edge "
                        f"(bboxX + bboxWidth = {x + width:g}, bboxY + bboxHeight = {y + height:g}; at most 1)")
    return box


def annotation_of(row: Any, image: dict[str, Any], category_id: int, file: Path | None, sizes: dict[Path, Any],
                  path: Path, line: int, report: ConversionReport) -> dict[str, Any]:
    """One CCT annotation from one media-level observation (its box in pixels when the image's size is known)."""
    annotation: dict[str, Any] = {"id": row["observationID"], "image_id": image["id"], "category_id": category_id}
    box = normalised_box(row, path, line)
    if box is not None:
        size = image_size(file, sizes)
        if size is None:
            report.boxes_without_size += 1
        else:
            width, height = size
            annotation["bbox"] = [round(box[0] * width, 2), round(box[1] * height, 2), round(box[2] * width, 2), round(box[3] * height, 2)]
            image["width"], image["height"] = size
            report.boxes += 1
    for column, key in (("count", "count"), ("classificationMethod", "classification_method"),
                        ("classifiedBy", "classified_by"), ("classificationProbability", "classification_probability")):
        value = str(row.get(column) or "").strip()
        if value:
            annotation[key] = value
    return annotation


def cct_images(package: CamtrapPackage, times: dict[str, datetime], events: dict[str, str]) -> list[dict[str, Any]]:
    """One CCT image per medium: file, location, local time, sequence and frame number."""
    deployments = {row["deploymentID"]: row for row in package.deployments.to_dict("records")}
    images = []
    for row in package.media.to_dict("records"):
        deployment = deployments[row["deploymentID"]]
        image: dict[str, Any] = {
            "id": row["mediaID"], "file_name": media_file_name(row), "location": location_of(deployment),
            "deployment_id": row["deploymentID"], "datetime": times[row["mediaID"]].strftime(CCT_DATETIME),
        }
        if str(deployment.get("locationName") or ""):
            image["location_name"] = deployment["locationName"]
        if is_url(row["filePath"]):
            image["url"] = row["filePath"]
        if row["mediaID"] in events:
            image["seq_id"] = events[row["mediaID"]]
        images.append(image)
    frames: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for image in images:
        if "seq_id" in image:
            frames[image["seq_id"]].append(image)
    for members in frames.values():
        members.sort(key=lambda im: (instant(times[im["id"]]), im["id"]))
        for number, image in enumerate(members):
            image["frame_num"], image["seq_num_frames"] = number, len(members)
    return images


def camtrap_dp_to_cct(package_path: str | Path | CamtrapPackage, images_dir: Path | None = None) -> tuple[CCT, ConversionReport]:
    """A CCT dict from a Camtrap DP package (its folder, or the package read); ``images_dir`` (default: the package
    folder) holds the media files whose sizes turn normalised boxes into pixels."""
    package = package_path if isinstance(package_path, CamtrapPackage) else read_package(package_path)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"--images-dir {images_dir}: folder not found")
    images_dir = Path(images_dir) if images_dir is not None else package.root
    files = local_media(package.media, images_dir, package.paths["media"])  # no link out of the folder, no FIFO
    times = media_times(package)
    events = media_events(package, times)
    images = cct_images(package, times, events)
    by_id = {image["id"]: image for image in images}
    report = ConversionReport(images=len(images), sequences=len(set(events.values())),
                              unclassified=int((package.observations["observationType"] == "unclassified").sum()))
    categories: dict[str, int] = {}
    annotations = media_annotations(package, by_id, categories, files, report)
    annotations += event_annotations(package, by_id, {a["image_id"] for a in annotations}, categories, report)
    report.annotations = len(annotations)
    report.media_without_labels = len(set(by_id) - {a["image_id"] for a in annotations})
    info = {"version": "1", "description": f"converted from the Camtrap DP package {package.descriptor.get('name') or package.root.name}",
            "camtrap_dp": {key: package.descriptor[key] for key in ("name", "id", "title", "version") if key in package.descriptor}}
    data = {"info": info, "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in categories.items()]}
    return data, report


def media_annotations(package: CamtrapPackage, images: dict[str, dict[str, Any]], categories: dict[str, int],
                      files: dict[str, Path], report: ConversionReport) -> list[dict[str, Any]]:
    """Annotations from the media-level observations (``files``: the media's files, for their sizes)."""
    path = package.paths["observations"]
    sizes: dict[Path, tuple[int, int] | None] = {}
    annotations = []
    for line, row in enumerate(package.observations.to_dict("records")):
        if row["observationLevel"] != "media" or not row["mediaID"]:
            continue
        category = category_of(row)
        if category is None:
            continue
        category_id = categories.setdefault(category, len(categories))
        report.categories[category] += 1
        annotations.append(annotation_of(row, images[row["mediaID"]], category_id, files.get(row["mediaID"]), sizes, path, line, report))
    return annotations


def event_annotations(package: CamtrapPackage, images: dict[str, dict[str, Any]], labelled: set[str],
                      categories: dict[str, int], report: ConversionReport) -> list[dict[str, Any]]:
    """Image-level annotations for media without media-level labels, from their event's event-level observations
    (id ``<observationID>_<mediaID>``; one that another annotation has already is refused, naming the row)."""
    observations = package.observations
    events = observations[observations["observationLevel"] == "event"]
    by_event: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for line, row in zip(events.index, events.to_dict("records")):
        if row["eventID"]:
            by_event[row["eventID"]].append((int(line), row))
    used = set(observations.loc[observations["observationLevel"] == "media", "observationID"])
    annotations = []
    for image in images.values():
        if image["id"] in labelled or image.get("seq_id") not in by_event:
            continue
        for line, row in by_event[image["seq_id"]]:
            category = category_of(row)
            if category is None:
                continue
            annotation_id = f"{row['observationID']}_{image['id']}"
            if annotation_id in used:
                raise DataError(f"{package.paths['observations']}: row {line + 2}: observationID: {row['observationID']!r} of "
                                f"medium {image['id']!r} gives the annotation id {annotation_id!r}, which another observation "
                                "has already (rename one of them)")
            used.add(annotation_id)
            category_id = categories.setdefault(category, len(categories))
            report.categories[category] += 1
            report.from_events += 1
            annotations.append({"id": annotation_id, "image_id": image["id"], "category_id": category_id, "observation_level": "event"})
    return annotations


def check_not_a_package_file(output: Path, package: CamtrapPackage) -> None:
    """Refuse an output file that is one of the package's own files (its descriptor, a table, a medium): the CCT
    would replace it."""
    target, root = output.resolve(), package.root.resolve()
    tables = {path.resolve() for path in (package.root / "datapackage.json", *package.paths.values())}
    media = target.is_relative_to(root) and target.relative_to(root).as_posix() in set(package.media["filePath"])
    if target in tables or media:
        raise DataError(f"{output}: is a file of the package {package.root}; it would be replaced (write the CCT elsewhere)")


def convert_package(package_path: str | Path, output: Path, images_dir: Path | None = None) -> ConversionReport:
    """Convert a Camtrap DP package and write the CCT file (validated like any CCT file first)."""
    check_output_file(output)
    package = read_package(package_path)
    check_not_a_package_file(output, package)
    data, report = camtrap_dp_to_cct(package, images_dir)
    load_cct(output, data)  # the same checks utils/validate_cct.py makes: a box outside its image is an error here too
    write_json_atomic(output, data)
    return report
