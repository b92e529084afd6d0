"""Where a crop comes from in its image: the two strategies' geometry, boxes in pixels, and how a
downscaled crop is resampled (``max_size``) and how small its image may be decoded.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from classification.data.detections import Box, ImageRequest
from classification.data.images import Pixels

__all__ = [
    "CROP_STRATEGIES",
    "CropGeometry",
    "CropStrategy",
    "ResamplePlan",
    "box_reference_size",
    "clip_box",
    "crop_geometry",
    "crop_region",
    "draft_factor",
    "extract_crop",
    "is_resized_copy",
    "pad_geometry",
    "pixel_box",
    "pixels_size",
    "plan_resampling",
    "render_crop",
    "round_half_up",
    "in_decoded_region",
    "source_region",
    "square_geometry",
    "stored_side",
    "union_region",
]

CropStrategy = Literal["square", "pad"]
CROP_STRATEGIES = ("square", "pad")


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


def in_decoded_region(geometry: CropGeometry, origin: tuple[int, int]) -> CropGeometry:
    """``geometry`` in the pixels of a decoded rectangle that starts at ``origin`` of the image."""
    (x, y), (left, top, right, bottom) = origin, geometry.region
    return replace(geometry, region=(left - x, top - y, right - x, bottom - y))


# ---------------------------------------------------------------- resampling


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


def source_region(geometry: CropGeometry, target: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels of a full-resolution image of ``size`` that a crop stored at ``target`` reads:
    its region, or its resampling window when it is downscaled."""
    if target == geometry.side:
        return geometry.region
    return plan_resampling(geometry, target, (1.0, 1.0), size).window


# ---------------------------------------------------------------- boxes in pixels, decoding scale


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
