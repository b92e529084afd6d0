"""Region decoding (classification.data.jpeg_region): crops cut from only the decoded rectangle
around an image's boxes are byte-identical to crops cut from the whole decoded image, and
every JPEG it cannot or must not take goes to the full decode."""

from __future__ import annotations

import importlib.util
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

import classification.data.images as images_module
from classification.data import jpeg_region
from classification.data.crop_geometry import in_decoded_region, pad_geometry, render_crop
from classification.data.crop_options import CropOptions
from classification.data.crop_run import CropReport, crop_detections
from classification.data.images import decode_pixels, decode_region_pixels

needs_library = pytest.mark.skipif(not jpeg_region.available(), reason="no libturbojpeg 3 here: the full decode is used")


def test_the_pinned_wheel_is_found_where_it_is_installed() -> None:
    if importlib.util.find_spec("turbojpeg") is None:
        pytest.skip("the turbojpeg wheel is not installed on this platform")
    assert jpeg_region.available(), f"libturbojpeg not loaded from {jpeg_region.library_path()}"


def smooth_picture(size: tuple[int, int], seed: int) -> np.ndarray:
    """An (H, W, 3) picture with detail at every scale (noise on a gradient), so chroma and block edges matter."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 6 + 2, size[0] // 6 + 2, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(size: tuple[int, int], subsampling: str, seed: int = 0, progressive: bool = False) -> bytes:
    """A JPEG of ``smooth_picture``: simplejpeg for any chroma subsampling, Pillow for a progressive one."""
    pixels = smooth_picture(size, seed)
    if progressive:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=92, progressive=True)
        return buffer.getvalue()
    return simplejpeg.encode_jpeg(pixels, quality=92, colorspace="RGB", colorsubsampling=subsampling)


def boxes_over(size: tuple[int, int], count: int, seed: int) -> list[list[float]]:
    """Boxes of every kind: touching each edge, tiny, and at random places and sizes."""
    width, height = size
    rng = np.random.default_rng(seed)
    boxes = [[0.0, 0.0, 17.0, 9.0], [width - 13.0, height - 21.0, 13.0, 21.0], [width / 2, 3.0, 1.4, 1.4]]
    for _ in range(count):
        w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
        boxes.append([float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), float(w), float(h)])
    return boxes


def crop_folder(images_dir: Path, files: dict[str, tuple[int, int]], boxes: dict[str, list[list[float]]],
                crops_dir: Path, strategy: str, max_size: int | None = None) -> CropReport:
    """``crop_detections`` on a CCT file listing ``files`` with their ``boxes``."""
    images = [{"id": i, "file_name": name, "width": w, "height": h, "location": "a"} for i, (name, (w, h)) in enumerate(files.items())]
    annotations = [{"id": f"{i}-{j}", "image_id": i, "category_id": 1, "bbox": box}
                   for i, name in enumerate(files) for j, box in enumerate(boxes[name])]
    cct = images_dir.parent / "cct.json"
    cct.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "deer"}]}), encoding="utf-8")
    options = CropOptions(crop_strategy=strategy, max_size=max_size, progress=False)  # type: ignore[arg-type]
    return crop_detections(cct, crops_dir, images_dir, options)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def without_region_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_module, "decode_region", lambda *arguments: None)


@needs_library
@pytest.mark.parametrize(("strategy", "max_size"), [("square", None), ("pad", None), ("square", 40), ("pad", 40)])
def test_crops_from_the_region_are_byte_identical_to_crops_from_the_whole_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, max_size: int | None) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    files: dict[str, tuple[int, int]] = {}
    kinds = [("444", False), ("422", False), ("420", False), ("440", False), ("411", False), ("420", True)]
    for index, (subsampling, progressive) in enumerate(kinds):
        for size in [(203, 157), (640, 480), (97, 311)]:
            name = f"{subsampling}_{'p' if progressive else 'b'}_{size[0]}x{size[1]}.jpg"
            (images_dir / name).write_bytes(jpeg_bytes(size, subsampling, seed=index, progressive=progressive))
            files[name] = size
    boxes = {name: boxes_over(size, 5, seed=i) for i, (name, size) in enumerate(files.items())}

    region = crop_folder(images_dir, files, boxes, tmp_path / "region", strategy, max_size)
    without_region_decoding(monkeypatch)
    full = crop_folder(images_dir, files, boxes, tmp_path / "full", strategy, max_size)

    assert region.failures == [] and region.new == full.new == sum(len(b) for b in boxes.values())
    assert folder_bytes(tmp_path / "region") == folder_bytes(tmp_path / "full")


@needs_library
@pytest.mark.parametrize(("dataset", "max_size"), [("mct", None), ("mct", 224), ("lila_md_test", None), ("lila_md_test", 224)])
def test_real_camera_trap_crops_are_byte_identical(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   dataset: str, max_size: int | None) -> None:
    if dataset == "mct":  # the first 150 images of MCT (640 x 640) and every box on them
        cct = json.loads((shared_data / "mct" / "mct_cct.json").read_text(encoding="utf-8"))
        kept = {image["id"] for image in cct["images"][:150]}
        cct["images"] = [image for image in cct["images"] if image["id"] in kept]
        cct["annotations"] = [a for a in cct["annotations"] if a["image_id"] in kept]
        source = tmp_path / "mct_subset.json"
        source.write_text(json.dumps(cct), encoding="utf-8")
        images_dir, options = shared_data / "mct" / "images", CropOptions(progress=False, max_size=max_size)
    else:  # MegaDetector boxes on 1280 x 1024 to 5152 x 3968 images, some with bytes after their end marker
        source, images_dir = shared_data / "lila_md_test" / "md_v5a_output.json", shared_data / "lila_md_test" / "images"
        options = CropOptions(progress=False, threshold=0.2, max_size=max_size)
    region = crop_detections(source, tmp_path / "region", images_dir, options)
    without_region_decoding(monkeypatch)
    full = crop_detections(source, tmp_path / "full", images_dir, options)
    assert region.new == full.new > 20 and region.failures == full.failures
    assert folder_bytes(tmp_path / "region") == folder_bytes(tmp_path / "full")


def test_a_downscaled_crop_does_not_depend_on_where_the_decoded_pixels_start() -> None:
    # Pillow's resize picks its pass order from the size of the whole input, which changes its
    # rounding: a crop resampled from the full image and from a rectangle around it differed by
    # up to 24 grey levels before crops were resampled from their own window only.
    picture = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    geometry = pad_geometry((518.12, 275.42, 121.88, 323.33), 640, 640)  # a crop at the right edge, 324 px -> 224
    from_full = render_crop(picture, geometry, 224, (1.0, 1.0))
    for origin in [(496, 253), (512, 256), (349, 0), (0, 253)]:
        part = picture[origin[1]:, origin[0]:]
        assert np.array_equal(np.asarray(render_crop(part, in_decoded_region(geometry, origin), 224, (1.0, 1.0))), np.asarray(from_full))


def open_jpeg(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@needs_library
def test_only_the_rectangle_around_the_region_is_decoded() -> None:
    data = jpeg_bytes((640, 480), "420")
    with open_jpeg(data) as image:
        pixels, origin = decode_region_pixels(image, (100, 200, 150, 260))
        whole = decode_pixels(open_jpeg(data), as_array=True)
    assert isinstance(pixels, np.ndarray)
    assert origin == (80, 184) and pixels.shape == (92, 86, 3)  # one 16-pixel iMCU around it, the left edge on a whole one
    assert np.array_equal(pixels[16:76, 20:70], np.asarray(whole)[200:260, 100:150])  # the region, exactly


@needs_library
def test_bytes_after_the_end_marker_do_not_stop_region_decoding() -> None:
    data = jpeg_bytes((320, 240), "420") + b"camera trailer \xff\xd8 0932353509"
    assert jpeg_region.decode_region(data, (10, 10, 50, 50), (320, 240)) is not None


@needs_library
def test_a_header_read_otherwise_than_pillow_read_it_is_left_to_the_full_decode() -> None:
    data = jpeg_bytes((320, 240), "420")
    assert jpeg_region.decode_region(data, (10, 10, 50, 50), (320, 240)) is not None
    assert jpeg_region.decode_region(data, (10, 10, 50, 50), (640, 480)) is None  # the region is in the caller's pixels


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_picture((120, 90), 3)).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(smooth_picture((120, 90), 4)).save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "exif-rotated", "png"])
def test_what_region_decoding_does_not_take_is_decoded_whole(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    picture = smooth_picture((120, 96), 5)
    if kind == "grayscale":
        data = simplejpeg.encode_jpeg(picture[:, :, :1].copy(), colorspace="GRAY", colorsubsampling="Gray")
    elif kind == "cmyk":
        data = cmyk_jpeg()
    elif kind == "exif-rotated":
        data = rotated_jpeg()
    else:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        data = buffer.getvalue()
    if kind == "grayscale":  # libturbojpeg itself declines it
        assert jpeg_region.decode_region(data, (0, 0, 10, 10), (120, 96)) is None
    else:  # never handed to it
        monkeypatch.setattr(images_module, "decode_region", lambda *arguments: pytest.fail("region decoding was tried"))
    with open_jpeg(data) as image:
        pixels, origin = decode_region_pixels(image, (0, 0, 10, 10))
        whole = decode_pixels(open_jpeg(data), as_array=True)
    assert origin == (0, 0) and np.array_equal(np.asarray(pixels), np.asarray(whole)) and np.asarray(pixels).shape[2] == 3


def test_a_truncated_image_is_reported_whether_or_not_its_boxes_are_in_the_part_that_arrived(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    cut = jpeg_bytes((640, 480), "420")[:30000]
    (images_dir / "cut.jpg").write_bytes(cut)
    assert jpeg_region.decode_region(cut, (0, 0, 40, 40), (640, 480)) is None  # the region alone would decode without a word
    report = crop_folder(images_dir, {"cut.jpg": (640, 480)}, {"cut.jpg": [[4.0, 4.0, 30.0, 20.0]]}, tmp_path / "crops", "square")
    assert report.new == 0 and [f.file for f in report.failures] == ["cut.jpg"]
    assert "truncated" in report.failures[0].reason


@needs_library
def test_a_corrupt_scan_inside_the_region_falls_back_to_the_full_decode() -> None:
    data = bytearray(jpeg_bytes((320, 240), "420"))
    scan = data.rfind(b"\xff\xda") + 20
    data[scan + 200: scan + 260] = b"\xff\xd3" * 30  # stray restart markers in the coded data: a libjpeg warning
    assert jpeg_region.decode_region(bytes(data), (0, 0, 320, 240), (320, 240)) is None


@needs_library
def test_threads_each_get_their_own_decompressor() -> None:
    samples = [jpeg_bytes((256, 192), "420", seed=seed) for seed in range(8)]
    region = (30, 40, 130, 150)
    expected = [jpeg_region.decode_region(data, region, (256, 192)) for data in samples]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda data: jpeg_region.decode_region(data, region, (256, 192)), samples * 4))
    for got, want in zip(results, expected * 4):
        assert got is not None and want is not None and got[1] == want[1] and np.array_equal(got[0], want[0])


def test_widened_region_keeps_the_left_edge_on_a_whole_imcu_and_stays_in_the_image() -> None:
    assert jpeg_region.widened_region((100, 200, 150, 260), (640, 480), (16, 16)) == (80, 184, 166, 276)
    assert jpeg_region.widened_region((5, 3, 635, 478), (640, 480), (16, 16)) == (0, 0, 640, 480)
    assert jpeg_region.widened_region((64, 64, 65, 65), (640, 480), (32, 8)) == (32, 56, 97, 73)


def test_the_library_can_be_switched_off_or_pointed_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(jpeg_region.LIBRARY_ENV, "none")
    assert jpeg_region.library_path() is None and jpeg_region._library.__wrapped__() is None
    not_a_library = tmp_path / "libturbojpeg.so"
    not_a_library.write_text("not a shared library", encoding="utf-8")
    monkeypatch.setenv(jpeg_region.LIBRARY_ENV, str(not_a_library))
    assert jpeg_region.library_path() == str(not_a_library)
    assert jpeg_region._library.__wrapped__() is None  # refused with a debug line, not an exception
