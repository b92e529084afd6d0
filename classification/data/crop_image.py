"""One image's crops: which are missing or invalid, the source opened (or downloaded) and decoded once,
each crop rendered and written atomically, and the manifest rows and counts (``ImageOutcome``).

Re-runs skip crops that exist and that the manifest lists; an existing crop the manifest
does not list is decoded first (``check_crops_valid``: every crop is; invalid ones are
redone).

Robustness: EXIF orientation is applied; CMYK, grayscale, 16-bit, palette and alpha
images become RGB (``classification.data.images.decode_pixels``: the decoder training and
prediction share, with simplejpeg's array where it gives Pillow's exact pixels); an image
that is missing, truncated or unreadable is skipped and listed with the reason, and the
run goes on. Crops are written atomically, so a crop left half-written by a killed process
never exists under its final name; they are synced to disk all at once, just before the
manifest lists them (see ``crop_status``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

try:
    from simplejpeg import encode_jpeg
except ImportError:  # optional: Pillow encodes crops, a little slower
    encode_jpeg = None

from classification.data.cct import read_image_size
from classification.data.crop_geometry import (
    CropGeometry,
    crop_geometry,
    draft_factor,
    in_decoded_region,
    is_resized_copy,
    pixel_box,
    pixels_size,
    render_crop,
    source_region,
    stored_side,
    union_region,
)
from classification.data.crop_manifest import CropRecord, crop_names
from classification.data.crop_options import CropOptions
from classification.data.detections import CropRequest, ImageRequest
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
from classification.errors import UserError
from classification.io import atomic_open, write_bytes_atomic

__all__ = [
    "DOWNLOAD_RETRIES",
    "DOWNLOAD_TIMEOUT_S",
    "NAME_MAX_BYTES",
    "PATH_MAX_BYTES",
    "Failure",
    "ImageError",
    "ImageOutcome",
    "PendingCrop",
    "check_crop_sides",
    "crop_image",
    "crop_name_problem",
    "crop_record",
    "crop_status",
    "decode_for_crops",
    "encode_crop",
    "fetch_source",
    "known_size",
    "open_source",
    "save_jpeg",
    "write_crops",
]

DOWNLOAD_RETRIES = 2
DOWNLOAD_TIMEOUT_S = 60
NAME_MAX_BYTES = 255  # the longest file name (one path component) common file systems allow
PATH_MAX_BYTES = 4096  # the longest path Linux opens


class ImageError(Exception):
    """A source image that cannot be used (missing, truncated, unreadable): skipped and logged."""


# ---------------------------------------------------------------- outcome


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
    return pixels, [in_decoded_region(g, origin) for g in geometries], (1.0, 1.0), 1


class PendingCrop(NamedTuple):
    """A crop still to write: the request, its file, and whether the existing manifest lists that name."""

    crop: CropRequest
    path: Path
    listed: bool


def write_crops(request: ImageRequest, pending: list[PendingCrop], images_dir: Path,
                options: CropOptions) -> tuple[tuple[int, int], bool]:
    """Decode the image once and write each crop in ``pending``; returns the displayed size and whether it was
    drafted.

    A crop under a name the manifest lists is fsynced at once (the manifest vouches for it);
    the others are synced together at the end of the run (``sync_files``).
    """
    with open_source(request, images_dir, options) as image:
        try:
            full_size = displayed_size(image)
            geometries = [
                crop_geometry(pixel_box(crop.bbox, request, full_size), *full_size, options.crop_strategy)
                for crop, _, _ in pending
            ]
            check_crop_sides(geometries, options.max_crop_side)
            decoded, geometries, scale, factor = decode_for_crops(image, geometries, options.max_size)
        except DECODE_ERRORS as error:
            raise ImageError(decode_failure(error)) from None
        for geometry, (_, path, listed) in zip(geometries, pending):
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
    pending = [PendingCrop(crop, crops_dir / name, name in listed)
               for crop, name, state in zip(request.crops, names, status) if state != "valid"]
    outcome = ImageOutcome()
    size = None
    if pending:
        try:
            size, outcome.drafted = write_crops(request, pending, images_dir, options)
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
