"""Small image-file checks shared by downloading, cropping and training."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from PIL import Image

# What PIL raises for a missing, truncated, corrupt or absurdly large image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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
