"""Read, validate and normalise COCO Camera Traps (CCT) files.

A CCT file is JSON with ``images``, ``annotations`` and ``categories``. Boxes are
absolute pixels ``[x, y, width, height]``. Validation reports every problem with its
JSON path (``annotations[17].bbox: width is negative``) so a user can fix the file;
``load_cct`` raises a one-line ``DataError`` naming the file and the first error.

Locations are normalised the way animl-ml does (strip, spaces to ``_``, lower case)
and always kept as strings. A missing location is never dropped silently: see
``resolve_missing_locations``.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from classification.data.images import DECODE_ERRORS, decode_failure, displayed_size, open_image
from classification.errors import DataError
from classification.io import read_json, shown_value

log = logging.getLogger(__name__)

CCT = dict[str, Any]
Severity = Literal["error", "warning"]
MissingLocationRule = Literal["sequence", "image", "drop"]

# A box may overshoot the image by this much (pixels, or this fraction of the side)
# before it counts as outside the image; smaller overshoots are clipped when cropping.
BOX_TOLERANCE_PIXELS = 2.0
BOX_TOLERANCE_FRACTION = 0.01
MISSING_LOCATION_PREFIX = "nolocation_"


@dataclass(frozen=True)
class Problem:
    """One validation finding, located by its JSON path."""

    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class MissingLocationReport:
    """What ``resolve_missing_locations`` did with images that had no location."""

    rule: MissingLocationRule
    images_without_location: int = 0
    groups_created: int = 0
    images_dropped: int = 0
    annotations_dropped: int = 0
    example_image_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        if self.images_without_location == 0:
            return "every image has a location"
        examples = ", ".join(self.example_image_ids[:3])
        if self.rule == "drop":
            action = f"dropped {self.images_dropped} images and {self.annotations_dropped} annotations"
        else:
            action = f"grouped them into {self.groups_created} pseudo-locations by {self.rule}"
        return f"{self.images_without_location} images have no location (e.g. {examples}): {action}"


def is_number(value: Any) -> bool:
    """True for a finite int or float (bool excluded); an integer too large for a float is not one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer literal beyond 1.8e308, e.g. "width": 1000...000
        return False


def shown(value: Any, limit: int = 120) -> str:
    """A value for a one-line message: its ``repr`` cut to ``limit`` characters (``io.shown_value``); a huge integer says so."""
    if isinstance(value, int) and not isinstance(value, bool) and not is_number(value):
        return f"an integer too large for a number ({value.bit_length()} bits)"
    if isinstance(value, list):
        text = "[" + ", ".join(shown(item, limit) for item in value[:8]) + (", ...]" if len(value) > 8 else "]")
    else:
        text = repr(value)
    return shown_value(text, limit)


def normalize_location(value: Any) -> str | None:
    """animl-ml's location rule: strip, spaces to ``_``, lower case; numbers stay strings.

    ``None``, NaN and empty strings are missing (``None``). ``12`` and ``12.0`` both
    become ``"12"`` so numeric locations never crash and never turn into floats.
    """
    if value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    if not text or text.lower() in {"nan", "none", "null"}:
        return None
    return "_".join(text.split()).lower()


def overshoot_tolerance(side: float, normalized: bool = False) -> float:
    """How far a box may run past an image side and still count as inside (it is clipped when cropping):
    max(2 px, 1% of the side); for normalised boxes (MegaDetector: the pixel size is not in the file) 1%."""
    return BOX_TOLERANCE_FRACTION * side if normalized else max(BOX_TOLERANCE_PIXELS, BOX_TOLERANCE_FRACTION * side)


def box_outside_image(box: tuple[float, float, float, float], width: float, height: float,
                      normalized: bool = False) -> str | None:
    """Why an ``[x, y, w, h]`` box lies outside a ``width`` x ``height`` image beyond the tolerance, or None.

    One rule for CCT boxes (pixels) and MegaDetector boxes (fractions: ``width = height = 1``).
    """
    x, y, w, h = box
    tol_x, tol_y = overshoot_tolerance(width, normalized), overshoot_tolerance(height, normalized)
    if x < -tol_x or y < -tol_y or x + w > width + tol_x or y + h > height + tol_y:
        image = "image (normalised: 0 to 1)" if normalized else f"{width:g}x{height:g} image"
        return (f"box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {image}"
                f" (x+width={x + w:g}, y+height={y + h:g}; tolerance {tol_x:g} x {tol_y:g})")
    return None


def _check_box(bbox: Any, width: Any, height: Any, path: str) -> list[Problem]:
    """Problems with one absolute-pixel box ``[x, y, w, h]`` in an image of ``width`` x ``height``."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        return [Problem(path, f"expected [x, y, width, height] with 4 numbers, got {shown(bbox)}")]
    x, y, w, h = bbox
    problems = []
    if w < 0:
        problems.append(Problem(path, "width is negative"))
    if h < 0:
        problems.append(Problem(path, "height is negative"))
    if problems:
        return problems
    if w == 0 or h == 0:
        return [Problem(path, f"box is empty (width {w:g}, height {h:g})")]
    if not (is_number(width) and is_number(height)):
        return []
    outside = box_outside_image((x, y, w, h), width, height)
    return [Problem(path, outside)] if outside else []


def _check_ids(items: list[Any], section: str) -> tuple[dict[Any, int], list[Problem]]:
    """Index ``items`` by ``id``; report items that are not objects, lack an id, or repeat one."""
    index: dict[Any, int] = {}
    problems = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(Problem(f"{section}[{i}]", f"expected an object, got {type(item).__name__}"))
            continue
        if "id" not in item or item["id"] is None:
            problems.append(Problem(f"{section}[{i}].id", "missing"))
            continue
        key = item["id"]
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            problems.append(Problem(f"{section}[{i}].id", f"must be a string or integer, got {shown(key)}"))
        elif key in index:
            problems.append(Problem(f"{section}[{i}].id", f"duplicate id {shown(key)} (also {section}[{index[key]}])"))
        else:
            index[key] = i
    return index, problems


def file_key(name: str) -> str:
    """The file an image path names, for comparing paths: ``\\`` as ``/``, ``./`` and ``a/../`` resolved
    (``a.jpg`` and ``./a.jpg`` are one photo)."""
    return posixpath.normpath(name.replace("\\", "/"))


def name_key(name: str) -> str:
    """A class name as compared for sameness: case and runs of spaces do not count (``Deer`` is ``deer ``)."""
    return " ".join(name.split()).casefold()


def _check_category_names(categories: list[Any]) -> list[Problem]:
    """Every category has a name, and no two names differ only by case or spaces: they would become two
    classes of one species (merge them with a category map)."""
    problems = []
    seen: dict[str, tuple[int, str]] = {}
    for i, category in enumerate(categories):
        if not isinstance(category, dict):
            continue
        name = category.get("name")
        if not isinstance(name, str):
            problems.append(Problem(f"categories[{i}].name", "missing or not a string"))
            continue
        first = seen.setdefault(name_key(name), (i, name))
        if first[1] != name:
            problems.append(Problem(f"categories[{i}].name", f"{shown(name)} differs from categories[{first[0]}]'s "
                                    f"{shown(first[1])} only by case or spaces (one class twice: merge them with a category map)"))
    return problems


def _check_images(images: list[Any]) -> list[Problem]:
    """Required fields and sizes of every image; one photo under two image ids is an error (its crops could
    land in two splits)."""
    problems = []
    seen: dict[str, int] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            continue
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            problems.append(Problem(f"images[{i}].file_name", "missing or not a string"))
        elif Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            problems.append(Problem(f"images[{i}].file_name", f"must be a relative path inside the images folder: {shown(file_name)}"))
        elif file_key(file_name) in seen:
            problems.append(Problem(f"images[{i}].file_name", f"{shown(file_name)} is the file of images[{seen[file_key(file_name)]}] "
                                    "too (one photo under two image ids)"))
        else:
            seen[file_key(file_name)] = i
        for key in ("width", "height"):
            value = image.get(key)
            if value is None:
                continue
            if not is_number(value) or value <= 0:
                problems.append(Problem(f"images[{i}].{key}", f"must be a positive number, got {shown(value)}"))
        if image.get("width") is None or image.get("height") is None:
            problems.append(Problem(f"images[{i}]", "width/height missing: boxes cannot be checked (read them with --read-sizes)", "warning"))
        if normalize_location(image.get("location")) is None:
            problems.append(Problem(f"images[{i}].location", "missing (see --missing-locations)", "warning"))
    return problems


def _check_annotations(data: CCT, image_index: dict[Any, int], category_ids: set[Any]) -> list[Problem]:
    """References and boxes of every annotation."""
    problems = []
    images = data["images"]
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            continue
        image_id = annotation.get("image_id")
        if image_id not in image_index:
            problems.append(Problem(f"annotations[{i}].image_id", f"no image with id {shown(image_id)}"))
        if annotation.get("category_id") not in category_ids:
            problems.append(Problem(f"annotations[{i}].category_id", f"no category with id {shown(annotation.get('category_id'))}"))
        if "bbox" in annotation and annotation["bbox"] is not None:
            image = images[image_index[image_id]] if image_id in image_index else {}
            problems += _check_box(annotation["bbox"], image.get("width"), image.get("height"), f"annotations[{i}].bbox")
    return problems


def validate_cct(data: Any) -> list[Problem]:
    """Every problem in a parsed CCT file: errors make it unusable, warnings are reported."""
    if not isinstance(data, dict):
        return [Problem("$", f"expected a JSON object with images, annotations and categories, got {type(data).__name__}")]
    problems = []
    for section in ("images", "annotations", "categories"):
        if section not in data:
            problems.append(Problem(section, "missing"))
        elif not isinstance(data[section], list):
            problems.append(Problem(section, f"expected a list, got {type(data[section]).__name__}"))
    if problems:
        return problems
    image_index, id_problems = _check_ids(data["images"], "images")
    category_index, category_problems = _check_ids(data["categories"], "categories")
    _, annotation_problems = _check_ids(data["annotations"], "annotations")
    problems = id_problems + category_problems + annotation_problems
    problems += _check_category_names(data["categories"])
    problems += _check_images(data["images"])
    problems += _check_annotations(data, image_index, set(category_index))
    return problems


def errors_only(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that make a file unusable."""
    return [p for p in problems if p.severity == "error"]


def load_cct(path: str | Path, data: Any | None = None) -> CCT:
    """Read and validate a CCT file; the first error becomes a one-line ``DataError``.

    Pass ``data`` when the JSON is already parsed (``path`` then only names it in errors).
    Warnings (missing sizes, missing locations) are logged once as a count, not raised.
    """
    data = read_json(path) if data is None else data
    problems = validate_cct(data)
    errors = errors_only(problems)
    if errors:
        more = f" (and {len(errors) - 1} more; list them all with utils/validate_cct.py)" if len(errors) > 1 else ""
        raise DataError(f"{path}: {errors[0]}{more}")
    warnings = Counter((p.path.split("]", 1)[-1].lstrip("."), p.message) for p in problems if p.severity == "warning")
    for (field_name, message), count in warnings.items():
        log.info("%s: %d images: %s %s", path, count, field_name, message)
    return data


def read_image_size(path: Path) -> tuple[int, int]:
    """Width and height as displayed (EXIF orientation applied), read from the header only."""
    with open_image(path) as image:  # not a FIFO (open would block), not a header declaring gigapixels
        return displayed_size(image)


def fill_image_sizes(data: CCT, images_dir: Path) -> int:
    """Fill missing ``width``/``height`` from the image files; returns how many were filled.

    An image that cannot be opened raises a ``DataError`` naming it.
    """
    filled = 0
    for i, image in enumerate(data["images"]):
        if image.get("width") is not None and image.get("height") is not None:
            continue
        path = images_dir / image["file_name"]
        try:
            image["width"], image["height"] = read_image_size(path)
        except DECODE_ERRORS as error:
            raise DataError(f"{path}: cannot read the size of images[{i}] ({decode_failure(error)})") from None
        filled += 1
    return filled


def missing_location_group(image: dict[str, Any], rule: MissingLocationRule) -> str:
    """The pseudo-location of an image without one: its sequence (or itself when it has none)."""
    if rule == "sequence" and image.get("seq_id") not in (None, ""):
        return f"{MISSING_LOCATION_PREFIX}seq_{image['seq_id']}"
    return f"{MISSING_LOCATION_PREFIX}img_{image['id']}"


def resolve_missing_locations(data: CCT, rule: MissingLocationRule = "sequence") -> tuple[CCT, MissingLocationReport]:
    """Normalise every location and handle the missing ones by an explicit rule.

    ``sequence`` (default): each sequence without a location becomes its own group
    ``nolocation_seq_<seq_id>``, so its frames stay together in one split.
    ``image``: each image becomes its own group. ``drop``: such images and their
    annotations are removed. The report says how many; nothing is dropped silently.
    """
    report = MissingLocationReport(rule=rule)
    kept_images = []
    dropped_ids: set[Any] = set()
    groups: set[str] = set()
    for image in data["images"]:
        location = normalize_location(image.get("location"))
        if location is None:
            report.images_without_location += 1
            if len(report.example_image_ids) < 5:
                report.example_image_ids.append(str(image["id"]))
            if rule == "drop":
                dropped_ids.add(image["id"])
                continue
            location = missing_location_group(image, rule)
            groups.add(location)
        kept_images.append({**image, "location": location})
    annotations = [a for a in data["annotations"] if a["image_id"] not in dropped_ids]
    report.groups_created = len(groups)
    report.images_dropped = len(dropped_ids)
    report.annotations_dropped = len(data["annotations"]) - len(annotations)
    return {**data, "images": kept_images, "annotations": annotations}, report


def category_names(data: CCT) -> dict[Any, str]:
    """Category id to name."""
    return {c["id"]: c["name"] for c in data["categories"]}
