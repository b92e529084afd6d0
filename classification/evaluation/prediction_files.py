"""What a prediction reads and writes, with no PyTorch: its input (an image folder, a CCT file,
MegaDetector crops) as samples with their true labels, and its files (``predictions.csv``,
``skipped.csv``, ``prediction_info.json``, ``metrics.json`` and the plots).

Shared by ``evaluation.predict`` (a checkpoint) and ``package.predict`` (a model package in
onnxruntime), so that both write the same files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classification.data.cct import category_names, load_cct
from classification.data.crop_manifest import MANIFEST_NAME
from classification.data.dataset import read_crops_manifest
from classification.data.detections import load_megadetector
from classification.data.samples import Sample, image_files
from classification.errors import DataError, UserError
from classification.evaluation.postprocess import PostprocessResult
from classification.evaluation.report import evaluate_predictions, prediction_columns, scored_rows, write_predictions
from classification.io import write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

UNKNOWN = -1  # Sample.label of an image whose true class is not known


@dataclass
class PredictionInput:
    """What to predict: samples (label -1 when unknown), their true label names, and the folder paths are relative to."""

    name: str
    samples: list[Sample]
    true_labels: list[str]  # "" when unknown; may be a name the model does not know
    root: Path
    megadetector: Path | None = None
    manifest: pd.DataFrame | None = None


@dataclass
class PredictionResult:
    """Where the outputs went and what came out."""

    output_dir: Path
    predictions_path: Path
    predictions: pd.DataFrame
    skipped: list[str]
    metrics: dict[str, Any] | None
    images_per_second: float
    megadetector_output: Path | None = None
    postprocess: PostprocessResult | None = None  # the config's postprocess: section, when a step is on


def labelled_samples(paths: Sequence[Path], true_labels: Sequence[str], locations: Sequence[str], datasets: Sequence[str],
                     label_names: Sequence[str]) -> list[Sample]:
    """Samples whose label is the model's class number, or -1 when unknown to the model."""
    index = {name: i for i, name in enumerate(label_names)}
    return [Sample(Path(p), index.get(t, UNKNOWN), loc, ds) for p, t, loc, ds in zip(paths, true_labels, locations, datasets)]


def folder_input(images_dir: Path, label_names: Sequence[str]) -> PredictionInput:
    """Every image under ``images_dir``; labelled by class sub-folder when each image sits in one named after a class."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: folder not found")
    files = image_files(images_dir)
    if not files:
        raise DataError(f"{images_dir}: no images (.jpg, .jpeg, .png) in this folder or below")
    folders = [f.relative_to(images_dir).parts[0] if len(f.relative_to(images_dir).parts) > 1 else "" for f in files]
    labelled = all(name in label_names for name in folders)
    log.info("%s: %d images, %s", images_dir, len(files),
             "labelled by their class folders" if labelled else "no labels (not all in folders named after the model's classes)")
    true_labels = folders if labelled else [""] * len(files)
    samples = labelled_samples(files, true_labels, [""] * len(files), [images_dir.name] * len(files), label_names)
    return PredictionInput(images_dir.name, samples, true_labels, images_dir)


def cct_input(cct_path: Path, root: Path, label_names: Sequence[str]) -> PredictionInput:
    """The images of a CCT file (relative to ``root``), labelled when an image has exactly one category."""
    data = load_cct(cct_path)
    names = category_names(data)
    labels: dict[Any, set[str]] = {}
    for annotation in data["annotations"]:
        labels.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    images = data["images"]
    true_labels = [next(iter(labels[im["id"]])) if len(labels.get(im["id"], ())) == 1 else "" for im in images]
    samples = labelled_samples([root / im["file_name"] for im in images], true_labels,
                               [str(im.get("location") or "") for im in images],
                               [str(im.get("dataset") or Path(cct_path).stem) for im in images], label_names)
    return PredictionInput(Path(cct_path).stem, samples, true_labels, root)


def megadetector_input(md_path: Path, crops_dir: Path, label_names: Sequence[str]) -> PredictionInput:
    """The crops of ``md_path``'s detections listed in ``crops_dir/crops_manifest.csv`` (by utils/crop_detections.py)."""
    md = load_megadetector(md_path)
    manifest = read_crops_manifest(Path(crops_dir) / MANIFEST_NAME)
    files = {image["file"].replace("\\", "/") for image in md["images"]}
    ours = manifest[manifest["file_name"].isin(files)].reset_index(drop=True) if "file_name" in manifest else manifest.iloc[:0]
    if ours.empty:
        raise DataError(f"{Path(crops_dir) / MANIFEST_NAME}: no crops of {md_path} (run utils/crop_detections.py {md_path} {crops_dir} ...)")
    true_labels = ours["label"].tolist()
    samples = labelled_samples([Path(crops_dir) / p for p in ours["crop_path"]], true_labels, ours["location"].tolist(),
                               ours["dataset"].tolist(), label_names)
    return PredictionInput(Path(md_path).stem, samples, true_labels, Path(crops_dir), Path(md_path), ours)


@dataclass
class Scores:
    """Per kept sample: dataset index, top-k class numbers and probabilities, and the true label's probability."""

    indices: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray
    true_probs: np.ndarray
    skipped: list[int]
    images_per_second: float
    probabilities: np.ndarray | None = None  # (N, C), only when asked for (``full``): what post-processing reads


def scores_from_probabilities(indices: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, skipped: list[int],
                              topk: int, num_classes: int) -> Scores:
    """``Scores`` from every class's probabilities of the kept samples (a model outside this module, such as an
    active-learning round's head on cached features): the same top-k and true-label columns ``score_samples`` gives."""
    k = min(topk, num_classes)
    probabilities = np.asarray(probabilities, dtype=np.float32).reshape(len(indices), num_classes)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    labels = np.asarray(labels, dtype=np.int64)
    true_probs = np.where(labels >= 0, probabilities[np.arange(len(labels)), np.maximum(labels, 0)], np.nan)
    return Scores(np.asarray(indices, dtype=np.int64), order, np.take_along_axis(probabilities, order, axis=1), true_probs,
                  list(skipped), 0.0, probabilities)


def write_prediction_files(source: PredictionInput, scores: Scores, label_names: list[str], output_dir: Path,
                           info: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, Path, dict[str, Any] | None]:
    """``predictions.csv``, ``skipped.csv``, ``prediction_info.json`` and (with true labels) ``metrics.json`` and
    the plots; returns the predictions, the skipped table, the predictions' path and the metrics."""
    predictions = predictions_table(source, scores, label_names)
    skipped = skipped_table(source, scores.skipped)
    predictions_path = write_predictions(predictions, output_dir / "predictions.csv")
    write_csv_atomic(output_dir / "skipped.csv", skipped)
    write_json_atomic(output_dir / "prediction_info.json", info)
    return predictions, skipped, predictions_path, write_metrics(predictions, label_names, output_dir, source.root, info)


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators, or absolute when outside it."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def predictions_table(source: PredictionInput, scores: Scores, label_names: Sequence[str]) -> pd.DataFrame:
    """The predictions.csv table, in input order, readable samples only."""
    k = scores.top_classes.shape[1]
    names = np.asarray(label_names, dtype=object)
    table: dict[str, Any] = {
        "path": [relative_path(source.samples[i].path, source.root) for i in scores.indices],
        "dataset": [source.samples[i].dataset for i in scores.indices],
        "location": [source.samples[i].location for i in scores.indices],
        "true_label": [source.true_labels[i] for i in scores.indices],
        "true_prob": scores.true_probs.astype(float),
        "pred_label": names[scores.top_classes[:, 0]],
        "confidence": scores.top_probs[:, 0].astype(float),
    }
    for j in range(k):
        table[f"top{j + 1}_label"] = names[scores.top_classes[:, j]]
    for j in range(k):
        table[f"top{j + 1}_prob"] = scores.top_probs[:, j].astype(float)
    return pd.DataFrame(table, columns=prediction_columns(k))


def skipped_table(source: PredictionInput, skipped: Sequence[int]) -> pd.DataFrame:
    """``skipped.csv``: path and reason of every image that could not be read."""
    paths = [source.samples[i].path for i in skipped]
    return pd.DataFrame({"path": [relative_path(p, source.root) for p in paths],
                         "reason": ["unreadable image" if p.exists() else "file not found" for p in paths]},
                        columns=["path", "reason"])


def write_metrics(predictions: pd.DataFrame, label_names: list[str], output_dir: Path, images_root: Path,
                  info: dict[str, Any]) -> dict[str, Any] | None:
    """``metrics.json`` and the plots when some images have a true label the model knows; None otherwise."""
    if scored_rows(predictions, label_names).empty:
        return None
    metrics = evaluate_predictions(predictions, label_names, output_dir, images_root=images_root, extra={"prediction": info})
    log.info("top-1 %.4f, top-3 %s, macro F1 %.4f on %d labelled images -> %s", metrics["top1"],
             "n/a" if metrics["top3"] is None else f"{metrics['top3']:.4f}", metrics["macro_f1"], metrics["n_scored"],
             output_dir / "metrics.json")
    return metrics
