"""Selecting a round's images: score the pool with the previous round's model, pick with the configured
strategy, write ``selection.csv`` with the reason for each pick and hand the images to the label tool.

Images already labelled or requested in an earlier round are never picked. A strategy that measures
from the labelled set (its registry entry's ``uses_labelled``) also sees the embedded train split as
labelled items.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classification.active_learning import store
from classification.active_learning.embeddings import PoolEmbeddings
from classification.active_learning.handoff import handoff_to_label_tool
from classification.active_learning.lightly import write_embeddings_csv, write_lightly_predictions
from classification.active_learning.registry import get_strategy, select
from classification.active_learning.round_models import round_model_of
from classification.active_learning.round_status import last_trained_round
from classification.active_learning.rounds import Experiment, pool_paths, pool_samples, round_seed
from classification.active_learning.scores import uncertainty_scores
from classification.active_learning.strategies import Selection, SelectionInputs
from classification.data.samples import Sample, build_samples
from classification.errors import DataError, UserError
from classification.io import read_string_csv, write_csv_atomic, write_json_atomic

__all__ = [
    "SelectResult",
    "check_finite",
    "compute_selection",
    "embed_for_selection",
    "select_round",
    "selection_table",
    "write_lightly_outputs",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- select


@dataclass
class SelectResult:
    """A round's selection and where it was handed to the label tool."""

    round: int
    selection: pd.DataFrame
    already_selected: bool
    handoff: list[Path] = field(default_factory=list)
    message: str = ""


def embed_for_selection(experiment: Experiment, number: int, samples: list[Sample], name: str) -> PoolEmbeddings:
    """Embeddings and probabilities of ``samples`` with the model of round ``number - 1`` (cached per round;
    with ``retrain: head`` the features are cached once and only the head's probabilities are new)."""
    return round_model_of(experiment).score_for_selection(number, samples, name)


def check_finite(probabilities: np.ndarray, checkpoint: Path) -> None:
    """A model whose training diverged predicts NaN: say so, instead of selecting at random."""
    bad = int((~np.isfinite(probabilities)).any(axis=1).sum())
    if bad:
        raise DataError(f"{checkpoint}: the model predicts NaN or infinite values for {bad} of {len(probabilities)} "
                        "pool images (its training diverged: lower learning_rate and retrain)")


def selection_table(selection: Selection, paths: Sequence[str], probabilities: np.ndarray, label_names: Sequence[str]) -> pd.DataFrame:
    """``selection.csv``: rank, path, score, distance, cluster, the model's guess and why it was picked."""
    rows = []
    for rank, pick in enumerate(selection.picks, start=1):
        p = probabilities[pick.index]
        rows.append([rank, paths[pick.index], pick.score, pick.distance, pick.cluster, label_names[int(np.argmax(p))],
                     float(np.max(p)), pick.reason])
    return pd.DataFrame(rows, columns=store.SELECTION_COLUMNS)


def compute_selection(experiment: Experiment, number: int) -> tuple[pd.DataFrame, dict[str, Any], PoolEmbeddings, list[str]]:
    """Score the pool with the previous round's model and pick this round's images."""
    al, pool_dir = experiment.active_learning, experiment.pool_dir()
    strategy = get_strategy(al.strategy)
    paths = pool_paths(pool_dir)
    labels = store.effective_labels(store.read_labels(experiment.labels_file))
    requested = set(store.requested_paths(experiment.root, up_to=number - 1))
    samples = pool_samples(experiment, paths)
    pool = embed_for_selection(experiment, number, samples, "pool")
    for index in pool.skipped:
        log.warning("skipped %s (unreadable image); it cannot be selected", samples[index].path)
    kept_paths = [paths[i] for i in pool.kept]
    labelled = np.array([p in labels for p in kept_paths], dtype=bool)
    excluded = np.array([p in requested and p not in labels for p in kept_paths], dtype=bool)
    embeddings, probabilities = pool.embeddings, pool.probabilities
    assert probabilities is not None
    check_finite(probabilities, round_model_of(experiment).model_file(number - 1))
    if strategy.uses_labelled:  # the train split is labelled too: distances start from it
        train = embed_for_selection(experiment, number, build_samples(experiment.config, experiment.config.train_split), "train")
        embeddings = np.concatenate([embeddings, train.embeddings])
        probabilities = np.concatenate([probabilities, train.probabilities])
        labelled = np.concatenate([labelled, np.ones(len(train), dtype=bool)])
        excluded = np.concatenate([excluded, np.zeros(len(train), dtype=bool)])
    inputs = SelectionInputs(labelled=labelled, excluded=excluded, probabilities=probabilities, embeddings=embeddings)
    seed = round_seed(al.seed, number)
    options = strategy.config_options(al)
    selection = select(al.strategy, inputs, al.batch_size, seed, **options)
    table = selection_table(selection, kept_paths, probabilities, experiment.label_names)
    info = {
        "round": number, "strategy": al.strategy, "options": options, "seed": seed,
        "batch_size": al.batch_size, "model": str(round_model_of(experiment).model_file(number - 1)), "pool": str(pool_dir),
        "pool_images": len(paths), "unreadable": len(pool.skipped), "already_labelled": int(labelled[:len(kept_paths)].sum()),
        "requested_not_labelled": int(excluded.sum()), "selected": len(table), "created_utc": store.utc_now(),
    }
    return table, info, pool, kept_paths


def select_round(experiment: Experiment) -> SelectResult:
    """Make the next round's selection (or show the one already made) and hand it to the label tool."""
    experiment.pool_dir()  # a missing pool is an error even when the round was selected before
    number = last_trained_round(experiment) + 1
    files = experiment.round(number)
    if files.is_selected():
        table = read_string_csv(files.selection, store.SELECTION_COLUMNS)
        handoff = handoff_to_label_tool(experiment, files, table["path"].tolist())
        return SelectResult(number, table, True, handoff, f"round {number} was already selected ({len(table)} images)")
    table, info, pool, kept_paths = compute_selection(experiment, number)
    if table.empty:
        raise UserError(f"{experiment.pool_dir()}: nothing left to select: every pool image is labelled or requested")
    if experiment.active_learning.lightly_outputs:
        write_lightly_outputs(experiment, files, pool, kept_paths)
    write_json_atomic(files.selection_info, info)
    write_csv_atomic(files.selection, table)  # last: the selection is made
    handoff = handoff_to_label_tool(experiment, files, table["path"].tolist())
    return SelectResult(number, table, False, handoff, f"round {number}: {len(table)} images selected with {info['strategy']}")


def write_lightly_outputs(experiment: Experiment, files: store.RoundFiles, pool: PoolEmbeddings, kept_paths: list[str]) -> None:
    """Lightly's predictions and ``embeddings.csv`` (with a margin ``al_score``) of the pool, for Lightly users."""
    assert pool.probabilities is not None
    folder = files.root / "lightly"
    write_lightly_predictions(folder, "classification", kept_paths, pool.probabilities, experiment.label_names)
    predicted = np.argmax(pool.probabilities, axis=1) if len(pool) else []
    write_embeddings_csv(folder / "embeddings.csv", kept_paths, pool.embeddings, list(predicted),
                         uncertainty_scores(pool.probabilities, "margin") if len(pool) else [])
