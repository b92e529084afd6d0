"""Small image-file checks shared by downloading, cropping and training."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# What PIL raises for a missing, truncated, corrupt or absurdly large image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def is_valid_image(path: Path) -> bool:
    """True when ``path`` is an image that PIL decodes completely (a truncated JPEG is not)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except DECODE_ERRORS:
        return False
