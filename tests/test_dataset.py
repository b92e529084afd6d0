"""create_classification_dataset: outputs, formats, reports and split options, run as a user would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from classification.data.crop_manifest import crop_file_name
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.demo import make_demo_dataset
from tests.helpers.processes import run_entry_point

LABELS = ["deer", "fox", "owl"]


def make_cct_with_crops(root: Path, n_locations: int = 12, seed: int = 0, skip_crops: int = 0) -> Path:
    """A CCT file (with numeric-looking and missing locations) and a real JPEG per boxed annotation."""
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    crops_dir = root / "crops"
    for k in range(n_locations):
        location = None if k == 0 else ("001" if k == 1 else ("1" if k == 2 else f"Site {k}"))
        for s in range(3):
            seq = f"s{k}_{s}"
            for frame in range(2):
                image_id = f"{seq}_{frame}"
                images.append({"id": image_id, "file_name": f"cam{k}/{image_id}.jpg", "width": 64, "height": 48,
                               "location": location, "seq_id": seq, "frame_num": frame})
                label = int(rng.integers(len(LABELS))) if k > 2 else k % len(LABELS)
                annotations.append({"id": f"a{len(annotations)}", "image_id": image_id, "category_id": label + 1,
                                    "bbox": [4, 4, 20, 20]})
    for annotation in annotations[skip_crops:]:
        image = next(i for i in images if i["id"] == annotation["image_id"])
        path = crops_dir / crop_file_name(image["file_name"], annotation["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (annotation["category_id"] * 60, 90, 90)).save(path)
    cct = {"images": images, "annotations": annotations,
           "categories": [{"id": i + 1, "name": n} for i, n in enumerate(LABELS)]}
    path = root / "clean_cct.json"
    path.write_text(json.dumps(cct))
    return path


def build(root: Path, out: str = "ds", *extra: object) -> tuple[int, str, Path]:
    result = run_entry_point(
        "utils/create_classification_dataset.py", root / out, "--mode", "csv", "cct", "splits",
        "--crops-dir", root / "crops", "--cct-json", root / "clean_cct.json", "--val-frac", "0.2",
        "--test-frac", "0.2", "--candidates", "2000", *extra)
    return result.returncode, result.stderr + result.stdout, root / out


def read_splits(out: Path) -> dict[str, set[tuple[str, str]]]:
    return {k: {tuple(pair) for pair in v} for k, v in json.loads((out / "splits.json").read_text()).items()}


def test_outputs_and_formats(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path)
    code, log, out = build(tmp_path)
    assert code == 0, log
    table = pd.read_csv(out / "classification_ds.csv", dtype=str)
    assert list(table.columns) == ["path", "dataset", "location", "dataset_class", "confidence", "label"]
    assert len(table) == 72 and table["path"].is_unique
    assert all((tmp_path / "crops" / p).is_file() for p in table["path"])
    assert {"001", "1", "nolocation_seq_s0_0"} <= set(table["location"])  # strings kept, missing grouped
    assert json.loads((out / "label_index.json").read_text()) == {"0": "deer", "1": "fox", "2": "owl"}
    splits = read_splits(out)
    all_keys = set(zip(table["dataset"], table["location"]))
    assert splits["train"] | splits["val"] | splits["test"] == all_keys
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    # frames of one sequence never straddle splits
    key_split = {key: s for s, keys in splits.items() for key in keys}
    table["split"] = [key_split[k] for k in zip(table["dataset"], table["location"])]
    table["seq"] = table["path"].str.extract(r"/(s\d+_\d+)_\d")[0]
    assert (table.groupby("seq")["split"].nunique() == 1).all()
    # per-split CCT files partition the crops CCT
    whole = json.loads((out / "classification_cct.json").read_text())
    parts = [json.loads((out / f"{s}_cct.json").read_text()) for s in ("train", "val", "test")]
    assert sum(len(p["images"]) for p in parts) == len(whole["images"]) == 72
    assert whole["categories"] == [{"id": 0, "name": "deer"}, {"id": 1, "name": "fox"}, {"id": 2, "name": "owl"}]
    report = json.loads((out / "split_report.json").read_text())
    assert report["seed"] == 123 and report["candidates"] == 2000
    assert "train" in log and "score" in log  # the table is printed


def test_same_seed_same_splits_and_seed_matters(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path)
    assert build(tmp_path, "a", "--seed", "5")[0] == 0
    assert build(tmp_path, "b", "--seed", "5")[0] == 0
    assert (tmp_path / "a" / "splits.json").read_bytes() == (tmp_path / "b" / "splits.json").read_bytes()
    other = [build(tmp_path, f"c{s}", "--seed", str(s), "--no-improve") for s in (1, 2, 3)]
    assert len({(o[2] / "splits.json").read_text() for o in other}) > 1


def test_missing_crops_are_reported_not_silent(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path, skip_crops=5)
    code, log, out = build(tmp_path)
    assert code == 0
    assert "5 crops listed but not found" in log
    assert "67 crops written" in log
    assert len(pd.read_csv(out / "classification_ds.csv")) == 67


def test_min_locs_drops_and_reports(tmp_path: Path) -> None:
    cct_path = make_cct_with_crops(tmp_path)
    cct = json.loads(cct_path.read_text())
    cct["categories"].append({"id": 4, "name": "lynx"})
    rare = [a for a in cct["annotations"] if a["image_id"].startswith("s5_")]
    for annotation in rare:
        annotation["category_id"] = 4
    cct_path.write_text(json.dumps(cct))
    code, log, out = build(tmp_path, "ds", "--min-locs", "2")
    assert code == 0, log
    assert "label 'lynx': 6 crops at 1 locations < --min-locs 2: dropped" in log
    assert "lynx" not in json.loads((out / "label_index.json").read_text()).values()
    assert len(pd.read_csv(out / "classification_ds.csv")) == 72 - len(rare)
    assert json.dumps(json.loads((out / "split_report.json").read_text())).count("lynx") >= 1
    code, log, _ = build(tmp_path, "none", "--min-locs", "50")
    assert code == 2 and "no labelled crops left" in log


def test_match_test_keeps_test_and_never_leaks(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path)
    assert build(tmp_path, "first", "--seed", "1")[0] == 0
    first = read_splits(tmp_path / "first")
    code, log, out = build(tmp_path, "second", "--seed", "2", "--match-test",
                           tmp_path / "first" / "classification_ds.csv", tmp_path / "first" / "splits.json")
    assert code == 0, log
    second = read_splits(out)
    assert second["test"] == first["test"]
    assert not (second["train"] | second["val"]) & first["test"]


def test_splits_file_used_as_is_and_validated(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path)
    assert build(tmp_path, "first")[0] == 0
    code, log, out = build(tmp_path, "again", "--splits-file", tmp_path / "first" / "splits.json")
    assert code == 0, log
    assert read_splits(out) == read_splits(tmp_path / "first")
    bad = json.loads((tmp_path / "first" / "splits.json").read_text())
    bad["val"].append(bad["train"][0])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, log, _ = build(tmp_path, "bad", "--splits-file", tmp_path / "bad.json")
    assert code == 2 and "Traceback" not in log
    assert "bad.json" in log


def split_only(out: Path, *extra: str) -> tuple[int, str]:
    """``--mode splits`` (or other modes without csv) on ``out``'s classification_ds.csv alone."""
    result = run_entry_point("utils/create_classification_dataset.py", out, "--val-frac", "0.2", "--test-frac", "0.2",
                             "--candidates", "2000", *(extra or ("--mode", "splits")))
    return result.returncode, result.stderr + result.stdout


def test_resplit_from_the_csv_alone_with_another_seed(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path)
    code, log, out = build(tmp_path, "ds", "--seed", "1")
    assert code == 0, log
    first = read_splits(out)
    csv_before, labels_before = (out / "classification_ds.csv").read_bytes(), (out / "label_index.json").read_bytes()
    moved = tmp_path / "moved"
    (tmp_path / "crops").rename(moved)  # no crops folder, no manifest, no CCT: only the CSV
    (tmp_path / "clean_cct.json").unlink()
    code, log = split_only(out, "--mode", "splits", "cct", "--seed", "2", "--no-improve")
    assert code == 0, log
    second = read_splits(out)
    assert second != first and "72 crops written" in log
    table = pd.read_csv(out / "classification_ds.csv", dtype=str)
    assert second["train"] | second["val"] | second["test"] == set(zip(table["dataset"], table["location"]))
    assert not (second["train"] & second["val"] or second["train"] & second["test"] or second["val"] & second["test"])
    assert (out / "classification_ds.csv").read_bytes() == csv_before  # inputs untouched
    assert (out / "label_index.json").read_bytes() == labels_before
    test_cct = json.loads((out / "test_cct.json").read_text())
    assert {(im["dataset"], im["location"]) for im in test_cct["images"]} == second["test"]
    assert json.loads((out / "split_report.json").read_text())["seed"] == 2


def test_splits_from_a_users_own_csv(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    rows = [f"img{i}.jpg,zoo,{loc:03d},{label}" for i, (loc, label) in
            enumerate((k % 9, LABELS[k % 3]) for k in range(60))]
    (out / "classification_ds.csv").write_text("path,dataset,location,label\n" + "\n".join(rows) + "\n")
    code, log = split_only(out)
    assert code == 0, log
    splits = read_splits(out)
    assert sum(map(len, splits.values())) == 9 and ("zoo", "007") in splits["train"] | splits["val"] | splits["test"]
    assert json.loads((out / "label_index.json").read_text()) == {"0": "deer", "1": "fox", "2": "owl"}


@pytest.mark.parametrize(("content", "message"), [
    (None, "classification_ds.csv: file not found (build it with --mode csv"),
    ("path,dataset,location,label\n", "lists no crops"),
    ("path,dataset,label\na.jpg,zoo,fox\n", "missing columns location"),
    ("path,dataset,location,label\na.jpg,zoo,,fox\n", "rows without a location"),
])
def test_splits_from_a_bad_csv_is_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "classification_ds.csv").write_text(content)
    code, log = split_only(tmp_path)
    assert code == 2 and message in log and log.strip().count("\n") == 0, log


def test_csv_mode_still_needs_the_crops_dir(tmp_path: Path) -> None:
    code, log = split_only(tmp_path, "--mode", "csv", "splits")
    assert code == 2 and "--crops-dir is needed" in log and "Traceback" not in log


def test_bad_input_gets_one_line(tmp_path: Path) -> None:
    make_cct_with_crops(tmp_path)
    (tmp_path / "clean_cct.json").write_text("{not json")
    code, log, _ = build(tmp_path)
    assert code == 2 and log.strip().count("\n") == 0 and "not valid JSON" in log
    code, log, _ = build(tmp_path, "ds", "--val-frac", "0.9")
    assert code == 2 and "Traceback" not in log


@pytest.mark.parametrize("flag", ["--min-loc", "--crops_dir"])
def test_typo_flag(tmp_path: Path, flag: str) -> None:
    result = run_entry_point("utils/create_classification_dataset.py", tmp_path, flag, "3")
    assert result.returncode == 2 and "did you mean" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: rows + [rows[1]], "line 5: crop_path '{first}' is the crop of line 2 again"),
    (lambda rows: rows + [rows[1].replace(rows[1].split(",")[0], "./" + rows[1].split(",")[0], 1)],
     "line 5: crop_path './{first}' is the crop of line 2 again"),
    (lambda rows: rows[:2] + ["/etc/passwd" + rows[2][rows[2].index(","):]], "line 3: crop_path '/etc/passwd' is not a path inside"),
    (lambda rows: rows[:2] + ["../../x.jpg" + rows[2][rows[2].index(","):]], "line 3: crop_path '../../x.jpg' is not a path inside"),
])
def test_a_crops_manifest_lists_each_crop_once_inside_its_folder(tmp_path: Path, edit: Any, message: str) -> None:
    cct = make_demo_dataset(tmp_path / "raw", 4, 2, 2, seed=0)
    crop_detections(cct, tmp_path / "crops", tmp_path / "raw" / "images", CropOptions(crop_strategy="pad", max_size=32, progress=False))
    manifest = tmp_path / "crops" / "crops_manifest.csv"
    rows = manifest.read_text().splitlines()[:4]  # the header and three crops
    first = rows[1].split(",")[0]
    manifest.write_text("\n".join(edit(rows)) + "\n")
    result = run_entry_point("utils/create_classification_dataset.py", tmp_path / "ds", "--mode", "csv",
                             "--crops-dir", tmp_path / "crops", "--crops-manifest", manifest)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{manifest}: " + message.format(first=first) in result.stderr


def test_labels_that_differ_only_by_case_or_spaces_are_one_line(tmp_path: Path) -> None:
    cct = make_demo_dataset(tmp_path / "raw", 4, 2, 2, seed=0)
    crop_detections(cct, tmp_path / "crops", tmp_path / "raw" / "images", CropOptions(crop_strategy="pad", max_size=32, progress=False))
    manifest = tmp_path / "crops" / "crops_manifest.csv"
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    label = frame.loc[0, "label"]
    frame.loc[0, "label"] = label.upper() + " "  # a hand-edited manifest: 'DEER ' beside 'deer'
    frame.to_csv(manifest, index=False)
    result = run_entry_point("utils/create_classification_dataset.py", tmp_path / "ds", "--mode", "csv",
                             "--crops-dir", tmp_path / "crops", "--crops-manifest", manifest)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"labels {label.upper() + ' '!r} and {label!r} differ only by case or spaces" in result.stderr
