"""The one image decoder, and small image helpers, shared by downloading, cropping, training,
prediction and the inspection and evaluation figures.

Decoding (``decode_rgb``, ``decode_pixels``, ``read_rgb``): the displayed image as 8-bit RGB,
that is, EXIF orientation applied and CMYK, grayscale, 16-bit, palette and alpha images
converted; a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, about twice as
fast) when the caller asks for at least a given size. Cropping decodes with ``decode_pixels``
(a draft size from its own factor rule, and simplejpeg's array where that gives Pillow's exact
pixels) and, at full scale, with ``decode_region_pixels`` (only a rectangle around an image's
crops where libturbojpeg can: ``jpeg_region``); training, prediction and the thumbnails with
``read_rgb`` (a draft size from the short side they need). An image that cannot be decoded is
the same one line everywhere (``decode_failure``).

A leaf of the ``data`` layer (it imports only PIL, numpy, ``jpeg_region`` and, when installed,
simplejpeg), so any stage may use it without borrowing from a sibling module.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from classification.data.jpeg_region import Region, decode_region
from classification.io import file_kind

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes the same pixels, a little slower
    simplejpeg = None

# What PIL raises for a missing, truncated, corrupt or absurdly large image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
THUMBNAIL_PIXELS = 128  # the longer side of a thumbnail in the inspection and evaluation grids
EXIF_ORIENTATION = 0x0112
Pixels = Image.Image | np.ndarray  # a decoded image: PIL, or an (H, W, 3) uint8 array from simplejpeg

log = logging.getLogger(__name__)


# The most pixels an image's header may declare: PIL's own 89.5 megapixels (268 MB as RGB), nearly four
# times a 24 MP camera-trap frame. A JPEG of a few bytes can declare 65500 x 65500; decoding it would take
# gigabytes. ``check_pixels`` refuses such an image in one line, so PIL's two-line warning about it is silenced.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class NotRegularFileError(OSError):
    """An image path that names a FIFO, a device or a folder: opening a FIFO would wait forever."""


class ImageLoadError(OSError):
    """An image that is missing, truncated or not an image: ``<file>: <decode_failure(error)>``, one line."""


def check_regular_file(path: Path) -> None:
    """Raise ``NotRegularFileError`` for what is not a regular file; ``os.stat`` errors (missing, a name
    too long) pass through. A stat never blocks, where opening a FIFO waits for a writer."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"not a regular file ({file_kind(mode)})")


def check_pixels(image: Image.Image) -> None:
    """Refuse an image whose header declares more than ``MAX_IMAGE_PIXELS`` (before any pixel is decoded)."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"{width} x {height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,}")


def refuse_truncated_images() -> None:
    """Keep PIL's process-wide ``LOAD_TRUNCATED_IMAGES`` off: another package (MegaDetector's
    visualization_utils, for one) turns it on at import, and a truncated image would then decode as
    grey pixels and train silently. Said once when it was on."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        log.warning("PIL's LOAD_TRUNCATED_IMAGES was turned on by another package: turned off, "
                    "truncated images are refused (skipped and reported)")


def open_image(source: Path | IO[bytes]) -> Image.Image:
    """``Image.open`` (header only) for every reader: a regular file (``check_regular_file``) whose declared
    size is within ``MAX_IMAGE_PIXELS``; what is refused raises one of ``DECODE_ERRORS``."""
    if isinstance(source, (str, Path)):
        check_regular_file(Path(source))
    refuse_truncated_images()
    image = Image.open(source)
    try:
        check_pixels(image)
    except Image.DecompressionBombError:
        image.close()
        raise
    return image


def is_valid_image(path: Path | IO[bytes], header_only: bool = False) -> bool:
    """True when ``path`` (a file or an open binary file) is an image that PIL decodes completely (a truncated
    JPEG is not); ``header_only``: whose header PIL reads (an HTML page is not an image, a truncated JPEG passes)."""
    try:
        with open_image(path) as image:
            if not header_only:
                image.load()
        return True
    except DECODE_ERRORS:
        return False


def has_image_suffix(name: str | Path) -> bool:
    """True for a file name whose suffix PIL can read (``.jpg``, ``.JPG``, ``.png``, ...; not ``.mp4``)."""
    return Path(name).suffix.lower() in Image.registered_extensions()


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: CMYK, grayscale (L, LA, 16-bit), palette and alpha images converted."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        high_byte = np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(high_byte).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------- decoding


def decode_failure(error: BaseException) -> str:
    """Why an image could not be read, as every caller reports it, one line: ``file not found``, or
    ``cannot decode: <PIL's reason>`` (truncated, not an image, ...)."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, NotRegularFileError):
        return str(error)
    if isinstance(error, OSError) and error.errno is not None and error.strerror:  # e.g. a file name too long
        return f"cannot be read ({error.strerror})"
    return "cannot decode: " + " ".join(str(error).split())


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """Width and height after the EXIF orientation, from the header (nothing decoded)."""
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def short_side_draft(image: Image.Image, side: int | None) -> tuple[int, int] | None:
    """The draft size for an image that will be shrunk to ``side`` pixels (training, prediction, thumbnails):
    ``(side, side)`` for a JPEG at least twice ``side`` on its short side, else None (a full decode).

    Cropping has its own rule (``(width // factor, height // factor)``, a factor that keeps every
    crop's pixels: see ``classification.data.crop_geometry.draft_factor``).
    """
    if side and image.format == "JPEG" and min(image.size) >= 2 * side:
        return side, side
    return None


def decode_rgb(image: Image.Image, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image as the displayed 8-bit RGB image: EXIF orientation applied, any mode converted.

    ``draft``: decode a JPEG at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps it at least
    this size (``Image.draft``; of the stored, unrotated image). The callers' rules differ on
    purpose (``short_side_draft``; cropping's factor), and each keeps its pixels.
    """
    if draft is not None:
        image.draft("RGB", draft)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def is_plain_jpeg(image: Image.Image) -> bool:
    """A YCbCr/RGB JPEG without EXIF rotation: libjpeg-turbo's pixels are then the displayed image."""
    return image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(EXIF_ORIENTATION, 1) == 1


def fast_decodable(image: Image.Image) -> bool:
    """Whether simplejpeg gives exactly Pillow's pixels (both are libjpeg-turbo, same settings):
    a plain JPEG (``is_plain_jpeg``) decoded at full scale."""
    return simplejpeg is not None and is_plain_jpeg(image)


def decode_pixels(image: Image.Image, draft: tuple[int, int] | None = None, as_array: bool = False) -> Pixels:
    """``decode_rgb``, or, with ``as_array`` and no ``draft``, straight into an (H, W, 3) array by
    simplejpeg where ``fast_decodable`` (no copy into Pillow's 4-byte pixels; ~10% less time per
    image when cropping): the same pixels either way."""
    if as_array and draft is None and fast_decodable(image):
        source: IO[bytes] = image.fp  # type: ignore[attr-defined]  # an opened JPEG file: Pillow's ImageFile keeps fp
        source.seek(0)
        try:
            return simplejpeg.decode_jpeg(source.read(), colorspace="RGB")
        except ValueError:  # strict: a recoverable flaw (e.g. stray bytes) that Pillow decodes through
            pass
    return decode_rgb(image, draft)


def decode_region_pixels(image: Image.Image, region: Region) -> tuple[Pixels, tuple[int, int]]:
    """The pixels of at least ``region`` (left, top, right, bottom of the displayed image) and where
    they start in it: only a rectangle around the region where ``is_plain_jpeg`` and libturbojpeg
    can (``jpeg_region.decode_region``, the same pixels at about half the time), else the whole
    image (``decode_pixels``, as an array where it can be) at ``(0, 0)``."""
    if is_plain_jpeg(image):
        source: IO[bytes] = image.fp  # type: ignore[attr-defined]  # an opened JPEG file: Pillow's ImageFile keeps fp
        source.seek(0)
        decoded = decode_region(source.read(), region, image.size)
        if decoded is not None:
            return decoded
    return decode_pixels(image, as_array=True), (0, 0)


def read_rgb(path: Path, side: int | None = None) -> Image.Image:
    """Open and decode an image file (``decode_rgb``), drafted by ``short_side_draft(side)``;
    ``ImageLoadError`` (one line: ``<path>: cannot decode: ...``) when it cannot be."""
    try:
        with open_image(path) as image:
            return decode_rgb(image, short_side_draft(image, side))
    except DECODE_ERRORS as error:
        raise ImageLoadError(f"{path}: {decode_failure(error)}") from None


def read_thumbnail(path: Path, size: int = THUMBNAIL_PIXELS) -> Image.Image:
    """An RGB thumbnail of at most ``size`` pixels, decoded at reduced scale (``read_rgb``)."""
    thumbnail = read_rgb(path, size)
    thumbnail.thumbnail((size, size))
    return thumbnail
