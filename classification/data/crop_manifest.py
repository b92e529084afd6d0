"""The crops folder's file formats: crop file names (``<file_name>___crop_<annotation id>.jpg``; MegaDetector's
``___cropNN_<detector>.jpg`` read too) and ``crops_manifest.csv``, which lists every crop of a finished run.

Other stages read crops by these (predict finds the manifest by ``MANIFEST_NAME``); a re-run skips
the crops the manifest lists and refuses to mix strategies in one folder.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from classification.data.detections import ImageRequest, detection_id
from classification.errors import DataError, UserError
from classification.io import atomic_open, unreadable_file

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "CropRecord",
    "check_same_strategy",
    "crop_file_name",
    "crop_names",
    "listed_crops",
    "manifest_column",
    "parse_crop_file_name",
    "write_manifest",
]

MANIFEST_NAME = "crops_manifest.csv"
MANIFEST_COLUMNS = (
    "crop_path", "image_id", "annotation_id", "file_name", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
    "dataset", "location", "seq_id", "datetime", "label", "confidence", "crop_strategy",
)
_OUR_CROP = re.compile(r"^(?P<file>.+)___crop_(?P<id>[^/]+)\.jpg$")
_MEGADETECTOR_CROP = re.compile(r"^(?P<file>.+)___crop(?P<index>\d+)_(?P<detector>[^/]*)\.jpg$")


# ---------------------------------------------------------------- crop names


def crop_file_name(file_name: str, annotation_id: str) -> str:
    """The crop's path relative to the crops folder: ``<file_name>___crop_<annotation id>.jpg``."""
    annotation_id = str(annotation_id)
    if not annotation_id or "/" in annotation_id or "\\" in annotation_id:
        raise DataError(f"annotation id {annotation_id!r} cannot name a crop file (empty or contains a path separator)")
    return f"{file_name.replace(chr(92), '/')}___crop_{annotation_id}.jpg"


def parse_crop_file_name(name: str) -> tuple[str, str]:
    """``(file_name, annotation_id)`` from our crop name or MegaDetector's ``<file>___cropNN_<detector>.jpg``.

    MegaDetector's ``NN`` is the detection's index in the image, which is the
    annotation id ``det<NN>`` that this module gives it. Anything else is a ``ValueError``.
    """
    name = name.replace("\\", "/")
    match = _OUR_CROP.match(name)
    if match:
        return match["file"], match["id"]
    match = _MEGADETECTOR_CROP.match(name)
    if match:
        return match["file"], detection_id(int(match["index"]))
    raise ValueError(f"not a crop file name: {name!r}")


def crop_names(request: ImageRequest) -> list[str]:
    """The crop file names of one image's boxes."""
    return [crop_file_name(request.file_name, crop.annotation_id) for crop in request.crops]


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class CropRecord:
    """One row of the crops manifest: a crop that exists after the run, and where it came from."""

    crop_path: str
    image_id: str
    annotation_id: str
    file_name: str
    bbox_x: str
    bbox_y: str
    bbox_w: str
    bbox_h: str
    dataset: str
    location: str
    seq_id: str
    datetime: str
    label: str
    confidence: str
    crop_strategy: str


def write_manifest(records: list[CropRecord], path: Path) -> None:
    """Write the crops manifest CSV atomically, sorted by crop path; every value is text."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for record in sorted(records, key=lambda r: r.crop_path):
            writer.writerow([getattr(record, name) for name in MANIFEST_COLUMNS])


def manifest_column(manifest: Path, column: str) -> list[str]:
    """The non-empty values of one column of an existing crops manifest ([] when there is none);
    a manifest that cannot be read is a one-line ``DataError`` (the run would replace it)."""
    if not manifest.is_file():
        return []
    try:
        with open(manifest, encoding="utf-8", newline="") as handle:
            return [value for row in csv.DictReader(handle) if (value := row.get(column))]
    except OSError as error:
        raise unreadable_file(manifest, error, "a crops manifest") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{manifest}: not a readable crops manifest ({str(error).splitlines()[0]}); move it away to crop "
                        "into this folder again (existing crops are then decoded and kept when valid)") from None


def listed_crops(manifest: Path) -> set[str]:
    """The crop paths that an existing manifest lists (empty when there is none)."""
    return set(manifest_column(manifest, "crop_path"))


def check_same_strategy(manifest: Path, strategy: str) -> None:
    """Refuse to mix strategies: existing crops are skipped by name, so they would keep the old one."""
    found = {value for value in manifest_column(manifest, "crop_strategy") if value != strategy}
    if found:
        raise UserError(
            f"{manifest.parent} holds crops made with --crop-strategy {', '.join(sorted(found))} (see {manifest.name});"
            f" crop into another folder for --crop-strategy {strategy}"
        )
