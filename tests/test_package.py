"""Model packages: classifier/export.py writes one folder; predict.py --model runs it with onnxruntime alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image

from classification.data.samples import Sample
from classification.errors import DataError
from classification.evaluation.report import read_predictions
from classification.package.quantize import pixels_of
from classification.package.spec import ONNX_NAME, SPEC_NAME, InputSpecModel, file_sha256, read_package
from tests.helpers.demo import DemoData, build_demo_dataset
from tests.helpers.processes import REPO_ROOT, run_in_process
from tests.helpers.training import train_env, write_run

pytestmark = pytest.mark.slow  # trains a tiny model once and exports it (~30 s)

PACKAGE_FILES = {"model.onnx", "model.safetensors", "label_index.json", "classes.csv", "model.json", "model_card.md"}


@dataclass(frozen=True)
class Exported:
    """A tiny model trained on demo crops, predicted on its test split, and exported."""

    data: DemoData
    config: Path
    package: Path


def run(script: str, *args: object) -> tuple[int, str, str]:
    result = run_in_process(script, *args, env=train_env())
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("package")
    data = build_demo_dataset(root / "demo")
    config = write_run(root / "runs" / "tiny" / "demo", data.dataset_dir, crops_dir=str(data.crops_dir), num_epochs=2)
    code, _, err = run("classifier/train.py", "--config", config)
    assert code == 0, err
    code, _, err = run("classifier/predict.py", "--config", config, "--checkpoint", "last", "--split", "test")
    assert code == 0, err
    code, out, err = run("classifier/export.py", "--config", config, "--checkpoint", "last", "--output", root / "models" / "tiny")
    assert code == 0, err
    assert "model package" in out
    return Exported(data, config, root / "models" / "tiny")


def test_the_package_holds_the_network_classes_and_facts(exported: Exported) -> None:
    assert {p.name for p in exported.package.iterdir()} == PACKAGE_FILES
    spec = read_package(exported.package)
    index = json.loads((exported.data.dataset_dir / "label_index.json").read_text())
    assert spec.label_names == [index[k] for k in sorted(index, key=int)]
    assert spec.input.size == 32 and spec.input.crop_strategy == "pad"  # the demo crops are padded
    onnx.checker.check_model(onnx.load(exported.package / ONNX_NAME))
    assert spec.provenance["checkpoint"]["name"] == "last.pt"
    assert sum(spec.provenance["data"]["train_counts"].values()) > 0
    assert spec.metrics is not None and 0 <= spec.metrics["test"]["top1"] <= 1
    classes = pd.read_csv(exported.package / "classes.csv")
    assert classes["class"].tolist() == spec.label_names and classes["id"].tolist() == list(range(len(spec.label_names)))
    card = (exported.package / "model_card.md").read_text()
    assert all(f"| {name} |" in card for name in spec.label_names) and "## Held-out results" in card
    assert str(exported.config.parent) not in (exported.package / SPEC_NAME).read_text()  # nothing of the run's paths


def test_package_predictions_equal_the_checkpoints(exported: Exported, tmp_path: Path) -> None:
    images = exported.data.crops_dir
    code, _, err = run("classifier/predict.py", "--config", exported.config, "--checkpoint", "last", "--images", images,
                       "--output-dir", tmp_path / "torch", "--topk", "3")
    assert code == 0, err
    code, out, err = run("classifier/predict.py", "--model", exported.package, "--images", images, "--output-dir", tmp_path / "onnx",
                         "--topk", "3", "--review-page")
    assert code == 0, err
    reference, packaged = (read_predictions(tmp_path / name / "predictions.csv") for name in ("torch", "onnx"))
    assert len(packaged) == len(reference) > 20
    assert packaged["path"].tolist() == reference["path"].tolist()
    assert packaged["pred_label"].tolist() == reference["pred_label"].tolist()
    for k in (1, 2, 3):
        assert np.abs(packaged[f"top{k}_prob"].to_numpy(float) - reference[f"top{k}_prob"].to_numpy(float)).max() < 1e-4
    info = json.loads((tmp_path / "onnx" / "prediction_info.json").read_text())
    assert info["runtime"] == "onnxruntime" and info["model_package"] == str(exported.package)
    assert (tmp_path / "onnx" / "review.html").is_file()


def test_exporting_twice_gives_identical_files(exported: Exported, tmp_path: Path) -> None:
    again = tmp_path / "tiny"
    code, _, err = run("classifier/export.py", "--config", exported.config, "--checkpoint", "last", "--output", again)
    assert code == 0, err
    for name in PACKAGE_FILES - {"model.json", "model_card.md"}:
        assert file_sha256(again / name) == file_sha256(exported.package / name), name
    first = json.loads((exported.package / SPEC_NAME).read_text())
    second = json.loads((again / SPEC_NAME).read_text())
    assert first.pop("name") == "tiny" == second.pop("name")
    assert first == second


def test_an_existing_package_is_replaced_only_with_overwrite(exported: Exported, tmp_path: Path) -> None:
    target = tmp_path / "pkg"
    shutil.copytree(exported.package, target)
    code, _, err = run("classifier/export.py", "--config", exported.config, "--checkpoint", "last", "--output", target)
    assert code != 0 and "already exists (pass --overwrite" in err and len(err.strip().splitlines()) == 1
    (target / "stale.txt").write_text("from before")
    code, _, err = run("classifier/export.py", "--config", exported.config, "--checkpoint", "last", "--output", target, "--overwrite")
    assert code == 0, err
    assert {p.name for p in target.iterdir()} == PACKAGE_FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or retired folder left


def test_a_checkpoint_of_another_architecture_is_refused(exported: Exported, tmp_path: Path) -> None:
    other = write_run(tmp_path / "runs" / "other", exported.data.dataset_dir, crops_dir=str(exported.data.crops_dir),
                      architecture="resnet18")
    checkpoint = exported.config.parent / "checkpoints" / "last.pt"
    code, _, err = run("classifier/export.py", "--config", other, "--checkpoint", checkpoint, "--output", tmp_path / "x")
    assert code != 0 and "trained as timm:test_efficientnet" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def break_package(package: Path, target: Path, how: str) -> None:
    """A copy of ``package`` at ``target`` with one defect."""
    shutil.copytree(package, target)
    spec = json.loads((target / SPEC_NAME).read_text())
    if how == "no model.json":
        (target / SPEC_NAME).unlink()
    elif how == "label index edited":
        (target / "label_index.json").write_text(json.dumps({"0": "cat"}))
    elif how == "classes disagree":
        spec["label_names"] = spec["label_names"][:-1]
        (target / SPEC_NAME).write_text(json.dumps(spec))
        index = {str(i): n for i, n in enumerate(spec["label_names"])}
        (target / "label_index.json").write_text(json.dumps(index))
        for entry in spec["files"]:
            entry["sha256"] = file_sha256(target / entry["name"])
        (target / SPEC_NAME).write_text(json.dumps(spec))
    elif how == "onnx from elsewhere":
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        program = torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), dynamo=True, verbose=False, report=False)
        assert program is not None
        (target / ONNX_NAME).write_bytes(program.model_proto.SerializeToString())
        spec["onnx"]["sha256"] = file_sha256(target / ONNX_NAME)
        (target / SPEC_NAME).write_text(json.dumps(spec))
    elif how == "not onnx":
        (target / ONNX_NAME).write_bytes(b"not a network")
        spec["onnx"]["sha256"] = file_sha256(target / ONNX_NAME)
        (target / SPEC_NAME).write_text(json.dumps(spec))


@pytest.mark.parametrize("how, message", [
    ("no model.json", "not a model package (model.json missing"),
    ("label index edited", "label_index.json: its SHA-256 differs from model.json"),
    ("classes disagree", "outputs but the package lists"),
    ("onnx from elsewhere", "input shape"),
    ("not onnx", "onnxruntime cannot load it"),
])
def test_a_broken_package_is_one_line(exported: Exported, tmp_path: Path, how: str, message: str) -> None:
    broken = tmp_path / "broken"
    break_package(exported.package, broken, how)
    code, _, err = run("classifier/predict.py", "--model", broken, "--images", exported.data.crops_dir, "--output-dir", tmp_path / "out")
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_model_needs_an_input_it_can_read(exported: Exported, tmp_path: Path) -> None:
    code, _, err = run("classifier/predict.py", "--model", exported.package, "--split", "test", "--output-dir", tmp_path)
    assert code != 0 and "--split needs --config" in err
    code, _, err = run("classifier/predict.py", "--model", exported.package, "--config", exported.config, "--split", "test")
    assert code != 0 and "not allowed with argument" in err


def test_predicting_unlabelled_images_with_a_package_never_imports_pytorch(exported: Exported, tmp_path: Path) -> None:
    images = tmp_path / "new_photos"
    images.mkdir()
    for path in sorted(exported.data.crops_dir.rglob("*.jpg"))[:5]:
        shutil.copy(path, images / path.name)  # no class folders: nothing to score, so nothing needs PyTorch
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "classifier" / "predict.py"), "--model",
                             str(exported.package), "--images", str(images), "--output-dir", str(tmp_path / "out"), "--review-page"],
                            capture_output=True, text=True, env=train_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and not {"torch", "torchvision", "timm"} & imported
    assert len(read_predictions(tmp_path / "out" / "predictions.csv")) == 5


@pytest.fixture(scope="module")
def int8_package(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint exported with its int8 network, calibrated on 16 train crops."""
    package = tmp_path_factory.mktemp("int8") / "tiny-int8"
    code, out, err = run("classifier/export.py", "--config", exported.config, "--checkpoint", "last", "--output", package,
                         "--int8", "--calibration-crops", "16")
    assert code == 0, err
    assert "int8 network: val top-1" in out
    return package


def test_an_int8_export_adds_a_calibrated_network_and_its_cost(exported: Exported, int8_package: Path) -> None:
    assert {p.name for p in int8_package.iterdir()} == PACKAGE_FILES | {"model_int8.onnx"}
    spec = read_package(int8_package)
    assert spec.onnx_int8 is not None and spec.int8 is not None
    graph = onnx.load(int8_package / "model_int8.onnx").graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert spec.int8["calibration_crops"] == 16 and spec.int8["calibration_split"] == "train"
    check = spec.int8["check"]
    assert check["split"] == "val" and check["n_images"] > 0 and 0 <= check["same_top1"] <= 1
    assert "--precision int8" in (int8_package / "model_card.md").read_text()
    assert file_sha256(int8_package / ONNX_NAME) == file_sha256(exported.package / ONNX_NAME)  # float32 network untouched


def test_int8_predictions_follow_the_float32_network(exported: Exported, int8_package: Path, tmp_path: Path) -> None:
    images = exported.data.crops_dir
    outputs = {}
    for precision in ("fp32", "int8"):
        code, _, err = run("classifier/predict.py", "--model", int8_package, "--images", images, "--output-dir", tmp_path / precision,
                           "--precision", precision)
        assert code == 0, err
        outputs[precision] = read_predictions(tmp_path / precision / "predictions.csv")
        info = json.loads((tmp_path / precision / "prediction_info.json").read_text())
        assert info["network"] == ("model_int8.onnx" if precision == "int8" else "model.onnx")
    fp32, int8 = outputs["fp32"], outputs["int8"]
    assert fp32["path"].tolist() == int8["path"].tolist()
    same = (fp32["pred_label"] == int8["pred_label"]).mean()
    assert same >= 0.8, same
    assert np.abs(fp32["top1_prob"].to_numpy(float) - int8["top1_prob"].to_numpy(float)).max() > 0  # not the float32 network


def test_an_int8_export_is_byte_identical_twice(exported: Exported, int8_package: Path, tmp_path: Path) -> None:
    again = tmp_path / "tiny-int8"
    code, _, err = run("classifier/export.py", "--config", exported.config, "--checkpoint", "last", "--output", again,
                       "--int8", "--calibration-crops", "16")
    assert code == 0, err
    assert file_sha256(again / "model_int8.onnx") == file_sha256(int8_package / "model_int8.onnx")
    assert json.loads((again / SPEC_NAME).read_text())["int8"] == json.loads((int8_package / SPEC_NAME).read_text())["int8"]


def test_int8_is_refused_where_there_is_none(exported: Exported, int8_package: Path, tmp_path: Path) -> None:
    images = exported.data.crops_dir
    code, _, err = run("classifier/predict.py", "--model", exported.package, "--images", images, "--output-dir", tmp_path / "a",
                       "--precision", "int8")
    assert code != 0 and "has no int8 network (export it with classifier/export.py --int8)" in err
    assert len(err.strip().splitlines()) == 1, err
    code, _, err = run("classifier/predict.py", "--config", exported.config, "--images", images, "--precision", "int8")
    assert code != 0 and "--precision needs --model" in err and len(err.strip().splitlines()) == 1, err
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_package, tampered)
    (tampered / "model_int8.onnx").write_bytes(b"replaced")
    code, _, err = run("classifier/predict.py", "--model", tampered, "--images", images, "--output-dir", tmp_path / "b")
    assert code != 0 and "model_int8.onnx: its SHA-256 differs from model.json" in err, err


def test_int8_skips_unreadable_crops_and_keeps_the_labels_of_the_readable_ones(tmp_path: Path) -> None:
    spec = InputSpecModel(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "good.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:40])
    samples = [Sample(tmp_path / name, label, "loc", "ds") for name, label in (("cut.jpg", 0), ("good.jpg", 1), ("gone.jpg", 2))]
    pixels, kept = pixels_of(samples, spec, "val crops")
    assert pixels.shape == (1, 3, 16, 16) and kept.tolist() == [1]  # the label of row 0 is samples[1]'s
    with pytest.raises(DataError, match="none of the 2 val crops could be read"):
        pixels_of([samples[0], samples[2]], spec, "val crops")
