"""The rounds of an experiment's active learning and their state: the experiment handle, each round's files
and model, and what to run next.

The state lives in the files of ``runs/<model>/<experiment>/active_learning/`` (see ``store.py``):
a round is selected once its ``selection.csv`` exists, trained once its ``done.json`` does, and
evaluated once its ``metrics.json`` does, so every step can be stopped and run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from classification.active_learning import head_rounds, store
from classification.active_learning.registry import check_config_strategies
from classification.config import ActiveLearningConfig, ExperimentConfig, load_config
from classification.data.samples import Sample, build_samples, image_files, load_label_index
from classification.errors import DataError, UserError
from classification.evaluation.prediction_files import labelled_samples
from classification.training.checkpoint import resolve_checkpoint

__all__ = [
    "AL_DIR",
    "POOL_DATASET",
    "Experiment",
    "RoundState",
    "head_context",
    "is_trained",
    "last_trained_round",
    "latest_selected_round",
    "model_checkpoint",
    "next_step",
    "open_experiment",
    "pool_paths",
    "pool_samples",
    "round_model",
    "round_seed",
    "round_states",
    "status_table",
    "train_round_head",
    "uses_head",
]


def round_seed(seed: int, round_number: int) -> int:
    """The seed of one round's selection and head training: distinct per round, the same on a re-run."""
    return seed * 1000 + round_number


AL_DIR = "active_learning"
POOL_DATASET = "al_pool"


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class Experiment:
    """An experiment folder seen by the loop: its config and where the rounds live."""

    config: ExperimentConfig
    run_dir: Path
    config_path: Path

    @property
    def active_learning(self) -> ActiveLearningConfig:
        """The config's ``active_learning:`` section."""
        return self.config.active_learning

    @property
    def root(self) -> Path:
        return self.run_dir / AL_DIR

    @property
    def labels_file(self) -> Path:
        return self.root / store.LABELS_FILE

    @property
    def label_names(self) -> list[str]:
        index = load_label_index(self.config.data_root, self.config.train_split)
        return [index[i] for i in range(len(index))]

    def round(self, number: int) -> store.RoundFiles:
        return store.round_files(self.root, number)

    def pool_dir(self) -> Path:
        """The pool folder; a one-line error when the config has none or it is missing."""
        pool = self.active_learning.pool
        if pool is None:
            raise UserError(f"{self.config_path}: active_learning.pool: required (the folder of unlabelled images)")
        if not Path(pool).is_dir():
            raise UserError(f"{self.config_path}: active_learning.pool: folder not found: {pool}")
        return Path(pool)


def open_experiment(config_path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Load the experiment's config (with ``--set`` overrides) for the loop; its strategy names must be registered."""
    config_path = Path(config_path)
    config = load_config(config_path, overrides)
    check_config_strategies(config.active_learning, str(config_path))
    return Experiment(config, config_path.resolve().parent, config_path)


def uses_head(experiment: Experiment) -> bool:
    """True when each round's model is an MLP on cached embeddings (``retrain: head``)."""
    return experiment.active_learning.retrain == "head"


def head_context(experiment: Experiment) -> head_rounds.HeadContext:
    """What the head-only rounds read: the config, the features folder, the round-0 CNN checkpoint."""
    return head_rounds.HeadContext(experiment.config, experiment.root / "features", lambda: model_checkpoint(experiment, 0))


def pool_samples(experiment: Experiment, paths: Sequence[str], labels: dict[str, str] | None = None) -> list[Sample]:
    """The pool images as samples (label -1 where ``labels`` has none known to the model)."""
    pool_dir, al = experiment.pool_dir(), experiment.active_learning
    labels = labels or {}
    return labelled_samples([pool_dir / p for p in paths], [labels.get(p, "") for p in paths], [al.pool_location] * len(paths),
                            [POOL_DATASET] * len(paths), experiment.label_names if labels else [])


def pool_paths(pool_dir: Path) -> list[str]:
    """Every image under the pool folder as a relative POSIX path, sorted."""
    files = image_files(pool_dir)
    if not files:
        raise DataError(f"{pool_dir}: no images (.jpg, .jpeg, .png) in the active-learning pool")
    return [f.relative_to(pool_dir).as_posix() for f in files]


# ---------------------------------------------------------------- the state of the rounds


@dataclass
class RoundState:
    """What has happened in one round, read from its files."""

    number: int
    selected: int
    labelled: int  # of this round's selection, images with a stored label
    trained: bool
    metrics: dict[str, Any] | None


def model_checkpoint(experiment: Experiment, number: int) -> Path:
    """The checkpoint of round ``number``'s model (round 0: the experiment's ``initial_checkpoint``)."""
    if number == 0:
        return resolve_checkpoint(experiment.run_dir, experiment.active_learning.initial_checkpoint)
    return resolve_checkpoint(experiment.round(number).model, "best")


def round_model(experiment: Experiment, number: int) -> Path:
    """Round ``number``'s model file: its CNN checkpoint, or with ``retrain: head`` its head (round 0's trained
    on the train split the first time it is asked for)."""
    if not uses_head(experiment):
        return model_checkpoint(experiment, number)
    path = experiment.round(number).model / head_rounds.HEAD_FILE
    if number == 0 and not head_rounds.head_fits(head_context(experiment), path, len(experiment.label_names)):
        train_round_head(experiment, 0, [])  # first use, or the embeddings changed since
    if not path.is_file():
        raise UserError(f"round {number}: no trained head yet; run: python classifier/active_learning.py retrain "
                        f"--config {experiment.config_path}")
    return path


def train_round_head(experiment: Experiment, number: int, pool: list[Sample]) -> dict[str, Any]:
    """Train round ``number``'s head on the train split plus the labelled ``pool`` samples."""
    config = experiment.config
    return head_rounds.train_head(head_context(experiment), build_samples(config, config.train_split), pool,
                                  len(experiment.label_names), experiment.round(number).model / head_rounds.HEAD_FILE,
                                  seed=round_seed(experiment.active_learning.seed, number))


def is_trained(experiment: Experiment, number: int) -> bool:
    """Round 0: the experiment has its initial checkpoint (a head is trained when needed); round k: its retrain
    finished."""
    if number == 0 and uses_head(experiment) and experiment.active_learning.embeddings == "pretrained":
        return True  # round 0's head is trained on the frozen backbone's features when first needed
    if number == 0:
        try:
            model_checkpoint(experiment, 0)
        except UserError:
            return False
        return True
    return experiment.round(number).done.exists()  # a folder in its place: reading it says so


def round_states(experiment: Experiment) -> list[RoundState]:
    """Every round's state, in order."""
    labels = store.effective_labels(store.read_labels(experiment.labels_file))
    states = []
    for number in store.round_numbers(experiment.root):
        files = experiment.round(number)
        selected = files.selected_paths()
        states.append(RoundState(number, len(selected), sum(path in labels for path in selected),
                                 is_trained(experiment, number), store.read_metrics(files)))
    return states


def last_trained_round(experiment: Experiment) -> int:
    """The newest round with a model; an error when not even round 0 has one."""
    trained = [state.number for state in round_states(experiment) if state.trained]
    if not trained:
        raise UserError(f"{experiment.run_dir}: no model yet (no checkpoint {experiment.active_learning.initial_checkpoint!r}); "
                        f"train round 0 first: python classifier/train.py --config {experiment.config_path}")
    return max(trained)


def latest_selected_round(experiment: Experiment) -> int:
    """The newest round with a selection; an error when there is none."""
    selected = [n for n in store.round_numbers(experiment.root) if experiment.round(n).is_selected()]
    if not selected:
        raise UserError(f"{experiment.root}: nothing selected yet; run: python classifier/active_learning.py select "
                        f"--config {experiment.config_path}")
    return max(selected)


# ---------------------------------------------------------------- status


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
