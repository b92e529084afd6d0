"""After prediction: calibration, species lists, image and sequence smoothing, abstention and taxonomy roll-up.

One stage, configured by the experiment's ``postprocess:`` section and run by ``predict.py``
after the raw predictions are written. The steps, in order, each on the (N, C) class
probabilities of the predicted crops:

1. **calibrate**: temperature scaling (``calibration.py``), fitted on the val split;
2. **species list**: classes not allowed at a row's location are renormalised away, or the
   row is marked to roll up (``taxonomy.py``); every changed row is reported;
3. **image smoothing**: in an image with several detections, a detection of a minority class
   below ``image_confident`` takes the image's dominant class ("700 cows and one deer");
4. **sequence**: the probabilities of a sequence (``seq_id`` from the crops manifest, else one
   location's frames less than ``sequence_gap_s`` apart) averaged, optionally weighted by
   detector confidence, or a majority vote;
5. **answers**: the top class where it is confident (above its per-class threshold, fitted on val
   for ``target_precision``, when ``abstain``), else the first taxon whose summed probability
   reaches ``rollup_threshold`` (with a taxonomy), else ``unknown_label``. For MegaDetector
   input, images without a detection at ``blank_threshold`` are "blank" and person/vehicle
   detections keep the detector's category.

Every stage is scored with the same metrics as the raw predictions
(``training.metrics.MetricAccumulator``), side by side in ``postprocess_metrics.json``, with
detection-, image- and sequence-level top-1. The temperature and thresholds are fitted when the
val split is predicted and saved atomically to ``<run>/postprocess/<checkpoint>.json`` with the
checkpoint's SHA-256; a later prediction with the same checkpoint applies them, one with
another checkpoint (e.g. a newer ``best.pt``) skips them with a warning and says so.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from classification.config import PostprocessConfig, describe_error
from classification.data.dataset import read_crops_manifest
from classification.errors import DataError
from classification.evaluation import calibration as cal
from classification.evaluation.megadetector import image_answers, write_megadetector_classifications
from classification.evaluation.plots import save_figure
from classification.evaluation.postprocess_scores import labelled, risk_coverage_figure, score
from classification.evaluation.postprocess_steps import StageState, answers, prediction_context, transform
from classification.evaluation.taxonomy import (
    SpeciesList,
    Taxonomy,
    megadetector_descriptions,
    read_species_list,
    read_taxonomy,
)
from classification.io import read_json_object, write_csv_atomic, write_json_atomic

__all__ = [
    "FITTED_DIR",
    "FittedPostprocess",
    "PostprocessInput",
    "PostprocessResult",
    "file_sha256",
    "fit",
    "fitted_for",
    "fitted_path",
    "is_enabled",
    "level_table",
    "load_fitted",
    "log_summary",
    "megadetector_descriptions_for",
    "postprocessed_table",
    "run_postprocess",
    "stage_table",
    "write_megadetector_answers",
]

log = logging.getLogger(__name__)

FITTED_DIR = "postprocess"


# ---------------------------------------------------------------- fitted state


@dataclass
class FittedPostprocess:
    """What was fitted on the val split for one checkpoint: the temperature and the per-class thresholds."""

    checkpoint: str
    checkpoint_sha256: str
    fitted_on: str
    n_fitted: int
    temperature: float | None = None
    target_precision: float | None = None
    thresholds: dict[str, float | None] | None = None  # None: the class never reaches the target (never answered)
    pooled_threshold: float | None = None

    def threshold_array(self, label_names: list[str]) -> np.ndarray | None:
        """Per-class thresholds in label order (inf where never answered), or None when none were fitted."""
        if self.thresholds is None:
            return None
        return np.array([np.inf if (value := self.thresholds.get(name)) is None else float(value) for name in label_names])


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (which checkpoint a fit belongs to)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fitted_path(run_dir: Path, checkpoint: Path) -> Path:
    """``<run>/postprocess/<checkpoint stem>.json``."""
    return Path(run_dir) / FITTED_DIR / f"{Path(checkpoint).stem}.json"


def load_fitted(run_dir: Path, checkpoint: Path) -> tuple[FittedPostprocess | None, str]:
    """The fit saved for this checkpoint, or None and why not (no file, or a fit of another checkpoint file)."""
    path = fitted_path(run_dir, checkpoint)
    if not path.exists():
        return None, f"nothing fitted for {Path(checkpoint).name} ({path} missing): predict the val split first"
    try:  # each field's type: a temperature or threshold that is not a number was a numpy traceback when applied
        fitted = TypeAdapter(FittedPostprocess).validate_python(read_json_object(path))
    except ValidationError as error:
        problems = "; ".join(describe_error(e) for e in error.errors())
        raise DataError(f"{path}: not a postprocess fit: {problems}; predict the val split again") from None
    if fitted.checkpoint_sha256 != file_sha256(Path(checkpoint)):
        return None, f"{path} was fitted for another {Path(checkpoint).name} (it changed since): predict the val split again"
    return fitted, ""


# ---------------------------------------------------------------- the stage


@dataclass
class PostprocessInput:
    """What the stage needs besides the predictions table: where the run is, and where the crops came from."""

    run_dir: Path
    checkpoint: Path
    fit: bool  # True when the val split was predicted: fit the temperature and thresholds here
    manifest: pd.DataFrame | Path | None = None
    megadetector: Path | None = None
    classifier: str | None = None
    packaged: FittedPostprocess | None = None  # a model package's own fit: applied as is, never refitted or looked up


@dataclass
class PostprocessResult:
    """The post-processed table, its metrics (None without labels), the fit used, and the files written."""

    table: pd.DataFrame
    metrics: dict[str, Any] | None
    fitted: FittedPostprocess | None
    paths: dict[str, Path]


def is_enabled(config: PostprocessConfig) -> bool:
    """Whether any step is on."""
    return bool(config.calibrate or config.image_smoothing or config.sequence != "off" or config.abstain
                or config.taxonomy is not None or config.species_list is not None)


def fit(config: PostprocessConfig, probabilities: np.ndarray, predictions: pd.DataFrame, context: pd.DataFrame,
        species_list: SpeciesList | None, label_names: list[str], where: PostprocessInput) -> FittedPostprocess:
    """Fit the temperature (on the raw probabilities) and then the thresholds (on the final ones) on the labelled rows."""
    scored, targets = labelled(predictions, label_names)
    if not scored.any():
        raise DataError(f"{where.checkpoint}: postprocess: the val split has no labelled predictions to fit on")
    fitted = FittedPostprocess(str(where.checkpoint), file_sha256(where.checkpoint), "val", int(scored.sum()))
    if config.calibrate:
        fitted.temperature = cal.fit_temperature(probabilities[scored], targets)
    if config.abstain:
        final = transform(probabilities, predictions, context, config, fitted.temperature, species_list, label_names).probabilities
        thresholds, pooled = cal.fit_thresholds(final[scored], targets, config.target_precision)
        fitted.target_precision = config.target_precision
        fitted.thresholds = {name: (None if np.isinf(t) else float(t)) for name, t in zip(label_names, thresholds)}
        fitted.pooled_threshold = None if np.isinf(pooled) else float(pooled)
    path = fitted_path(where.run_dir, where.checkpoint)
    write_json_atomic(path, asdict(fitted))
    log.info("postprocess: fitted on %d val predictions (temperature %s, thresholds for precision %s) -> %s", fitted.n_fitted,
             fitted.temperature, fitted.target_precision, path)
    return fitted


def fitted_for(config: PostprocessConfig, probabilities: np.ndarray, predictions: pd.DataFrame, context: pd.DataFrame,
               species_list: SpeciesList | None, label_names: list[str], where: PostprocessInput) -> tuple[FittedPostprocess | None, str]:
    """The fit to apply (made here on val, else loaded), or None and why the fitted steps are skipped."""
    if not (config.calibrate or config.abstain):
        return None, ""
    if where.packaged is not None:
        return where.packaged, ""
    if where.fit:
        return fit(config, probabilities, predictions, context, species_list, label_names, where), ""
    fitted, why = load_fitted(where.run_dir, where.checkpoint)
    if fitted is None:
        log.warning("postprocess: calibration and abstention skipped: %s", why)
    elif config.abstain and fitted.thresholds is None or config.calibrate and fitted.temperature is None:
        why = f"{fitted_path(where.run_dir, where.checkpoint)} was fitted without calibrate/abstain: predict the val split again"
        log.warning("postprocess: %s", why)
    return fitted, why


def postprocessed_table(predictions: pd.DataFrame, context: pd.DataFrame, state: StageState, answer_table: pd.DataFrame,
                        label_names: list[str]) -> pd.DataFrame:
    """``postprocessed.csv``: per crop, the raw and smoothed top-1 and the final answer side by side."""
    names = np.asarray(label_names, dtype=object)
    final = state.probabilities
    return pd.DataFrame({
        "path": predictions["path"].to_numpy(), "dataset": predictions["dataset"].to_numpy(),
        "location": predictions["location"].to_numpy(), "image": context["image"].to_numpy(), "seq_id": context["seq_id"].to_numpy(),
        "true_label": predictions["true_label"].to_numpy(), "raw_label": predictions["pred_label"].to_numpy(),
        "raw_confidence": predictions["confidence"].to_numpy(float).round(6),
        "pred_label": names[final.argmax(axis=1)], "confidence": final.max(axis=1).round(6),
        "answer": answer_table["answer"].to_numpy(), "answer_rank": answer_table["answer_rank"].to_numpy(),
        "answer_confidence": answer_table["answer_confidence"].to_numpy(float).round(6),
        "species_list": state.species_flags if state.species_flags is not None else "",
    })


def run_postprocess(config: PostprocessConfig, label_names: list[str], predictions: pd.DataFrame, probabilities: np.ndarray,
                    output_dir: Path, where: PostprocessInput) -> PostprocessResult | None:
    """Run the steps the config turns on and write ``postprocessed.csv``, ``postprocess_metrics.json`` and the plot.

    None when no step is on. ``probabilities`` are the raw (N, C) probabilities of the table's rows.
    """
    if not is_enabled(config):
        return None
    label_names = list(label_names)
    if config.unknown_label in label_names:
        raise DataError(f"postprocess.unknown_label: {config.unknown_label!r} is one of the model's classes: choose another name")
    taxonomy = read_taxonomy(config.taxonomy, label_names) if config.taxonomy is not None else None
    species_list = read_species_list(config.species_list, label_names, taxonomy) if config.species_list is not None else None
    context = prediction_context(predictions, where.manifest)
    fitted, skipped = fitted_for(config, probabilities, predictions, context, species_list, label_names, where)
    temperature = fitted.temperature if fitted is not None and config.calibrate else None
    state = transform(probabilities, predictions, context, config, temperature, species_list, label_names)
    thresholds = fitted.threshold_array(label_names) if fitted is not None and config.abstain else None
    answer_table = answers(state.probabilities, label_names, config, thresholds, taxonomy, state.species_flags)
    table = postprocessed_table(predictions, context, state, answer_table, label_names)
    output_dir = Path(output_dir)
    paths = {"table": output_dir / "postprocessed.csv", "metrics": output_dir / "postprocess_metrics.json"}
    write_csv_atomic(paths["table"], table)
    metrics: dict[str, Any] = {"config": config.model_dump(mode="json"), "fitted": asdict(fitted) if fitted else None,
                               "skipped": skipped or None, "notes": state.notes}
    if predictions["true_label"].isin(label_names).any():
        metrics.update(score(state, answer_table, predictions, context, label_names, taxonomy, config.sequence_gap_s))
        paths["risk_coverage"] = save_figure(risk_coverage_figure(state, answer_table, predictions, label_names),
                                             output_dir / "risk_coverage.png")
    if where.megadetector is not None:
        paths.update(write_megadetector_answers(where, table, label_names, taxonomy, config, output_dir))
    write_json_atomic(paths["metrics"], metrics)
    log_summary(metrics, paths["metrics"])
    return PostprocessResult(table, metrics if "stages" in metrics else None, fitted, paths)


def log_summary(metrics: dict[str, Any], path: Path) -> None:
    """One line per stage: top-1 and ECE; and the answers' coverage."""
    for name, figures in metrics.get("stages", {}).items():
        log.info("postprocess %-15s top-1 %.4f  ECE %.4f  NLL %.4f", name, figures["top1"], figures["ece"], figures["loss"])
    answered = metrics.get("answers")
    if answered:
        accuracy = answered["species_accuracy"]
        log.info("postprocess answers: species for %.1f%% (accuracy %s), unknown %.1f%% -> %s", 100 * answered["species_coverage"],
                 "n/a" if accuracy is None else f"{accuracy:.4f}", 100 * answered["unknown_fraction"], path)


# ---------------------------------------------------------------- MegaDetector output


def megadetector_descriptions_for(config: PostprocessConfig, label_names: list[str]) -> dict[str, str] | None:
    """``classification_category_descriptions`` of the model's classes when the config names a taxonomy, else None."""
    if config.taxonomy is None:
        return None
    return megadetector_descriptions(label_names, read_taxonomy(config.taxonomy, label_names))


def write_megadetector_answers(where: PostprocessInput, table: pd.DataFrame, label_names: list[str], taxonomy: Taxonomy | None,
                               config: PostprocessConfig, output_dir: Path) -> dict[str, Path]:
    """``<md>_postprocessed.json`` (each classified detection's answer; taxa and unknown as extra categories) and ``image_answers.csv``."""
    assert where.megadetector is not None
    manifest = where.manifest if isinstance(where.manifest, pd.DataFrame) else read_crops_manifest(Path(str(where.manifest)))
    names = label_names + sorted(set(table["answer"]) - set(label_names))
    answered = pd.DataFrame({"path": table["path"], "top1_label": table["answer"], "top1_prob": table["answer_confidence"]})
    descriptions = megadetector_descriptions(names, taxonomy) if taxonomy is not None else None
    md_path = output_dir / f"{where.megadetector.stem}_postprocessed.json"
    md = write_megadetector_classifications(where.megadetector, answered, manifest, md_path, 1, label_names=names,
                                            classifier=where.classifier, descriptions=descriptions)
    images_path = output_dir / "image_answers.csv"
    write_csv_atomic(images_path, image_answers(md, table, manifest, config.blank_threshold))
    return {"megadetector": md_path, "image_answers": images_path}


# ---------------------------------------------------------------- tables for the notebook


def stage_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per step of a ``postprocess_metrics.json`` (raw first): top-1, top-3, macro-F1, NLL, ECE."""
    return pd.DataFrame.from_dict(metrics.get("stages", {}), orient="index").rename(columns={"loss": "nll"})


def level_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Top-1 of the final probabilities per detection, per image and per sequence."""
    rows = {level: {"top1": figures.get("top1"), "n": figures.get("n", figures.get("n_groups"))}
            for level, figures in metrics.get("levels", {}).items()}
    return pd.DataFrame.from_dict(rows, orient="index")
