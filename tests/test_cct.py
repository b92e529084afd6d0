"""CCT validation, location normalisation and the missing-location rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classification.data.cct import (
    errors_only,
    fill_image_sizes,
    load_cct,
    normalize_location,
    resolve_missing_locations,
    validate_cct,
)
from classification.errors import DataError
from tests.helpers.processes import run_entry_point


def small_cct() -> dict:
    return {
        "images": [
            {"id": "a", "file_name": "a.jpg", "width": 100, "height": 80, "location": " Site 01 ", "seq_id": "s1"},
            {"id": "b", "file_name": "b.jpg", "width": 100, "height": 80, "location": None, "seq_id": "s2"},
            {"id": "c", "file_name": "c.jpg", "width": 100, "height": 80, "seq_id": "s2"},
            {"id": "d", "file_name": "d.jpg", "width": 100, "height": 80, "location": 7},
        ],
        "annotations": [
            {"id": 1, "image_id": "a", "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": "b", "category_id": 1, "bbox": [0, 0, 100, 80]},
            {"id": 3, "image_id": "c", "category_id": 2},
        ],
        "categories": [{"id": 1, "name": "deer"}, {"id": 2, "name": "fox"}],
    }


def test_valid_file_has_no_errors() -> None:
    problems = validate_cct(small_cct())
    assert errors_only(problems) == []
    assert {p.path for p in problems} == {"images[1].location", "images[2].location"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["annotations"][0].update(bbox=[10, 10, -5, 20]), "annotations[0].bbox: width is negative"),
        (lambda d: d["annotations"][0].update(bbox=[90, 10, 50, 20]), "annotations[0].bbox: box [90, 10, 50, 20] lies outside"),
        (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 20]), "annotations[0].bbox: box is empty"),
        (lambda d: d["annotations"][0].update(bbox=[10, 10, 20]), "annotations[0].bbox: expected [x, y, width, height]"),
        (lambda d: d["annotations"][1].update(image_id="zz"), "annotations[1].image_id: no image with id 'zz'"),
        (lambda d: d["annotations"][1].update(category_id=9), "annotations[1].category_id: no category with id 9"),
        (lambda d: d["images"][1].update(id="a"), "images[1].id: duplicate id 'a' (also images[0])"),
        (lambda d: d["images"][0].pop("file_name"), "images[0].file_name: missing"),
        (lambda d: d["images"][0].update(file_name="../x.jpg"), "images[0].file_name: must be a relative path"),
        (lambda d: d["images"][0].update(width=-3), "images[0].width: must be a positive number"),
        (lambda d: d.pop("categories"), "categories: missing"),
    ],
)
def test_each_problem_is_named_by_its_json_path(change, expected: str) -> None:
    data = small_cct()
    change(data)
    messages = [str(p) for p in errors_only(validate_cct(data))]
    assert any(m.startswith(expected) for m in messages), messages


def test_small_overshoot_is_tolerated_but_far_outside_is_not() -> None:
    data = small_cct()
    data["annotations"][0]["bbox"] = [80, 60, 21, 21]  # 1 px past the right and bottom edges
    assert errors_only(validate_cct(data)) == []


def test_load_cct_raises_one_line_naming_file_and_field(tmp_path: Path) -> None:
    data = small_cct()
    data["annotations"][0]["bbox"] = [10, 10, -5, 20]
    data["annotations"][1]["image_id"] = "nope"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as error:
        load_cct(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: annotations[0].bbox: width is negative")
    assert "and 1 more" in message


def test_malformed_json_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"images": [1, 2,')
    with pytest.raises(DataError, match=r"broken.json: not valid JSON: .* line 1"):
        load_cct(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(" Site 01 ", "site_01"), ("GIG-05-01", "gig-05-01"), (7, "7"), (7.0, "7"), ("007", "007"),
     (None, None), ("", None), ("  ", None), (float("nan"), None), ("NaN", None), ("a  b\tc", "a_b_c")],
)
def test_normalize_location(raw, expected) -> None:
    assert normalize_location(raw) == expected


def test_missing_locations_grouped_by_sequence() -> None:
    data, report = resolve_missing_locations(small_cct(), "sequence")
    locations = {image["id"]: image["location"] for image in data["images"]}
    assert locations == {"a": "site_01", "b": "nolocation_seq_s2", "c": "nolocation_seq_s2", "d": "7"}
    assert report.images_without_location == 2 and report.groups_created == 1
    assert len(data["annotations"]) == 3


def test_missing_locations_dropped_are_counted() -> None:
    data, report = resolve_missing_locations(small_cct(), "drop")
    assert [image["id"] for image in data["images"]] == ["a", "d"]
    assert report.images_dropped == 2 and report.annotations_dropped == 2
    assert "dropped 2 images and 2 annotations" in report.summary()


def test_missing_locations_per_image() -> None:
    data, report = resolve_missing_locations(small_cct(), "image")
    assert report.groups_created == 2
    assert data["images"][1]["location"] == "nolocation_img_b"


def test_fill_image_sizes_reads_exif_orientation(shared_data: Path) -> None:
    folder = shared_data / "speciesnet_test_data"
    data = {"images": [{"id": 1, "file_name": "african_elephants_with_exif_orientation.jpg"},
                       {"id": 2, "file_name": "african_elephants.jpg"}], "annotations": [], "categories": []}
    assert fill_image_sizes(data, folder) == 2
    rotated, original = data["images"]
    assert (rotated["width"], rotated["height"]) == (original["width"], original["height"])


def test_fill_image_sizes_names_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    data = {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [], "categories": []}
    with pytest.raises(DataError, match=r"x.jpg: cannot read the size of images\[0\]"):
        fill_image_sizes(data, tmp_path)


def test_real_mct_file_loads_and_keeps_every_image(shared_data: Path) -> None:
    data = load_cct(shared_data / "mct" / "mct_cct.json")
    resolved, report = resolve_missing_locations(data, "sequence")
    assert report.images_without_location == 150
    assert len(resolved["images"]) == len(data["images"]) == 1275
    assert all(isinstance(image["location"], str) and image["location"] for image in resolved["images"])
    # frames of one sequence share one pseudo-location
    by_seq: dict[str, set[str]] = {}
    for image in resolved["images"]:
        by_seq.setdefault(image["seq_id"], set()).add(image["location"])
    assert all(len(locations) == 1 for locations in by_seq.values())


def test_validate_entry_point(tmp_path: Path) -> None:
    data = small_cct()
    data["annotations"][0]["bbox"] = [200, 10, 20, 20]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    result = run_entry_point("utils/validate_cct.py", path)
    assert result.returncode == 2
    assert "annotations[0].bbox: box [200, 10, 20, 20] lies outside the 100x80 image" in result.stdout
    assert "Traceback" not in result.stderr
