"""Decode only the part of a JPEG that cropping needs, with libjpeg-turbo's TurboJPEG 3 API.

Cropping keeps on average a tenth of a camera-trap image (MCT: 9% of the area, within the top
72% of the rows). ``decode_region`` asks libturbojpeg (``tj3SetCroppingRegion``) for a
rectangle around all of an image's crops: it skips the inverse DCT, upsampling and colour
conversion outside it and stops reading after its last row, which halves the time to decode an
MCT image (0.62 ms against 1.27 ms for 640 x 640). The rectangle is the crops' union widened by
one iMCU (the 8-32 pixel block the JPEG is coded in) on every side, so that every pixel a crop
uses is computed from the same neighbours as in a full decode: the crops are byte-identical to
those cut from a full decode (tested on MCT, lila_md_test and every chroma subsampling).

Where the library comes from, first match wins:

- ``CLASSIFICATION_LIBTURBOJPEG``: a path to libturbojpeg, or ``none`` to switch this off;
- the ``turbojpeg`` wheel (a pinned dependency on Linux x86-64, Windows and macOS), which
  bundles libjpeg-turbo 2.1.92, the 3.0 beta with the TurboJPEG 3 API: only its library is used,
  through ctypes;
- a system or conda libturbojpeg (conda-forge's ``libjpeg-turbo``, version 3 or later).

Without one (or for a JPEG it cannot take: grayscale, 12-bit, lossless, unusual subsampling,
or any warning or error while decoding) ``decode_region`` returns None and the caller decodes
the whole image as before: the same pixels, only slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LIBRARY_ENV = "CLASSIFICATION_LIBTURBOJPEG"
_WHEEL = "turbojpeg"
_LIBRARY_FILE = re.compile(r"^(lib)?turbojpeg(-[0-9a-f]+)?(\.\d+)*\.(so|dylib|dll)(\.\d+)*$")

# turbojpeg.h (libjpeg-turbo 3.x)
_TJINIT_DECOMPRESS = 1
_TJPF_RGB = 0
_TJPARAM_STOPONWARNING = 0
_TJPARAM_SUBSAMP = 4
_TJPARAM_JPEGWIDTH = 5
_TJPARAM_JPEGHEIGHT = 6
_TJPARAM_PRECISION = 7
_TJPARAM_COLORSPACE = 8
_TJPARAM_LOSSLESS = 15
_TJCS_RGB, _TJCS_YCBCR = 0, 1
# iMCU width and height by TJSAMP (444, 422, 420, GRAY, 440, 411, 441); grayscale is not taken
_START_OF_SCAN, _END_OF_IMAGE = b"\xff\xda", b"\xff\xd9"
_IMCU_SIZE = {0: (8, 8), 1: (16, 8), 2: (16, 16), 4: (8, 16), 5: (32, 8), 6: (8, 32)}

Region = tuple[int, int, int, int]  # left, top, right, bottom, in pixels of the stored image


class _TJRegion(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


def _wheel_library() -> Path | None:
    """libturbojpeg inside the installed ``turbojpeg`` wheel, if any."""
    try:
        distribution = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if _LIBRARY_FILE.match(file.name):
            return Path(str(distribution.locate_file(file)))
    return None


def library_path() -> str | None:
    """The libturbojpeg to load (see the module docstring), or None."""
    chosen = os.environ.get(LIBRARY_ENV, "").strip()
    if chosen:
        return None if chosen.lower() in ("none", "off", "0") else chosen
    wheel = _wheel_library()
    if wheel is not None:
        return str(wheel)
    return ctypes.util.find_library("turbojpeg")


def _bind(library: ctypes.CDLL) -> None:
    """Declare the argument and result types of the TurboJPEG 3 functions used here."""
    handle = ctypes.c_void_p
    library.tj3Init.restype, library.tj3Init.argtypes = handle, [ctypes.c_int]
    library.tj3Destroy.restype, library.tj3Destroy.argtypes = None, [handle]
    library.tj3Set.restype, library.tj3Set.argtypes = ctypes.c_int, [handle, ctypes.c_int, ctypes.c_int]
    library.tj3Get.restype, library.tj3Get.argtypes = ctypes.c_int, [handle, ctypes.c_int]
    library.tj3DecompressHeader.restype = ctypes.c_int
    library.tj3DecompressHeader.argtypes = [handle, ctypes.c_char_p, ctypes.c_size_t]
    library.tj3SetCroppingRegion.restype, library.tj3SetCroppingRegion.argtypes = ctypes.c_int, [handle, _TJRegion]
    library.tj3Decompress8.restype = ctypes.c_int
    library.tj3Decompress8.argtypes = [handle, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded libturbojpeg (version 3 or later), or None (logged once at debug level)."""
    path = library_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)
        _bind(library)  # AttributeError: a libturbojpeg older than 3.0 (no tj3 functions)
    except (OSError, AttributeError) as error:
        log.debug("region decoding off: cannot use libturbojpeg %s: %s", path, error)
        return None
    return library


class _Decompressor:
    """One TurboJPEG decompression instance (they are not thread-safe: one per thread)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        self.handle = library.tj3Init(_TJINIT_DECOMPRESS)
        if not self.handle or library.tj3Set(self.handle, _TJPARAM_STOPONWARNING, 1) != 0:
            raise OSError("tj3Init failed")

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.library.tj3Destroy(self.handle)


_local = threading.local()


def _decompressor() -> _Decompressor | None:
    """This thread's decompressor, or None without a usable library."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        library = _library()
        if library is None:
            return None
        try:
            decompressor = _local.decompressor = _Decompressor(library)
        except OSError:
            return None
    return decompressor


def available() -> bool:
    """Whether region decoding can be used in this process."""
    return _decompressor() is not None


def widened_region(region: Region, size: tuple[int, int], imcu: tuple[int, int]) -> Region:
    """``region`` grown by one iMCU on every side (the left edge also down to a whole iMCU, as
    libturbojpeg requires), clipped to the image."""
    (left, top, right, bottom), (width, height), (step_x, step_y) = region, size, imcu
    left = max(0, (left // step_x - 1) * step_x)
    return left, max(0, top - step_y), min(width, right + step_x), min(height, bottom + step_y)


def ends_its_last_scan(data: bytes) -> bool:
    """Whether an end-of-image marker follows the last start-of-scan marker: not so in a file cut
    short (neither marker can occur inside the coded data; bytes after the end marker, as some
    cameras append, are allowed)."""
    return data.rfind(_END_OF_IMAGE) > data.rfind(_START_OF_SCAN) >= 0


def decode_region(data: bytes, region: Region, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The RGB pixels of a rectangle of the JPEG ``data`` that holds ``region``, and where that
    rectangle starts in the image; None when region decoding is off, the JPEG is of a kind it
    does not take, libturbojpeg reads another ``size`` (width, height) from its header than the
    caller did (the region is in the caller's pixels), or it reports any warning or error (the
    caller then decodes the whole image, which also says what is wrong with it).

    Decoding stops after the rectangle's last row, so a file cut short below it would decode
    without a word: such a file (``ends_its_last_scan``) is left to the full decode, which
    reports it, as is any JPEG with a flaw inside the rectangle (a warning stops libturbojpeg).
    """
    decompressor = _decompressor()
    if decompressor is None or not ends_its_last_scan(data):
        return None
    library, handle = decompressor.library, decompressor.handle
    if library.tj3DecompressHeader(handle, data, len(data)) != 0:
        return None
    imcu = _IMCU_SIZE.get(library.tj3Get(handle, _TJPARAM_SUBSAMP))
    if (imcu is None or library.tj3Get(handle, _TJPARAM_PRECISION) != 8 or library.tj3Get(handle, _TJPARAM_LOSSLESS) == 1
            or library.tj3Get(handle, _TJPARAM_COLORSPACE) not in (_TJCS_RGB, _TJCS_YCBCR)):
        return None
    if (library.tj3Get(handle, _TJPARAM_JPEGWIDTH), library.tj3Get(handle, _TJPARAM_JPEGHEIGHT)) != size:
        return None  # e.g. a tables-only stream, after which libturbojpeg still reports the previous image's values
    left, top, right, bottom = widened_region(region, size, imcu)
    if right <= left or bottom <= top:
        return None
    if library.tj3SetCroppingRegion(handle, _TJRegion(left, top, right - left, bottom - top)) != 0:
        return None
    pixels = np.empty((bottom - top, right - left, 3), dtype=np.uint8)
    if library.tj3Decompress8(handle, data, len(data), pixels.ctypes.data, (right - left) * 3, _TJPF_RGB) != 0:
        return None
    return pixels, (left, top)
