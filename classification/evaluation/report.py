"""The predictions table and its evaluation: metrics.json and the PNG plots.

``predictions.csv`` has one row per image: ``path, dataset, location, true_label,
true_prob, pred_label, confidence, top1_label..topK_label, top1_prob..topK_prob``
(``true_label``/``true_prob`` empty when the label is unknown). The figures are computed
by ``classification.training.metrics.MetricAccumulator``, the same code that scores
validation during training: the table's probabilities are turned back into a (N, C)
probability matrix (top-k and true-label probabilities exact, the rest of each row's mass
spread evenly over the other classes), which gives exact top-1, top-3 (when K >= 3),
loss, per-class figures, confusion matrix and calibration.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from classification.errors import DataError
from classification.evaluation.plots import write_evaluation_plots
from classification.io import read_json_object, read_string_csv, write_csv_atomic, write_json_atomic

if TYPE_CHECKING:
    from classification.training.metrics import MetricAccumulator

log = logging.getLogger(__name__)

BASE_COLUMNS = ["path", "dataset", "location", "true_label", "true_prob", "pred_label", "confidence"]
MISTAKES_PER_CLASS = 6
PROBABILITY_DECIMALS = 6
_TOPK_LABEL = re.compile(r"^top(\d+)_label$")


def topk_columns(topk: int) -> list[str]:
    """``top1_label..topK_label, top1_prob..topK_prob``."""
    return [f"top{k}_label" for k in range(1, topk + 1)] + [f"top{k}_prob" for k in range(1, topk + 1)]


def prediction_columns(topk: int) -> list[str]:
    """Every column of ``predictions.csv``, in order."""
    return BASE_COLUMNS + topk_columns(topk)


def topk_of(predictions: pd.DataFrame) -> int:
    """K of a predictions table: how many ``top<k>_label`` columns it has."""
    ks = sorted(int(m[1]) for m in map(_TOPK_LABEL.match, predictions.columns) if m)
    if not ks or ks != list(range(1, len(ks) + 1)):
        raise DataError("predictions: expected columns top1_label..topK_label")
    return len(ks)


def probability_columns(predictions: pd.DataFrame) -> list[str]:
    """The columns that hold probabilities."""
    return ["confidence", "true_prob"] + [f"top{k}_prob" for k in range(1, topk_of(predictions) + 1)]


def read_prediction_info(predictions_path: Path) -> dict[str, Any]:
    """``prediction_info.json`` beside a predictions file (written by classifier/predict.py), or {} where there is none.

    A folder or a list in its place, or an ``images_root`` that is not text, is a one-line ``DataError``: read as {} it sent
    the review page and the Camtrap DP export to the predictions' own folder for the images, without a word."""
    path = Path(predictions_path).parent / "prediction_info.json"
    info = read_json_object(path, optional=True)
    for key in ("images_root", "checkpoint", "architecture"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise DataError(f"{path}: {key}: expected a string, got {info[key]!r}")
    return info


def read_predictions(path: Path) -> pd.DataFrame:
    """A ``predictions.csv``: text columns as strings, probabilities as floats (NaN when empty)."""
    frame = read_string_csv(Path(path), ["path", "true_label", "pred_label", "confidence", "top1_label", "top1_prob"])
    if "true_prob" not in frame:
        frame["true_prob"] = ""
    missing = [f"top{k}_prob" for k in range(1, topk_of(frame) + 1) if f"top{k}_prob" not in frame]
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(missing)} (each top<k>_label needs its top<k>_prob)")
    for column in probability_columns(frame):
        frame[column] = probabilities_of(frame[column], Path(path), column)
    return frame


def probabilities_of(values: pd.Series, path: Path, column: str) -> pd.Series:
    """A column of probabilities (empty: NaN); text, NaN written out, or a value outside 0..1 is a one-line error naming its row."""
    numbers = pd.to_numeric(values.replace("", np.nan), errors="coerce").astype(float)
    bad = numbers.index[(numbers.isna() & (values != "")) | ~(numbers.isna() | numbers.between(0.0, 1.0 + 1e-6))]
    if len(bad):
        raise DataError(f"{path}: row {int(bad[0]) + 2}: {column}: expected a probability from 0 to 1, got {values[bad[0]]!r}")
    return numbers


def write_predictions(predictions: pd.DataFrame, path: Path) -> Path:
    """Write a predictions table to CSV atomically (probabilities to 6 decimals)."""
    write_csv_atomic(Path(path), predictions.round({c: PROBABILITY_DECIMALS for c in probability_columns(predictions)}))
    return Path(path)


def scored_rows(predictions: pd.DataFrame, label_names: Sequence[str]) -> pd.DataFrame:
    """Rows whose true label is one of the model's classes (the rows metrics are computed on)."""
    return predictions[predictions["true_label"].isin(list(label_names))]


def probability_matrix(scored: pd.DataFrame, label_names: Sequence[str], with_true_label: bool = True) -> np.ndarray:
    """(N, C) probabilities: the table's top-k and true-label values, the remaining mass spread evenly.
    ``with_true_label=False``: the top-k values only (what post-processing may fit on: the true label's
    probability would leak the answer)."""
    index = {name: i for i, name in enumerate(label_names)}
    rows = np.arange(len(scored))
    probabilities = np.zeros((len(scored), len(label_names)))
    known = np.zeros_like(probabilities, dtype=bool)
    for k in range(1, topk_of(scored) + 1):
        columns = scored[f"top{k}_label"].map(index)
        if columns.isna().any():
            raise DataError(f"predictions: top{k}_label {scored[f'top{k}_label'][columns.isna()].iloc[0]!r} is not a model class")
        probabilities[rows, columns.to_numpy(int)] = scored[f"top{k}_prob"].to_numpy(float)
        known[rows, columns.to_numpy(int)] = True
    if with_true_label:
        true_prob = scored["true_prob"].to_numpy(float)
        has_true = ~np.isnan(true_prob)
        true_columns = scored["true_label"].map(index).to_numpy(int)
        probabilities[rows[has_true], true_columns[has_true]] = true_prob[has_true]
        known[rows[has_true], true_columns[has_true]] = True
    rest = np.clip(1.0 - probabilities.sum(axis=1), 0.0, None)
    unknown = (~known).sum(axis=1)
    share = np.divide(rest, unknown, out=np.zeros_like(rest), where=unknown > 0)
    return np.where(known, probabilities, share[:, None])


def accumulate_scores(probabilities: np.ndarray, targets: np.ndarray, num_classes: int) -> MetricAccumulator:
    """The training loop's ``MetricAccumulator`` fed with these probabilities and true class numbers.

    PyTorch is imported here, when there are labels to score: predicting unlabelled images with a
    model package never loads it.
    """
    from classification.training.metrics import accumulate_probabilities  # noqa: PLC0415 - see above

    return accumulate_probabilities(probabilities, targets, num_classes)


def accumulate(scored: pd.DataFrame, label_names: Sequence[str]) -> MetricAccumulator:
    """A ``MetricAccumulator`` fed with the table's rows (loss = mean cross-entropy of the true label)."""
    targets = scored["true_label"].map({n: i for i, n in enumerate(label_names)}).to_numpy(int, copy=True)
    return accumulate_scores(probability_matrix(scored, label_names), targets, len(label_names))


def per_location_accuracy(scored: pd.DataFrame) -> pd.DataFrame:
    """Top-1 accuracy per (dataset, location), most images first; empty without locations."""
    columns = ["dataset", "location", "n", "top1"]
    if "location" not in scored or not (scored["location"] != "").any():
        return pd.DataFrame(columns=columns)
    frame = scored.assign(correct=(scored["pred_label"] == scored["true_label"]).astype(float),
                          dataset=scored["dataset"] if "dataset" in scored else "")
    table = frame.groupby(["dataset", "location"]).agg(n=("correct", "size"), top1=("correct", "mean")).reset_index()
    return table.sort_values(["n", "dataset", "location"], ascending=[False, True, True]).reset_index(drop=True)[columns]


def most_confident_mistakes(predictions: pd.DataFrame, per_class: int = MISTAKES_PER_CLASS) -> pd.DataFrame:
    """Up to ``per_class`` wrong predictions per true class, most confident first; classes in name order."""
    known = predictions[predictions["true_label"] != ""]
    wrong = known[known["pred_label"] != known["true_label"]]
    ordered = wrong.sort_values(["true_label", "confidence", "path"], ascending=[True, False, True], kind="stable")
    return ordered.groupby("true_label", sort=False).head(per_class).reset_index(drop=True)


def compute_metrics(predictions: pd.DataFrame, label_names: Sequence[str]) -> dict[str, Any]:
    """Every figure of metrics.json from a predictions table with true labels."""
    scored = scored_rows(predictions, label_names)
    known = predictions[predictions["true_label"] != ""]
    if scored.empty:
        raise DataError("predictions: no row has a true label among the model's classes: nothing to evaluate")
    if len(known) > len(scored):
        others = sorted(set(known["true_label"]) - set(label_names))
        log.warning("%d predictions have true labels the model does not know (%s): not scored",
                    len(known) - len(scored), ", ".join(others[:5]))
    accumulator = accumulate(scored, label_names)
    metrics, bins = accumulator.compute(list(label_names)), accumulator.calibration_bins()
    metrics["top3"] = metrics["top3"] if topk_of(predictions) >= 3 or len(label_names) <= topk_of(predictions) else None
    metrics.update(
        n_predictions=len(predictions),
        n_scored=len(scored),
        n_unknown_label=len(known) - len(scored),
        label_names=list(label_names),
        calibration={"n_bins": len(bins), "bins": bins},
        per_location=per_location_accuracy(scored).to_dict("records"),
    )
    return metrics


def evaluate_predictions(
    predictions: pd.DataFrame,
    label_names: list[str],
    output_dir: Path,
    images_root: Path | None = None,
    mistakes_per_class: int = MISTAKES_PER_CLASS,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the metrics, write ``metrics.json`` and the PNG plots into ``output_dir``; return the metrics.

    ``images_root``: the folder the table's paths are relative to (for the mistakes grid);
    ``extra``: more fields for metrics.json (what was predicted, with which checkpoint).
    """
    metrics = {**(extra or {}), **compute_metrics(predictions, label_names)}
    mistakes = most_confident_mistakes(scored_rows(predictions, label_names), mistakes_per_class)
    plots = write_evaluation_plots(metrics, mistakes, label_names, Path(output_dir), images_root, mistakes_per_class)
    metrics["plots"] = {name: path.name for name, path in plots.items()}
    write_json_atomic(Path(output_dir) / "metrics.json", metrics)
    return metrics


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The headline figures of a metrics.json as a one-column table."""
    keys = ["n_scored", "top1", "top3", "macro_precision", "macro_recall", "macro_f1",
            "weighted_precision", "weighted_recall", "weighted_f1", "loss", "ece"]
    return pd.DataFrame({"value": pd.Series([metrics.get(key) for key in keys], index=keys, dtype=object)})


def per_class_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """precision, recall, f1, support per class, from a metrics.json."""
    return pd.DataFrame.from_dict(metrics["per_class"], orient="index")[["precision", "recall", "f1", "support"]]
