"""MegaDetector results files as LILA publishes them (a JSON, or a zip holding one), read as a stream.

One dataset's results can be a JSON of a gigabyte or more (millions of images); a subset needs a few
of its entries. ijson's C parser walks the file, so memory holds only the entries kept: one pass for
the images, and one each for ``detection_categories`` and ``info`` (MegaDetector writes them after
the images).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson

from classification.errors import DataError
from classification.io import check_regular_file, unreadable_file


@dataclass
class MdResults:
    """What a subset takes from one results file: its categories, its info and the entries kept."""

    detection_categories: dict[str, str]
    info: dict[str, Any]
    images: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def json_stream(path: Path) -> Iterator[IO[bytes]]:
    """The JSON's bytes: the file itself, or the one JSON inside a zip (a FIFO or device refused: it would block)."""
    check_regular_file(path, "a JSON file or a zip holding one")
    if path.suffix.lower() != ".zip":
        with open(path, "rb") as handle:
            yield handle
        return
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
        if len(names) != 1 or not names[0].lower().endswith(".json"):
            raise DataError(f"{path}: expected one JSON file inside, found {len(names)}: {', '.join(names[:5])}")
        with archive.open(names[0]) as handle:
            yield handle


def _first(path: Path, prefix: str) -> Any:
    with json_stream(path) as handle:
        return next(iter(ijson.items(handle, prefix, use_float=True)), None)


def scan_md_results(path: Path, keep: Callable[[dict[str, Any]], dict[str, Any] | None]) -> MdResults:
    """The file's categories and info, and ``keep(entry)`` of every image entry for which it is not None."""
    try:
        categories = _first(path, "detection_categories")
        if not isinstance(categories, dict):
            raise DataError(f"{path}: detection_categories: missing or not an object (is this a MegaDetector results file?)")
        info = _first(path, "info")
        results = MdResults({str(k): str(v) for k, v in categories.items()}, info if isinstance(info, dict) else {})
        with json_stream(path) as handle:
            for entry in ijson.items(handle, "images.item", use_float=True):
                kept = keep(entry) if isinstance(entry, dict) else None
                if kept is not None:
                    results.images.append(kept)
        return results
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a zip file (cut short?)") from None
    except ijson.JSONError as error:
        raise DataError(f"{path}: not a MegaDetector JSON file ({str(error).splitlines()[0][:120]})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable_file(path, error, "a MegaDetector results file") from None
