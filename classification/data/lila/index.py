"""LILA's index files: where they are, fetching them once into a metadata folder, and reading them.

LILA publishes three files (MegaDetector's ``data_management/lila/lila_common.py`` is the reference):
the datasets index (one row per dataset: region, per-cloud image and metadata URLs, MegaDetector
results), the all-images table (one row per image and label, zipped) and the taxonomy mapping.
``--index-url`` replaces LILA's locations with one folder or URL prefix holding the three files under
their LILA names: a mirror, a local copy, an HPC proxy. A fetched file is kept: later runs, offline
ones included, read it without asking the server again (``refresh`` fetches it anew).
"""

from __future__ import annotations

import csv
import logging
import urllib.parse
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from classification.data.download import Connection, DownloadItem, download_files
from classification.errors import DataError, UserError
from classification.io import copy_file_atomic, ensure_folder, repeated_name, shown_json, unreadable_file

log = logging.getLogger(__name__)

DATASETS_FILE = "lila_camera_trap_datasets.csv"
ALL_IMAGES_FILE = "lila_image_urls_and_labels.csv.zip"
TAXONOMY_FILE = "lila-taxonomy-mapping_release.csv"
LILA_URLS = {
    DATASETS_FILE: "https://lila.science/wp-content/uploads/2023/06/lila_camera_trap_datasets.csv",
    ALL_IMAGES_FILE: "https://lila.science/public/lila_image_urls_and_labels.csv.zip",
    TAXONOMY_FILE: "https://lila.science/public/lila-taxonomy-mapping_release.csv",
}
CLOUDS = ("gcp", "aws", "azure")
RANKS = ("kingdom", "phylum", "subphylum", "superclass", "class", "subclass", "infraclass", "superorder", "order",
         "suborder", "infraorder", "superfamily", "family", "subfamily", "tribe", "genus", "subgenus", "species",
         "subspecies", "variety")
DATASET_COLUMNS = ("name", "short_name", "continent", "country", "region", "image_base_url_relative",
                   *(f"{kind}_{cloud}" for cloud in CLOUDS for kind in ("image_base_url", "metadata_url")))
MD_RESULTS_COLUMNS = ("mdv5a_results_raw", "mdv5b_results_raw", "md1000-redwood_results_raw", "mdv4_results_raw")
ALL_IMAGES_COLUMNS = ("dataset_name", *(f"url_{cloud}" for cloud in CLOUDS), "image_id", "sequence_id", "location_id",
                      "frame_num", "original_label", "scientific_name", "common_name", "datetime", "annotation_level")
TAXONOMY_COLUMNS = ("dataset_name", "query", "scientific_name", "common_name")


@dataclass(frozen=True)
class Dataset:
    """One row of the datasets index: names, where it is, its image base URL per cloud, its MegaDetector results."""

    name: str
    short_name: str
    continent: str
    country: str
    region: str
    folder: str  # the dataset's folder under LILA's base (image_base_url_relative), else its short name
    image_base_urls: Mapping[str, str]
    metadata_urls: Mapping[str, str]  # cloud -> the dataset's CCT metadata (a .json or a .zip holding one)
    md_results: Mapping[str, str]  # column -> URL of a zipped MegaDetector results file, where LILA has one

    def image_base_url(self, cloud: str) -> str:
        url = self.image_base_urls.get(cloud, "")
        if not url:
            raise DataError(f"{DATASETS_FILE}: {self.name}: image_base_url_{cloud}: empty (try another --cloud)")
        return url.rstrip("/")


@dataclass(frozen=True)
class IndexFiles:
    """The three index files, local."""

    datasets: Path
    all_images: Path
    taxonomy: Path


def index_urls(index_url: str | None) -> dict[str, str]:
    """Where each index file comes from: LILA's own locations, or ``<index_url>/<LILA file name>``."""
    if index_url is None:
        return dict(LILA_URLS)
    return {name: index_url.rstrip("/") + "/" + urllib.parse.quote(name) for name in LILA_URLS}


def _is_local(index_url: str | None) -> bool:
    return index_url is not None and "://" not in index_url


def fetch_index(metadata_dir: str | Path, index_url: str | None = None, refresh: bool = False,
                connection: Connection | None = None, names: Sequence[str] = tuple(LILA_URLS)) -> IndexFiles:
    """The index files in ``metadata_dir``: copied from a local ``index_url`` folder, else downloaded, once each."""
    folder = ensure_folder(metadata_dir)
    wanted = [name for name in names if refresh or not (folder / name).is_file()]
    if _is_local(index_url):
        source = Path(str(index_url))
        for name in wanted:
            if not (source / name).is_file():
                raise UserError(f"--index-url {source}: {name} not found there (it holds LILA's index files under their LILA names)")
            copy_file_atomic(source / name, folder / name)
    elif wanted:
        urls = index_urls(index_url)
        items = [DownloadItem(name, urls[name]) for name in wanted]
        report = download_files(items, folder, threads=len(items), overwrite=True, connection=connection)
        if not report.ok:
            failure = report.failures[0]
            raise UserError(f"cannot fetch LILA's {failure.file_name} from {urls[failure.file_name]}: {failure.reason}"
                            " (offline? give --index-url a folder or mirror holding the index files)")
    return IndexFiles(folder / DATASETS_FILE, folder / ALL_IMAGES_FILE, folder / TAXONOMY_FILE)


def open_csv_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """A small index CSV as rows of text; a missing column (LILA changed its format) is one line naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [column for column in required if column not in header]
            if (twice := repeated_name(header)) is not None:  # DictReader keeps the last of the two, without a word
                raise DataError(f"{path}: the column {shown_json(twice)} is named twice in the header (only one could be read)")
            if missing:
                raise DataError(f"{path}: column {missing[0]!r} missing (has LILA changed the format? columns: {', '.join(header[:12])})")
            return [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader]
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable_file(path, error, "a CSV file") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None


def read_datasets(path: Path) -> dict[str, Dataset]:
    """The datasets index, by dataset name (rows without a name are LILA's separators, skipped)."""
    datasets: dict[str, Dataset] = {}
    for row in open_csv_rows(path, DATASET_COLUMNS):
        if not row["name"]:
            continue
        datasets[row["name"]] = Dataset(
            name=row["name"], short_name=row["short_name"] or row["name"], continent=row["continent"], country=row["country"],
            region=row["region"], folder=(row["image_base_url_relative"] or row["short_name"] or row["name"]).strip("/"),
            image_base_urls={cloud: row[f"image_base_url_{cloud}"] for cloud in CLOUDS},
            metadata_urls={cloud: row[f"metadata_url_{cloud}"] for cloud in CLOUDS},
            md_results={column: row[column] for column in MD_RESULTS_COLUMNS if row.get(column)},
        )
    if not datasets:
        raise DataError(f"{path}: no dataset rows")
    return datasets


def all_images_member(path: Path) -> str:
    """The one CSV inside the all-images zip; a zip holding other than one file is one line naming them."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a zip file (cut short? fetch it again with --refresh-index)") from None
    except OSError as error:
        raise unreadable_file(path, error, "a zip file") from None
    if len(names) != 1 or not names[0].lower().endswith(".csv"):
        raise DataError(f"{path}: expected one CSV file inside, found {len(names)}: {', '.join(names[:5])}")
    return names[0]
