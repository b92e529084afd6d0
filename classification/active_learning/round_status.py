"""The state of an experiment's rounds, read from their files, and what the person should run next.

A round is selected once its ``selection.csv`` exists, trained once its model does (``round_models``:
``done.json``, or for round 0 what its model is made from) and evaluated once its ``metrics.json`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from classification.active_learning import store
from classification.active_learning.round_models import round_model_of
from classification.active_learning.rounds import Experiment
from classification.errors import UserError

__all__ = ["RoundState", "last_trained_round", "next_step", "round_states", "status_table"]


@dataclass
class RoundState:
    """What has happened in one round, read from its files."""

    number: int
    selected: int
    labelled: int  # of this round's selection, images with a stored label
    trained: bool
    metrics: dict[str, Any] | None


def round_states(experiment: Experiment) -> list[RoundState]:
    """Every round's state, in order."""
    labels = store.effective_labels(store.read_labels(experiment.labels_file))
    model = round_model_of(experiment)
    states = []
    for number in store.round_numbers(experiment.root):
        files = experiment.round(number)
        selected = files.selected_paths()
        states.append(RoundState(number, len(selected), sum(path in labels for path in selected),
                                 model.is_trained(number), store.read_metrics(files)))
    return states


def last_trained_round(experiment: Experiment) -> int:
    """The newest round with a model; an error when not even round 0 has one."""
    trained = [state.number for state in round_states(experiment) if state.trained]
    if not trained:
        raise UserError(f"{experiment.run_dir}: no model yet (no checkpoint {experiment.active_learning.initial_checkpoint!r}); "
                        f"train round 0 first: python classifier/train.py --config {experiment.config_path}")
    return max(trained)


def next_step(experiment: Experiment, states: list[RoundState]) -> str:
    """What the person should run next."""
    command = f"python classifier/active_learning.py {{}} --config {experiment.config_path}"
    if not states[0].trained:
        return f"train round 0: python classifier/train.py --config {experiment.config_path}"
    last = states[-1]
    if last.number > 0 and last.selected and not last.trained:
        if last.labelled == 0:
            tool = "Timelapse (timelapse_request.csv)" if experiment.active_learning.label_tool == "timelapse" else "Label Studio"
            return f"label round {last.number}'s {last.selected} images in {tool}, then: " + command.format("import") + (
                " --file <export>" if experiment.active_learning.label_tool == "timelapse" else "")
        return command.format("retrain")
    if last.metrics is None:
        return command.format("evaluate")
    return command.format("select")


def status_table(experiment: Experiment) -> tuple[pd.DataFrame, str]:
    """One row per round (selected, labelled, trained, held-out figures) and the next step."""
    states = round_states(experiment)
    rows = []
    for state in states:
        metrics = state.metrics or {}
        rows.append({"round": state.number, "selected": state.selected, "labelled": state.labelled,
                     "pool_labels": metrics.get("pool_labels", ""), "model": "yes" if state.trained else "no",
                     f"{experiment.active_learning.eval_split}_top1": metrics.get("top1", ""),
                     f"{experiment.active_learning.eval_split}_macro_f1": metrics.get("macro_f1", "")})
    return pd.DataFrame(rows), next_step(experiment, states)
