"""The rounds of an experiment's active learning: the experiment handle, its pool, each round's files and seed,
and round k's CNN checkpoint (what a round's model does is ``round_models.py``; the rounds' state, ``round_status.py``).

The state lives in the files of ``runs/<model>/<experiment>/active_learning/`` (see ``store.py``):
a round is selected once its ``selection.csv`` exists, trained once its ``done.json`` does, and
evaluated once its ``metrics.json`` does, so every step can be stopped and run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from classification.active_learning import head_rounds, store
from classification.active_learning.registry import check_config_strategies
from classification.config import ActiveLearningConfig, ExperimentConfig, load_config
from classification.data.samples import Sample, image_files, load_label_index
from classification.errors import DataError, UserError
from classification.evaluation.prediction_files import labelled_samples
from classification.training.checkpoint import resolve_checkpoint

__all__ = [
    "AL_DIR",
    "POOL_DATASET",
    "Experiment",
    "head_context",
    "latest_selected_round",
    "model_checkpoint",
    "open_experiment",
    "pool_paths",
    "pool_samples",
    "round_seed",
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


def model_checkpoint(experiment: Experiment, number: int) -> Path:
    """The checkpoint of round ``number``'s model (round 0: the experiment's ``initial_checkpoint``)."""
    if number == 0:
        return resolve_checkpoint(experiment.run_dir, experiment.active_learning.initial_checkpoint)
    return resolve_checkpoint(experiment.round(number).model, "best")


def latest_selected_round(experiment: Experiment) -> int:
    """The newest round with a selection; an error when there is none."""
    selected = [n for n in store.round_numbers(experiment.root) if experiment.round(n).is_selected()]
    if not selected:
        raise UserError(f"{experiment.root}: nothing selected yet; run: python classifier/active_learning.py select "
                        f"--config {experiment.config_path}")
    return max(selected)
