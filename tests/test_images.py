"""The one image decoder (classification.data.images): cropping, training, prediction and the
thumbnails see the same pixels and report an unreadable image with the same line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import classification.data.images as images_module
from classification.data.crop_geometry import crop_geometry, extract_crop
from classification.data.crop_image import Failure, encode_crop
from classification.data.crop_manifest import crop_file_name
from classification.data.crop_options import CropOptions
from classification.data.crop_run import CropReport, crop_detections
from classification.data.detections import Box
from classification.data.images import ImageLoadError, decode_failure, decode_pixels, read_rgb, read_thumbnail
from classification.training.data import load_image

EXIF_ORIENTATION = 0x0112


def write_photo(path: Path, size: tuple[int, int], orientation: int = 1, seed: int = 0) -> Path:
    """A JPEG of a smooth random picture (so each orientation shows), stored ``size`` and tagged ``orientation``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = np.random.default_rng(seed).integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    picture.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


def crop_one(images_dir: Path, name: str, displayed: tuple[int, int], box: Box, crops_dir: Path) -> CropReport:
    """Crop one box of one image with ``crop_detections`` (square, quality 95); the report."""
    cct = {
        "images": [{"id": 1, "file_name": name, "width": displayed[0], "height": displayed[1], "location": "a"}],
        "annotations": [{"id": "x", "image_id": 1, "category_id": 1, "bbox": box}],
        "categories": [{"id": 1, "name": "deer"}],
    }
    cct_path = images_dir.parent / "cct.json"
    cct_path.write_text(json.dumps(cct), encoding="utf-8")
    return crop_detections(cct_path, crops_dir, images_dir, CropOptions(crop_strategy="square", quality=95, progress=False))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_an_exif_rotated_image_gives_the_same_pixels_through_cropping_and_training(tmp_path: Path, orientation: int) -> None:
    path = write_photo(tmp_path / "images" / "cam.jpg", (64, 48), orientation)
    upright = load_image(path)  # training's and prediction's decoder
    displayed = (48, 64) if orientation in (6, 8) else (64, 48)
    assert upright.size == displayed and upright.mode == "RGB"
    with Image.open(path) as image:  # cropping's decoder, simplejpeg's array allowed
        assert np.array_equal(np.asarray(decode_pixels(image, as_array=True)), np.asarray(upright))
    box = (5.0, 7.0, 30.0, 26.0)
    report = crop_one(tmp_path / "images", "cam.jpg", displayed, box, tmp_path / "crops")
    assert report.failures == [] and report.new == 1
    expected = encode_crop(extract_crop(np.asarray(upright), crop_geometry(box, *displayed, "square")), 95)
    assert (tmp_path / "crops" / crop_file_name("cam.jpg", "x")).read_bytes() == expected
    assert np.array_equal(np.asarray(read_thumbnail(path)), np.asarray(upright))  # the grids show it upright too


def test_the_fast_path_gives_pillows_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if images_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (optional: Pillow decodes the same pixels)")
    path = write_photo(tmp_path / "plain.jpg", (96, 72))
    with Image.open(path) as image:
        fast = decode_pixels(image, as_array=True)
    assert isinstance(fast, np.ndarray)
    monkeypatch.setattr(images_module, "simplejpeg", None)
    with Image.open(path) as image:
        slow = decode_pixels(image, as_array=True)
    assert isinstance(slow, Image.Image) and np.array_equal(fast, np.asarray(slow))


def test_draft_rules_of_training_and_cropping(tmp_path: Path) -> None:
    path = write_photo(tmp_path / "big.jpg", (640, 480))
    assert read_rgb(path, 64).size == (160, 120)  # short side >= 2 x 64: the smallest scale still >= 64
    assert read_rgb(path, 300).size == (640, 480)
    with Image.open(path) as image:  # cropping asks for an exact factor
        assert decode_pixels(image, (640 // 2, 480 // 2), as_array=True).size == (320, 240)


def test_a_truncated_image_is_the_same_one_line_error_everywhere(tmp_path: Path) -> None:
    whole = write_photo(tmp_path / "whole.jpg", (256, 192)).read_bytes()
    path = tmp_path / "images" / "cut.jpg"
    path.parent.mkdir()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageLoadError) as training:
        load_image(path)
    message = str(training.value)
    assert message.startswith(f"{path}: cannot decode: ") and "truncated" in message and "\n" not in message
    with pytest.raises(ImageLoadError) as thumbnail:
        read_thumbnail(path, 256)
    assert str(thumbnail.value) == message
    report = crop_one(tmp_path / "images", "cut.jpg", (256, 192), (10.0, 10.0, 50.0, 40.0), tmp_path / "crops")
    assert report.failures == [Failure("cut.jpg", message.removeprefix(f"{path}: "))]


def test_decode_failure_is_one_line_and_names_a_missing_file() -> None:
    assert decode_failure(OSError("broken\n  data")) == "cannot decode: broken data"
    assert decode_failure(FileNotFoundError(2, "No such file or directory")) == "file not found"
