"""Clean and combine CCT files: category maps, box filters, merging datasets.

This is animl-ml's clean-and-combine workflow as functions: write a
``category_map.json`` (``id, name, count, keep, convert_to``) for a person to edit,
apply it, drop annotations without a box or with a box that covers (almost) the
whole image, and combine several CCT files into one with namespaced ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classification.data.cct import (
    CCT,
    MissingLocationRule,
    fill_image_sizes,
    is_number,
    load_cct,
    resolve_missing_locations,
)
from classification.errors import DataError, UserError
from classification.io import read_json, shown_value, write_json_atomic

log = logging.getLogger(__name__)

CATEGORY_MAP_FIELDS = ("id", "name", "count", "keep", "convert_to")


@dataclass
class CleanReport:
    """Counts of what cleaning removed or changed, for the log."""

    annotations_in: int = 0
    dropped_by_category: Counter[str] = field(default_factory=Counter)
    converted: Counter[str] = field(default_factory=Counter)
    dropped_without_box: int = 0
    dropped_whole_image_box: int = 0
    unchecked_box_size: int = 0
    annotations_out: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"annotations: {self.annotations_in} in, {self.annotations_out} out"]
        for name, count in sorted(self.dropped_by_category.items()):
            out.append(f"  dropped {count} of category {shown_value(repr(name))} (keep: false)")
        for change, count in sorted(self.converted.items()):
            out.append(f"  converted {count}: {change}")
        if self.dropped_without_box:
            out.append(f"  dropped {self.dropped_without_box} without a box (keep them with --keep-image-level)")
        if self.dropped_whole_image_box:
            out.append(f"  dropped {self.dropped_whole_image_box} boxes covering nearly the whole image")
        if self.unchecked_box_size:
            out.append(f"  {self.unchecked_box_size} boxes not size-checked: image width/height unknown")
        return out


def build_category_map(datasets: list[CCT]) -> list[dict[str, Any]]:
    """One editable row per category name across ``datasets``: ``keep: true``, no conversion.

    Categories are keyed by name, so the same species in two files is one row; ``id`` is
    the row's position (1-based) and ``count`` the number of annotations.
    """
    counts: Counter[str] = Counter()
    for data in datasets:
        names = {c["id"]: c["name"] for c in data["categories"]}
        counts.update({name: 0 for name in names.values()})
        counts.update(names[a["category_id"]] for a in data["annotations"])
    return [
        {"id": i, "name": name, "count": counts[name], "keep": True, "convert_to": None}
        for i, name in enumerate(sorted(counts), start=1)
    ]


def write_category_map(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write the category map for a person to edit (atomic)."""
    write_json_atomic(path, rows, indent=2)


def read_category_map(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check an edited category map; returns rows keyed by name."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of rows with {', '.join(CATEGORY_MAP_FIELDS)}")
    by_name: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise DataError(f"{path}: [{i}].name: missing or not a string")
        if not isinstance(row.get("keep", True), bool):
            raise DataError(f"{path}: [{i}].keep: must be true or false, got {shown_value(repr(row.get('keep')))}")
        convert_to = row.get("convert_to")
        if convert_to is not None and (not isinstance(convert_to, str) or not convert_to.strip()):
            raise DataError(f"{path}: [{i}].convert_to: must be a category name or null, got {shown_value(repr(convert_to))}")
        if row["name"] in by_name:
            raise DataError(f"{path}: [{i}].name: {shown_value(repr(row['name']))} appears twice")
        by_name[row["name"]] = row
    return by_name


def _final_name(row: dict[str, Any]) -> str:
    return (row.get("convert_to") or row["name"]).strip()


def apply_category_map(data: CCT, category_map: dict[str, dict[str, Any]], source: str, report: CleanReport) -> CCT:
    """Drop ``keep: false`` categories and rename ``convert_to`` ones; ids follow the final names.

    A category of ``data`` missing from the map is an error (the map is stale), so no
    category is kept or dropped by accident.
    """
    names = {c["id"]: c["name"] for c in data["categories"]}
    missing = sorted(set(names.values()) - set(category_map))
    if missing:
        raise DataError(f"{source}: categories not in the category map: {shown_value(', '.join(missing[:5]), 300)} (rebuild the map)")
    final_names = sorted({_final_name(category_map[n]) for n in names.values() if category_map[n].get("keep", True)})
    new_ids = {name: i for i, name in enumerate(final_names, start=1)}
    annotations = []
    for annotation in data["annotations"]:
        row = category_map[names[annotation["category_id"]]]
        if not row.get("keep", True):
            report.dropped_by_category[row["name"]] += 1
            continue
        if _final_name(row) != row["name"]:
            report.converted[f"{row['name']} -> {_final_name(row)}"] += 1
        annotations.append({**annotation, "category_id": new_ids[_final_name(row)]})
    categories = [{"id": i, "name": name} for name, i in new_ids.items()]
    return {**data, "annotations": annotations, "categories": categories}


def is_whole_image_box(bbox: list[float], width: float, height: float, max_fraction: float) -> bool:
    """True when the box covers at least ``max_fraction`` of both the width and the height."""
    return bbox[2] >= max_fraction * width and bbox[3] >= max_fraction * height


def filter_annotations(
    data: CCT, report: CleanReport, keep_image_level: bool = False, max_box_fraction: float | None = 0.95
) -> CCT:
    """Drop annotations without a box (unless kept) and boxes covering nearly the whole image."""
    sizes = {image["id"]: (image.get("width"), image.get("height")) for image in data["images"]}
    kept = []
    for annotation in data["annotations"]:
        bbox = annotation.get("bbox")
        if bbox is None:
            if keep_image_level:
                kept.append(annotation)
            else:
                report.dropped_without_box += 1
            continue
        width, height = sizes[annotation["image_id"]]
        if max_box_fraction is not None:
            if not (is_number(width) and is_number(height)):
                report.unchecked_box_size += 1
            elif is_whole_image_box(bbox, width, height, max_box_fraction):
                report.dropped_whole_image_box += 1
                continue
        kept.append(annotation)
    return {**data, "annotations": kept}


def _namespaced(name: str, value: Any) -> str:
    return f"{name}/{value}"


def combine_datasets(named: list[tuple[str, CCT]], prefix_file_names: bool = False) -> CCT:
    """Merge CCT files into one: ids become ``<dataset>/<id>``, categories merge by name.

    Each image records its ``dataset`` (kept when the image already has one). With
    ``prefix_file_names`` file names become ``<dataset>/<file_name>`` (one images root
    with a folder per dataset); otherwise two datasets with the same file name are an
    error, since their crops would overwrite each other.
    """
    dataset_names = [name for name, _ in named]
    duplicates = sorted(n for n, c in Counter(dataset_names).items() if c > 1)
    if duplicates:
        raise DataError(f"dataset names must be unique, repeated: {', '.join(duplicates)}")
    all_names = sorted({c["name"] for _, data in named for c in data["categories"]})
    category_ids = {name: i for i, name in enumerate(all_names, start=1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    seen_files: dict[str, str] = {}
    for name, data in named:
        names = {c["id"]: c["name"] for c in data["categories"]}
        for image in data["images"]:
            file_name = f"{name}/{image['file_name']}" if prefix_file_names else image["file_name"]
            if file_name in seen_files:
                raise DataError(
                    f"{name}: file_name {shown_value(repr(file_name))} also in dataset {shown_value(repr(seen_files[file_name]))}; "
                    "use --prefix-file-names"
                )
            seen_files[file_name] = name
            seq_id = image.get("seq_id")
            images.append(
                {
                    **image,
                    "id": _namespaced(name, image["id"]),
                    "file_name": file_name,
                    "dataset": image.get("dataset") or name,
                    **({"seq_id": _namespaced(name, seq_id)} if seq_id not in (None, "") else {}),
                }
            )
        for annotation in data["annotations"]:
            annotations.append(
                {
                    **annotation,
                    "id": _namespaced(name, annotation["id"]),
                    "image_id": _namespaced(name, annotation["image_id"]),
                    "category_id": category_ids[names[annotation["category_id"]]],
                }
            )
    return {
        "info": {"description": f"combined from {', '.join(dataset_names)}", "datasets": dataset_names},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in category_ids.items()],
    }


@dataclass(frozen=True)
class CleanOptions:
    """How ``clean_cct`` treats one file; defaults follow animl-ml's cleaning notebook."""

    category_map: Path | None = None
    keep_image_level: bool = False
    max_box_fraction: float | None = 0.95
    missing_locations: MissingLocationRule = "sequence"
    dataset: str | None = None
    images_dir: Path | None = None
    read_sizes: bool = False


def clean_cct(input_path: Path, output_path: Path, options: CleanOptions) -> CleanReport:
    """Validate, normalise locations, apply the category map and filters; write the clean CCT."""
    fraction = options.max_box_fraction
    if fraction is not None and not 0 < fraction:  # NaN too: it would silently keep every box
        raise UserError(f"--max-box-fraction must be a positive fraction (1.01 keeps every box), got {fraction}")
    data = load_cct(input_path)
    report = CleanReport(annotations_in=len(data["annotations"]))
    if options.read_sizes:
        if options.images_dir is None:
            raise DataError("--read-sizes needs --images-dir")
        log.info("read the size of %d images", fill_image_sizes(data, options.images_dir))
    data, location_report = resolve_missing_locations(data, options.missing_locations)
    log.info("%s: %s", input_path, location_report.summary())
    dataset = options.dataset or input_path.stem
    data["images"] = [{**image, "dataset": image.get("dataset") or dataset} for image in data["images"]]
    if options.category_map is not None:
        data = apply_category_map(data, read_category_map(options.category_map), str(input_path), report)
    data = filter_annotations(data, report, options.keep_image_level, options.max_box_fraction)
    report.annotations_out = len(data["annotations"])
    write_json_atomic(output_path, data)
    return report
