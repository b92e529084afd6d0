"""Category maps, box filters and combining CCT files, through the library and the entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classification.data.clean import (
    CleanReport,
    apply_category_map,
    build_category_map,
    combine_datasets,
    filter_annotations,
)
from classification.errors import DataError
from tests.helpers.processes import run_entry_point


def cct(names: list[str], boxes: list[list[float] | None], image_ids: list[str] | None = None) -> dict:
    image_ids = image_ids or [f"i{k}" for k in range(len(boxes))]
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100, "location": "l1"} for i in image_ids],
        "annotations": [
            {"id": k, "image_id": image_ids[k], "category_id": 1 + k % len(names), **({"bbox": b} if b else {})}
            for k, b in enumerate(boxes)
        ],
        "categories": [{"id": i, "name": n} for i, n in enumerate(names, start=1)],
    }


def test_category_map_counts_and_defaults() -> None:
    rows = build_category_map([cct(["deer", "fox"], [[1, 1, 5, 5]] * 3), cct(["fox", "owl"], [[1, 1, 5, 5]])])
    assert [(r["name"], r["count"], r["keep"], r["convert_to"]) for r in rows] == [
        ("deer", 2, True, None), ("fox", 2, True, None), ("owl", 0, True, None)]


def test_apply_category_map_drops_and_converts() -> None:
    data = cct(["mule deer", "white-tailed deer", "human"], [[1, 1, 5, 5]] * 6)
    category_map = {
        "mule deer": {"name": "mule deer", "keep": True, "convert_to": "deer"},
        "white-tailed deer": {"name": "white-tailed deer", "keep": True, "convert_to": "deer"},
        "human": {"name": "human", "keep": False, "convert_to": None},
    }
    report = CleanReport()
    out = apply_category_map(data, category_map, "test.json", report)
    assert out["categories"] == [{"id": 1, "name": "deer"}]
    assert len(out["annotations"]) == 4 and {a["category_id"] for a in out["annotations"]} == {1}
    assert report.dropped_by_category == {"human": 2}
    assert report.converted == {"mule deer -> deer": 2, "white-tailed deer -> deer": 2}


def test_stale_category_map_is_an_error() -> None:
    with pytest.raises(DataError, match="not in the category map: fox"):
        apply_category_map(cct(["deer", "fox"], [[1, 1, 5, 5]]), {"deer": {"name": "deer"}}, "x.json", CleanReport())


def test_filters_drop_unboxed_and_whole_image_boxes() -> None:
    data = cct(["deer"], [[1, 1, 5, 5], None, [0, 0, 99, 96], [0, 0, 99, 50]])
    report = CleanReport()
    out = filter_annotations(data, report)
    assert [a["id"] for a in out["annotations"]] == [0, 3]
    assert report.dropped_without_box == 1 and report.dropped_whole_image_box == 1
    kept = filter_annotations(data, CleanReport(), keep_image_level=True, max_box_fraction=None)
    assert len(kept["annotations"]) == 4


def test_combine_namespaces_ids_and_merges_categories() -> None:
    a = cct(["deer", "fox"], [[1, 1, 5, 5]] * 2, ["x", "y"])
    b = cct(["fox", "owl"], [[1, 1, 5, 5]] * 2, ["x", "y"])
    with pytest.raises(DataError, match="also in dataset 'a'; use --prefix-file-names"):
        combine_datasets([("a", a), ("b", b)])
    out = combine_datasets([("a", a), ("b", b)], prefix_file_names=True)
    assert [c["name"] for c in out["categories"]] == ["deer", "fox", "owl"]
    assert [i["id"] for i in out["images"]] == ["a/x", "a/y", "b/x", "b/y"]
    assert [i["dataset"] for i in out["images"]] == ["a", "a", "b", "b"]
    names = {c["id"]: c["name"] for c in out["categories"]}
    assert [names[a["category_id"]] for a in out["annotations"]] == ["deer", "fox", "fox", "owl"]
    assert out["annotations"][2]["image_id"] == "b/x"


def test_clean_workflow_on_real_file(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "mct" / "mct_cct.json"
    category_map = tmp_path / "category_map.json"
    assert run_entry_point("utils/make_category_map.py", source, "--output", category_map).returncode == 0
    rows = json.loads(category_map.read_text())
    rows[0]["keep"] = False  # agouti
    rows[2]["convert_to"] = "agouti_like"  # coiban_agouti
    category_map.write_text(json.dumps(rows))
    out = tmp_path / "clean.json"
    result = run_entry_point("utils/clean_cct.py", source, out, "--category-map", category_map)
    assert result.returncode == 0, result.stderr
    clean = json.loads(out.read_text())
    names = {c["name"] for c in clean["categories"]}
    assert "agouti" not in names and "coiban_agouti" not in names and "agouti_like" in names
    assert all("bbox" in a for a in clean["annotations"])
    assert len(clean["images"]) == 1275  # missing locations are grouped, not dropped
    assert all(image["location"] and image["dataset"] == "mct_cct" for image in clean["images"])
    assert "150 images have no location" in result.stderr


def test_make_category_map_refuses_to_overwrite_edits(tmp_path: Path) -> None:
    source = tmp_path / "a.json"
    source.write_text(json.dumps(cct(["deer"], [[1, 1, 5, 5]])))
    target = tmp_path / "map.json"
    target.write_text("[]")
    result = run_entry_point("utils/make_category_map.py", source, "--output", target)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {target}: exists and may hold your edits; pass --overwrite to replace it"


def test_typo_flag_gets_one_line_with_suggestion(tmp_path: Path) -> None:
    result = run_entry_point("utils/clean_cct.py", "in.json", "out.json", "--category-mapp", "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean --category-map?" in lines[0]


def test_clean_cct_quotes_a_huge_category_name_cut_short(tmp_path: Path) -> None:
    """A category map row with a 1 MB name: the summary line it printed held the whole name."""
    huge = "x" * 1_000_000
    cct = {"images": [{"id": "a", "file_name": "a.jpg", "width": 64, "height": 48, "location": "l1"}],
           "annotations": [{"id": "x1", "image_id": "a", "category_id": 1, "bbox": [4, 4, 20, 20]},
                           {"id": "x2", "image_id": "a", "category_id": 2, "bbox": [4, 4, 20, 20]}],
           "categories": [{"id": 1, "name": huge}, {"id": 2, "name": "deer"}]}
    (tmp_path / "in.json").write_text(json.dumps(cct))
    (tmp_path / "map.json").write_text(json.dumps([{"name": huge, "keep": False}, {"name": "deer"}]))
    result = run_entry_point("utils/clean_cct.py", str(tmp_path / "in.json"), str(tmp_path / "out.json"),
                             "--category-map", str(tmp_path / "map.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert all(len(line) < 1000 for line in lines), [len(line) for line in lines]
    assert any("dropped 1 of category 'xxx" in line and "(1000002 characters)" in line for line in lines), lines
