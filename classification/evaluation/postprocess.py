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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from classification.config import PostprocessConfig, describe_error
from classification.data.dataset import read_crops_manifest
from classification.data.time_splits import parse_datetimes
from classification.errors import DataError
from classification.evaluation import calibration as cal
from classification.evaluation.megadetector import image_answers, write_megadetector_classifications
from classification.evaluation.plots import save_figure
from classification.evaluation.report import accumulate_scores, probability_matrix, topk_of
from classification.evaluation.taxonomy import (
    SpeciesList,
    Taxonomy,
    allowed_matrix,
    answer_is_right,
    megadetector_descriptions,
    rank_accuracy,
    read_species_list,
    read_taxonomy,
    renormalise,
    roll_up,
)
from classification.io import read_json_object, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

FITTED_DIR = "postprocess"


# ---------------------------------------------------------------- inputs


def probabilities_from_topk(predictions: pd.DataFrame, label_names: list[str]) -> np.ndarray:
    """(N, C) probabilities from a predictions table's top-k columns; the rest of each row's mass spread evenly.

    For a predictions table read back from disk: ``predict.py`` itself hands the stage every class's
    probability. Exact when k equals the number of classes (``--topk C``). The true label's
    probability is not used: fitting on it would leak the answer.
    """
    if topk_of(predictions) < len(label_names):
        log.info("postprocess: from the top-%d of %d probabilities per crop (the rest spread evenly)",
                 topk_of(predictions), len(label_names))
    probabilities = probability_matrix(predictions, label_names, with_true_label=False)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def prediction_context(predictions: pd.DataFrame, manifest: pd.DataFrame | Path | None) -> pd.DataFrame:
    """Per prediction row: its image, sequence id, time and detector confidence (from the crops manifest when there is one)."""
    context = pd.DataFrame({"image": predictions["path"].to_numpy(), "seq_id": "", "datetime": "", "detection_conf": np.nan})
    if isinstance(manifest, Path):
        manifest = read_crops_manifest(manifest) if manifest.exists() else None
    if manifest is None or manifest.empty:
        return context
    table = manifest.drop_duplicates("crop_path").set_index("crop_path")
    found = predictions["path"].isin(table.index).to_numpy()
    rows = table.reindex(predictions["path"])
    for column, source in (("image", "image_id"), ("seq_id", "seq_id"), ("datetime", "datetime")):
        if source in rows:
            values = rows[source].fillna("").astype(str).to_numpy()
            context[column] = np.where(found & (values != ""), values, context[column].to_numpy())
    if "confidence" in rows:
        context["detection_conf"] = pd.to_numeric(rows["confidence"].replace("", np.nan), errors="coerce").to_numpy()
    return context


def sequence_keys(predictions: pd.DataFrame, context: pd.DataFrame, gap_s: float) -> np.ndarray:
    """A group key per row: ``dataset/seq_id``; else one location's frames less than ``gap_s`` apart; else the row alone."""
    datasets = predictions["dataset"].astype(str).to_numpy()
    locations = predictions["location"].astype(str).to_numpy()
    keys = np.array([f"row:{i}" for i in range(len(predictions))], dtype=object)
    has_seq = context["seq_id"].to_numpy() != ""
    keys[has_seq] = [f"seq:{d}/{s}" for d, s in zip(datasets[has_seq], context["seq_id"].to_numpy()[has_seq])]
    times = parse_datetimes(context["datetime"])  # the time splits' reader: ISO or EXIF (2011:06:13 ...) text, else NaT
    timed = ~has_seq & times.notna().to_numpy() & (locations != "")
    if timed.any():
        frame = pd.DataFrame({"dataset": datasets[timed], "location": locations[timed], "time": times[timed].to_numpy(),
                              "row": np.flatnonzero(timed)}).sort_values(["dataset", "location", "time"])
        new_place = (frame["dataset"] != frame["dataset"].shift()) | (frame["location"] != frame["location"].shift())
        gap = frame["time"].diff().dt.total_seconds().fillna(np.inf) > gap_s
        burst = (new_place | gap).cumsum()
        keys[frame["row"].to_numpy()] = [f"time:{d}/{loc}/{b}" for d, loc, b in zip(frame["dataset"], frame["location"], burst)]
    return keys


# ---------------------------------------------------------------- smoothing


def group_mean(probabilities: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each row replaced by the weighted mean probability of its group."""
    codes, uniques = pd.factorize(keys)
    sums = np.zeros((len(uniques), probabilities.shape[1]))
    np.add.at(sums, codes, probabilities * weights[:, None])
    totals = np.bincount(codes, weights=weights, minlength=len(uniques))
    return sums[codes] / totals[codes, None]


def group_vote(probabilities: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each row replaced by its group's (weighted) vote shares of the top-1 classes; ties go to the higher mean probability."""
    votes = np.zeros_like(probabilities)
    votes[np.arange(len(probabilities)), probabilities.argmax(axis=1)] = 1.0
    shares = group_mean(votes, keys, weights) + 1e-6 * group_mean(probabilities, keys, weights)
    return shares / shares.sum(axis=1, keepdims=True)


def smooth_images(probabilities: np.ndarray, images: np.ndarray, confident: float) -> tuple[np.ndarray, int]:
    """In each image with several detections, unconfident detections of a minority class take the dominant class.

    The dominant class has the most top-1 detections (ties: the larger summed probability); a
    changed detection gets the mean probabilities of the image's dominant detections. Returns the
    new probabilities and how many detections changed.
    """
    smoothed = probabilities.copy()
    top, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    changed = 0
    for rows in pd.Series(np.arange(len(images))).groupby(images).indices.values():
        if len(rows) < 2:
            continue
        counts = np.bincount(top[rows], minlength=probabilities.shape[1]) + 1e-6 * probabilities[rows].sum(axis=0)
        dominant = int(counts.argmax())
        switch = rows[(top[rows] != dominant) & (confidence[rows] < confident)]
        if len(switch):
            smoothed[switch] = probabilities[rows[top[rows] == dominant]].mean(axis=0)
            changed += len(switch)
    return smoothed, changed


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


# ---------------------------------------------------------------- the steps


@dataclass
class StageState:
    """The probabilities as they go through the steps, with a record of each step."""

    probabilities: np.ndarray
    stages: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    species_flags: np.ndarray | None = None


def apply_species_list(state: StageState, species_list: SpeciesList, locations: np.ndarray, action: str,
                       label_names: list[str]) -> None:
    """Renormalise over the allowed classes (or flag for roll-up) every row whose top class is not allowed here."""
    allowed = allowed_matrix(species_list, list(locations), len(label_names))
    top = state.probabilities.argmax(axis=1)
    disallowed = ~allowed[np.arange(len(top)), top]
    flags = np.full(len(top), "", dtype=object)
    none_allowed = ~allowed.any(axis=1)
    if action == "renormalise":
        state.probabilities = renormalise(state.probabilities, allowed)
        flags[disallowed] = "renormalised"
    else:
        flags[disallowed] = "rolled up"
    flags[none_allowed] = "no allowed class"
    state.species_flags = flags
    moved = pd.DataFrame({"location": locations[disallowed], "from": np.asarray(label_names, dtype=object)[top[disallowed]]})
    counts = [{"location": str(loc), "from": str(name), "n": int(n)} for (loc, name), n in moved.value_counts().items()]
    state.notes["species_list"] = {"action": action, "n_disallowed": int(disallowed.sum()), "n_no_allowed_class": int(none_allowed.sum()),
                                   "by_location_and_class": counts}
    if disallowed.any():
        log.warning("species list: %d predictions were of a class not allowed at their location (%s; see postprocess_metrics.json)",
                    int(disallowed.sum()), "renormalised over the allowed classes" if action == "renormalise" else "rolled up")
    state.stages["species_list"] = state.probabilities


def transform(probabilities: np.ndarray, predictions: pd.DataFrame, context: pd.DataFrame, config: PostprocessConfig,
              temperature: float | None, species_list: SpeciesList | None, label_names: list[str]) -> StageState:
    """Steps 1-4 of the module docstring on the raw probabilities; every intermediate kept for scoring."""
    state = StageState(probabilities, {"raw": probabilities})
    if temperature is not None:
        state.probabilities = cal.apply_temperature(probabilities, temperature)
        state.stages["calibrated"] = state.probabilities
    if species_list is not None:
        apply_species_list(state, species_list, predictions["location"].astype(str).to_numpy(), config.species_list_action, label_names)
    if config.image_smoothing:
        state.probabilities, changed = smooth_images(state.probabilities, context["image"].to_numpy(), config.image_confident)
        state.notes["image_smoothing"] = {"n_changed": changed, "n_images": int(context["image"].nunique())}
        state.stages["image_smoothing"] = state.probabilities
    if config.sequence != "off":
        keys = sequence_keys(predictions, context, config.sequence_gap_s)
        weights = np.ones(len(keys))
        if config.sequence_weights == "detection":
            weights = np.nan_to_num(context["detection_conf"].to_numpy(float), nan=1.0).clip(min=1e-3)
        state.probabilities = (group_mean if config.sequence == "mean" else group_vote)(state.probabilities, keys, weights)
        kinds = pd.Series(keys).str.split(":").str[0].value_counts().to_dict()
        state.notes["sequence"] = {"method": config.sequence, "weights": config.sequence_weights,
                                   "n_groups": int(len(set(keys))), "rows_by_key": {str(k): int(v) for k, v in kinds.items()}}
        state.stages["sequence"] = state.probabilities
    return state


def answers(probabilities: np.ndarray, label_names: list[str], config: PostprocessConfig, thresholds: np.ndarray | None,
            taxonomy: Taxonomy | None, species_flags: np.ndarray | None) -> pd.DataFrame:
    """Step 5: the answer per row (a class, a taxon or unknown), its rank and confidence."""
    top, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    if thresholds is not None:
        cut = thresholds[top]
    else:
        cut = np.full(len(top), config.rollup_threshold if taxonomy is not None else 0.0)
    blocked = species_flags == "rolled up" if species_flags is not None else np.zeros(len(top), dtype=bool)
    confident = (confidence >= cut) & ~blocked
    answer = np.asarray(label_names, dtype=object)[top]
    rank = np.full(len(top), "species", dtype=object)
    value = confidence.copy()
    unsure = ~confident
    if taxonomy is not None:
        answer[unsure], rank[unsure], value[unsure] = roll_up(probabilities, taxonomy, unsure, config.rollup_threshold,
                                                              config.unknown_label)
    else:
        answer[unsure], rank[unsure] = config.unknown_label, "none"
    return pd.DataFrame({"answer": answer, "answer_rank": rank, "answer_confidence": value})


# ---------------------------------------------------------------- scoring


def labelled(predictions: pd.DataFrame, label_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose true label is a model class (a mask) and those labels' class numbers."""
    scored = predictions["true_label"].isin(label_names).to_numpy()
    index = {name: i for i, name in enumerate(label_names)}
    return scored, np.array([index[name] for name in predictions["true_label"].to_numpy()[scored]], dtype=np.int64)


def stage_summary(probabilities: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """The headline figures of the training metrics for one stage's probabilities."""
    result = accumulate_scores(probabilities, targets, len(label_names)).compute(list(label_names))
    return {"n": int(len(targets)), **{key: float(result[key]) for key in ("top1", "top3", "macro_f1", "loss", "ece")}}


def group_top1(probabilities: np.ndarray, targets: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
    """Top-1 per group (image or sequence): the argmax of the group's mean probability against its one true label.

    Groups whose labelled crops carry more than one true label are counted, not scored.
    """
    frame = pd.DataFrame({"key": keys, "target": targets})
    unanimous = frame.groupby("key")["target"].transform("nunique") == 1
    mean = group_mean(probabilities, keys, np.ones(len(keys)))
    kept = frame[unanimous.to_numpy()].assign(hit=mean[unanimous.to_numpy()].argmax(axis=1) == targets[unanimous.to_numpy()])
    per_group = kept.groupby("key")["hit"].first()
    return {"n_groups": int(len(per_group)), "n_mixed": int(frame.loc[~unanimous.to_numpy(), "key"].nunique()),
            "top1": float(per_group.mean()) if len(per_group) else None}


def answer_summary(table: pd.DataFrame, true_labels: np.ndarray, taxonomy: Taxonomy | None) -> dict[str, Any]:
    """Coverage and accuracy of the answers: species-level, any taxon, unknown."""
    species = (table["answer_rank"] == "species").to_numpy()
    right = np.array([answer_is_right(a, r, t, taxonomy) for a, r, t in zip(table["answer"], table["answer_rank"], true_labels)])
    answered = (table["answer_rank"] != "none").to_numpy()
    return {
        "n": int(len(table)),
        "species_coverage": float(species.mean()) if len(table) else 0.0,
        "species_accuracy": float(right[species].mean()) if species.any() else None,
        "answered_coverage": float(answered.mean()) if len(table) else 0.0,
        "answered_accuracy": float(right[answered].mean()) if answered.any() else None,
        "unknown_fraction": float((~answered).mean()) if len(table) else 0.0,
        "answers_by_rank": {str(k): int(v) for k, v in table["answer_rank"].value_counts().items()},
    }


def score(state: StageState, table: pd.DataFrame, predictions: pd.DataFrame, context: pd.DataFrame,
          label_names: list[str], taxonomy: Taxonomy | None, gap_s: float) -> dict[str, Any]:
    """Every stage with the raw predictions' metrics; image and sequence top-1; the answers; ranks."""
    scored, targets = labelled(predictions, label_names)
    final = state.probabilities[scored]
    metrics: dict[str, Any] = {"stages": {name: stage_summary(p[scored], targets, label_names) for name, p in state.stages.items()}}
    metrics["levels"] = {
        "detection": {"n": int(scored.sum()), "top1": float((final.argmax(axis=1) == targets).mean())},
        "image": group_top1(final, targets, context["image"].to_numpy()[scored]),
        "sequence": group_top1(final, targets, sequence_keys(predictions, context, gap_s)[scored]),
    }
    metrics["answers"] = answer_summary(table[scored].reset_index(drop=True), predictions.loc[scored, "true_label"].to_numpy(), taxonomy)
    if taxonomy is not None:
        metrics["ranks"] = {"raw": rank_accuracy(state.stages["raw"][scored].argmax(axis=1), targets, taxonomy),
                            "final": rank_accuracy(final.argmax(axis=1), targets, taxonomy)}
    return metrics


def risk_coverage_figure(state: StageState, table: pd.DataFrame, predictions: pd.DataFrame, label_names: list[str]) -> Any:
    """Risk-coverage curves of the raw and final probabilities, with the answers' operating point."""
    scored, targets = labelled(predictions, label_names)
    curves = {}
    for name in dict.fromkeys(["raw", list(state.stages)[-1]]):
        p = state.stages[name][scored]
        curves[name] = cal.risk_coverage(p.max(axis=1), p.argmax(axis=1) == targets)
    species = (table.loc[scored, "answer_rank"] == "species").to_numpy()
    hits = (table.loc[scored, "answer"].to_numpy() == predictions.loc[scored, "true_label"].to_numpy())
    points = {"answers": (float(species.mean()), float(hits[species].mean()))} if species.any() else {}
    return cal.plot_risk_coverage(curves, points)


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
