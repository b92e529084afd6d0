"""Retraining and evaluating a round: round k's model on the train split plus every pool image labelled in
rounds 1 to k, scored on the held-out ``eval_split``; what the model is (a CNN, or a head on cached
embeddings) is the round model's business (``round_models.py``). Evaluation adds the round's row to
``history.csv``.
"""

from __future__ import annotations

from typing import Any

from classification.active_learning import store
from classification.active_learning.round_models import round_model_of
from classification.active_learning.round_status import last_trained_round
from classification.active_learning.rounds import Experiment, latest_selected_round
from classification.data.samples import available_splits
from classification.errors import UserError
from classification.io import write_json_atomic
from classification.training.engine import TrainResult

__all__ = ["evaluate_round", "retrain_round"]


# ---------------------------------------------------------------- retrain


def retrain_round(experiment: Experiment, number: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train round ``number``'s model (default: the newest selected round without one) on the labels imported for
    rounds 1 to ``number``, never a later round's; resumable."""
    number = latest_selected_round(experiment) if number is None else number
    files = experiment.round(number)
    if number < 1 or not files.is_selected():
        raise UserError(f"round {number}: nothing was selected in this round; nothing to retrain")
    labels = store.labels_up_to(store.read_labels(experiment.labels_file), number)  # not those of later rounds
    new = [path for path in files.selected_paths() if path in labels]
    if not new:
        raise UserError(f"round {number}: none of its {len(files.selected_paths())} images has a label yet; "
                        f"label them and run: python classifier/active_learning.py import --config {experiment.config_path} --file ...")
    return round_model_of(experiment).retrain(files, labels, overwrite)


# ---------------------------------------------------------------- evaluate


def evaluate_round(experiment: Experiment, number: int | None = None) -> dict[str, Any]:
    """Score round ``number``'s model on the held-out ``eval_split``; write its ``metrics.json`` and ``history.csv``."""
    number = last_trained_round(experiment) if number is None else number
    model = round_model_of(experiment)
    if not model.is_trained(number):
        raise UserError(f"round {number}: no trained model yet; run: python classifier/active_learning.py retrain "
                        f"--config {experiment.config_path}")
    files = experiment.round(number)
    checkpoint = model.model_file(number).resolve()
    split = experiment.active_learning.eval_split
    if split not in available_splits(experiment.config):
        raise UserError(f"{experiment.config_path}: active_learning.eval_split: {experiment.config.data_root} has no "
                        f"split {split!r} (available: {', '.join(available_splits(experiment.config))})")
    scored, used = model.evaluate(number, split, files.evaluation)
    labels = store.read_labels(experiment.labels_file)
    metrics = {
        "round": number, "pool_labels": int(used), "eval_split": split, "eval_images": scored["n_scored"],
        **{key: scored.get(key) for key in ("top1", "top3", "macro_f1", "weighted_f1", "ece")},
        "checkpoint": str(checkpoint), "labels_stored": len(store.effective_labels(labels)), "evaluated_utc": store.utc_now(),
    }
    write_json_atomic(files.metrics, metrics)
    history = [m for n in store.round_numbers(experiment.root) if (m := store.read_metrics(experiment.round(n)))]
    store.write_history(experiment.root, history)
    return metrics
