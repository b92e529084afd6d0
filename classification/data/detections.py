"""Read the boxes to crop: a CCT file with boxes, MegaDetector output, or both joined.

Three inputs, told apart by their JSON:

- a **CCT file** with boxes (absolute pixels): one crop per boxed annotation, labelled
  with its category name; annotations without a box are counted and skipped;
- **MegaDetector batch output** (``images[].file``, ``detections[]`` with a string
  ``category``, ``conf`` and a normalised ``[x, y, w, h]``): one crop per detection of
  a wanted category (default ``animal``) with ``conf >= threshold``, unlabelled;
- both: MegaDetector output plus ``labels_cct``, a CCT with image-level labels. Each
  detection takes the label, location, dataset, sequence and time of its CCT image.

Every crop gets a stable annotation id: the CCT annotation id, or ``det<NN>`` for a
MegaDetector detection, ``NN`` being its position in the image's ``detections`` list
(so an id does not change when the threshold does, and matches MegaDetector's own
``___cropNN_`` numbering). Images that cannot be used are reported, never dropped
silently.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from classification.data.cct import (
    CCT,
    MissingLocationReport,
    MissingLocationRule,
    Problem,
    box_outside_image,
    category_names,
    errors_only,
    file_key,
    is_number,
    load_cct,
    resolve_missing_locations,
    shown,
)
from classification.errors import DataError, UserError
from classification.io import read_json

log = logging.getLogger(__name__)

InputFormat = Literal["cct", "megadetector", "megadetector+cct"]
Box = tuple[float, float, float, float]


def as_box(values: Any) -> Box:
    """An ``[x, y, w, h]`` list (already checked to hold four numbers) as a tuple of four floats."""
    x, y, w, h = (float(v) for v in values)
    return x, y, w, h

DEFAULT_THRESHOLD = 0.2
DEFAULT_DETECTOR_CATEGORIES = ("animal",)


@dataclass(frozen=True)
class CropRequest:
    """One box to crop from an image, with the annotation id that names its crop."""

    annotation_id: str
    bbox: Box
    label: str
    confidence: float | None = None


@dataclass
class ImageRequest:
    """One source image and every box to crop from it, with the metadata its crops inherit.

    ``file_name`` is relative to the images folder. ``normalized`` says whether the boxes
    are fractions of the image (MegaDetector) or absolute pixels (CCT). ``width`` and
    ``height`` are the CCT's displayed size when known.
    """

    image_id: str
    file_name: str
    dataset: str
    location: str
    seq_id: str
    datetime: str
    normalized: bool
    crops: list[CropRequest]
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class SkippedImage:
    """An input image none of whose boxes are cropped, and why."""

    file: str
    kind: str
    reason: str


@dataclass
class InputReport:
    """What reading the input kept and left out."""

    input_format: InputFormat
    images: int = 0
    boxes: int = 0
    annotations_without_box: int = 0
    detections_below_threshold: int = 0
    detections_other_category: int = 0
    detections_in_skipped_images: int = 0
    skipped_images: list[SkippedImage] = field(default_factory=list)
    missing_locations: MissingLocationReport | None = None

    def skipped_counts(self) -> dict[str, int]:
        """Number of skipped images by kind."""
        return dict(Counter(s.kind for s in self.skipped_images))

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"input: {self.input_format}: {self.boxes} boxes to crop in {self.images} images"]
        if self.annotations_without_box:
            out.append(f"  {self.annotations_without_box} annotations without a box: skipped")
        if self.detections_below_threshold or self.input_format != "cct":
            out.append(f"  {self.detections_below_threshold} detections below the threshold: skipped")
        if self.detections_other_category:
            out.append(f"  {self.detections_other_category} detections of other categories: skipped")
        for kind, count in sorted(self.skipped_counts().items()):
            example = next(s for s in self.skipped_images if s.kind == kind)
            out.append(f"  {count} images skipped: {kind} (e.g. {example.file}: {example.reason})")
        if self.detections_in_skipped_images:
            out.append(f"  {self.detections_in_skipped_images} wanted detections in skipped images")
        if self.missing_locations is not None:
            out.append(f"  locations: {self.missing_locations.summary()}")
        return out


def detect_format(data: Any, path: Path) -> Literal["cct", "megadetector"]:
    """``megadetector`` or ``cct`` from the JSON's keys; anything else is a one-line ``DataError``."""
    if isinstance(data, dict) and "detection_categories" in data:
        return "megadetector"
    if isinstance(data, dict) and ("annotations" in data or "categories" in data):
        return "cct"
    if isinstance(data, dict):
        found = f"an object with keys {', '.join(sorted(map(str, data))[:6]) or 'none'}"
    else:
        found = f"a JSON {type(data).__name__}"
    raise DataError(
        f"{path}: neither a COCO Camera Traps file (images, annotations, categories) nor MegaDetector"
        f" batch output (images, detection_categories); found {found}"
    )


def is_safe_relative(file_name: str) -> bool:
    """True for a relative path that stays inside its folder (no ``..``, not absolute)."""
    path = PurePosixPath(file_name)
    if not file_name.strip() or path.is_absolute() or ".." in path.parts:
        return False
    return not (len(path.parts[0]) == 2 and path.parts[0][1] == ":")  # a Windows drive


def _check_detection(detection: Any, categories: dict[str, str], path: str) -> list[Problem]:
    """Problems with one MegaDetector detection."""
    if not isinstance(detection, dict):
        return [Problem(path, f"expected an object, got {type(detection).__name__}")]
    problems = []
    if str(detection.get("category")) not in categories:
        problems.append(Problem(f"{path}.category", f"{shown(detection.get('category'))} is not in detection_categories"))
    if not is_number(detection.get("conf")):
        problems.append(Problem(f"{path}.conf", f"expected a number, got {shown(detection.get('conf'))}"))
    elif not 0 <= detection["conf"] <= 1:  # a percentage or a logit: every threshold would keep or drop it all
        problems.append(Problem(f"{path}.conf", f"expected a confidence from 0 to 1, got {shown(detection['conf'])}"))
    bbox = detection.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        problems.append(Problem(f"{path}.bbox", f"expected [x, y, width, height] with 4 numbers, got {shown(bbox)}"))
    elif bbox[2] <= 0 or bbox[3] <= 0:
        problems.append(Problem(f"{path}.bbox", f"box is empty or negative (width {bbox[2]:g}, height {bbox[3]:g})"))
    elif outside := box_outside_image(as_box(bbox), 1.0, 1.0, normalized=True):
        problems.append(Problem(f"{path}.bbox", outside))
    return problems


def validate_megadetector(data: dict[str, Any]) -> list[Problem]:
    """Every structural problem in parsed MegaDetector batch output."""
    categories = data.get("detection_categories")
    if not isinstance(categories, dict) or not all(isinstance(v, str) for v in categories.values()):
        return [Problem("detection_categories", "expected an object mapping ids to names")]
    if not isinstance(data.get("images"), list):
        return [Problem("images", "missing or not a list")]
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, image in enumerate(data["images"]):
        path = f"images[{i}]"
        if not isinstance(image, dict):
            problems.append(Problem(path, f"expected an object, got {type(image).__name__}"))
            continue
        file = image.get("file")
        if not isinstance(file, str) or not is_safe_relative(file.replace("\\", "/")):
            problems.append(Problem(f"{path}.file", f"expected a relative path inside the images folder, got {shown(file)}"))
        elif file_key(file) in seen:
            problems.append(Problem(f"{path}.file", f"duplicate file {shown(file)} (also images[{seen[file_key(file)]}])"))
        else:
            seen[file_key(file)] = i
        if image.get("failure") is not None:
            continue
        detections = image.get("detections")
        if not isinstance(detections, list):
            problems.append(Problem(f"{path}.detections", "missing or not a list (and no failure given)"))
            continue
        for j, detection in enumerate(detections):
            problems += [Problem(p.path, f"{p.message} (image {shown(file)})", p.severity)
                         for p in _check_detection(detection, categories, f"{path}.detections[{j}]")]
    return problems


def load_megadetector(path: Path, data: Any | None = None) -> dict[str, Any]:
    """Read and validate MegaDetector output; the first error is a one-line ``DataError``."""
    data = read_json(path) if data is None else data
    errors = errors_only(validate_megadetector(data))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(f"{path}: {errors[0]}{more}")
    return data


def _text(value: Any) -> str:
    """A metadata value as a string; missing becomes empty."""
    return "" if value is None else str(value)


def image_request(image: dict[str, Any], file_name: str, default_dataset: str, normalized: bool) -> ImageRequest:
    """An empty request carrying a CCT image's metadata (its location already resolved)."""
    return ImageRequest(
        image_id=str(image["id"]),
        file_name=file_name,
        dataset=_text(image.get("dataset")) or default_dataset,
        location=image["location"],
        seq_id=_text(image.get("seq_id")),
        datetime=_text(image.get("datetime")),
        normalized=normalized,
        crops=[],
        width=image.get("width"),
        height=image.get("height"),
    )


def cct_box_requests(data: CCT, default_dataset: str, rule: MissingLocationRule) -> tuple[list[ImageRequest], InputReport]:
    """One request per image with boxed annotations, labelled with the category name."""
    data, location_report = resolve_missing_locations(data, rule)
    report = InputReport(input_format="cct", missing_locations=location_report)
    names = category_names(data)
    boxes: dict[Any, list[CropRequest]] = defaultdict(list)
    for annotation in data["annotations"]:
        if annotation.get("bbox") is None:
            report.annotations_without_box += 1
            continue
        bbox = as_box(annotation["bbox"])
        boxes[annotation["image_id"]].append(CropRequest(str(annotation["id"]), bbox, names[annotation["category_id"]]))
    requests = []
    for image in data["images"]:
        if image["id"] in boxes:
            request = image_request(image, image["file_name"], default_dataset, normalized=False)
            request.crops = boxes[image["id"]]
            requests.append(request)
    return requests, report


def detection_id(index: int) -> str:
    """The annotation id of the ``index``-th detection of an image (``det00``, ``det01``, ...)."""
    return f"det{index:02d}"


def wanted_detections(
    image: dict[str, Any], names: dict[str, str], threshold: float, wanted: set[str], report: InputReport
) -> list[CropRequest]:
    """The detections of one MegaDetector image to crop; counts the ones left out."""
    crops = []
    for index, detection in enumerate(image["detections"]):
        if names[str(detection["category"])] not in wanted:
            report.detections_other_category += 1
        elif detection["conf"] < threshold:
            report.detections_below_threshold += 1
        else:
            crops.append(CropRequest(detection_id(index), as_box(detection["bbox"]), "", float(detection["conf"])))
    return crops


def _posix(file_name: str) -> str:
    """A file name with ``/`` separators (MegaDetector output written on Windows uses ``\\``)."""
    return file_name.replace("\\", "/")


def _suffixes(file_name: str) -> list[str]:
    """Every proper path suffix: ``a/b/c.jpg`` gives ``b/c.jpg`` and ``c.jpg``."""
    parts = file_name.split("/")
    return ["/".join(parts[i:]) for i in range(1, len(parts))]


class FileMatcher:
    """Matches a MegaDetector ``file`` to a CCT ``file_name``: exactly, else by a unique path suffix."""

    def __init__(self, file_names: list[str]) -> None:
        self.exact = {_posix(name): name for name in file_names}
        self.by_suffix: dict[str, list[str]] = defaultdict(list)
        for name in file_names:
            for suffix in _suffixes(_posix(name)):
                self.by_suffix[suffix].append(name)

    def match(self, file: str) -> tuple[str | None, str]:
        """The matching CCT file_name, or ``None`` and the reason."""
        file = _posix(file)
        if file in self.exact:
            return self.exact[file], ""
        candidates = set(self.by_suffix.get(file, []))
        candidates.update(self.exact[s] for s in _suffixes(file) if s in self.exact)
        if len(candidates) == 1:
            return candidates.pop(), ""
        if not candidates:
            return None, "no CCT image with this file_name or path suffix"
        return None, f"matches {len(candidates)} CCT images by path suffix (e.g. {sorted(candidates)[:2]})"


def image_labels(data: CCT) -> dict[Any, set[str]]:
    """Image id to the distinct category names of its annotations (with or without a box)."""
    names = category_names(data)
    labels: dict[Any, set[str]] = defaultdict(set)
    for annotation in data["annotations"]:
        labels[annotation["image_id"]].add(names[annotation["category_id"]])
    return labels


def match_labelled_image(file: str, matcher: FileMatcher, by_file: dict[str, dict[str, Any]],
                         labels: dict[Any, set[str]] | None) -> tuple[dict[str, Any] | None, str, str, str]:
    """The CCT image a MegaDetector file is cropped as, and its label; or None, why it is skipped and the detail."""
    cct_file, reason = matcher.match(file)
    if cct_file is None:
        return None, "", "not in the labels CCT", reason
    image = by_file.get(cct_file)
    if image is None:
        return None, "", "no location (dropped by --missing-locations drop)", f"CCT image {shown(cct_file)}"
    if labels is None:
        return image, "", "", ""
    found = sorted(labels.get(image["id"], set()))
    if len(found) != 1:
        return None, "", "no label" if not found else "ambiguous label", f"CCT image {shown(image['id'])} has labels {shown(found)}"
    return image, found[0], "", ""


def megadetector_requests(
    md: dict[str, Any],
    labels_cct: CCT | None,
    default_dataset: str,
    threshold: float,
    categories: tuple[str, ...],
    rule: MissingLocationRule,
) -> tuple[list[ImageRequest], InputReport]:
    """Requests for MegaDetector detections, labelled from ``labels_cct`` when given.

    Without labels each MegaDetector image is its own CCT-like image without a location,
    handled by ``rule``. With labels, an image is cropped only when it matches one CCT
    image that has exactly one distinct label; unmatched, unlabelled and ambiguous
    images are skipped and reported.
    """
    names = {str(k): v for k, v in md["detection_categories"].items()}
    unknown = sorted(set(categories) - set(names.values()))
    if unknown:
        raise UserError(f"detector categories {unknown} not in the file's detection_categories {sorted(names.values())}")
    if labels_cct is None:
        pseudo = {"images": [{"id": im["file"], "file_name": im["file"], "location": None} for im in md["images"]], "annotations": []}
        labels_cct, labels = pseudo, None
    else:
        labels = image_labels(labels_cct)
    original_files = {image["file_name"] for image in labels_cct["images"]}
    resolved, location_report = resolve_missing_locations(labels_cct, rule)
    by_file = {image["file_name"]: image for image in resolved["images"]}
    matcher = FileMatcher(sorted(original_files))
    report = InputReport(input_format="megadetector" if labels is None else "megadetector+cct", missing_locations=location_report)
    requests = []
    for md_image in md["images"]:
        file = md_image["file"]
        if md_image.get("failure") is not None:
            report.skipped_images.append(SkippedImage(file, "detector failure", str(md_image["failure"])))
            continue
        crops = wanted_detections(md_image, names, threshold, set(categories), report)
        if not crops:
            continue
        image, label, kind, reason = match_labelled_image(file, matcher, by_file, labels)
        if image is None:
            report.skipped_images.append(SkippedImage(file, kind, reason))
            report.detections_in_skipped_images += len(crops)
            continue
        request = image_request(image, _posix(file), default_dataset, normalized=True)
        request.crops = [CropRequest(c.annotation_id, c.bbox, label, c.confidence) for c in crops]
        requests.append(request)
    return requests, report


def read_crop_requests(
    input_json: Path,
    *,
    labels_cct: Path | None = None,
    dataset: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    detector_categories: tuple[str, ...] = DEFAULT_DETECTOR_CATEGORIES,
    missing_locations: MissingLocationRule = "sequence",
) -> tuple[list[ImageRequest], InputReport]:
    """Detect the input's format and return every image to crop and a report of what was left out.

    ``dataset`` names images without a ``dataset`` field (default: the input file's stem).
    """
    input_json = Path(input_json)
    data = read_json(input_json)
    default_dataset = dataset or input_json.stem
    if detect_format(data, input_json) == "cct":
        if labels_cct is not None:
            raise UserError(f"--labels-cct joins labels to MegaDetector output, but {input_json} is a CCT file")
        requests, report = cct_box_requests(load_cct(input_json, data), default_dataset, missing_locations)
    else:
        md = load_megadetector(input_json, data)
        labels = load_cct(labels_cct) if labels_cct is not None else None
        requests, report = megadetector_requests(md, labels, default_dataset, threshold, detector_categories, missing_locations)
    report.images = len(requests)
    report.boxes = sum(len(r.crops) for r in requests)
    return requests, report
