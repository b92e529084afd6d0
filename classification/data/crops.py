"""Crop detections out of camera-trap images: geometry, decoding, atomic writes, manifest.

``crop_detections`` reads a CCT file with boxes or MegaDetector output (see
``classification.data.detections``), decodes each source image once for all of its
boxes, writes one JPEG per box to ``<crops_dir>/<file_name>___crop_<annotation id>.jpg``
and lists every crop in ``<crops_dir>/crops_manifest.csv``.

Geometry (``CropGeometry``). Boxes are in the displayed image, i.e. after the EXIF
orientation is applied. A box is first rounded to whole pixels (half up: ``floor(v +
0.5)`` for ``x``, ``y``, ``x + w``, ``y + h``) and clipped to the image, keeping at
least one pixel. Then:

- ``square``: side ``s = max(w, h)`` of the clipped box, centred on it (an odd excess
  puts the extra pixel right/below), then shifted so that it stays inside the image:
  ``left`` in ``[0, W - s]``. Only along an axis where ``s > W`` (or ``H``) is the
  square centred on the image, the outside black. The references clamp with ``W - w``
  instead of ``W - s``, so their squares near the right/bottom edge hang off the image
  and fill with black; ours never do unless the image is smaller than the square.
- ``pad``: the clipped box exactly, pasted centred on an ``s x s`` black canvas
  (aspect ratio kept).

Boxes in pixels: MegaDetector's normalised boxes are multiplied by the displayed size
of the file; CCT boxes are taken as they are, or scaled when the file is not the size
the CCT's ``width``/``height`` say (a resized copy; counted in the report).

``max_size``: crops are stored at ``min(s, max_size)`` pixels a side (Lanczos). When
every crop of an image is downscaled, the JPEG is decoded at 1/2, 1/4 or 1/8 scale
(``Image.draft``) only if the smallest crop still has ``s / factor >= max_size``
source pixels, so nothing is lost; crops are then resampled from their exact
(sub-pixel) box in the reduced image.

Re-runs skip crops that exist and that the manifest lists; an existing crop the manifest
does not list is decoded first (``check_crops_valid``: every crop is; invalid ones are
redone). Existing crops made with another strategy are refused, not mixed.

Robustness: EXIF orientation is applied; CMYK, grayscale, 16-bit, palette and alpha
images become RGB (``classification.data.images.decode_pixels``: the decoder training and
prediction share, with simplejpeg's array where it gives Pillow's exact pixels); an image
that is missing, truncated or unreadable is skipped and listed with the reason, and the
run goes on. Crops are written atomically, so a crop left half-written by a killed process
never exists under its final name; they are synced to disk all at once, just before the
manifest lists them (see ``crop_status``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

try:
    from simplejpeg import encode_jpeg
except ImportError:  # optional: Pillow encodes crops, a little slower
    encode_jpeg = None

from classification.data.cct import MissingLocationRule, read_image_size
from classification.data.detections import (
    DEFAULT_DETECTOR_CATEGORIES,
    DEFAULT_THRESHOLD,
    Box,
    CropRequest,
    ImageRequest,
    InputReport,
    detection_id,
    read_crop_requests,
)
from classification.data.http import fetch_bytes, image_url
from classification.data.images import (
    DECODE_ERRORS,
    Pixels,
    decode_failure,
    decode_pixels,
    decode_region_pixels,
    displayed_size,
    is_valid_image,
    open_image,
)
from classification.errors import DataError, UserError
from classification.io import (
    atomic_open,
    remove_stale_temporaries,
    sync_files,
    unreadable_file,
    write_bytes_atomic,
    write_json_atomic,
)
from classification.shards import SHARDS_DIR, DaskOptions, Shard, cut_shards, remove_shard_files, run_shards

log = logging.getLogger(__name__)

CropStrategy = Literal["square", "pad"]
CROP_STRATEGIES = ("square", "pad")
MANIFEST_NAME = "crops_manifest.csv"
MANIFEST_COLUMNS = (
    "crop_path", "image_id", "annotation_id", "file_name", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
    "dataset", "location", "seq_id", "datetime", "label", "confidence", "crop_strategy",
)
DOWNLOAD_RETRIES = 2
DOWNLOAD_TIMEOUT_S = 60
MAX_LOGGED_FAILURES = 10
CROP_BATCH = 16  # images per task sent to a worker process

_OUR_CROP = re.compile(r"^(?P<file>.+)___crop_(?P<id>[^/]+)\.jpg$")
_MEGADETECTOR_CROP = re.compile(r"^(?P<file>.+)___crop(?P<index>\d+)_(?P<detector>[^/]*)\.jpg$")


class ImageError(Exception):
    """A source image that cannot be used (missing, truncated, unreadable): skipped and logged."""


# A crop's side before --max-size: 8192 px (200 MB as RGB) is far above any model input and above a whole
# 24 MP frame; a larger one comes from a header declaring a huge image, and is refused unless asked for.
DEFAULT_MAX_CROP_SIDE = 8192
NAME_MAX_BYTES = 255  # the longest file name (one path component) common file systems allow
PATH_MAX_BYTES = 4096  # the longest path Linux opens


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


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CropGeometry:
    """Copy ``region`` (left, top, right, bottom) of the image to ``offset`` on a black ``side`` x ``side`` canvas."""

    region: tuple[int, int, int, int]
    side: int
    offset: tuple[int, int]


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (unlike Python's banker's ``round``)."""
    return math.floor(value + 0.5)


def clip_box(bbox: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of an ``[x, y, w, h]`` box rounded and clipped to the image, at least 1 px."""
    x, y, w, h = bbox
    left = min(max(round_half_up(x), 0), width - 1)
    top = min(max(round_half_up(y), 0), height - 1)
    right = min(max(round_half_up(x + w), left + 1), width)
    bottom = min(max(round_half_up(y + h), top + 1), height)
    return left, top, right, bottom


def _place_window(start: int, length: int, side: int, limit: int) -> int:
    """Start of a ``side`` window centred on ``[start, start + length)`` and kept inside ``[0, limit]``.

    A window longer than ``limit`` is centred on the whole axis instead.
    """
    if side > limit:
        return (limit - side) // 2
    return min(max(start - (side - length) // 2, 0), limit - side)


def square_geometry(bbox: Box, width: int, height: int) -> CropGeometry:
    """The ``square`` strategy: an ``s = max(w, h)`` square on the box, inside the image when it fits."""
    left, top, right, bottom = clip_box(bbox, width, height)
    side = max(right - left, bottom - top)
    x0 = _place_window(left, right - left, side, width)
    y0 = _place_window(top, bottom - top, side, height)
    region = (max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height))
    return CropGeometry(region, side, (region[0] - x0, region[1] - y0))


def pad_geometry(bbox: Box, width: int, height: int) -> CropGeometry:
    """The ``pad`` strategy: the exact clipped box, centred on a black ``max(w, h)`` square."""
    left, top, right, bottom = clip_box(bbox, width, height)
    w, h = right - left, bottom - top
    side = max(w, h)
    return CropGeometry((left, top, right, bottom), side, ((side - w) // 2, (side - h) // 2))


def crop_geometry(bbox: Box, width: int, height: int, strategy: CropStrategy) -> CropGeometry:
    """The geometry of one crop under ``strategy``."""
    return square_geometry(bbox, width, height) if strategy == "square" else pad_geometry(bbox, width, height)


def crop_region(image: Pixels, region: tuple[int, int, int, int]) -> Pixels:
    """``region`` (left, top, right, bottom, inside the image), in the image's own kind (array or PIL)."""
    if isinstance(image, np.ndarray):
        left, top, right, bottom = region
        return image[top:bottom, left:right]
    return image.crop(region)


def pixels_size(image: Pixels) -> tuple[int, int]:
    """Width and height of a decoded image."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def extract_crop(image: Pixels, geometry: CropGeometry) -> Pixels:
    """The crop's pixels: the region, on a black square canvas where it does not fill it."""
    piece = crop_region(image, geometry.region)
    if pixels_size(piece) == (geometry.side, geometry.side):
        return piece
    if isinstance(piece, np.ndarray):
        canvas = np.zeros((geometry.side, geometry.side, 3), dtype=np.uint8)
        (x, y), (width, height) = geometry.offset, pixels_size(piece)
        canvas[y:y + height, x:x + width] = piece
        return canvas
    pil_canvas = Image.new("RGB", (geometry.side, geometry.side))
    pil_canvas.paste(piece, geometry.offset)
    return pil_canvas


def union_region(regions: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The smallest rectangle (left, top, right, bottom) that holds all ``regions``."""
    return (min(r[0] for r in regions), min(r[1] for r in regions),
            max(r[2] for r in regions), max(r[3] for r in regions))


def shifted(geometry: CropGeometry, origin: tuple[int, int]) -> CropGeometry:
    """``geometry`` in the pixels of a decoded rectangle that starts at ``origin`` of the image."""
    (x, y), (left, top, right, bottom) = origin, geometry.region
    return replace(geometry, region=(left - x, top - y, right - x, bottom - y))


@dataclass(frozen=True)
class ResamplePlan:
    """How a downscaled crop is made: ``source_box`` (sub-pixel, in the decoded image) resampled
    to ``size`` and pasted at ``offset`` on a black ``target`` square, reading only ``window``."""

    size: tuple[int, int]
    offset: tuple[int, int]
    source_box: tuple[float, float, float, float]
    window: tuple[int, int, int, int]


def plan_resampling(geometry: CropGeometry, target: int, scale: tuple[float, float], bounds: tuple[int, int]) -> ResamplePlan:
    """The ``ResamplePlan`` of a crop stored at ``target`` pixels from an image decoded at ``scale``
    of full resolution and ``bounds`` (width, height) in size.

    ``window``: the source box grown by the Lanczos filter's reach (3 source pixels per
    output pixel, plus one) and clipped to the image. Resampling only the window gives the same
    pixels wherever the decoded image starts (a full decode or the crops' rectangle): Pillow's
    resize otherwise picks its pass order from the whole input's size, which changes rounding.
    """
    factor = target / geometry.side
    left, top, right, bottom = geometry.region
    x_off, y_off = round(geometry.offset[0] * factor), round(geometry.offset[1] * factor)
    size = (max(1, min(round((right - left) * factor), target - x_off)), max(1, min(round((bottom - top) * factor), target - y_off)))
    box = (left * scale[0], top * scale[1], right * scale[0], bottom * scale[1])
    reach_x = math.ceil(3 * max(1.0, (box[2] - box[0]) / size[0])) + 1
    reach_y = math.ceil(3 * max(1.0, (box[3] - box[1]) / size[1])) + 1
    window = (max(0, math.floor(box[0]) - reach_x), max(0, math.floor(box[1]) - reach_y),
              min(bounds[0], math.ceil(box[2]) + reach_x), min(bounds[1], math.ceil(box[3]) + reach_y))
    return ResamplePlan(size, (x_off, y_off), box, window)


def render_crop(image: Pixels, geometry: CropGeometry, target: int, scale: tuple[float, float]) -> Pixels:
    """The crop at ``target`` pixels a side from an image decoded at ``scale`` of full resolution.

    ``geometry`` is in full-resolution pixels. Without scaling this is ``extract_crop``;
    otherwise the region is resampled (Lanczos) straight from its exact sub-pixel box, reading
    only its window (``plan_resampling``).
    """
    if target == geometry.side and scale == (1.0, 1.0):
        return extract_crop(image, geometry)
    plan = plan_resampling(geometry, target, scale, pixels_size(image))
    window = crop_region(image, plan.window)
    source = Image.fromarray(window) if isinstance(window, np.ndarray) else window
    x0, y0 = plan.window[:2]
    box = (plan.source_box[0] - x0, plan.source_box[1] - y0, plan.source_box[2] - x0, plan.source_box[3] - y0)
    piece = source.resize(plan.size, Image.Resampling.LANCZOS, box=box)
    if piece.size == (target, target):
        return piece
    canvas = Image.new("RGB", (target, target))
    canvas.paste(piece, plan.offset)
    return canvas


def box_reference_size(request: ImageRequest) -> tuple[float, float] | None:
    """The size a request's boxes are relative to: 1 x 1 (normalised), the CCT's width x height, or unknown."""
    if request.normalized:
        return 1.0, 1.0
    if request.width and request.height:
        return float(request.width), float(request.height)
    return None


def pixel_box(bbox: Box, request: ImageRequest, size: tuple[int, int]) -> Box:
    """The box in pixels of the displayed image of ``size``.

    MegaDetector boxes are fractions of the image. CCT boxes are pixels of the CCT's
    ``width`` x ``height``; a file of another size (a resized copy) gets them scaled.
    """
    reference = box_reference_size(request)
    if reference is None or reference == size:
        return bbox
    scale_x, scale_y = size[0] / reference[0], size[1] / reference[1]
    return bbox[0] * scale_x, bbox[1] * scale_y, bbox[2] * scale_x, bbox[3] * scale_y


def is_resized_copy(request: ImageRequest, size: tuple[int, int]) -> bool:
    """True when a CCT image's file is not the size its width/height say (its boxes get scaled)."""
    reference = box_reference_size(request)
    return not request.normalized and reference is not None and reference != size


def stored_side(side: int, max_size: int | None) -> int:
    """The side a crop is stored at: its own, or ``max_size`` when that is smaller."""
    return side if max_size is None else min(side, max_size)


def draft_factor(sides: list[int], max_size: int | None, raw_size: tuple[int, int]) -> int:
    """The largest JPEG decoding scale (1, 2, 4 or 8) that still gives every crop ``max_size`` pixels.

    Only when every crop of the image is downscaled to ``max_size`` can the image be
    decoded smaller: the factor keeps ``side / factor >= max_size`` for the smallest
    crop, so each stored crop is still resampled from at least as many pixels as it has.
    """
    if max_size is None or not sides:
        return 1
    for factor in (8, 4, 2):
        if min(sides) / factor >= max_size and min(raw_size) // factor >= 2:
            return factor
    return 1


# ---------------------------------------------------------------- options, records, report


@dataclass(frozen=True)
class CropOptions:
    """How to crop; the command line's flags."""

    crop_strategy: CropStrategy = "square"
    threads: int = 1
    threshold: float = DEFAULT_THRESHOLD
    detector_categories: tuple[str, ...] = DEFAULT_DETECTOR_CATEGORIES
    labels_cct: Path | None = None
    max_size: int | None = None
    max_crop_side: int = DEFAULT_MAX_CROP_SIDE
    missing_locations: MissingLocationRule = "sequence"
    dataset: str | None = None
    quality: int = 90
    check_crops_valid: bool = False
    images_base_url: str | None = None
    save_full_images: bool = False
    logdir: Path | None = None
    progress: bool | None = None
    dask: DaskOptions = DaskOptions()

    def validate(self) -> None:
        """Raise a one-line ``UserError`` for a value out of range."""
        self.dask.validate()
        if self.crop_strategy not in CROP_STRATEGIES:
            raise UserError(f"--crop-strategy must be one of {', '.join(CROP_STRATEGIES)}, got {self.crop_strategy!r}")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.max_size is not None and self.max_size < 1:
            raise UserError(f"--max-size must be at least 1, got {self.max_size}")
        if self.max_crop_side < 1:
            raise UserError(f"--max-crop-side must be at least 1, got {self.max_crop_side}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be between 1 and 100, got {self.quality}")


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


@dataclass(frozen=True)
class Failure:
    """A source image whose crops could not be made."""

    file: str
    reason: str


@dataclass
class ImageOutcome:
    """What happened to the crops of one image."""

    records: list[CropRecord] = field(default_factory=list)
    new: int = 0
    skipped: int = 0
    redone: int = 0
    invalid_removed: int = 0
    failed_crops: int = 0
    drafted: bool = False
    resized_copy: bool = False
    failure: Failure | None = None


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


# ---------------------------------------------------------------- one image


def crop_status(path: Path, check_valid: bool, listed: bool) -> Literal["missing", "valid", "invalid"]:
    """Whether a crop must be made: it is missing, or does not decode.

    Only a crop ``listed`` in the manifest of a finished run (written after its crops were
    synced to disk) is trusted by its existence; any other one (left by a run that was
    killed or lost power before its final sync) is decoded first, as is every crop under
    ``check_valid``.
    """
    if not path.is_file():
        return "missing"
    if (check_valid or not listed) and not is_valid_image(path):
        return "invalid"
    return "valid"


def open_source(request: ImageRequest, images_dir: Path, options: CropOptions) -> Image.Image:
    """Open the source image (header only, ``open_image``): from ``images_dir``, else from the base URL."""
    path = images_dir / request.file_name
    try:
        try:
            return open_image(path)
        except FileNotFoundError:
            if options.images_base_url is None:
                raise ImageError(f"image not found: {path}") from None
            return open_image(io.BytesIO(fetch_source(request, path, options.images_base_url, options.save_full_images)))
    except DECODE_ERRORS as error:  # a FIFO, a name too long, more than MAX_IMAGE_PIXELS, not an image
        raise ImageError(decode_failure(error)) from None


def fetch_source(request: ImageRequest, path: Path, base_url: str, save: bool) -> bytes:
    """The image's bytes from ``base_url``, kept at ``path`` when ``save``."""
    url = image_url(base_url, request.file_name)
    try:
        data = fetch_bytes(url, retries=DOWNLOAD_RETRIES, timeout=DOWNLOAD_TIMEOUT_S)
    except OSError as error:
        raise ImageError(str(error)) from None
    if save:
        try:
            write_bytes_atomic(path, data)
        except OSError as error:
            raise UserError(f"cannot save downloaded image {path}: {error}") from None
    return data


def encode_crop(image: Pixels, quality: int) -> bytes:
    """A crop as JPEG bytes (4:2:0 chroma, accurate DCT, no metadata). simplejpeg encodes straight
    from the array (~0.1 ms a crop less than Pillow, which first copies it into its own pixels);
    both are libjpeg-turbo, so the two differ by about one grey level on average, at the same
    quality. Pillow when simplejpeg is not installed."""
    if encode_jpeg is not None:
        pixels = np.ascontiguousarray(image)  # a PIL image converts through the array interface
        return encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420", fastdct=False)
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    # comment=b"": Pillow would copy the source's JPEG comment into crops cut straight from a PIL image
    picture.save(buffer, format="JPEG", quality=quality, comment=b"")
    return buffer.getvalue()


def save_jpeg(image: Pixels, path: Path, quality: int, durable: bool) -> None:
    """Write a JPEG atomically (fsynced when ``durable``); a write error (disk full, permissions) stops the run."""
    data = encode_crop(image, quality)
    try:
        with atomic_open(path, "wb", durable=durable) as handle:
            handle.write(data)
    except OSError as error:
        raise UserError(f"cannot write crop {path}: {error}") from None


def source_region(geometry: CropGeometry, target: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels of a full-resolution image of ``size`` that a crop stored at ``target`` reads:
    its region, or its resampling window when it is downscaled."""
    if target == geometry.side:
        return geometry.region
    return plan_resampling(geometry, target, (1.0, 1.0), size).window


def decode_for_crops(image: Image.Image, geometries: list[CropGeometry], max_size: int | None
                     ) -> tuple[Pixels, list[CropGeometry], tuple[float, float], int]:
    """The pixels the crops are cut from, their geometries in those pixels, the decoding scale and
    the draft factor.

    At full scale only the rectangle around the pixels every crop reads (``source_region``) is
    decoded where it can be (``decode_region_pixels``). A JPEG whose crops are all downscaled
    enough is decoded whole at 1/2 to 1/8 scale (``draft_factor``).
    """
    full_size = displayed_size(image)
    factor = draft_factor([g.side for g in geometries], max_size, image.size)
    if factor > 1:
        decoded = decode_pixels(image, (image.width // factor, image.height // factor))
        width, height = pixels_size(decoded)
        return decoded, geometries, (width / full_size[0], height / full_size[1]), factor
    needed = union_region([source_region(g, stored_side(g.side, max_size), full_size) for g in geometries])
    pixels, origin = decode_region_pixels(image, needed)
    return pixels, [shifted(g, origin) for g in geometries], (1.0, 1.0), 1


def write_crops(request: ImageRequest, todo: list[tuple[CropRequest, Path, bool]], images_dir: Path,
                options: CropOptions) -> tuple[tuple[int, int], bool]:
    """Decode the image once and write each crop in ``todo`` (crop, path, listed in the manifest);
    returns the displayed size and whether it was drafted.

    A crop under a name the manifest lists is fsynced at once (the manifest vouches for it);
    the others are synced together at the end of the run (``sync_files``).
    """
    with open_source(request, images_dir, options) as image:
        try:
            full_size = displayed_size(image)
            geometries = [
                crop_geometry(pixel_box(crop.bbox, request, full_size), *full_size, options.crop_strategy)
                for crop, _, _ in todo
            ]
            check_crop_sides(geometries, options.max_crop_side)
            decoded, geometries, scale, factor = decode_for_crops(image, geometries, options.max_size)
        except DECODE_ERRORS as error:
            raise ImageError(decode_failure(error)) from None
        for geometry, (_, path, listed) in zip(geometries, todo):
            crop = render_crop(decoded, geometry, stored_side(geometry.side, options.max_size), scale)
            save_jpeg(crop, path, options.quality, durable=listed)
    return full_size, factor > 1


def check_crop_sides(geometries: list[CropGeometry], limit: int) -> None:
    """Refuse an image with a crop larger than ``limit`` pixels a side, before any pixel is allocated."""
    side = max((g.side for g in geometries), default=0)
    if side > limit:
        raise ImageError(f"a crop of {side} x {side} pixels is larger than --max-crop-side {limit}")


def crop_name_problem(crops_dir: Path, name: str) -> str | None:
    """Why a crop cannot be written under ``name`` (a component over ``NAME_MAX_BYTES``, a path over
    ``PATH_MAX_BYTES``: the system would refuse it with ``File name too long``), else None."""
    path = crops_dir / name
    longest = max(len(os.fsencode(part)) for part in path.parts)
    if longest > NAME_MAX_BYTES:
        return f"a crop file name would be {longest} bytes long, more than the {NAME_MAX_BYTES} file systems allow"
    if len(os.fsencode(str(path))) >= PATH_MAX_BYTES:
        return f"a crop path would be {len(os.fsencode(str(path)))} bytes long, more than the {PATH_MAX_BYTES} allowed"
    return None


def known_size(request: ImageRequest, images_dir: Path) -> tuple[int, int] | None:
    """The displayed size without decoding: from the file's header, else from the CCT, else unknown."""
    try:
        return read_image_size(images_dir / request.file_name)
    except DECODE_ERRORS:
        if request.width and request.height:
            return int(request.width), int(request.height)
        return None


def _number(value: float) -> str:
    """A coordinate with at most two decimals and no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def crop_record(request: ImageRequest, crop: CropRequest, crop_path: str, size: tuple[int, int] | None, strategy: str) -> CropRecord:
    """The manifest row of one crop; the box in displayed pixels (empty when MegaDetector's image size is unknown)."""
    if size is not None:
        box = [_number(v) for v in pixel_box(crop.bbox, request, size)]
    else:
        box = [""] * 4 if request.normalized else [_number(v) for v in crop.bbox]
    x, y, w, h = box
    return CropRecord(
        crop_path, request.image_id, crop.annotation_id, request.file_name, x, y, w, h,
        request.dataset, request.location, request.seq_id, request.datetime, crop.label,
        "" if crop.confidence is None else str(crop.confidence), strategy,
    )


def crop_image(request: ImageRequest, crops_dir: Path, images_dir: Path, options: CropOptions,
               listed: Collection[str] = frozenset()) -> ImageOutcome:
    """Make the missing (or invalid) crops of one image; an unusable image becomes a ``Failure``.

    ``listed``: crop names that the existing manifest lists (see ``crop_status``).
    """
    names = crop_names(request)
    problem = next((p for p in (crop_name_problem(crops_dir, n) for n in names) if p), None)
    if problem is not None:
        return ImageOutcome(failure=Failure(request.file_name, problem), failed_crops=len(names))
    status = [crop_status(crops_dir / name, options.check_crops_valid, name in listed) for name in names]
    todo = [(crop, crops_dir / name, name in listed)
            for crop, name, s in zip(request.crops, names, status) if s != "valid"]
    outcome = ImageOutcome()
    size = None
    if todo:
        try:
            size, outcome.drafted = write_crops(request, todo, images_dir, options)
        except ImageError as error:
            outcome.failure = Failure(request.file_name, str(error))
    if size is None:
        size = known_size(request, images_dir)
    outcome.resized_copy = size is not None and is_resized_copy(request, size)
    for crop, name, s in zip(request.crops, names, status):
        if s == "valid":
            outcome.skipped += 1
        elif outcome.failure is None:
            outcome.new += s == "missing"
            outcome.redone += s == "invalid"
        else:
            outcome.failed_crops += 1
            if s == "invalid":
                (crops_dir / name).unlink(missing_ok=True)
                outcome.invalid_removed += 1
            continue
        outcome.records.append(crop_record(request, crop, name, size, options.crop_strategy))
    return outcome


# ---------------------------------------------------------------- the run


def crop_names(request: ImageRequest) -> list[str]:
    """The crop file names of one image's boxes."""
    return [crop_file_name(request.file_name, crop.annotation_id) for crop in request.crops]


def show_progress(options: CropOptions) -> bool:
    """Progress bar on unless asked otherwise or stderr is not a terminal."""
    return options.progress if options.progress is not None else sys.stderr.isatty()


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


def write_manifest(records: list[CropRecord], path: Path) -> None:
    """Write the crops manifest CSV atomically, sorted by crop path; every value is text."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for record in sorted(records, key=lambda r: r.crop_path):
            writer.writerow([getattr(record, name) for name in MANIFEST_COLUMNS])


def write_run_log(report: CropReport, logdir: Path, arguments: dict[str, object]) -> Path:
    """Write ``crop_detections_<UTC time>.json``: arguments, counts, every failure and skipped image."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")
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
