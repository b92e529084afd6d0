"""Crop detections out of camera-trap images: the run, its workers (threads, processes or Dask shards) and its log.

``crop_detections`` reads a CCT file with boxes or MegaDetector output (see
``classification.data.detections``), decodes each source image once for all of its
boxes (``crop_image.py``; the geometry in ``crop_geometry.py``), writes one JPEG per box to
``<crops_dir>/<file_name>___crop_<annotation id>.jpg`` and lists every crop in
``<crops_dir>/crops_manifest.csv`` (``crop_manifest.py``), after syncing the new crops to disk.

Re-runs skip crops that exist and that the manifest lists. Existing crops made with another
strategy are refused, not mixed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from classification.data.crop_image import Failure, ImageOutcome, crop_image
from classification.data.crop_manifest import MANIFEST_NAME, CropRecord, check_same_strategy, crop_names, listed_crops, write_manifest
from classification.data.crop_options import CropOptions
from classification.data.detections import ImageRequest, InputReport, read_crop_requests
from classification.errors import UserError
from classification.io import remove_stale_temporaries, sync_files, write_json_atomic
from classification.shards import SHARDS_DIR, DaskOptions, Shard, cut_shards, remove_shard_files, run_shards

__all__ = [
    "CROP_BATCH",
    "MAX_LOGGED_FAILURES",
    "CropJob",
    "CropReport",
    "as_skipped",
    "batches",
    "crop_all",
    "crop_detections",
    "crop_images",
    "crop_shard",
    "crop_shard_list",
    "crop_shards",
    "log_failures",
    "make_executor",
    "remove_stale_crop_temporaries",
    "shard_fingerprint",
    "shard_is_reusable",
    "show_progress",
    "write_run_log",
]

log = logging.getLogger(__name__)

MAX_LOGGED_FAILURES = 10
CROP_BATCH = 16  # images per task sent to a worker process


# ---------------------------------------------------------------- the report


@dataclass
class CropReport:
    """Counts and failures of one run (the manifest lists the crops)."""

    input: InputReport
    crops_dir: Path
    crops_requested: int = 0
    new: int = 0
    skipped: int = 0
    redone: int = 0
    invalid_removed: int = 0
    failed_crops: int = 0
    drafted_images: int = 0
    resized_copies: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    manifest: Path | None = None
    log_file: Path | None = None

    def add(self, outcome: ImageOutcome) -> None:
        """Count one image's outcome."""
        self.new += outcome.new
        self.skipped += outcome.skipped
        self.redone += outcome.redone
        self.invalid_removed += outcome.invalid_removed
        self.failed_crops += outcome.failed_crops
        self.drafted_images += outcome.drafted
        self.resized_copies += outcome.resized_copy
        if outcome.failure is not None:
            self.failures.append(outcome.failure)

    def counts(self) -> dict[str, int | float]:
        """Every count, for the JSON log."""
        return {
            "images": self.input.images,
            "crops_requested": self.crops_requested,
            "new": self.new,
            "skipped_existing": self.skipped,
            "redone_invalid": self.redone,
            "invalid_removed": self.invalid_removed,
            "failed_images": len(self.failures),
            "failed_crops": self.failed_crops,
            "drafted_images": self.drafted_images,
            "resized_copies": self.resized_copies,
            "annotations_without_box": self.input.annotations_without_box,
            "detections_below_threshold": self.input.detections_below_threshold,
            "detections_other_category": self.input.detections_other_category,
            "detections_in_skipped_images": self.input.detections_in_skipped_images,
            "skipped_images": len(self.input.skipped_images),
            "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        """Human-readable summary of the cropping (the input's summary is ``input.lines()``)."""
        rate = (self.new + self.redone) / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"crops: {self.crops_requested} requested: {self.new} new, {self.skipped} skipped (existing),"
            f" {self.redone} redone (invalid); {len(self.failures)} images failed ({self.failed_crops} crops)"
        ]
        if self.invalid_removed:
            out.append(f"  {self.invalid_removed} invalid crops removed (their image failed)")
        if self.resized_copies:
            out.append(f"  {self.resized_copies} images differ in size from the CCT's width/height: their boxes were scaled")
        out.append(f"  {self.seconds:.1f} s, {rate:.1f} crops/s written; {self.drafted_images} images decoded at reduced scale")
        if self.manifest is not None:
            out.append(f"manifest: {self.manifest}")
        if self.log_file is not None:
            out.append(f"log: {self.log_file}")
        return out


# ---------------------------------------------------------------- the run


def crop_detections(input_json: Path, crops_dir: Path, images_dir: Path, options: CropOptions = CropOptions()) -> CropReport:
    """Crop every wanted box of ``input_json`` into ``crops_dir`` and write the manifest (and a log).

    Existing crops are skipped (``check_crops_valid``: decoded, and redone when invalid).
    """
    options.validate()
    crops_dir, images_dir = Path(crops_dir), Path(images_dir)
    if not images_dir.is_dir() and options.images_base_url is None:
        raise UserError(f"--images-dir {images_dir}: folder not found")
    if options.save_full_images and options.images_base_url is None:
        log.warning("--save-full-images has no effect without --images-base-url")
    check_same_strategy(crops_dir / MANIFEST_NAME, options.crop_strategy)
    remove_stale_crop_temporaries(crops_dir)
    started = time.perf_counter()
    requests, input_report = read_crop_requests(
        input_json,
        labels_cct=options.labels_cct,
        dataset=options.dataset,
        threshold=options.threshold,
        detector_categories=options.detector_categories,
        missing_locations=options.missing_locations,
    )
    for line in input_report.lines():
        log.info("%s", line)
    report = CropReport(input=input_report, crops_dir=crops_dir, crops_requested=input_report.boxes)
    report.manifest = crops_dir / MANIFEST_NAME
    listed = listed_crops(report.manifest)
    jobs = [(request, frozenset(crop_names(request)) & listed) for request in requests]
    records: list[CropRecord] = []
    for outcome in crop_all(jobs, crops_dir, images_dir, options):
        report.add(outcome)
        records += outcome.records
    report.failures.sort(key=lambda f: f.file)
    log_failures(report.failures)
    if report.new or report.redone:
        sync_files(crops_dir / record.crop_path for record in records)  # before the manifest vouches for them
    write_manifest(records, report.manifest)
    remove_shard_files(crops_dir / SHARDS_DIR)  # the manifest lists their crops: a re-run skips by it
    report.seconds = time.perf_counter() - started
    if options.logdir is not None:
        arguments: dict[str, object] = {"input_json": str(input_json), "crops_dir": str(crops_dir), "images_dir": str(images_dir)}
        arguments.update({f.name: _jsonable(getattr(options, f.name)) for f in fields(options)})
        report.log_file = write_run_log(report, options.logdir, arguments)
    return report


def _jsonable(value: object) -> object:
    """Paths, tuples and option groups as JSON values."""
    if isinstance(value, DaskOptions):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def show_progress(options: CropOptions) -> bool:
    """Progress bar on unless asked otherwise or stderr is not a terminal."""
    return options.progress if options.progress is not None else sys.stderr.isatty()


def log_failures(failures: list[Failure]) -> None:
    """Log the first failures, one line each, and how many more the JSON log holds."""
    for failure in failures[:MAX_LOGGED_FAILURES]:
        log.warning("skipped %s: %s", failure.file, failure.reason)
    if len(failures) > MAX_LOGGED_FAILURES:
        log.warning("... and %d more failed images (all listed in the --logdir log)", len(failures) - MAX_LOGGED_FAILURES)


def remove_stale_crop_temporaries(crops_dir: Path) -> None:
    """Delete the temporary files of crops (and manifest) that a killed run left half-written; logged."""
    removed = remove_stale_temporaries(crops_dir, recursive=True)
    if removed:
        log.info("%s: removed %d temporary files left by an interrupted run (e.g. %s)", crops_dir, len(removed), removed[0].name)


def write_run_log(report: CropReport, logdir: Path, arguments: dict[str, object]) -> Path:
    """Write ``crop_detections_<UTC time>.json``: arguments, counts, every failure and skipped image."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S_%fZ")
    path = Path(logdir) / f"crop_detections_{stamp}.json"
    write_json_atomic(
        path,
        {
            "arguments": arguments,
            "counts": report.counts(),
            "summary": report.input.lines() + report.lines(),
            "failures": [asdict(f) for f in report.failures],
            "skipped_images": [asdict(s) for s in report.input.skipped_images],
            "missing_locations": asdict(report.input.missing_locations) if report.input.missing_locations else None,
        },
    )
    return path


# ---------------------------------------------------------------- workers


CropJob = tuple[ImageRequest, frozenset[str]]  # an image and the names of its crops that the manifest lists


def crop_images(jobs: list[CropJob], crops_dir: Path, images_dir: Path, options: CropOptions) -> list[ImageOutcome]:
    """``crop_image`` on a batch of images (one task of a worker process)."""
    return [crop_image(request, crops_dir, images_dir, options, listed) for request, listed in jobs]


def make_executor(options: CropOptions) -> Executor:
    """Worker processes for local images (decoding and encoding hold the GIL between calls, so
    processes scale with cores where threads do not), at most one per core; threads when images
    are downloaded (waiting on the network)."""
    if options.images_base_url is not None:
        return ThreadPoolExecutor(max_workers=options.threads)
    return ProcessPoolExecutor(max_workers=min(options.threads, os.cpu_count() or 1))


def batches(jobs: list[CropJob], workers: int) -> list[list[CropJob]]:
    """Jobs cut into batches: about 8 per worker (even load), at most ``CROP_BATCH`` images each."""
    size = max(1, min(CROP_BATCH, math.ceil(len(jobs) / (8 * workers))))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def crop_all(jobs: list[CropJob], crops_dir: Path, images_dir: Path, options: CropOptions) -> Iterator[ImageOutcome]:
    """Crop every image (in ``options.threads`` workers when more than one, or as shards on Dask), yielding outcomes."""
    if options.dask.enabled:
        yield from crop_shards(jobs, crops_dir, images_dir, options)
        return
    with tqdm(total=len(jobs), unit="image", desc="cropping", disable=not show_progress(options)) as bar:
        if options.threads == 1:
            for job in jobs:
                yield crop_image(job[0], crops_dir, images_dir, options, job[1])
                bar.update()
            return
        executor = make_executor(options)
        try:
            futures = [executor.submit(crop_images, batch, crops_dir, images_dir, options)
                       for batch in batches(jobs, options.threads)]
            for future in as_completed(futures):
                outcomes = future.result()
                yield from outcomes
                bar.update(len(outcomes))
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- shards on Dask


def shard_fingerprint(jobs: Sequence[CropJob], images_dir: Path, options: CropOptions) -> str:
    """What a crop shard's result depends on: its images and boxes, the source folder and the crop settings."""
    settings = [str(images_dir), options.crop_strategy, options.max_size, options.quality, options.images_base_url,
                options.max_crop_side]
    return json.dumps([settings, [asdict(request) for request, _ in jobs]], sort_keys=True, default=str)


def crop_shard(jobs: list[CropJob], crops_dir: Path, images_dir: Path, options: CropOptions) -> list[ImageOutcome]:
    """One Dask task: crop a shard's images in this worker process, then sync its new crops before the shard
    file (written by the caller, ``run_shards``) vouches for them."""
    outcomes = crop_images(jobs, crops_dir, images_dir, options)
    if any(outcome.new or outcome.redone for outcome in outcomes):
        sync_files(crops_dir / record.crop_path for outcome in outcomes for record in outcome.records)
    return outcomes


def shard_is_reusable(outcomes: list[ImageOutcome], crops_dir: Path) -> bool:
    """An earlier run's shard stands when none of its images failed (a re-run retries them, as one process
    would) and every crop it made still exists."""
    return all(outcome.failure is None for outcome in outcomes) and all(
        (crops_dir / record.crop_path).is_file() for outcome in outcomes for record in outcome.records)


def as_skipped(outcome: ImageOutcome) -> ImageOutcome:
    """An outcome read from an earlier run's shard file: its crops exist, so this run skipped them all."""
    done = outcome.new + outcome.redone + outcome.skipped
    return replace(outcome, new=0, redone=0, skipped=done, invalid_removed=0, drafted=False)


def crop_shards(jobs: list[CropJob], crops_dir: Path, images_dir: Path, options: CropOptions) -> Iterator[ImageOutcome]:
    """Crop as shards of ``options.dask.shard_size`` images on Dask (``classification.shards``); shards an
    earlier, interrupted run finished are read from their files (unless ``check_crops_valid``)."""
    if options.threads > 1:
        log.warning("--threads is not used on Dask: each worker process crops its shard in one thread")
    shards = crop_shard_list(jobs, crops_dir, images_dir, options)
    reusable = (lambda outcomes: False) if options.check_crops_valid else (lambda outcomes: shard_is_reusable(outcomes, crops_dir))
    results = run_shards(crop_shard, shards, (crops_dir, images_dir, options), options.dask, reusable,
                         progress=show_progress(options), unit="image")
    for result in results:
        yield from (as_skipped(outcome) if result.reused else outcome for outcome in result.value)


def crop_shard_list(jobs: list[CropJob], crops_dir: Path, images_dir: Path, options: CropOptions) -> list[Shard[CropJob]]:
    """The run's shards, their files in ``<crops_dir>/.shards``."""
    return cut_shards(jobs, options.dask.shard_size, crops_dir / SHARDS_DIR,
                      lambda piece: shard_fingerprint(piece, images_dir, options))
