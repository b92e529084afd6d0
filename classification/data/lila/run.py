"""The LILA commands' work, start to end: index → table → selection → subset files → images.

``utils/download_lila_subset.py``, ``utils/find_lila_locations.py`` and
``utils/download_lila_dataset_cct.py`` parse their flags into these requests and call one function each.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from classification.data.download import Connection, DownloadItem, DownloadPlan, DownloadReport, download_files, plan_downloads
from classification.data.lila.index import (
    ALL_IMAGES_FILE,
    CLOUDS,
    DATASETS_FILE,
    MD_RESULTS_COLUMNS,
    TAXONOMY_FILE,
    Dataset,
    fetch_index,
    read_datasets,
)
from classification.data.lila.locations import species_locations, write_locations
from classification.data.lila.select import Selection, SelectionOptions, select_rows
from classification.data.lila.subset import CCT_FILE, SubsetReport, download_items, fetch_md_results, read_cct_file, summary_lines, write_subset
from classification.data.lila.table import PARQUET_FILE, convert_all_images
from classification.data.lila.taxa import Taxonomy
from classification.errors import DataError, UserError, did_you_mean
from classification.io import ensure_folder, read_json

log = logging.getLogger(__name__)

IMAGES_FOLDER = "images"


def default_metadata_dir() -> Path:
    """Where LILA's index files and the converted table are kept: ``$CLASSIFICATION_LILA_CACHE`` or the user's cache."""
    return Path(os.environ.get("CLASSIFICATION_LILA_CACHE") or Path.home() / ".cache" / "camtrap-classification" / "lila")


@dataclass(frozen=True)
class LilaSource:
    """Where LILA's files come from and are kept."""

    metadata_dir: Path = field(default_factory=default_metadata_dir)
    index_url: str | None = None
    cloud: str = "gcp"
    refresh_index: bool = False
    connection: Connection = field(default_factory=Connection)
    progress: bool | None = None


@dataclass(frozen=True)
class SubsetRequest:
    """``download_lila_subset.py``: what to select, where to write it, and whether to fetch boxes and images."""

    output_dir: Path
    selection: SelectionOptions
    source: LilaSource = field(default_factory=LilaSource)
    md_results: tuple[str, ...] = MD_RESULTS_COLUMNS
    boxes: bool = True
    download: bool = True
    dry_run: bool = False
    threads: int = 8
    overwrite: bool = False


@dataclass
class SubsetResult:
    selection: Selection
    report: SubsetReport
    download: DownloadReport | None = None
    plan: DownloadPlan | None = None

    def lines(self, request: SubsetRequest) -> list[str]:
        lines = self.selection.summary(request.selection.label_rank) + summary_lines(self.report, request.output_dir)
        if self.plan is not None:
            lines.append(self.plan.summary())
        if self.download is not None:
            lines.append(self.download.summary())
        return lines


def _check_cloud(cloud: str) -> None:
    if cloud not in CLOUDS:
        raise UserError(f"--cloud {cloud!r}: not one of {', '.join(CLOUDS)}{did_you_mean(cloud, CLOUDS, n=3)}")


def open_lila(source: LilaSource, table: bool = True) -> tuple[dict[str, Dataset], Taxonomy, Path]:
    """The datasets index, the taxonomy and (with ``table``) the Parquet all-images table, fetched and converted once."""
    _check_cloud(source.cloud)
    names = (DATASETS_FILE, TAXONOMY_FILE, ALL_IMAGES_FILE) if table else (DATASETS_FILE, TAXONOMY_FILE)
    files = fetch_index(source.metadata_dir, source.index_url, source.refresh_index, source.connection, names)
    datasets = read_datasets(files.datasets)
    taxonomy = Taxonomy.read(files.taxonomy) if files.taxonomy.is_file() else Taxonomy([])
    parquet = source.metadata_dir / PARQUET_FILE
    if table:
        convert_all_images(files.all_images, parquet, progress=sys.stderr.isatty() if source.progress is None else source.progress)
    return datasets, taxonomy, parquet


def make_subset(request: SubsetRequest) -> SubsetResult:
    """Select, write the CCT (and MegaDetector) subset files, then download (or plan) the images."""
    datasets, taxonomy, parquet = open_lila(request.source)
    selection = select_rows(parquet, datasets, taxonomy, request.selection, request.source.cloud)
    output = ensure_folder(request.output_dir)
    md_results = None
    if request.boxes:
        chosen = [datasets[name] for name in sorted(set(selection.rows["dataset_name"]))]
        md_results = fetch_md_results(chosen, ensure_folder(request.source.metadata_dir / "md_results"),
                                      request.source.connection, request.md_results)
    info = {"description": "LILA subset", "created_by": "utils/download_lila_subset.py", "cloud": request.source.cloud,
            "selection": asdict(request.selection)}
    report = write_subset(selection.rows, datasets, output, request.source.cloud, info, md_results)
    result = SubsetResult(selection, report)
    if request.dry_run or request.download:
        items = download_items(read_json(output / CCT_FILE))
        images = output / IMAGES_FOLDER
        if request.dry_run:
            result.plan = plan_downloads(items, images, request.threads, request.overwrite, request.source.connection, request.source.progress)
        else:
            result.download = download_files(items, images, request.threads, request.overwrite, request.source.connection,
                                             request.source.progress)
    return result


def find_locations(source: LilaSource, selection: SelectionOptions, output: Path) -> int:
    """Write where the taxa live (``locations.csv``); returns the number of locations."""
    datasets, taxonomy, parquet = open_lila(source)
    frame = species_locations(parquet, datasets, taxonomy, selection)
    write_locations(frame, output)
    return int(frame[["dataset", "location"]].drop_duplicates().shape[0])


def download_dataset_cct(source: LilaSource, dataset_name: str, output_dir: Path) -> Path:
    """One dataset's CCT metadata (LILA's ``metadata_url_<cloud>``, a JSON or a zip holding one), as ``<short_name>.json``."""
    datasets, _, _ = open_lila(source, table=False)
    by_any = {key.lower(): dataset for dataset in datasets.values() for key in (dataset.name, dataset.short_name)}
    dataset = by_any.get(dataset_name.lower())
    if dataset is None:
        raise UserError(f"--dataset {dataset_name!r}: not a LILA dataset{did_you_mean(dataset_name.lower(), by_any, n=3)}")
    url = dataset.metadata_urls.get(source.cloud, "")
    if not url:
        raise DataError(f"{dataset.name}: metadata_url_{source.cloud}: empty (try another --cloud)")
    output = ensure_folder(output_dir)
    suffix = ".zip" if url.split("?")[0].lower().endswith(".zip") else ".json"
    fetched = output / f".{dataset.short_name}.download{suffix}"
    report = download_files([DownloadItem(fetched.name, url)], output, threads=1, overwrite=True, connection=source.connection,
                            progress=source.progress)
    if not report.ok:
        raise UserError(f"cannot fetch {url}: {report.failures[0].reason}")
    target = output / f"{dataset.short_name}.json"
    read_cct_file(fetched, target)
    fetched.unlink()
    return target
