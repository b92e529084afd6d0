"""Scoring the post-processing stage: every step with the raw predictions' metrics, image- and
sequence-level top-1, the answers' coverage and accuracy, taxonomic ranks, and the risk-coverage figure
(``postprocess_metrics.json`` and ``risk_coverage.png``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from classification.evaluation import calibration as cal
from classification.evaluation.postprocess_steps import StageState, group_mean, sequence_keys
from classification.evaluation.report import accumulate_scores
from classification.evaluation.taxonomy import Taxonomy, answer_is_right, rank_accuracy

__all__ = ["answer_summary", "group_top1", "labelled", "risk_coverage_figure", "score", "stage_summary"]

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
