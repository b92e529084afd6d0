"""classifier/predict.py on a tiny model trained by classifier/train.py on demo data built by the pipeline's entry points."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from classification.cli import run_main
from classification.errors import DataError
from classification.evaluation.predict import run_prediction
from classification.evaluation.report import prediction_columns, read_predictions
from classification.training.checkpoint import load_checkpoint
from tests.helpers.demo import TrainedRun, predict_here, run_predict, split_paths
from tests.helpers.notebooks import cell, outputs_text, png_outputs, run_notebook
from tests.helpers.processes import REPO_ROOT, run_entry_point, run_in_process
from tests.helpers.training import write_run

pytestmark = pytest.mark.slow  # trains a model once (~10 s) and runs the entry point a few times
PLOTS = ("confusion_matrix.png", "precision_recall.png", "reliability.png", "confident_mistakes.png")


def test_split_test_scores_exactly_the_test_crops(trained: TrainedRun) -> None:
    result = run_predict("--config", trained.config, "--checkpoint", "best", "--split", "test")
    assert result.returncode == 0, result.stderr
    output = trained.run_dir / "predictions" / "test_best"
    predictions = read_predictions(output / "predictions.csv")
    assert list(predictions.columns) == prediction_columns(3)
    assert sorted(predictions["path"]) == sorted(split_paths(trained.data.dataset_dir, "test"))  # not val (animl-ml's bug)
    labels = pd.read_csv(trained.data.dataset_dir / "classification_ds.csv", dtype=str).set_index("path")["label"]
    assert predictions["true_label"].tolist() == labels[predictions["path"]].tolist()
    top = predictions[["top1_prob", "top2_prob", "top3_prob"]].to_numpy()
    assert (np.diff(top, axis=1) <= 0).all() and (top.sum(axis=1) <= 1 + 1e-5).all()
    assert (predictions["pred_label"] == predictions["top1_label"]).all()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["n_scored"] == len(predictions)
    assert metrics["top1"] == pytest.approx((predictions["pred_label"] == predictions["true_label"]).mean())
    assert metrics["prediction"]["input"] == "test" and metrics["prediction"]["checkpoint"].endswith("best.pt")
    assert {row["location"] for row in metrics["per_location"]} == set(predictions["location"])
    for name in PLOTS:
        with Image.open(output / name) as image:
            assert image.format == "PNG"
    assert pd.read_csv(output / "skipped.csv").empty
    assert f"{len(predictions)} predictions in {output}" in result.stdout


def test_split_val_is_the_val_crops(trained: TrainedRun) -> None:
    result = run_prediction(trained.config, "last", split="val")
    val = split_paths(trained.data.dataset_dir, "val")
    assert sorted(result.predictions["path"]) == sorted(val)
    assert not set(val) & set(split_paths(trained.data.dataset_dir, "test"))
    assert result.output_dir == trained.run_dir / "predictions" / "val_last"


def test_every_way_of_naming_a_checkpoint(trained: TrainedRun, tmp_path: Path) -> None:
    checkpoints = trained.run_dir / "checkpoints"
    names = ("1.pt", "2", "last", "best", str(checkpoints / "last.pt"))
    by_name = {name: run_prediction(trained.config, name, split="test", output_dir=tmp_path / str(i)).predictions
               for i, name in enumerate(names)}
    pd.testing.assert_frame_equal(by_name["last"], by_name[str(checkpoints / "last.pt")])
    pd.testing.assert_frame_equal(by_name["last"], by_name["2"])
    best_epoch = load_checkpoint(checkpoints / "best.pt")["epoch"]
    pd.testing.assert_frame_equal(by_name["best"], by_name["1.pt" if best_epoch == 1 else "2"])
    probabilities = [column for column in by_name["last"].columns if column.endswith("_prob")]
    # another epoch, other weights: other probabilities (compared exactly: a confident tiny model can put ~1.0
    # on its top class at both epochs, so the top-1 column alone may agree to many digits)
    assert not by_name["1.pt"][probabilities].equals(by_name["last"][probabilities])


def test_ema_weights_are_used_when_present(trained: TrainedRun, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(trained.run_dir / "checkpoints" / "last.pt")
    ema = {name: torch.zeros_like(value) if name.startswith("classifier.") else value
           for name, value in checkpoint["model"].items()}  # a head of zeros: every class 1/C
    torch.save({**checkpoint, "ema": ema}, tmp_path / "ema.pt")
    result = run_prediction(trained.config, tmp_path / "ema.pt", split="test", output_dir=tmp_path / "out")
    assert result.predictions["top1_prob"].to_numpy() == pytest.approx(0.25)
    assert json.loads((tmp_path / "out" / "prediction_info.json").read_text())["weights"] == "ema"


def test_a_dataset_with_another_label_index_is_refused(trained: TrainedRun, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(trained.data.dataset_dir, dataset)
    index = json.loads((dataset / "label_index.json").read_text())
    index["0"], index["1"] = index["1"], index["0"]  # same names, other numbers
    (dataset / "label_index.json").write_text(json.dumps(index))
    config = write_run(tmp_path / "run", dataset, crops_dir=str(trained.data.crops_dir))
    checkpoint = trained.run_dir / "checkpoints" / "last.pt"
    with pytest.raises(DataError, match="differs from the one"):
        run_prediction(config, checkpoint, split="test")
    result = predict_here("--config", config, "--checkpoint", checkpoint, "--split", "test")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "label index" in result.stderr


def test_images_folder_with_class_folders_and_a_corrupt_file(trained: TrainedRun, tmp_path: Path) -> None:
    folder = tmp_path / "new_images"
    test_paths = split_paths(trained.data.dataset_dir, "test")
    labels = pd.read_csv(trained.data.dataset_dir / "classification_ds.csv", dtype=str).set_index("path")["label"]
    for i, path in enumerate(test_paths):
        (folder / labels[path]).mkdir(parents=True, exist_ok=True)
        shutil.copy(trained.data.crops_dir / path, folder / labels[path] / f"{i:02d}.JPG")
    (folder / "deer" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = run_prediction(trained.config, "last", images_dir=folder)
    assert result.output_dir == trained.run_dir / "predictions" / "new_images_last"
    assert len(result.predictions) == len(test_paths) and result.skipped == ["deer/broken.jpg"]
    assert pd.read_csv(result.output_dir / "skipped.csv").to_dict("records") == [{"path": "deer/broken.jpg", "reason": "unreadable image"}]
    assert (result.predictions["true_label"] == result.predictions["path"].str.split("/").str[0]).all()
    from_split = run_prediction(trained.config, "last", split="test", output_dir=tmp_path / "split").predictions
    assert result.metrics is not None and result.metrics["top1"] == pytest.approx(
        (from_split["pred_label"] == from_split["true_label"]).mean())  # same crops, same figures

    (folder / "unsorted").mkdir()
    shutil.copy(trained.data.crops_dir / test_paths[0], folder / "unsorted" / "x.jpg")  # not a class: no labels at all
    unlabelled = run_prediction(trained.config, "last", images_dir=folder, output_dir=tmp_path / "unlabelled")
    assert (unlabelled.predictions["true_label"] == "").all() and unlabelled.metrics is None
    assert not (tmp_path / "unlabelled" / "metrics.json").exists()


def test_cct_input_equals_the_split(trained: TrainedRun, tmp_path: Path) -> None:
    by_cct = run_prediction(trained.config, "best", cct=trained.data.dataset_dir / "test_cct.json", output_dir=tmp_path / "cct")
    by_split = run_prediction(trained.config, "best", split="test", output_dir=tmp_path / "split")
    columns = ["path", "location", "true_label", "pred_label", "top1_prob", "top3_label"]
    pd.testing.assert_frame_equal(by_cct.predictions.sort_values("path")[columns].reset_index(drop=True),
                                  by_split.predictions.sort_values("path")[columns].reset_index(drop=True))
    assert by_cct.metrics is not None and by_split.metrics is not None
    assert by_cct.metrics["top1"] == by_split.metrics["top1"]


def test_megadetector_crops_give_a_megadetector_file(trained: TrainedRun, shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "lila_md_test"
    crops = tmp_path / "md_crops"
    cropped = run_in_process("utils/crop_detections.py", root / "md_v5a_output.json", crops, "--images-dir", root / "images",
                             "--max-size", "64")
    assert cropped.returncode == 0, cropped.stderr
    result = predict_here("--config", trained.config, "--checkpoint", "last", "--megadetector", root / "md_v5a_output.json",
                          "--crops-dir", crops, "--output-dir", tmp_path / "out", "--topk", "2")
    assert result.returncode == 0, result.stderr
    predictions = read_predictions(tmp_path / "out" / "predictions.csv")
    assert len(predictions) == 30 and (predictions["true_label"] == "").all()
    output = json.loads((tmp_path / "out" / "md_v5a_output_classified.json").read_text())
    assert output["classification_categories"] == {"0": "bird", "1": "deer", "2": "rabbit", "3": "wild_boar"}
    classified = [d for image in output["images"] for d in image.get("detections") or [] if "classifications" in d]
    assert len(classified) == 30 and all(len(d["classifications"]) == 2 for d in classified)
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert json.loads((root / "md_v5a_output.json").read_text())["info"]["format_version"] == "1.1"
    assert output["info"]["format_version"] == "1.4"
    assert_megadetector_validates(tmp_path / "out" / "md_v5a_output_classified.json")


def assert_megadetector_validates(path: Path) -> None:
    """MegaDetector's own validator (``pip install --no-deps megadetector``; .ci/run installs it) accepts ``path``."""
    validator = pytest.importorskip("megadetector.postprocessing.validate_batch_results",
                                    reason="MegaDetector's validator: pip install --no-deps megadetector==10.0.28")
    options = validator.ValidateBatchResultsOptions()
    options.raise_errors = True
    options.check_image_existence = False
    results = validator.validate_batch_results(str(path), options)["validation_results"]
    assert not results["errors"], results["errors"]


def predict_in_process(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """classifier/predict.py's ``main`` through ``run_main``, in this process (the subprocess's code without 5 s of imports)."""
    main = runpy.run_path(str(REPO_ROOT / "classifier" / "predict.py"))["main"]  # not __main__: defines main only
    try:
        code = run_main(main, [str(a) for a in args])
    except SystemExit as stop:  # argparse errors exit from the parser
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


def test_predict_on_a_split_whose_crops_are_missing_is_one_line(trained: TrainedRun, tmp_path: Path) -> None:
    """A wrong ``--crops-dir`` (or crops deleted) predicted nothing and wrote empty outputs: now one line, exit 2."""
    empty = tmp_path / "no_crops"
    empty.mkdir()
    result = run_predict("--config", trained.config, "--cct", trained.data.dataset_dir / "test_cct.json", "--crops-dir", empty,
                         "--output-dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the CCT reader's own warning (no width/height)
    assert error.startswith("error: predict (is the folder right?): ") and "Traceback" not in result.stderr, result.stderr
    assert "images missing or unreadable, more than max_skipped_fraction (0.05); first: " in error
    assert str(empty) in error and not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize("args, message", [
    ((), "one of the arguments --split --images --cct --megadetector is required"),
    (("--split", "test", "--cct", "x.json"), "not allowed with argument"),
    (("--split", "test", "--top-k", "2"), "--top-k: did you mean --topk?"),
    (("--megadetector", "md.json"), "--megadetector needs --crops-dir"),
    (("--split", "tset"), "no split 'tset'"),
    (("--split", "test", "--checkpoint", "9.pt"), "checkpoint not found (checkpoints in"),
    (("--split", "test", "--batch-size", "0"), "argument --batch-size: expected an integer from 1 to 1,000,000, got 0"),
    (("--split", "test", "--batch-size", "100000000000000000000"), "expected an integer from 1 to 1,000,000"),
])
def test_input_errors_are_one_line(trained: TrainedRun, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str) -> None:
    code, stderr = predict_in_process(capsys, "--config", trained.config, *args)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert message in stderr


def test_evaluate_notebook_runs_headless_on_the_run(trained: TrainedRun, kernel_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    output = run_prediction(trained.config, "best", split="test").output_dir
    monkeypatch.setenv("RUN_DIR", str(trained.run_dir))
    monkeypatch.setenv("PREDICTIONS_DIR", str(output))
    monkeypatch.setenv("MISTAKES_PER_CLASS", "3")
    notebook = run_notebook("evaluate_results.ipynb")
    assert "2 epochs" in outputs_text(cell(notebook, "load"))
    assert len(png_outputs(cell(notebook, "curves"))) == 1
    assert "top1" in outputs_text(cell(notebook, "summary")) and "macro_f1" in outputs_text(cell(notebook, "summary"))
    assert all(name in outputs_text(cell(notebook, "per-class")) for name in ("bird", "deer", "rabbit", "wild_boar"))
    assert "top1" in outputs_text(cell(notebook, "per-location"))
    assert len(png_outputs(cell(notebook, "plots"))) == len(PLOTS)
    assert len(png_outputs(cell(notebook, "mistakes"))) == 1


def test_evaluate_notebook_is_stored_clean_with_demo_defaults() -> None:
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "evaluate_results.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata["tags"] and "os.environ.get" in code[0].source
    assert '"../runs/efficientnet-lite0/demo"' in code[0].source and '"../runs/efficientnet-lite0/demo/predictions/test_best"' in code[0].source
    assert (REPO_ROOT / "runs" / "efficientnet-lite0" / "demo" / "config.yml").is_file()


def test_run_notebook_entry_point_saves_the_executed_evaluation(trained: TrainedRun, kernel_env: None,
                                                                 tmp_path: Path) -> None:

    output = run_prediction(trained.config, "best", split="val").output_dir
    executed = tmp_path / "evaluate_results.ipynb"
    result = run_entry_point("utils/run_notebook.py", "notebooks/evaluate_results.ipynb", "--output", executed,
                             "--set", f"RUN_DIR={trained.run_dir}", "--set", f"PREDICTIONS_DIR={output}")
    assert result.returncode == 0, result.stderr
    notebook = nbformat.read(executed, as_version=4)
    assert len(png_outputs(cell(notebook, "plots"))) == len(PLOTS)
    assert "2 epochs" in outputs_text(cell(notebook, "load"))
    failed = run_in_process("utils/run_notebook.py", "notebooks/evaluate_results.ipynb", "--output",
                            tmp_path / "failed.ipynb", "--set", f"RUN_DIR={tmp_path / 'missing'}")
    assert failed.returncode == 2 and not (tmp_path / "failed.ipynb").exists()
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert "a cell failed: FileNotFoundError" in line and "metrics.csv" in line and "Traceback" not in failed.stderr
