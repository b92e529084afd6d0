"""Cropping detections: geometry, real JPEGs (MCT, MegaDetector output, broken files), re-runs, CLI."""

from __future__ import annotations

import functools
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import classification.data.crop_image as crop_image_module
import classification.data.crop_run as crop_run_module
import classification.data.images as images_module
from classification.data.crop_geometry import CropGeometry, clip_box, draft_factor, extract_crop, pad_geometry, square_geometry
from classification.data.crop_manifest import MANIFEST_COLUMNS, crop_file_name, parse_crop_file_name
from classification.data.crop_options import CropOptions
from classification.data.crop_run import CropReport, crop_detections
from classification.data.detections import FileMatcher
from classification.errors import DataError, UserError
from tests.helpers.processes import REPO_ROOT, run_entry_point


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON and return the path."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def run(input_json: Path, crops_dir: Path, images_dir: Path, **options: Any) -> CropReport:
    """``crop_detections`` with the progress bar off."""
    return crop_detections(input_json, crops_dir, images_dir, CropOptions(progress=False, **options))


def read_manifest(crops_dir: Path) -> pd.DataFrame:
    """The crops manifest, every column as text."""
    return pd.read_csv(crops_dir / "crops_manifest.csv", dtype=str, keep_default_na=False)


def crop_files(crops_dir: Path) -> set[str]:
    """Crop paths under ``crops_dir`` relative to it, '/'-separated."""
    return {p.relative_to(crops_dir).as_posix() for p in crops_dir.rglob("*.jpg")}


def decoded(path: Path) -> np.ndarray:
    """A fully decoded image file as an int array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def boxed_annotations(cct: dict[str, Any]) -> list[dict[str, Any]]:
    """The annotations with a box."""
    return [a for a in cct["annotations"] if a.get("bbox") is not None]


# ---------------------------------------------------------------- names


def test_crop_names_round_trip_and_read_megadetector_names() -> None:
    name = crop_file_name("agouti/SEQ1_IMG_0001.JPG", "ann00001")
    assert name == "agouti/SEQ1_IMG_0001.JPG___crop_ann00001.jpg"
    assert parse_crop_file_name(name) == ("agouti/SEQ1_IMG_0001.JPG", "ann00001")
    assert parse_crop_file_name("a/b.jpg___crop03_mdv5a.jpg") == ("a/b.jpg", "det03")
    assert parse_crop_file_name("a\\b.jpg___crop_7.jpg") == ("a/b.jpg", "7")
    with pytest.raises(ValueError):
        parse_crop_file_name("a/b.jpg")
    with pytest.raises(DataError):
        crop_file_name("a.jpg", "x/y")


# ---------------------------------------------------------------- geometry


def test_clip_box_rounds_half_up_and_clips_overshoot() -> None:
    assert clip_box((10.5, 20.49, 5.0, 5.0), 100, 100) == (11, 20, 16, 25)
    assert clip_box((-1.5, 95.0, 10.0, 8.0), 100, 100) == (0, 95, 9, 100)
    assert clip_box((99.9, 50.0, 0.2, 0.1), 100, 100) == (99, 50, 100, 51)  # at least one pixel


def test_square_near_right_and_bottom_edge_stays_inside() -> None:
    # Centred on these boxes, the 40 px squares would start at 615 and end at 655 > 640. The
    # references clamp the start to W - w = 630 (no effect) and hang 15 px off the image.
    right_edge = square_geometry((630.0, 300.0, 10.0, 40.0), 640, 640)
    bottom_edge = square_geometry((300.0, 630.0, 40.0, 10.0), 640, 640)
    assert right_edge == CropGeometry((600, 300, 640, 340), 40, (0, 0))
    assert bottom_edge == CropGeometry((300, 600, 340, 640), 40, (0, 0))


def test_square_is_centred_on_the_box_when_it_fits() -> None:
    geometry = square_geometry((100.0, 200.0, 40.0, 10.0), 640, 480)
    assert geometry == CropGeometry((100, 185, 140, 225), 40, (0, 0))


def test_square_larger_than_image_is_centred_on_it_with_black_outside() -> None:
    geometry = square_geometry((10.0, 5.0, 90.0, 20.0), 100, 30)
    assert geometry.side == 90
    assert geometry.region == (10, 0, 100, 30)  # x fits: shifted inside; y does not: whole height
    assert geometry.offset == (0, 30)  # (30 - 90) // 2 = -30: centred, 30 black rows above


def test_pad_keeps_the_aspect_ratio() -> None:
    geometry = pad_geometry((10.0, 20.0, 60.0, 20.0), 200, 100)
    assert geometry == CropGeometry((10, 20, 70, 40), 60, (0, 20))
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    crop = np.asarray(extract_crop(image, geometry))
    rows = np.flatnonzero(crop.any(axis=(1, 2)))
    assert crop.shape == (60, 60, 3) and (rows.min(), rows.max() + 1) == (20, 40)


@pytest.mark.parametrize("strategy", ["square", "pad"])
@pytest.mark.parametrize(
    "bbox",
    [(10.2, 20.7, 30.0, 12.0), (180.0, 80.0, 19.6, 19.9), (150.0, 90.0, 70.0, 20.0), (0.0, 0.0, 150.0, 110.0)],
)
def test_crop_pixels_equal_numpy_slicing_of_the_source(strategy: str, bbox: tuple[float, ...]) -> None:
    height, width = 100, 200
    yy, xx = np.mgrid[0:height, 0:width]
    source = np.stack([xx % 256, yy * 2, (xx + yy) % 256], axis=-1).astype(np.uint8)
    geometry = (square_geometry if strategy == "square" else pad_geometry)(bbox, width, height)  # type: ignore[arg-type]
    crop = np.asarray(extract_crop(Image.fromarray(source), geometry))
    left, top, right, bottom = geometry.region
    expected = np.zeros((geometry.side, geometry.side, 3), np.uint8)
    ox, oy = geometry.offset
    expected[oy : oy + bottom - top, ox : ox + right - left] = source[top:bottom, left:right]
    np.testing.assert_array_equal(crop, expected)
    x0, y0, x1, y1 = clip_box(bbox, width, height)  # type: ignore[arg-type]
    assert left <= x0 and top <= y0 and right >= x1 and bottom >= y1, "the crop holds the whole (clipped) box"


def test_draft_factor_only_when_lossless() -> None:
    assert draft_factor([600, 700], None, (2048, 1536)) == 1
    assert draft_factor([600, 700], 64, (2048, 1536)) == 8  # 600 / 8 = 75 >= 64
    assert draft_factor([600, 100], 64, (2048, 1536)) == 1  # a 100 px crop at 1/2 scale would be 50 < 64
    assert draft_factor([300], 64, (2048, 1536)) == 4  # 300 / 8 = 37.5 < 64 <= 300 / 4
    assert draft_factor([128], 64, (2048, 1536)) == 2


def test_file_matcher_exact_then_unique_suffix() -> None:
    matcher = FileMatcher(["images/a.jpg", "x/b.jpg", "y/b.jpg", "c.jpg"])
    assert matcher.match("images/a.jpg")[0] == "images/a.jpg"
    assert matcher.match("a.jpg")[0] == "images/a.jpg"
    assert matcher.match("root/c.jpg")[0] == "c.jpg"
    assert matcher.match("b.jpg")[0] is None and "2 CCT images" in matcher.match("b.jpg")[1]
    assert matcher.match("d.jpg")[0] is None


# ---------------------------------------------------------------- real data: MCT (CCT boxes)


def mct_subset(shared_data: Path, tmp_path: Path, n_located: int = 40, n_unlocated: int = 20) -> tuple[Path, dict[str, Any]]:
    """A CCT with the first boxed annotations of located and unlocated MCT images (plus one without a box)."""
    cct = json.loads((shared_data / "mct" / "mct_cct.json").read_text())
    images = {im["id"]: im for im in cct["images"]}
    located = [a for a in boxed_annotations(cct) if images[a["image_id"]]["location"] is not None][:n_located]
    unlocated = [a for a in boxed_annotations(cct) if images[a["image_id"]]["location"] is None][:n_unlocated]
    no_box = next(a for a in cct["annotations"] if a.get("bbox") is None)
    annotations = located + unlocated + [no_box]
    image_ids = {a["image_id"] for a in annotations}
    subset = {**cct, "images": [im for im in cct["images"] if im["id"] in image_ids], "annotations": annotations}
    return write_json(tmp_path / "mct_subset.json", subset), subset


def check_mct_crops(cct: dict[str, Any], crops_dir: Path, strategy: str) -> None:
    """Every boxed annotation has exactly one crop of the right size, listed once in the manifest."""
    boxed = boxed_annotations(cct)
    images = {im["id"]: im for im in cct["images"]}
    expected = {crop_file_name(images[a["image_id"]]["file_name"], a["id"]) for a in boxed}
    assert crop_files(crops_dir) == expected
    manifest = read_manifest(crops_dir)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert set(manifest["crop_path"]) == expected and len(manifest) == len(boxed)
    assert (manifest["crop_strategy"] == strategy).all() and (manifest["location"] != "").all()
    for annotation in boxed[:: max(1, len(boxed) // 25)]:
        image = images[annotation["image_id"]]
        side = square_geometry(tuple(annotation["bbox"]), image["width"], image["height"]).side
        with Image.open(crops_dir / crop_file_name(image["file_name"], annotation["id"])) as crop:
            assert crop.size == (side, side) and crop.mode == "RGB"


@pytest.mark.parametrize("strategy", ["square", "pad"])
def test_mct_subset_every_box_one_crop_and_rerun_creates_nothing(shared_data: Path, tmp_path: Path, strategy: str) -> None:
    cct_path, cct = mct_subset(shared_data, tmp_path)
    crops_dir = tmp_path / "crops"
    report = run(cct_path, crops_dir, shared_data / "mct" / "images", crop_strategy=strategy, threads=2)
    n_boxes = len(boxed_annotations(cct))
    assert (report.new, report.skipped, report.failures) == (n_boxes, 0, [])
    assert report.input.annotations_without_box == 1
    assert report.input.missing_locations is not None and report.input.missing_locations.images_without_location > 0
    check_mct_crops(cct, crops_dir, strategy)
    manifest = read_manifest(crops_dir)
    assert manifest["location"].str.startswith("nolocation_seq_").sum() == 20, "unlocated images kept, grouped by sequence"
    assert manifest["label"].isin({c["name"] for c in cct["categories"]}).all()
    again = run(cct_path, crops_dir, shared_data / "mct" / "images", crop_strategy=strategy, check_crops_valid=True)
    assert (again.new, again.skipped, again.redone) == (0, n_boxes, 0)
    assert read_manifest(crops_dir).equals(manifest)


def test_square_crop_pixels_match_the_decoded_source(shared_data: Path, tmp_path: Path) -> None:
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=3, n_unlocated=0)
    run(cct_path, tmp_path / "crops", shared_data / "mct" / "images", quality=100)
    annotation = boxed_annotations(cct)[0]
    image = next(im for im in cct["images"] if im["id"] == annotation["image_id"])
    source = decoded(shared_data / "mct" / "images" / image["file_name"])
    left, top, right, bottom = square_geometry(tuple(annotation["bbox"]), 640, 640).region
    crop = decoded(tmp_path / "crops" / crop_file_name(image["file_name"], annotation["id"]))
    assert np.abs(crop - source[top:bottom, left:right]).mean() < 3.0  # JPEG re-encoding only


def test_boxes_of_a_resized_copy_are_scaled(shared_data: Path, tmp_path: Path) -> None:
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=5, n_unlocated=0)
    run(cct_path, tmp_path / "crops", shared_data / "mct" / "images")
    full_size = {**cct, "images": [{**im, "width": 1280, "height": 1920} for im in cct["images"]]}
    full_size["annotations"] = [
        {**a, "bbox": [a["bbox"][0] * 2, a["bbox"][1] * 3, a["bbox"][2] * 2, a["bbox"][3] * 3]} if a.get("bbox") else a
        for a in cct["annotations"]
    ]
    report = run(write_json(tmp_path / "full_size.json", full_size), tmp_path / "scaled", shared_data / "mct" / "images")
    assert report.resized_copies == len({a["image_id"] for a in boxed_annotations(cct)})
    for path in crop_files(tmp_path / "crops"):
        np.testing.assert_array_equal(decoded(tmp_path / "scaled" / path), decoded(tmp_path / "crops" / path))
    assert read_manifest(tmp_path / "scaled")[["bbox_x", "bbox_h"]].equals(read_manifest(tmp_path / "crops")[["bbox_x", "bbox_h"]])


def test_mixing_strategies_in_one_folder_is_refused(shared_data: Path, tmp_path: Path) -> None:
    cct_path, _ = mct_subset(shared_data, tmp_path, n_located=2, n_unlocated=0)
    run(cct_path, tmp_path / "crops", shared_data / "mct" / "images", crop_strategy="square")
    with pytest.raises(UserError, match="crop-strategy square"):
        run(cct_path, tmp_path / "crops", shared_data / "mct" / "images", crop_strategy="pad")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["square", "pad"])
def test_whole_mct_every_box_one_crop(shared_data: Path, tmp_path: Path, strategy: str) -> None:
    cct_path = shared_data / "mct" / "mct_cct.json"
    cct = json.loads(cct_path.read_text())
    crops_dir = tmp_path / "crops"
    report = run(cct_path, crops_dir, shared_data / "mct" / "images", crop_strategy=strategy, threads=4)
    assert (report.new, report.failures) == (1108, []) == (len(boxed_annotations(cct)), [])
    check_mct_crops(cct, crops_dir, strategy)
    assert report.input.missing_locations is not None and report.input.missing_locations.images_without_location == 150
    again = run(cct_path, crops_dir, shared_data / "mct" / "images", crop_strategy=strategy, threads=4)
    assert (again.new, again.skipped) == (0, 1108)


# ---------------------------------------------------------------- real data: MegaDetector output


def expected_detections(md: dict[str, Any], threshold: float) -> set[str]:
    """Crop paths of the animal detections with conf >= threshold, read straight from the JSON."""
    animal = {k for k, v in md["detection_categories"].items() if v == "animal"}
    return {
        crop_file_name(image["file"], f"det{i:02d}")
        for image in md["images"]
        for i, d in enumerate(image.get("detections") or [])
        if d["category"] in animal and d["conf"] >= threshold
    }


def test_megadetector_crops_exactly_the_detections_above_threshold(shared_data: Path, tmp_path: Path) -> None:
    md_path = shared_data / "lila_md_test" / "md_v5a_output.json"
    md = json.loads(md_path.read_text())
    images_dir = shared_data / "lila_md_test" / "images"
    report = run(md_path, tmp_path / "crops", images_dir, threads=2)
    expected = expected_detections(md, 0.2)
    assert len(expected) == 30  # the data's README: 30 detections >= 0.2 (the one vehicle is below)
    assert crop_files(tmp_path / "crops") == expected
    assert (report.new, report.input.detections_other_category, report.input.detections_below_threshold) == (30, 1, 48)
    manifest = read_manifest(tmp_path / "crops").set_index("crop_path")
    assert (manifest["label"] == "").all() and (manifest["dataset"] == "md_v5a_output").all()
    assert (manifest["confidence"].astype(float) >= 0.2).all()
    assert manifest["location"].str.startswith("nolocation_img_").all()
    # Boxes in the manifest are absolute pixels of the decoded image.
    row = manifest.loc["wcs_camera_traps_animals_0090_1439.jpg___crop_det08.jpg"]
    with Image.open(images_dir / row["file_name"]) as image:
        width = image.width
    assert float(row["bbox_w"]) == pytest.approx(0.3942 * width, abs=0.01)
    # A higher threshold keeps a subset with the same ids.
    high = run(md_path, tmp_path / "high", images_dir, threshold=0.8)
    assert crop_files(tmp_path / "high") == expected_detections(md, 0.8) < expected
    assert high.new == len(expected_detections(md, 0.8))


def test_megadetector_failures_and_unknown_category(shared_data: Path, tmp_path: Path) -> None:
    md = json.loads((shared_data / "lila_md_test" / "md_v5a_output.json").read_text())
    md["images"][0] = {"file": md["images"][0]["file"], "failure": "Failure image access"}
    md_path = write_json(tmp_path / "md.json", md)
    report = run(md_path, tmp_path / "crops", shared_data / "lila_md_test" / "images")
    assert [(s.kind, s.reason) for s in report.input.skipped_images] == [("detector failure", "Failure image access")]
    with pytest.raises(UserError, match="animl"):
        run(md_path, tmp_path / "crops2", shared_data / "lila_md_test" / "images", detector_categories=("animl",))


def test_megadetector_joined_with_image_level_labels(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "lila_md_test"
    md = json.loads((root / "md_v5a_output.json").read_text())
    cct = json.loads((root / "cct_images_only.json").read_text())
    with_crops = sorted({path.split("___crop")[0] for path in expected_detections(md, 0.2)})
    by_file = {im["file_name"].removeprefix("images/"): im for im in cct["images"]}
    ambiguous, unlabelled, unmatched = with_crops[0], with_crops[1], with_crops[2]
    datasets = sorted({im["dataset"] for im in cct["images"]})
    categories = [{"id": i, "name": name} for i, name in enumerate(datasets)] + [{"id": 99, "name": "other"}]
    cat_id = {c["name"]: c["id"] for c in categories}
    annotations = [
        {"id": f"a{i}", "image_id": im["id"], "category_id": cat_id[im["dataset"]]}
        for i, im in enumerate(cct["images"])
        if im["file_name"] != f"images/{unlabelled}"
    ]
    annotations.append({"id": "extra", "image_id": by_file[ambiguous]["id"], "category_id": 99})
    images = [im for im in cct["images"] if im["file_name"] != f"images/{unmatched}"]
    annotations = [a for a in annotations if a["image_id"] != by_file[unmatched]["id"]]
    images[0] = {**images[0], "location": "001"}
    labels_path = write_json(tmp_path / "labels.json", {**cct, "images": images, "annotations": annotations, "categories": categories})

    report = run(root / "md_v5a_output.json", tmp_path / "crops", root / "images", labels_cct=labels_path)
    kinds = {s.file: s.kind for s in report.input.skipped_images}
    assert kinds == {ambiguous: "ambiguous label", unlabelled: "no label", unmatched: "not in the labels CCT"}
    manifest = read_manifest(tmp_path / "crops")
    expected = {p for p in expected_detections(md, 0.2) if p.split("___crop")[0] not in kinds}
    assert set(manifest["crop_path"]) == expected == crop_files(tmp_path / "crops")
    for row in manifest.itertuples():
        image = by_file[row.file_name]
        assert row.label == image["dataset"] == row.dataset
        assert row.image_id == image["id"]
    if images[0]["file_name"].removeprefix("images/") in set(manifest["file_name"]):
        assert "001" in set(manifest["location"])


# ---------------------------------------------------------------- real data: broken and unusual files


ELEPHANT_BOXES = [[700.0, 600.0, 500.0, 400.0], [100.0, 900.0, 300.0, 200.0]]


def speciesnet_cct(shared_data: Path, tmp_path: Path, files: list[str], boxes: list[list[float]] = ELEPHANT_BOXES) -> Path:
    """A CCT with the same boxes on each of the speciesnet elephant files."""
    images, annotations = [], []
    for i, name in enumerate(files):
        images.append({"id": name, "file_name": name, "width": 2048, "height": 1536, "location": "serengeti"})
        for j, box in enumerate(boxes):
            annotations.append({"id": f"{i}_{j}", "image_id": name, "category_id": 1, "bbox": box})
    cct = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "african_elephant"}]}
    return write_json(tmp_path / "speciesnet.json", cct)


def test_broken_files_truncated_skipped_cmyk_grayscale_exif_handled(shared_data: Path, tmp_path: Path) -> None:
    files = [
        "african_elephants.jpg", "african_elephants_bw.jpg", "african_elephants_cmyk.jpg",
        "african_elephants_truncated_file.jpg", "african_elephants_with_exif_orientation.jpg", "missing.jpg",
    ]
    images_dir = shared_data / "speciesnet_test_data"
    crops_dir = tmp_path / "crops"
    report = run(speciesnet_cct(shared_data, tmp_path, files), crops_dir, images_dir, threads=3, logdir=tmp_path / "logs")
    reasons = {f.file: f.reason for f in report.failures}
    assert set(reasons) == {"african_elephants_truncated_file.jpg", "missing.jpg"}
    assert "truncated" in reasons["african_elephants_truncated_file.jpg"]
    assert "not found" in reasons["missing.jpg"]
    assert report.new == 8 and report.failed_crops == 4
    log = json.loads(next((tmp_path / "logs").glob("crop_detections_*.json")).read_text())
    assert {f["file"]: f["reason"] for f in log["failures"]} == reasons
    assert log["counts"]["failed_images"] == 2 and log["arguments"]["threads"] == 3

    for j in range(len(ELEPHANT_BOXES)):
        original = decoded(crops_dir / crop_file_name(files[0], f"0_{j}"))
        for i, name in [(2, "cmyk"), (4, "exif")]:
            crop_path = crops_dir / crop_file_name(files[i], f"{i}_{j}")
            with Image.open(crop_path) as crop:
                assert crop.mode == "RGB", name
            assert np.abs(decoded(crop_path) - original).mean() < 4.0, name
        with Image.open(crops_dir / crop_file_name(files[1], f"1_{j}")) as gray:
            assert gray.mode == "RGB"
            gray_pixels = np.asarray(gray).astype(int)
        original_gray = np.asarray(Image.fromarray(original.astype(np.uint8)).convert("L")).astype(int)
        assert np.abs(gray_pixels[..., 0] - original_gray).mean() < 4.0


def test_exif_orientation_crop_comes_from_the_rotated_image(shared_data: Path, tmp_path: Path) -> None:
    files = ["african_elephants.jpg", "african_elephants_with_exif_orientation.jpg"]
    run(speciesnet_cct(shared_data, tmp_path, files), tmp_path / "crops", shared_data / "speciesnet_test_data")
    original = decoded(tmp_path / "crops" / crop_file_name(files[0], "0_0"))
    rotated = decoded(tmp_path / "crops" / crop_file_name(files[1], "1_0"))
    with Image.open(shared_data / "speciesnet_test_data" / files[1]) as raw:
        raw_crop = np.asarray(raw.convert("RGB").crop((700, 600, 1200, 1100))).astype(int)
    assert np.abs(rotated - original).mean() < 4.0
    assert np.abs(raw_crop - original).mean() > 20.0, "the raw (unrotated) pixels would be a different crop"


@pytest.mark.parametrize("mode", ["L", "LA", "I;16", "P", "RGBA", "CMYK"])
def test_unusual_modes_give_rgb_crops(tmp_path: Path, mode: str) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    gradient = np.tile(np.arange(0, 200, dtype=np.uint8), (120, 1))
    base = Image.fromarray(gradient).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray(gradient.astype(np.uint16) * 256)
    elif mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    else:
        image = base.convert(mode)
    name = "x.tif" if mode == "CMYK" else "x.png"
    image.save(images_dir / name)
    cct = {
        "images": [{"id": 1, "file_name": name, "width": 200, "height": 120, "location": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 20, 60, 40]}],
        "categories": [{"id": 1, "name": "x"}],
    }
    report = run(write_json(tmp_path / "cct.json", cct), tmp_path / "crops", images_dir, quality=100)
    assert report.new == 1
    crop = decoded(tmp_path / "crops" / crop_file_name(name, "1"))
    assert crop.shape == (60, 60, 3)
    assert abs(crop[30, 10, 0] - 60) <= 4 and abs(crop[30, 50, 0] - 100) <= 4, "gray levels kept"


# ---------------------------------------------------------------- faults and re-runs


def test_leftover_temp_file_is_never_a_crop_and_invalid_crop_is_redone(shared_data: Path, tmp_path: Path) -> None:
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=3, n_unlocated=0)
    images = {im["id"]: im for im in cct["images"]}
    names = [crop_file_name(images[a["image_id"]]["file_name"], a["id"]) for a in boxed_annotations(cct)]
    crops_dir = tmp_path / "crops"
    good = crops_dir / names[1]
    run(cct_path, crops_dir, shared_data / "mct" / "images")
    # A killed writer leaves a temp file (never the final name); a bad disk leaves a truncated crop.
    (crops_dir / names[0]).unlink()
    temp = (crops_dir / names[0]).with_name(f".{Path(names[0]).name}.x1y2.tmp")
    temp.write_bytes(good.read_bytes()[:500])
    good.write_bytes(good.read_bytes()[:300])

    report = run(cct_path, crops_dir, shared_data / "mct" / "images")
    assert (report.new, report.skipped, report.redone) == (1, 2, 0), "the truncated crop is trusted without the check"
    assert temp.name not in "".join(read_manifest(crops_dir)["crop_path"])
    report = run(cct_path, crops_dir, shared_data / "mct" / "images", check_crops_valid=True)
    assert (report.new, report.skipped, report.redone) == (0, 2, 1)
    for name in names:
        decoded(crops_dir / name)  # every crop decodes


def test_killed_run_leaves_only_valid_crops(shared_data: Path, tmp_path: Path) -> None:
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=300, n_unlocated=0)
    crops_dir = tmp_path / "crops"
    args = [sys.executable, str(REPO_ROOT / "utils" / "crop_detections.py"), str(cct_path), str(crops_dir),
            "--images-dir", str(shared_data / "mct" / "images")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline and len(list(crops_dir.rglob("*.jpg"))) < 20:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    existing = list(crops_dir.rglob("*.jpg"))
    assert process.returncode == -signal.SIGKILL and 0 < len(existing) < len(boxed_annotations(cct))
    report = run(cct_path, crops_dir, shared_data / "mct" / "images", check_crops_valid=True)
    assert report.redone == 0, "no half-written crop under a final name"
    assert report.new + report.skipped == len(boxed_annotations(cct)) and report.skipped >= len(existing) - 1
    assert len(read_manifest(crops_dir)) == len(boxed_annotations(cct))


def test_crop_not_vouched_for_by_the_manifest_is_decoded_before_it_is_trusted(shared_data: Path, tmp_path: Path) -> None:
    # Crops are synced once, just before the manifest lists them. A power cut before that can
    # leave an empty crop under its final name, which no manifest lists: a re-run decodes it
    # and redoes it, while a listed crop is trusted by its existence.
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=3, n_unlocated=0)
    crops_dir = tmp_path / "crops"
    run(cct_path, crops_dir, shared_data / "mct" / "images")
    manifest = read_manifest(crops_dir)
    lost, listed_empty = manifest["crop_path"][0], manifest["crop_path"][1]
    (crops_dir / lost).write_bytes(b"")
    (crops_dir / listed_empty).write_bytes(b"")
    manifest[manifest["crop_path"] != lost].to_csv(crops_dir / "crops_manifest.csv", index=False)
    report = run(cct_path, crops_dir, shared_data / "mct" / "images")
    assert (report.new, report.skipped, report.redone) == (0, 2, 1)
    decoded(crops_dir / lost)
    assert (crops_dir / listed_empty).stat().st_size == 0, "listed: trusted without --check-crops-valid"


def test_crops_are_synced_once_before_the_manifest_lists_them(shared_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, Any]] = []

    def note(event: tuple[str, Any]) -> bool:
        events.append(event)
        return False

    sync, manifest, save = crop_run_module.sync_files, crop_run_module.write_manifest, crop_image_module.save_jpeg
    monkeypatch.setattr(crop_run_module, "sync_files", lambda paths: note(("sync", sorted(paths))) or sync([]))
    monkeypatch.setattr(crop_run_module, "write_manifest", lambda *a: note(("manifest", None)) or manifest(*a))
    monkeypatch.setattr(crop_image_module, "save_jpeg", lambda image, path, quality, durable: note(
        ("save", (path.name, durable))) or save(image, path, quality, durable))
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=3, n_unlocated=0)
    crops_dir = tmp_path / "crops"
    run(cct_path, crops_dir, shared_data / "mct" / "images")
    names = sorted(crops_dir / p for p in read_manifest(crops_dir)["crop_path"])
    assert [kind for kind, _ in events] == ["save"] * 3 + ["sync", "manifest"]
    assert events[3][1] == names and not any(durable for kind, (_, durable) in events[:3])
    events.clear()
    names[0].unlink()  # rewritten under a name the manifest vouches for: fsynced at once
    run(cct_path, crops_dir, shared_data / "mct" / "images")
    assert events[0] == ("save", (names[0].name, True)) and [kind for kind, _ in events] == ["save", "sync", "manifest"]
    events.clear()
    run(cct_path, crops_dir, shared_data / "mct" / "images")
    assert events == [("manifest", None)], "nothing written, nothing to sync"


def test_fast_decoder_writes_the_same_crops_as_pillow(shared_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if images_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (optional: Pillow decodes the same pixels)")
    cct_path, _ = mct_subset(shared_data, tmp_path, n_located=60, n_unlocated=10)
    md_path = shared_data / "lila_md_test" / "md_v5a_output.json"
    for name in ("fast", "pillow"):
        if name == "pillow":
            monkeypatch.setattr(images_module, "simplejpeg", None)  # the decoder's fast path off
        run(cct_path, tmp_path / name / "mct", shared_data / "mct" / "images", threads=2)
        run(md_path, tmp_path / name / "md", shared_data / "lila_md_test" / "images", threshold=0.2)
    for folder in ("mct", "md"):
        fast, pillow = tmp_path / "fast" / folder, tmp_path / "pillow" / folder
        assert crop_files(fast) == crop_files(pillow) and crop_files(fast)
        for path in crop_files(fast):
            assert (fast / path).read_bytes() == (pillow / path).read_bytes(), path


def test_manifest_round_trip_keeps_text(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    (images_dir / "cam 1").mkdir(parents=True)
    Image.new("RGB", (64, 48), (90, 120, 30)).save(images_dir / "cam 1" / "0001.jpg")
    cct = {
        "images": [{"id": 7, "file_name": "cam 1/0001.jpg", "width": 64, "height": 48, "location": "001",
                    "seq_id": "0042", "datetime": "2020-01-02 03:04:05", "dataset": "007"}],
        "annotations": [{"id": 3, "image_id": 7, "category_id": 1, "bbox": [1.25, 2.5, 20, 10]}],
        "categories": [{"id": 1, "name": "NaN"}],
    }
    run(write_json(tmp_path / "cct.json", cct), tmp_path / "crops", images_dir, crop_strategy="pad")
    manifest = read_manifest(tmp_path / "crops")
    assert manifest.to_dict("records") == [{
        "crop_path": "cam 1/0001.jpg___crop_3.jpg", "image_id": "7", "annotation_id": "3", "file_name": "cam 1/0001.jpg",
        "bbox_x": "1.25", "bbox_y": "2.5", "bbox_w": "20", "bbox_h": "10", "dataset": "007", "location": "001",
        "seq_id": "0042", "datetime": "2020-01-02 03:04:05", "label": "NaN", "confidence": "", "crop_strategy": "pad",
    }]
    assert (tmp_path / "crops" / manifest["crop_path"][0]).is_file()


# ---------------------------------------------------------------- --max-size and draft decoding


def test_max_size_bounds_crops_and_drafts_only_when_lossless(shared_data: Path, tmp_path: Path) -> None:
    images_dir = shared_data / "speciesnet_test_data"
    big_only = speciesnet_cct(shared_data, tmp_path, ["african_elephants.jpg"], [[700.0, 600.0, 600.0, 500.0]])
    drafted = run(big_only, tmp_path / "drafted", images_dir, max_size=64, quality=95)
    assert drafted.drafted_images == 1
    assert run(big_only, tmp_path / "full", images_dir, quality=95).drafted_images == 0
    assert run(big_only, tmp_path / "by4", images_dir, max_size=76, quality=95).drafted_images == 1  # 1/4: 600 / 8 < 76
    name = crop_file_name("african_elephants.jpg", "0_0")
    small = decoded(tmp_path / "drafted" / name)
    assert small.shape == (64, 64, 3)
    reference = Image.open(tmp_path / "full" / name).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.abs(small - np.asarray(reference).astype(int)).mean() < 6.0, "drafted decode loses nothing visible"
    # One small crop in the image: drafting would lose resolution, so it decodes in full.
    mixed = speciesnet_cct(shared_data, tmp_path, ["african_elephants.jpg"], [[700.0, 600.0, 600.0, 500.0], [100.0, 900.0, 90.0, 80.0]])
    report = run(mixed, tmp_path / "mixed", images_dir, max_size=64)
    assert report.drafted_images == 0 and report.new == 2
    for path in (tmp_path / "mixed").rglob("*.jpg"):
        with Image.open(path) as crop:
            assert max(crop.size) == 64


def test_max_size_on_mct_never_exceeds_n(shared_data: Path, tmp_path: Path) -> None:
    cct_path, _ = mct_subset(shared_data, tmp_path, n_located=20, n_unlocated=0)
    run(cct_path, tmp_path / "crops", shared_data / "mct" / "images", max_size=96)
    sizes = [Image.open(p).size for p in (tmp_path / "crops").rglob("*.jpg")]
    assert len(sizes) == 20 and all(w == h <= 96 for w, h in sizes)
    assert any(w < 96 for w, _ in sizes) or all(w == 96 for w, _ in sizes)


# ---------------------------------------------------------------- images from a URL


@pytest.fixture
def image_server(shared_data: Path) -> Iterator[str]:
    """A local HTTP server for the MCT images on 127.0.0.1."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(shared_data / "mct" / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("save", [False, True])
def test_images_fetched_from_base_url(shared_data: Path, tmp_path: Path, image_server: str, save: bool) -> None:
    cct_path, cct = mct_subset(shared_data, tmp_path, n_located=4, n_unlocated=0)
    cct["images"].append({**cct["images"][0], "id": "gone", "file_name": "agouti/not_there.JPG"})
    cct["annotations"].append({**cct["annotations"][0], "id": "gone", "image_id": "gone"})
    write_json(cct_path, cct)
    images_dir = tmp_path / "images"
    report = run(cct_path, tmp_path / "crops", images_dir, images_base_url=image_server, save_full_images=save, threads=2)
    assert report.new == 4 and [f.file for f in report.failures] == ["agouti/not_there.JPG"]
    assert "404" in report.failures[0].reason
    saved = sorted(p.relative_to(images_dir).as_posix() for p in images_dir.rglob("*.JPG")) if images_dir.exists() else []
    boxed_ids = {a["image_id"] for a in boxed_annotations(cct)} - {"gone"}
    wanted = sorted({im["file_name"] for im in cct["images"] if im["id"] in boxed_ids})
    assert saved == (wanted if save else [])
    if save:
        assert (images_dir / wanted[0]).read_bytes() == (shared_data / "mct" / "images" / wanted[0]).read_bytes()


# ---------------------------------------------------------------- the entry point


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Non-zero exit, a short error on stderr, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_entry_point_rejects_bad_input_with_one_line(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    other = write_json(tmp_path / "other.json", {"rows": [1, 2]})
    assert_one_line_error(run_entry_point("utils/crop_detections.py", other, tmp_path / "c", "--images-dir", images),
                          "other.json", "neither a COCO Camera Traps file")
    malformed = tmp_path / "bad.json"
    malformed.write_text('{"images": [', encoding="utf-8")
    assert_one_line_error(run_entry_point("utils/crop_detections.py", malformed, tmp_path / "c", "--images-dir", images),
                          "bad.json", "not valid JSON")
    md = write_json(tmp_path / "md.json", {"detection_categories": {"1": "animal"},
                                            "images": [{"file": "a.jpg",
                                                        "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, -0.2, 0.3]}]}]})
    assert_one_line_error(run_entry_point("utils/crop_detections.py", md, tmp_path / "c", "--images-dir", images),
                          "images[0].detections[0].bbox")
    typo = run_entry_point("utils/crop_detections.py", md, tmp_path / "c", "--images-dir", images, "--thread", "4")
    assert_one_line_error(typo, "--thread")
    assert "--threads" in typo.stderr


def test_entry_point_crops_and_reports(shared_data: Path, tmp_path: Path) -> None:
    cct_path, _ = mct_subset(shared_data, tmp_path, n_located=5, n_unlocated=0)
    result = run_entry_point("utils/crop_detections.py", cct_path, tmp_path / "crops", "--images-dir",
                             shared_data / "mct" / "images", "--crop-strategy", "pad", "--threads", "2",
                             "--logdir", tmp_path / "logs")
    assert result.returncode == 0, result.stderr
    assert "5 new" in result.stdout and "crops_manifest.csv" in result.stdout
    assert len(list((tmp_path / "logs").glob("crop_detections_*.json"))) == 1
