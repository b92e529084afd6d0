"""Evaluation of a predictions table (exact figures on a hand-computed example), its plots, and MegaDetector output."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from classification.errors import DataError
from classification.evaluation.megadetector import write_megadetector_classifications
from classification.evaluation.plots import plot_training_curves, save_figure
from classification.evaluation.report import (
    compute_metrics,
    evaluate_predictions,
    most_confident_mistakes,
    prediction_columns,
    probability_matrix,
    read_predictions,
    topk_of,
    write_predictions,
)
from tests.helpers.processes import SHARED_DATA, run_entry_point

LABELS = ["a", "b", "c"]


def table(rows: list[tuple[str, str, str, dict[str, float]]], topk: int) -> pd.DataFrame:
    """A predictions table from (path, location, true label, {class: prob}) rows, as predict.py writes it."""
    records = []
    for path, location, true, probs in rows:
        ranked = sorted(probs.items(), key=lambda item: -item[1])[:topk]
        record = {"path": path, "dataset": "ds", "location": location, "true_label": true,
                  "true_prob": probs.get(true, math.nan), "pred_label": ranked[0][0], "confidence": ranked[0][1]}
        for k, (name, prob) in enumerate(ranked, start=1):
            record[f"top{k}_label"] = name
            record[f"top{k}_prob"] = prob
        records.append(record)
    return pd.DataFrame(records, columns=prediction_columns(topk))


# Five labelled rows and one without a label; every figure below is computed by hand.
EXAMPLE = [
    ("1.jpg", "L1", "a", {"a": 0.7, "b": 0.2, "c": 0.1}),  # right, confidence 0.7
    ("2.jpg", "L1", "a", {"b": 0.6, "a": 0.3, "c": 0.1}),  # wrong (b), 0.6
    ("3.jpg", "L2", "b", {"b": 0.9, "c": 0.05, "a": 0.05}),  # right, 0.9
    ("4.jpg", "L2", "c", {"a": 0.5, "c": 0.4, "b": 0.1}),  # wrong (a), 0.5
    ("5.jpg", "L3", "c", {"c": 0.8, "a": 0.1, "b": 0.1}),  # right, 0.8
    ("6.jpg", "L3", "", {"a": 0.6, "b": 0.3, "c": 0.1}),  # no label: not scored
]


def test_metrics_of_a_hand_computed_example() -> None:
    metrics = compute_metrics(table(EXAMPLE, topk=3), LABELS)
    assert metrics["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert (metrics["n_predictions"], metrics["n_scored"], metrics["n_unknown_label"]) == (6, 5, 0)
    assert metrics["top1"] == pytest.approx(0.6) and metrics["top3"] == pytest.approx(1.0)
    expected_per_class = {"a": (0.5, 0.5, 0.5, 2), "b": (0.5, 1.0, 2 / 3, 1), "c": (1.0, 0.5, 2 / 3, 2)}
    for name, (precision, recall, f1, support) in expected_per_class.items():
        figures = metrics["per_class"][name]
        assert (figures["precision"], figures["recall"], figures["f1"]) == pytest.approx((precision, recall, f1))
        assert figures["support"] == support
    assert metrics["macro_precision"] == pytest.approx(2 / 3)
    assert metrics["macro_recall"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(11 / 18)
    assert metrics["weighted_precision"] == pytest.approx(0.7)
    assert metrics["weighted_recall"] == pytest.approx(0.6)
    assert metrics["weighted_f1"] == pytest.approx(0.6)
    assert metrics["loss"] == pytest.approx(-np.log([0.7, 0.3, 0.9, 0.4, 0.8]).mean())
    # Each confidence falls in its own bin: ECE = mean |correct - confidence|.
    assert metrics["ece"] == pytest.approx((0.3 + 0.6 + 0.1 + 0.5 + 0.2) / 5)
    bins = metrics["calibration"]["bins"]
    assert metrics["calibration"]["n_bins"] == len(bins) == 15 and sum(b["count"] for b in bins) == 5
    (bin_09,) = [b for b in bins if b["lower"] < 0.9 <= b["upper"]]
    assert (bin_09["count"], bin_09["accuracy"], bin_09["confidence"]) == (1, 1.0, pytest.approx(0.9))
    assert metrics["per_location"] == [
        {"dataset": "ds", "location": "L1", "n": 2, "top1": 0.5},
        {"dataset": "ds", "location": "L2", "n": 2, "top1": 0.5},
        {"dataset": "ds", "location": "L3", "n": 1, "top1": 1.0},
    ]


def test_labels_the_model_does_not_know_are_counted_not_scored() -> None:
    rows = EXAMPLE + [("7.jpg", "L3", "zebra", {"a": 0.5, "b": 0.3, "c": 0.2})]
    metrics = compute_metrics(table(rows, topk=3), LABELS)
    assert (metrics["n_scored"], metrics["n_unknown_label"]) == (5, 1)
    assert metrics["top1"] == pytest.approx(0.6)
    with pytest.raises(DataError, match="nothing to evaluate"):
        compute_metrics(table([EXAMPLE[-1]], topk=3), LABELS)


def test_top2_table_rebuilds_exact_probabilities_and_leaves_top3_out() -> None:
    labels = ["a", "b", "c", "d"]
    rows = [("1.jpg", "L1", "d", {"a": 0.5, "b": 0.3, "c": 0.05, "d": 0.15}),
            ("2.jpg", "L1", "a", {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1})]
    frame = table(rows, topk=2)
    assert topk_of(frame) == 2
    # Top-2 and the true label's probability are exact; the rest of the mass is spread evenly.
    assert probability_matrix(frame, labels) == pytest.approx(np.array([[0.5, 0.3, 0.05, 0.15], [0.4, 0.3, 0.15, 0.15]]))
    metrics = compute_metrics(frame, labels)
    assert metrics["top3"] is None and metrics["top1"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(-(np.log(0.15) + np.log(0.4)) / 2)


def test_predictions_csv_round_trip(tmp_path: Path) -> None:
    frame = table(EXAMPLE, topk=3)
    back = read_predictions(write_predictions(frame, tmp_path / "predictions.csv"))
    assert list(back.columns) == prediction_columns(3)
    assert back["location"].tolist() == ["L1", "L1", "L2", "L2", "L3", "L3"]
    assert back["true_label"].iloc[-1] == "" and math.isnan(back["true_prob"].iloc[-1])
    assert back["top2_prob"].tolist() == pytest.approx(frame["top2_prob"].tolist())
    assert compute_metrics(back, LABELS)["ece"] == pytest.approx(compute_metrics(frame, LABELS)["ece"])


def test_most_confident_mistakes_per_class() -> None:
    rows = EXAMPLE + [("8.jpg", "L1", "a", {"c": 0.9, "a": 0.05, "b": 0.05}), ("9.jpg", "L1", "a", {"b": 0.4, "a": 0.35, "c": 0.25})]
    mistakes = most_confident_mistakes(table(rows, topk=3), per_class=2)
    assert mistakes[["path", "true_label", "pred_label"]].values.tolist() == [
        ["8.jpg", "a", "c"], ["2.jpg", "a", "b"], ["4.jpg", "c", "a"]]


def write_crops(folder: Path, rows: list[tuple[str, str, str, dict[str, float]]]) -> None:
    """A coloured 48 px crop for each row (a real JPEG), so the mistakes grid shows pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, *_rest) in enumerate(rows):
        Image.new("RGB", (48, 40), (40 * i % 256, 200, 255 - 30 * i)).save(folder / path)


def test_evaluate_writes_metrics_json_and_real_pngs(tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    write_crops(crops, EXAMPLE)
    (crops / "4.jpg").write_bytes(b"not a jpeg")  # an unreadable crop gets an empty cell, not a crash
    output = tmp_path / "out"
    metrics = evaluate_predictions(table(EXAMPLE, topk=3), LABELS, output, images_root=crops, extra={"split": "test"})
    stored = json.loads((output / "metrics.json").read_text())
    assert stored["split"] == "test" and stored["top1"] == pytest.approx(0.6) == metrics["top1"]
    assert stored["confusion"] == metrics["confusion"]
    names = ["confusion_matrix", "precision_recall", "reliability", "confident_mistakes"]
    assert stored["plots"] == {name: f"{name}.png" for name in names}
    for name in names:
        with Image.open(output / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            low, high = cast("tuple[int, int]", image.convert("L").getextrema())  # one band: (min, max)
            assert high - low > 100, name  # something drawn
    assert sorted(p.name for p in output.iterdir()) == sorted([f"{n}.png" for n in names] + ["metrics.json"])  # no temp files


def test_training_curves_figure(tmp_path: Path) -> None:
    history = pd.DataFrame({"epoch": ["1", "2", "3"], "train_loss": ["1.2", "0.9", "0.7"], "val_loss": ["1.3", "1.0", "0.95"],
                            "train_top1": ["0.4", "0.6", "0.7"], "val_top1": ["0.35", "0.5", "0.55"]})
    figure = plot_training_curves(history)
    assert [len(ax.lines) for ax in figure.axes] == [2, 2]
    assert np.asarray(figure.axes[1].lines[1].get_ydata()).tolist() == [0.35, 0.5, 0.55]
    with Image.open(save_figure(figure, tmp_path / "curves.png")) as image:
        assert image.format == "PNG"


# ---------------------------------------------------------------- MegaDetector output


@pytest.fixture(scope="module")
def md_crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real MegaDetector file of ../shared/data and its crops at threshold 0.2 (via utils/crop_detections.py)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    root = SHARED_DATA / "lila_md_test"
    crops = tmp_path_factory.mktemp("md_crops")
    result = run_entry_point("utils/crop_detections.py", root / "md_v5a_output.json", crops, "--images-dir", root / "images",
                             "--threshold", "0.2", "--threads", "2", "--max-size", "64")
    assert result.returncode == 0, result.stderr
    return root / "md_v5a_output.json", crops


def fake_predictions(crop_paths: list[str], labels: list[str], seed: int = 0) -> pd.DataFrame:
    """Random (Dirichlet) probabilities for each crop, as a top-3 predictions table."""
    rng = np.random.default_rng(seed)
    rows = [(path, "", "", dict(zip(labels, rng.dirichlet(np.ones(len(labels))).tolist()))) for path in crop_paths]
    return table(rows, topk=3)


def test_megadetector_output_round_trip(md_crops: tuple[Path, Path], tmp_path: Path) -> None:
    md_path, crops = md_crops
    manifest = pd.read_csv(crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 30
    labels = ["deer", "fox", "hare", "owl", "zebra"]
    classified = manifest["crop_path"].tolist()[::2] + manifest["crop_path"].tolist()[1:6:2]  # some crops left out
    predictions = fake_predictions(classified, labels)
    output_path = tmp_path / "md_classified.json"
    written = write_megadetector_classifications(md_path, predictions, crops / "crops_manifest.csv", output_path,
                                                 label_names=labels, classifier="resnet18 best.pt")
    output = json.loads(output_path.read_text())
    assert output == json.loads(json.dumps(written))
    original = json.loads(md_path.read_text())
    assert output["classification_categories"] == {"0": "deer", "1": "fox", "2": "hare", "3": "owl", "4": "zebra"}
    assert output["info"] == {**original["info"], "classifier": "resnet18 best.pt", "format_version": "1.4"}
    assert output["detection_categories"] == original["detection_categories"]
    expected = {}
    for row in predictions.itertuples(index=False):
        crop = manifest.set_index("crop_path").loc[row.path]
        index = int(crop["annotation_id"].removeprefix("det"))
        ranked = [[str(labels.index(getattr(row, f"top{k}_label"))), getattr(row, f"top{k}_prob")] for k in (1, 2, 3)]
        expected[(crop["file_name"], index)] = ranked
    n_classified = 0
    for before, after in zip(original["images"], output["images"], strict=True):
        assert {k: v for k, v in after.items() if k != "detections"} == {k: v for k, v in before.items() if k != "detections"}
        for index, (old, new) in enumerate(zip(before.get("detections") or [], after.get("detections") or [], strict=True)):
            key = (before["file"], index)
            if key not in expected:
                assert new == old  # untouched detections keep exactly their fields
                continue
            n_classified += 1
            assert {k: v for k, v in new.items() if k != "classifications"} == old
            probs = [p for _, p in new["classifications"]]
            assert probs == sorted(probs, reverse=True) and len(probs) == 3
            assert [c for c, _ in new["classifications"]] == [c for c, _ in expected[key]]
            assert probs == pytest.approx([p for _, p in expected[key]], abs=1e-4)
    assert n_classified == len(classified) == 18


def test_megadetector_output_refuses_crops_of_another_file(md_crops: tuple[Path, Path], tmp_path: Path) -> None:
    md_path, crops = md_crops
    predictions = fake_predictions(["elsewhere/x.jpg___crop_det00.jpg"], ["deer", "fox", "hare"])
    with pytest.raises(DataError, match="not in the crops manifest"):
        write_megadetector_classifications(md_path, predictions, crops / "crops_manifest.csv", tmp_path / "out.json",
                                           label_names=["deer", "fox", "hare"])
    manifest = pd.read_csv(crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    broken = copy.deepcopy(manifest)
    broken.loc[0, "annotation_id"] = "det99"
    predictions = fake_predictions([manifest.loc[0, "crop_path"]], ["deer", "fox", "hare"])
    with pytest.raises(DataError, match="has no detection 99"):
        write_megadetector_classifications(md_path, predictions, broken, tmp_path / "out.json", label_names=["deer", "fox", "hare"])
    assert not (tmp_path / "out.json").exists()
