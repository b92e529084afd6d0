"""Small image helpers shared by downloading, cropping, training and evaluation plots.

A leaf of the ``data`` layer (it imports only PIL and numpy), so any stage may use it without
borrowing from a sibling module: ``training`` and ``evaluation`` take ``to_rgb`` and
``read_thumbnail`` from here, not from ``data/crops.py`` or ``data/inspect.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

# What PIL raises for a missing, truncated, corrupt or absurdly large image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
THUMBNAIL_PIXELS = 128  # the longer side of a thumbnail in the inspection and evaluation grids


def is_valid_image(path: Path | IO[bytes], header_only: bool = False) -> bool:
    """True when ``path`` (a file or an open binary file) is an image that PIL decodes completely (a truncated
    JPEG is not); ``header_only``: whose header PIL reads (an HTML page is not an image, a truncated JPEG passes)."""
    try:
        with Image.open(path) as image:
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


def read_thumbnail(path: Path, size: int = THUMBNAIL_PIXELS) -> Image.Image:
    """Decode a crop at reduced scale (``Image.draft``) into an RGB thumbnail of at most ``size`` pixels."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        thumbnail = image.convert("RGB")
    thumbnail.thumbnail((size, size))
    return thumbnail
