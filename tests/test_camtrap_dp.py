"""Camtrap DP in (utils/camtrap_dp_to_cct.py) and out (classifier/predictions_to_camtrap_dp.py) on the standard's own example package."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from classification.data.camtrap_dp import camtrap_dp_to_cct, read_package
from classification.data.camtrap_dp_schema import column_names, validate_camtrap_dp
from classification.evaluation.camtrap_dp import export_predictions
from classification.evaluation.report import prediction_columns
from classification.io import read_json, write_json_atomic
from tests.helpers.camtrap_dp import copy_tables
from tests.helpers.processes import run_entry_point, run_in_process

HERON = "7ab33b3a"  # the first of the 10 local media: event 7245a2aa, deployment 62c200a9, location ce943ced
HERON_EVENT = "7245a2aa"
TIMESTAMP = "2026-01-02T03:04:05Z"


def edit_csv(path: Path, change: Callable[[pd.DataFrame], object]) -> None:
    """Rewrite a CSV (every column a string) after ``change(frame)``."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame)
    frame.to_csv(path, index=False)


# ---------------------------------------------------------------- in: Camtrap DP -> CCT


def test_example_converts_to_the_reference_cct(example: Path) -> None:
    data, report = camtrap_dp_to_cct(example)
    images = {image["id"]: image for image in data["images"]}
    assert len(images) == 423 and report.sequences > 0
    heron = images[HERON]
    assert heron["file_name"] == "media/20210531082538-RCNX0031.JPG"
    assert (heron["location"], heron["deployment_id"], heron["seq_id"]) == ("ce943ced", "62c200a9", HERON_EVENT)
    assert heron["datetime"] == "2021-04-11 20:43:09"  # local time, as written in media.csv (+01:00)
    assert (heron["frame_num"], heron["seq_num_frames"], heron["width"], heron["height"]) == (0, 10, 2048, 1440)
    names = {c["id"]: c["name"] for c in data["categories"]}
    box = next(a for a in data["annotations"] if a["image_id"] == HERON)
    assert names[box["category_id"]] == "Ardea"
    assert box["bbox"] == pytest.approx([736.2, 883.9, 674.8, 449.6], abs=0.1)  # 0.35947 x 2048, ... as in the reference CCT
    assert report.boxes == 10 and report.boxes_without_size == 10  # boxed remote media: size unknown, kept as image-level
    remote = next(image for image in data["images"] if "url" in image)  # camera file names repeat across deployments
    assert remote["file_name"].startswith(remote["deployment_id"] + "/") and remote["url"].startswith("https://")

    reference = read_json(example / "cct_camtrapdp_full.json")  # derived independently from the same package
    ref_names = {c["id"]: c["name"] for c in reference["categories"]}
    for ref_image in reference["images"]:
        ours = images[ref_image["id"]]
        assert (ours["location"], ours["datetime"], ours.get("seq_id")) == \
            (ref_image["location"], ref_image["datetime"], ref_image.get("seq_id")), ref_image["id"]
    ref_labels = {(a["image_id"], ref_names[a["category_id"]]) for a in reference["annotations"]}
    assert {(a["image_id"], names[a["category_id"]]) for a in data["annotations"]} >= ref_labels


def test_the_pipeline_runs_unchanged_on_the_converted_package(example: Path, tmp_path: Path) -> None:
    cct = tmp_path / "camtrap_cct.json"
    result = run_entry_point("utils/camtrap_dp_to_cct.py", example, cct)
    assert result.returncode == 0, result.stderr
    assert "423 images" in result.stdout and "sequences" in result.stdout
    assert run_in_process("utils/validate_cct.py", cct).returncode == 0
    clean = tmp_path / "clean.json"
    result = run_in_process("utils/clean_cct.py", cct, clean)
    assert result.returncode == 0, result.stderr
    crops = tmp_path / "crops"
    result = run_in_process("utils/crop_detections.py", clean, crops, "--images-dir", example)
    assert result.returncode == 0, result.stderr
    manifest = pd.read_csv(crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 10 and set(manifest["seq_id"]) == {HERON_EVENT} and set(manifest["label"]) == {"Ardea"}
    result = run_in_process("utils/create_classification_dataset.py", tmp_path / "dataset", "--mode", "csv", "cct",
                            "--crops-dir", crops, "--cct-json", clean)
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "dataset" / "classification_ds.csv")) == 10


@pytest.mark.parametrize(("change", "expected"), [
    ("no_media_resource", "datapackage.json: resources: no 'media' resource"),
    ("no_timestamp_column", "media.csv: missing columns timestamp"),
    ("bad_timestamp", "media.csv: row 2: timestamp: not an ISO 8601 date-time ('yesterday')"),
    ("bad_box", "observations.csv: row 6: bboxX: expected a number from 0 to 1, got 'left'"),
    ("unknown_media", "observations.csv: row 3: mediaID: 'nope' is not in media.csv"),
    ("no_datapackage", "datapackage.json: file not found"),
])
def test_a_malformed_package_is_one_line_naming_file_and_field(example: Path, tmp_path: Path, change: str, expected: str) -> None:
    package = copy_tables(example, tmp_path / "package")
    if change == "no_media_resource":
        descriptor = read_json(package / "datapackage.json")
        descriptor["resources"] = [r for r in descriptor["resources"] if r["name"] != "media"]
        write_json_atomic(package / "datapackage.json", descriptor)
    elif change == "no_timestamp_column":
        edit_csv(package / "media.csv", lambda f: f.__delitem__("timestamp"))
    elif change == "bad_timestamp":
        edit_csv(package / "media.csv", lambda f: f.__setitem__("timestamp", ["yesterday"] + list(f["timestamp"][1:])))
    elif change == "bad_box":
        edit_csv(package / "observations.csv", lambda f: f.loc.__setitem__((4, "bboxX"), "left"))
    elif change == "unknown_media":
        edit_csv(package / "observations.csv", lambda f: f.loc.__setitem__((1, "mediaID"), "nope"))
    else:
        (package / "datapackage.json").unlink()
    result = run_in_process("utils/camtrap_dp_to_cct.py", package, tmp_path / "out.json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------- the offline validator


EXAMPLE_DEFECTS = [f"media.csv: row {row}: exifData: type-error: type is \"object/default\"" for row in (236, 238, 240)]


def test_the_bundled_schemas_accept_the_standards_own_example_but_its_broken_exif(example: Path) -> None:
    # Three exifData cells of the example are not one JSON object ('{...}, "File": {...}}'): the standard says object
    assert validate_camtrap_dp(example) == EXAMPLE_DEFECTS


@pytest.mark.parametrize(("table", "column", "value", "expected"), [
    ("observations", "bboxX", "1.5", "observations.csv: row 2: bboxX: constraint-error"),
    ("observations", "observationType", "animals", "observations.csv: row 2: observationType: constraint-error"),
    ("observations", "classificationProbability", "95", "classificationProbability: constraint-error"),
    ("media", "timestamp", "2020-05-30 04:57:37", "media.csv: row 2: timestamp: type-error"),  # no T, no timezone
    ("media", "deploymentID", "elsewhere", "foreign-key"),
    ("deployments", "latitude", "91", "deployments.csv: row 2: latitude: constraint-error"),
])
def test_the_validator_refuses_what_the_standard_refuses(example: Path, tmp_path: Path, table: str, column: str, value: str,
                                                          expected: str) -> None:
    package = copy_tables(example, tmp_path / "package")
    edit_csv(package / f"{table}.csv", lambda f: f.loc.__setitem__((0, column), value))
    problems = validate_camtrap_dp(package)
    assert any(expected in problem for problem in problems), problems


def test_the_validator_checks_the_descriptor(example: Path, tmp_path: Path) -> None:
    package = copy_tables(example, tmp_path / "package")
    descriptor = read_json(package / "datapackage.json")
    del descriptor["project"]
    descriptor["created"] = "last week"
    write_json_atomic(package / "datapackage.json", descriptor)
    problems = validate_camtrap_dp(package)
    assert any(p.startswith("datapackage.json: project:") for p in problems)
    assert any(p.startswith("datapackage.json: created:") for p in problems)


# ---------------------------------------------------------------- out: predictions -> Camtrap DP, and the round trip


def fake_predictions(crops: Path, run: Path) -> Path:
    """A predictions.csv over the crops of the manifest, as classifier/predict.py writes it (top-3), with its info file."""
    manifest = pd.read_csv(crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    rows = []
    for i, crop in enumerate(manifest.to_dict("records")):
        top = ["Ardea", "Ardea cinerea", "blank"] if i % 5 else ["unknown", "Ardea", "blank"]
        rows.append({"path": crop["crop_path"], "dataset": "example", "location": crop["location"], "true_label": crop["label"],
                     "true_prob": 0.8, "pred_label": top[0], "confidence": 0.8, "top1_label": top[0], "top2_label": top[1],
                     "top3_label": top[2], "top1_prob": 0.8, "top2_prob": 0.15, "top3_prob": 0.05})
    run.mkdir(parents=True)
    pd.DataFrame(rows, columns=prediction_columns(3)).to_csv(run / "predictions.csv", index=False)
    info = {"images_root": str(crops), "checkpoint": str(run.parent / "tiny" / "checkpoints" / "best.pt"), "architecture": "resnet18"}
    (run / "prediction_info.json").write_text(json.dumps(info))
    return run / "predictions.csv"


def crops_of_example(example: Path, tmp_path: Path) -> Path:
    """The example's 10 local heron boxes, cropped by the pipeline's own entry points."""
    cct = tmp_path / "camtrap_cct.json"
    assert run_in_process("utils/camtrap_dp_to_cct.py", example, cct).returncode == 0
    result = run_in_process("utils/crop_detections.py", cct, tmp_path / "crops", "--images-dir", example)
    assert result.returncode == 0, result.stderr
    return tmp_path / "crops"


def test_round_trip_in_cct_predictions_out_validated(example: Path, tmp_path: Path) -> None:
    predictions = fake_predictions(crops_of_example(example, tmp_path), tmp_path / "predictions")
    out = tmp_path / "camtrap_out"
    report = export_predictions(predictions, example, out, timestamp=TIMESTAMP)
    assert report.problems == [] and report.unmatched == [] and report.inherited == EXAMPLE_DEFECTS
    assert validate_camtrap_dp(out) == EXAMPLE_DEFECTS  # the source's media.csv, kept as it is: nothing of ours
    observations = pd.read_csv(out / "observations.csv", dtype=str, keep_default_na=False)
    assert list(observations.columns) == column_names("observations")
    media_level = observations[observations["observationLevel"] == "media"]
    assert len(media_level) == 10 and set(media_level["classificationMethod"]) == {"machine"}
    assert set(media_level["classifiedBy"]) == {"resnet18 tiny/best.pt"} and set(media_level["classificationTimestamp"]) == {TIMESTAMP}
    assert sorted(media_level["observationType"].unique()) == ["animal", "unknown"]
    assert set(media_level[media_level["observationType"] == "animal"]["scientificName"]) == {"Ardea"}
    # each crop's box is the source observation's box, back in fractions of the image
    source = pd.read_csv(example / "observations.csv", dtype=str, keep_default_na=False).set_index("mediaID")
    heron = media_level[media_level["mediaID"] == HERON].iloc[0]
    for column in ("bboxX", "bboxY", "bboxWidth", "bboxHeight"):
        assert float(heron[column]) == pytest.approx(float(source.loc[HERON, column]), abs=1e-3)
    event_level = observations[observations["observationLevel"] == "event"]
    assert set(event_level["eventID"]) == {HERON_EVENT} and set(event_level["scientificName"]) == {"Ardea", ""}
    ardea = event_level[event_level["scientificName"] == "Ardea"].iloc[0]
    assert float(ardea["classificationProbability"]) == pytest.approx((8 * 0.8 + 2 * 0.15) / 10)
    assert ardea["eventStart"] < ardea["eventEnd"]
    descriptor = read_json(out / "datapackage.json")
    assert descriptor["project"]["observationLevel"] == ["event", "media"] and descriptor["created"] == TIMESTAMP
    assert [t["scientificName"] for t in descriptor["taxonomic"]] == ["Ardea"]
    # and back in: the package we wrote is a dataset source like any other
    data, _ = camtrap_dp_to_cct(out)
    back = {a["id"]: a for a in data["annotations"]}
    assert back[heron["observationID"]]["bbox"] == pytest.approx([736.2, 883.9, 674.8, 449.6], abs=1.0)
    assert len(read_package(out).media) == 423


def test_the_entry_point_writes_a_valid_package(example: Path, tmp_path: Path) -> None:
    predictions = fake_predictions(crops_of_example(example, tmp_path), tmp_path / "predictions")
    out = tmp_path / "out"
    result = run_entry_point("classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", example,
                             "--output-dir", out, "--classified-by", "my model v1")
    assert result.returncode == 0, result.stderr
    assert "valid Camtrap DP 1.0.2" in result.stdout
    with open(out / "observations.csv", encoding="utf-8", newline="") as handle:
        assert {row["classifiedBy"] for row in csv.DictReader(handle)} == {"my model v1"}
    assert (out / "media" / "20210531082538-RCNX0031.JPG").is_file()  # local media travel with the package


def test_predictions_of_no_medium_are_refused(example: Path, tmp_path: Path) -> None:
    predictions = fake_predictions(crops_of_example(example, tmp_path), tmp_path / "predictions")
    info = read_json(predictions.parent / "prediction_info.json")
    info["images_root"] = str(tmp_path / "elsewhere")  # no manifest there, and crop names are no media file names
    write_json_atomic(predictions.parent / "prediction_info.json", info)
    result = run_in_process("classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", example,
                            "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "no prediction is of a medium" in result.stderr


def test_predictions_on_whole_images_are_matched_by_file_name(example: Path, tmp_path: Path) -> None:
    local = sorted(p.relative_to(example).as_posix() for p in (example / "media").glob("*.JPG"))
    run = tmp_path / "predictions"
    run.mkdir()
    rows = [{"path": path, "dataset": "example", "location": "", "true_label": "", "true_prob": "", "pred_label": "blank",
             "confidence": 0.6, "top1_label": "blank", "top1_prob": 0.6} for path in local]
    pd.DataFrame(rows, columns=prediction_columns(1)).to_csv(run / "predictions.csv", index=False)
    (run / "prediction_info.json").write_text(json.dumps({"images_root": str(example), "architecture": "resnet18"}))
    report = export_predictions(run / "predictions.csv", example, tmp_path / "out", timestamp=TIMESTAMP)
    assert report.problems == [] and report.media_observations == 10 and report.event_observations == 1
    observations = pd.read_csv(tmp_path / "out" / "observations.csv", dtype=str, keep_default_na=False)
    assert set(observations["observationType"]) == {"blank"} and set(observations["bboxX"]) == {""}
    assert set(observations["count"]) == {""} and set(observations["scientificName"]) == {""}


def test_the_source_package_is_never_overwritten(example: Path, tmp_path: Path) -> None:
    predictions = fake_predictions(crops_of_example(example, tmp_path), tmp_path / "predictions")
    package = copy_tables(example, tmp_path / "package")
    before = (package / "observations.csv").read_bytes()
    result = run_in_process("classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", package,
                            "--output-dir", package)
    assert result.returncode == 2 and "is the source package" in result.stderr
    assert (package / "observations.csv").read_bytes() == before
