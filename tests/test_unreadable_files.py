"""Files an entry point reads back that are not what it wrote: not UTF-8, under a file instead of a
folder, or with rows of the wrong shape. One line ``error: ...`` and exit code 2, never a traceback
(each case was a UnicodeDecodeError, NotADirectoryError or TypeError page before)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import ImageFile

from classification.active_learning.simulation import CURVE_COLUMNS, read_curve
from classification.config import load_config
from classification.data.images import ImageLoadError, is_valid_image, read_rgb
from classification.data.lila.md_results import json_stream
from classification.errors import DataError
from classification.io import CONFIG_READ_LIMIT, read_bounded_text, read_json, read_json_object, read_string_csv, write_csv_atomic
from classification.training.engine import train
from tests.helpers.hostile import assert_one_line, jpeg, run
from tests.helpers.training import build_dataset, write_run

NOT_UTF8 = b"\xff\xfe\x00garbage \x81\x82\n"


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yml"
    config.write_bytes(b"data_root: .\nmodel: \x81\x82\n")
    assert_one_line(run(capsys, "classifier/train.py", "--config", config), str(config), "not a UTF-8 text file (invalid byte at offset 20)")


def test_a_config_under_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").write_text("a file, not a run folder", encoding="utf-8")
    assert_one_line(run(capsys, "classifier/train.py", "--config", tmp_path / "run" / "config.yml"),
                    "is a file, not a folder")


def test_a_crops_manifest_that_is_not_utf8_stops_the_crop_run_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jpeg(tmp_path / "images" / "a.jpg")
    cct = {"images": [{"id": "a", "file_name": "a.jpg", "width": 64, "height": 48, "location": "x"}],
           "annotations": [{"id": "1", "image_id": "a", "category_id": 1, "bbox": [4, 4, 20, 20]}],
           "categories": [{"id": 1, "name": "deer"}]}
    (tmp_path / "cct.json").write_text(json.dumps(cct), encoding="utf-8")
    manifest = tmp_path / "crops" / "crops_manifest.csv"
    manifest.parent.mkdir()
    manifest.write_bytes(NOT_UTF8)
    outcome = run(capsys, "utils/crop_detections.py", tmp_path / "cct.json", tmp_path / "crops", "--images-dir", tmp_path / "images")
    assert_one_line(outcome, str(manifest), "not a readable crops manifest", "move it away")
    assert manifest.read_bytes() == NOT_UTF8  # kept for the user to look at, not overwritten


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of one epoch, trained in this process."""
    root = tmp_path_factory.mktemp("unreadable_run")
    config = write_run(root / "run", build_dataset(root, n_locations=4, sequences=2, frames=2), num_workers=0, num_epochs=1)
    train(load_config(config), config.parent)
    return config.parent


@pytest.mark.parametrize("content, message", [
    (NOT_UTF8, "not a readable metrics.csv"),
    (b"epoch,val_loss\n1,0.5,0.7\n", "line 2: 3 values, expected 2"),
])
def test_a_spoiled_metrics_csv_stops_resuming_in_one_line(content: bytes, message: str, one_epoch: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    (run_dir / "metrics.csv").write_bytes(content)
    outcome = run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--set", "num_epochs=2")
    assert_one_line(outcome, "metrics.csv", message)
    assert (run_dir / "metrics.csv").read_bytes() == content


def test_a_finished_learning_curve_is_read_back_or_refused_in_one_line(tmp_path: Path) -> None:
    curve = tmp_path / "margin.csv"
    rows = [["margin", 3, 0, 40, 0.25, 0.125], ["margin", 3, 1, 60, 0.3125, 0.2]]
    write_csv_atomic(curve, pd.DataFrame(rows, columns=CURVE_COLUMNS))
    assert read_curve(curve, "margin", 3) == rows
    without_held_out = [["margin", 3, 0, 40, math.nan, math.nan]]  # no readable held-out image: NaN, written empty
    write_csv_atomic(curve, pd.DataFrame(without_held_out, columns=CURVE_COLUMNS))
    assert all(math.isnan(value) for value in read_curve(curve, "margin", 3)[0][4:])
    write_csv_atomic(curve, pd.DataFrame(rows, columns=CURVE_COLUMNS))
    with pytest.raises(DataError, match="holds another strategy's or seed's curve, not margin with seed 4"):
        read_curve(curve, "margin", 4)
    curve.write_text(",".join(CURVE_COLUMNS) + "\nmargin,3,0,forty,0.25,0.1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"margin.csv: not a finished learning curve .*delete it"):
        read_curve(curve, "margin", 3)
    curve.write_text("strategy,seed\nmargin,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"margin.csv: missing columns labels, macro_f1, round, top1"):
        read_curve(curve, "margin", 3)
    curve.write_bytes(NOT_UTF8)
    with pytest.raises(DataError, match=r"margin.csv: not a readable CSV"):
        read_curve(curve, "margin", 3)


def test_a_dot_env_that_is_not_utf8_is_one_line_without_its_contents(one_epoch: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    (run_dir / ".env").write_bytes(b"COMET_API_KEY=secret-\xff\xfe-key\n")
    line = assert_one_line(run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--set", "num_epochs=2",
                               "--set", "comet=offline"), ".env: not a UTF-8 text file")
    assert "secret" not in line


def test_a_folder_in_place_of_a_state_file_is_not_taken_for_no_file(one_epoch: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A folder named like splits.json, split_report.json or metrics.csv used to read as 'not written yet'
    (a dataset without splits, a run without metrics); now it is one line naming it."""
    from classification.data.inspect import load_dataset  # noqa: PLC0415

    config = load_config(one_epoch / "config.yml")
    dataset = tmp_path / "dataset"
    shutil.copytree(config.data_root, dataset)
    for name, message in [("splits.json", "is a folder, expected a JSON file"), ("split_report.json", "is a folder")]:
        spoiled = tmp_path / f"spoiled_{name}"
        shutil.copytree(dataset, spoiled)
        (spoiled / name).unlink(missing_ok=True)
        (spoiled / name).mkdir()
        with pytest.raises(DataError, match=message):
            load_dataset(spoiled)
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    (run_dir / "metrics.csv").unlink()
    (run_dir / "metrics.csv").mkdir()
    outcome = run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--set", "num_epochs=2")
    assert_one_line(outcome, "metrics.csv: is a folder")


def test_a_key_given_twice_in_a_state_file_is_refused(one_epoch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """label_index.json with class "0" twice used to keep the last silently (the first class lost)."""
    config = load_config(one_epoch / "config.yml")
    dataset = tmp_path / "dataset"
    shutil.copytree(config.data_root, dataset)
    names = json.loads((dataset / "label_index.json").read_text(encoding="utf-8"))
    text = "{" + ", ".join(f'"{k}": "{v}"' for k, v in names.items()) + ', "0": "impostor"}'
    (dataset / "label_index.json").write_text(text, encoding="utf-8")
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    outcome = run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--set", f"data_root={dataset}",
                  "--set", "num_epochs=2")
    assert_one_line(outcome, "label_index.json", 'the key "0" is given twice')


# ---------------------------------------------------------------- special files: a FIFO, /dev/zero (issue 17)


def run_script(script: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run an entry point as a user would, in its own process, killed after ``timeout`` (a hang fails the test)."""
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1], check=False)


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit code 2, one ``error:`` line holding every ``expected`` piece, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("script, extra", [("classifier/train.py", ()), ("classifier/predict.py", ("--split", "val"))])
def test_a_config_that_is_a_fifo_or_dev_zero_is_refused_at_once(script: str, extra: tuple[str, ...], tmp_path: Path) -> None:
    fifo = tmp_path / "config.yml"
    os.mkfifo(fifo)
    assert_refused(run_script(script, "--config", fifo, *extra), str(fifo), "is a FIFO (named pipe), expected a config.yml file")
    assert_refused(run_script(script, "--config", "/dev/zero", *extra), "/dev/zero: is a character device")


def test_a_config_larger_than_the_cap_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yml"
    config.write_bytes(b"# padding\n" * (CONFIG_READ_LIMIT // 10 + 1))
    assert_one_line(run(capsys, "classifier/train.py", "--config", config), str(config), "larger than 1024 KiB")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_json_readers_refuse_a_fifo_and_a_device(tmp_path: Path) -> None:
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device")):
        with pytest.raises(DataError, match=f"is {kind}"):
            read_json(path)
        with pytest.raises(DataError, match=f"is {kind}"):
            read_json_object(path, optional=True)
        with pytest.raises(DataError, match=f"is {kind}"):
            read_bounded_text(path, "a .env file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_megadetector_output_that_is_a_fifo_stops_the_crop_run_in_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / "md.json"
    os.mkfifo(fifo)
    assert_refused(run_script("utils/crop_detections.py", fifo, tmp_path / "crops", "--images-dir", tmp_path),
                   str(fifo), "is a FIFO")


# ---------------------------------------------------------------- images: FIFOs, huge headers, names too long (issue 17)


def declared_jpeg(path: Path, width: int, height: int) -> Path:
    """A small JPEG whose SOF header is patched to declare ``width`` x ``height`` (nothing large is allocated)."""
    data = bytearray(jpeg(path, (16, 8)).read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def crop_run(tmp_path: Path, files: list[str], bbox: str = "[0.1, 0.1, 0.3, 0.3]", *flags: str) -> tuple[str, list[dict[str, str]]]:
    """Crop MegaDetector output naming ``files`` in ``tmp_path / "images"`` as a subprocess; its stdout and logged failures."""
    detections = [{"file": f, "detections": [{"category": "1", "conf": 0.9, "bbox": json.loads(bbox)}]} for f in files]
    md = tmp_path / "md.json"
    md.write_text(json.dumps({"images": detections, "detection_categories": {"1": "animal"}}), encoding="utf-8")
    result = run_script("utils/crop_detections.py", md, tmp_path / "crops", "--images-dir", tmp_path / "images",
                        "--logdir", tmp_path / "logs", *flags, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    log = json.loads(next((tmp_path / "logs").glob("*.json")).read_text(encoding="utf-8"))
    return result.stdout, log["failures"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_named_in_megadetector_output_is_skipped_not_waited_on(tmp_path: Path) -> None:
    jpeg(tmp_path / "images" / "good.jpg")
    os.mkfifo(tmp_path / "images" / "pipe.jpg")
    _, failures = crop_run(tmp_path, ["good.jpg", "pipe.jpg"])
    assert failures == [{"file": "pipe.jpg", "reason": "not a regular file (a FIFO (named pipe))"}]
    assert len(list((tmp_path / "crops").glob("good.jpg___crop*"))) == 1


@pytest.mark.parametrize("bbox", ["[0.1, 0.1, 0.3, 0.3]", "[0, 0, 1, 1]"])
def test_a_jpeg_header_declaring_a_huge_crop_is_skipped_before_allocating(bbox: str, tmp_path: Path) -> None:
    declared_jpeg(tmp_path / "images" / "wide.jpg", 65500, 8)
    jpeg(tmp_path / "images" / "good.jpg")
    _, failures = crop_run(tmp_path, ["wide.jpg", "good.jpg"], bbox)
    assert [f["file"] for f in failures] == ["wide.jpg"]
    assert "is larger than --max-crop-side 8192" in failures[0]["reason"]
    assert len(list((tmp_path / "crops").glob("good.jpg___crop*"))) == 1


def test_a_jpeg_header_declaring_more_than_the_pixel_limit_is_refused_everywhere(tmp_path: Path) -> None:
    path = declared_jpeg(tmp_path / "images" / "huge.jpg", 12000, 10000)  # under PIL's own 2 x 89 M refusal
    with pytest.raises(ImageLoadError, match="more than the limit of 89,478,485"):
        read_rgb(path)
    assert not is_valid_image(path, header_only=True)
    _, failures = crop_run(tmp_path, ["huge.jpg"], "[0.4, 0.4, 0.01, 0.01]")
    assert "12000 x 10000 pixels, more than the limit" in failures[0]["reason"]


def test_max_crop_side_can_be_raised_and_is_checked(tmp_path: Path) -> None:
    jpeg(tmp_path / "images" / "good.jpg")
    _, failures = crop_run(tmp_path, ["good.jpg"], "[0, 0, 1, 1]", "--max-crop-side", "32")
    assert "a crop of 64 x 64 pixels is larger than --max-crop-side 32" in failures[0]["reason"]
    assert_refused(run_script("utils/crop_detections.py", tmp_path / "md.json", tmp_path / "c2", "--images-dir",
                              tmp_path / "images", "--max-crop-side", "0"), "--max-crop-side: expected an integer from 1")


def test_image_paths_and_crop_names_too_long_are_skipped_with_a_reason(tmp_path: Path) -> None:
    jpeg(tmp_path / "images" / "good.jpg")
    (tmp_path / "images" / ("a" * 250 + ".jpg")).write_bytes((tmp_path / "images" / "good.jpg").read_bytes())
    long_path = "/".join(["d" * 200] * 25) + "/x.jpg"  # 5000 characters: ENAMETOOLONG
    _, failures = crop_run(tmp_path, ["good.jpg", "a" * 250 + ".jpg", long_path])
    reasons = {f["file"][:10]: f["reason"] for f in failures}
    assert "more than the 255 file systems allow" in reasons["a" * 10]
    assert "more than the 4096 allowed" in reasons["d" * 10] or "File name too long" in reasons["d" * 10]
    assert len(failures) == 2 and len(list((tmp_path / "crops").glob("good.jpg___crop*"))) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_csv_and_lila_json_readers_refuse_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "table.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is a FIFO"):
        read_string_csv(fifo, ["path"])
    with pytest.raises(DataError, match="is a character device"), json_stream(Path("/dev/zero")):
        pass


def test_a_truncated_jpeg_is_refused_even_when_another_package_turned_on_truncated_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    whole = jpeg(tmp_path / "whole.jpg", (64, 48))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what importing MegaDetector's visualization does
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        read_rgb(cut)
    assert not is_valid_image(cut) and is_valid_image(whole)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text
