"""The post-processing steps on the (N, C) class probabilities of the predicted crops: where they come
from (every class from ``predict.py``, or a table's top-k), each row's image, sequence and detector
confidence, calibration, the species list, image and sequence smoothing, and the answers.

Steps 1-5 of ``postprocess.py``'s docstring, in that order (``transform`` then ``answers``); the
stage there fits what they need on val, scores them and writes the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classification.config import PostprocessConfig
from classification.data.dataset import read_crops_manifest
from classification.data.time_splits import parse_datetimes
from classification.evaluation import calibration as cal
from classification.evaluation.report import probability_matrix, topk_of
from classification.evaluation.taxonomy import SpeciesList, Taxonomy, allowed_matrix, renormalise, roll_up

__all__ = [
    "StageState",
    "answers",
    "apply_species_list",
    "group_mean",
    "group_vote",
    "prediction_context",
    "probabilities_from_topk",
    "sequence_keys",
    "smooth_images",
    "transform",
]

log = logging.getLogger(__name__)

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
    """Steps 1-4 of ``postprocess.py``'s docstring on the raw probabilities; every intermediate kept for scoring."""
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
