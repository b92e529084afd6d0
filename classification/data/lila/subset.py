"""A LILA selection as files the rest of the pipeline takes unchanged: a CCT subset, the MegaDetector
boxes of exactly its images, and the images themselves.

- ``file_name`` is ``<dataset folder>/<path in the dataset>`` (the layout under LILA's cloud base, as
  MegaDetector's subset script writes it): unique across datasets, and the same for every cloud.
- ``location`` is ``<short_name>/<location>``: two datasets' "site_1" never merge. Datasets that have
  no locations (LILA gives the dataset name) get none, and ``clean_cct.py --missing-locations`` decides.
- ``seq_id`` is namespaced the same way; ``datetime`` becomes ISO (``2012-06-01 14:03:09``); each
  image keeps ``url`` (the chosen cloud's) and its URL per cloud (``url_gcp``, ``url_aws``, ``url_azure``:
  the same path under each cloud's image base URL, as LILA lays them out).
- Each class is an annotation without a box that records LILA's ``original_label``; the boxes come
  from the dataset's published MegaDetector results, rewritten to the subset's file names, in one
  MegaDetector-format file beside the CCT, for ``crop_detections.py --labels-cct``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from classification.data.detections import FileMatcher
from classification.data.download import Connection, DownloadItem, check_file_name, download_files
from classification.data.lila.index import CLOUDS, MD_RESULTS_COLUMNS, Dataset
from classification.data.lila.md_results import json_stream, scan_md_results
from classification.errors import DataError, UserError
from classification.io import unreadable_file, write_json_atomic

log = logging.getLogger(__name__)

CCT_FILE = "lila_subset_cct.json"
MEGADETECTOR_FILE = "lila_subset_megadetector.json"
LILA_DATETIME = "%m-%d-%Y %H:%M:%S"


@dataclass
class SubsetReport:
    """What the subset files hold, and the images they could not place."""

    images: int = 0
    annotations: int = 0
    categories: int = 0
    without_location: int = 0
    boxes_images: int = 0
    without_boxes: list[str] = field(default_factory=list)


def relative_path(url: str, dataset: Dataset, cloud: str) -> str:
    """The image's path inside its dataset: its URL less the dataset's image base URL for that cloud."""
    base = dataset.image_base_url(cloud) + "/"
    if url.startswith(base):
        return urllib.parse.unquote(url[len(base):])
    base_path = urllib.parse.urlsplit(base).path
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    if path.startswith(base_path):
        return path[len(base_path):]
    raise DataError(f"{url}: not under {dataset.name}'s image_base_url_{cloud} {base}")


def cloud_urls(url: str, dataset: Dataset, cloud: str) -> dict[str, str]:
    """``url_<cloud>`` for every cloud the dataset is on: the chosen URL's path under each cloud's image base URL."""
    base = dataset.image_base_url(cloud) + "/"
    rest = url[len(base):] if url.startswith(base) else urllib.parse.quote(relative_path(url, dataset, cloud))
    return {f"url_{c}": f"{dataset.image_base_urls[c].rstrip('/')}/{rest}" for c in CLOUDS if dataset.image_base_urls.get(c)}


def _strip_prefix(value: str, dataset: Dataset) -> str:
    """LILA's ids are ``"<dataset name> : <id>"``; the id alone."""
    return value.split(" : ", 1)[1] if value.startswith(f"{dataset.name} : ") else value


def _iso_datetime(value: str) -> str | None:
    try:
        return datetime.strptime(value, LILA_DATETIME).strftime("%Y-%m-%d %H:%M:%S") if value else None
    except ValueError:
        return None


def _image_record(row: Mapping[str, Any], dataset: Dataset, cloud: str) -> dict[str, Any]:
    """One CCT image from its first row in the selection."""
    short = dataset.short_name
    url = str(row["url"])
    file_name = f"{dataset.folder}/{relative_path(url, dataset, cloud)}"
    check_file_name(file_name, f"{dataset.name}: {row['image_id']}: file_name")
    location = str(row["location_id"])
    sequence = _strip_prefix(str(row["sequence_id"]), dataset)
    frame = int(float(row["frame_num"])) if str(row["frame_num"]).strip() not in ("", "nan") else -1
    image: dict[str, Any] = {
        "id": f"{short}/{_strip_prefix(str(row['image_id']), dataset)}",
        "file_name": file_name,
        "dataset": short,
        "location": f"{short}/{_strip_prefix(location, dataset)}" if location and location != dataset.name else None,
        "datetime": _iso_datetime(str(row["datetime"])),
        "seq_id": f"{short}/{sequence}" if sequence and sequence != "unknown" else None,
        "url": url,
        **cloud_urls(url, dataset, cloud),
        "lila_dataset": dataset.name,
        "lila_image_id": str(row["image_id"]),
    }
    if frame >= 0:
        image["frame_num"] = frame
    return image


def build_cct(rows: pd.DataFrame, datasets: Mapping[str, Dataset], cloud: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """The subset's CCT: one image per LILA image, one image-level annotation per class."""
    labels = sorted(set(rows["label"]))
    category_ids = {label: index for index, label in enumerate(labels)}
    images: dict[str, dict[str, Any]] = {}
    annotations = []
    for row in rows.to_dict("records"):
        dataset = datasets.get(row["dataset_name"])
        if dataset is None:
            raise DataError(f"all-images table: dataset {row['dataset_name']!r} is not in the datasets index")
        key = str(row["image_id"])
        if key not in images:
            images[key] = _image_record(row, dataset, cloud)
        image_id = images[key]["id"]
        annotations.append({
            "id": f"{image_id}#{row['label']}", "image_id": image_id, "category_id": category_ids[row["label"]],
            "original_label": row["original_label"], "sequence_level_annotation": row["annotation_level"] == "sequence",
        })
    categories = [{"id": index, "name": label} for label, index in category_ids.items()]
    return {"info": dict(info), "images": list(images.values()), "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------- MegaDetector boxes


def md_results_url(dataset: Dataset, preference: Sequence[str] = MD_RESULTS_COLUMNS) -> tuple[str, str] | None:
    """The first of the dataset's MegaDetector results files in ``preference`` order: (column, URL)."""
    for column in preference:
        if dataset.md_results.get(column):
            return column, dataset.md_results[column]
    return None


def read_json_or_zip(path: Path, what: str) -> dict[str, Any]:
    """A JSON file, plain or zipped (one JSON inside, as LILA publishes metadata), whose ``images`` is a list."""
    try:
        with json_stream(path) as handle:
            data = json.load(handle)
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a zip file (cut short?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a {what} JSON file ({error})") from None
    except OSError as error:
        raise unreadable_file(path, error, f"a {what} file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: images: missing or not a list (is this a {what} file?)")
    return data


def read_cct_file(path: Path, target: Path) -> None:
    """Check that ``path`` (JSON or zip) holds a CCT file and write it to ``target`` atomically."""
    data = read_json_or_zip(path, "COCO Camera Traps")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: {key}: missing or not a list (is this a COCO Camera Traps file?)")
    write_json_atomic(target, data)


def fetch_md_results(datasets: Sequence[Dataset], folder: Path, connection: Connection | None,
                     preference: Sequence[str]) -> dict[str, Path]:
    """Each dataset's MegaDetector results file, downloaded once into ``folder``; by dataset name."""
    items, names = [], {}
    for dataset in datasets:
        found = md_results_url(dataset, preference)
        if found is None:
            log.warning("%s: LILA lists no MegaDetector results (%s): its images get no boxes", dataset.name, ", ".join(preference))
            continue
        column, url = found
        name = f"{dataset.short_name}.{column}{PurePosixPath(urllib.parse.urlsplit(url).path).suffix or '.json'}"
        names[dataset.name] = folder / name
        if not (folder / name).is_file():
            items.append(DownloadItem(name, url))
    if items:
        report = download_files(items, folder, threads=min(8, len(items)), overwrite=True, connection=connection)
        if not report.ok:
            failure = report.failures[0]
            raise UserError(f"cannot fetch MegaDetector results {failure.file_name}: {failure.reason} (--no-boxes to go without)")
    return names


def build_megadetector(cct: Mapping[str, Any], datasets: Mapping[str, Dataset], results: Mapping[str, Path],
                       cloud: str) -> tuple[dict[str, Any], list[str]]:
    """The MegaDetector file for the subset's images (``file`` = the subset's ``file_name``), and the images without results."""
    wanted: dict[str, dict[str, str]] = {}
    for image in cct["images"]:
        dataset = datasets[image["lila_dataset"]]
        wanted.setdefault(dataset.name, {})[relative_path(image["url"], dataset, cloud)] = image["file_name"]
    images: list[dict[str, Any]] = []
    categories: dict[str, str] | None = None
    versions: set[str] = set()
    detectors: set[str] = set()
    found: set[str] = set()
    for name, by_path in wanted.items():
        if name not in results:
            continue
        matcher = FileMatcher(sorted(by_path))  # exact, else a unique path suffix: results written with another prefix

        def keep(entry: dict[str, Any], matcher: FileMatcher = matcher, by_path: dict[str, str] = by_path) -> dict[str, Any] | None:
            path, _ = matcher.match(str(entry.get("file", "")))
            if path is None or by_path[path] in found:
                return None
            found.add(by_path[path])
            return {**entry, "file": by_path[path]}

        data = scan_md_results(results[name], keep)
        if categories is not None and data.detection_categories != categories:
            raise DataError(f"{results[name]}: detection_categories differ from another dataset's results")
        categories = data.detection_categories
        versions.add(str(data.info.get("format_version", "1.0")))
        detectors.add(str(data.info.get("detector", "unknown")))
        images += data.images
    missing = sorted(image["file_name"] for image in cct["images"] if image["file_name"] not in found)
    info = {"format_version": max(versions, key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit())) if versions else "1.1",
            "detector": ", ".join(sorted(detectors)), "source": "LILA MegaDetector results, joined to the subset's file names"}
    images.sort(key=lambda entry: entry["file"])
    return {"info": info, "detection_categories": categories or {"1": "animal", "2": "person", "3": "vehicle"}, "images": images}, missing


# --------------------------------------------------------------------------- writing and downloading


def write_subset(rows: pd.DataFrame, datasets: Mapping[str, Dataset], output_dir: Path, cloud: str, info: Mapping[str, Any],
                 md_results: Mapping[str, Path] | None) -> SubsetReport:
    """Write ``lila_subset_cct.json`` and (with ``md_results``) ``lila_subset_megadetector.json`` atomically."""
    cct = build_cct(rows, datasets, cloud, info)
    report = SubsetReport(images=len(cct["images"]), annotations=len(cct["annotations"]), categories=len(cct["categories"]),
                          without_location=sum(image["location"] is None for image in cct["images"]))
    write_json_atomic(output_dir / CCT_FILE, cct)
    if md_results is not None:
        megadetector, missing = build_megadetector(cct, datasets, md_results, cloud)
        report.boxes_images = len(megadetector["images"])
        report.without_boxes = missing
        write_json_atomic(output_dir / MEGADETECTOR_FILE, megadetector)
    return report


def download_items(cct: Mapping[str, Any]) -> list[DownloadItem]:
    """One download per subset image: its file name and the chosen cloud's URL."""
    return [DownloadItem(image["file_name"], image["url"]) for image in cct["images"]]


def summary_lines(report: SubsetReport, output_dir: Path) -> list[str]:
    lines = [f"{output_dir / CCT_FILE}: {report.images} images, {report.annotations} labels, {report.categories} classes"]
    if report.without_location:
        lines.append(f"  {report.without_location} images from datasets without locations (clean_cct.py --missing-locations decides)")
    if report.boxes_images or report.without_boxes:
        lines.append(f"{output_dir / MEGADETECTOR_FILE}: MegaDetector results for {report.boxes_images} images")
    if report.without_boxes:
        lines.append(f"  {len(report.without_boxes)} images have no MegaDetector results (first: {report.without_boxes[0]})")
    return lines
