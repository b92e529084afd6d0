"""What a round's model is and does, behind one interface (``RoundModel``), chosen once from the config.

``retrain: full`` (``CnnRounds``): each round fine-tunes the CNN on its round dataset with
``engine.train`` (resumable like any run); round 0 is the experiment's own checkpoint.
``retrain: head`` (``HeadRounds``): each round trains an MLP on embeddings cached once
(``head_rounds.py``), in seconds; round 0's head is trained the first time it is asked for.
The loop (selection, retraining, evaluation, status) asks ``round_model_of(experiment)`` and never
branches on the mode itself; a third kind of round model is one more class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from classification.active_learning import head_rounds, store
from classification.active_learning.embeddings import PoolEmbeddings, embed_with_checkpoint
from classification.active_learning.round_datasets import labels_fingerprint, round_config, write_round_dataset
from classification.active_learning.rounds import (
    Experiment,
    head_context,
    model_checkpoint,
    pool_paths,
    pool_samples,
    round_seed,
)
from classification.data.samples import Sample, build_samples
from classification.errors import DataError, UserError
from classification.evaluation.predict import run_prediction, split_samples_input
from classification.evaluation.prediction_files import scores_from_probabilities, write_prediction_files
from classification.io import json_count, read_json_object, write_json_atomic
from classification.training.engine import TrainResult, train

__all__ = ["CnnRounds", "HeadRounds", "RoundModel", "round_model_of"]


class RoundModel(Protocol):
    """A round's model as the loop uses it."""

    def model_file(self, number: int) -> Path:
        """Round ``number``'s model file (a checkpoint or a head); an error when it is not trained yet."""
        ...

    def is_trained(self, number: int) -> bool:
        """Round ``number`` has a model (for round 0: the experiment has what its model is made from)."""
        ...

    def score_for_selection(self, number: int, samples: list[Sample], name: str) -> PoolEmbeddings:
        """Embeddings and probabilities of ``samples`` with round ``number - 1``'s model, for round ``number``'s
        selection (cached under ``name``)."""
        ...

    def retrain(self, files: store.RoundFiles, labels: dict[str, str], overwrite: bool) -> TrainResult:
        """Train the round's model on the train split plus the labelled pool images in ``labels``."""
        ...

    def evaluate(self, number: int, split: str, output_dir: Path) -> tuple[dict[str, Any], int]:
        """Round ``number``'s metrics on ``split`` (the prediction files written in ``output_dir``), and how many
        pool labels its model was trained with."""
        ...


def round_model_of(experiment: Experiment) -> RoundModel:
    """The experiment's kind of round model (``active_learning.retrain``)."""
    return HeadRounds(experiment) if experiment.active_learning.retrain == "head" else CnnRounds(experiment)


def has_initial_checkpoint(experiment: Experiment) -> bool:
    """The experiment's ``initial_checkpoint`` exists (round 0's CNN)."""
    try:
        model_checkpoint(experiment, 0)
    except UserError:
        return False
    return True


def finished(experiment: Experiment, number: int) -> bool:
    """Round ``number`` (>= 1) finished its retraining (a folder in place of ``done.json``: reading it says so)."""
    return experiment.round(number).done.exists()


@dataclass(frozen=True)
class CnnRounds:
    """``retrain: full``: round k's model is the CNN fine-tuned on its round dataset."""

    experiment: Experiment

    def model_file(self, number: int) -> Path:
        return model_checkpoint(self.experiment, number)

    def is_trained(self, number: int) -> bool:
        return has_initial_checkpoint(self.experiment) if number == 0 else finished(self.experiment, number)

    def score_for_selection(self, number: int, samples: list[Sample], name: str) -> PoolEmbeddings:
        experiment = self.experiment
        return embed_with_checkpoint(model_checkpoint(experiment, number - 1), samples, experiment.config,
                                     experiment.round(number).embeddings / name)

    def retrain(self, files: store.RoundFiles, labels: dict[str, str], overwrite: bool) -> TrainResult:
        """Resumable; labels imported after the model was started need ``overwrite`` (the earlier model is archived)."""
        experiment = self.experiment
        used = files.dataset / "labels_used.json"
        changed = used.exists() and read_json_object(used).get("fingerprint") != labels_fingerprint(labels)
        if changed and not overwrite:
            raise UserError(f"round {files.number}: labels were imported after this round's model was started; retrain it "
                            "with them using --overwrite (the earlier model is moved to model/archive/)")
        restart = changed or (overwrite and files.model.is_dir())
        write_round_dataset(experiment, files, labels)
        config = round_config(experiment, files)
        if restart:
            files.done.unlink(missing_ok=True)
        has_run = (files.model / "checkpoints").is_dir() or (files.model / "metrics.csv").is_file()
        result = train(config, files.model, resume=not (restart and has_run), overwrite=restart and has_run,
                       argv=["active_learning.py", "retrain", "--config", str(experiment.config_path)],
                       config_path=files.model / "config.yml")
        if result.exit_code == 0:
            write_json_atomic(files.done, {"round": files.number, "epochs": result.epochs_completed,
                                           "best_epoch": result.best_epoch, "best_metric": result.best_metric,
                                           "pool_labels": len(labels), "finished_utc": store.utc_now()})
        return result

    def evaluate(self, number: int, split: str, output_dir: Path) -> tuple[dict[str, Any], int]:
        experiment = self.experiment
        checkpoint = self.model_file(number).resolve()
        result = run_prediction(experiment.config, checkpoint, split=split, run_dir=checkpoint.parent.parent,
                                output_dir=output_dir)
        if result.metrics is None:
            raise DataError(f"{experiment.config.data_root}: the {split} split has no labelled images to evaluate on")
        used_file = experiment.round(number).dataset / "labels_used.json"
        used = json_count(read_json_object(used_file), "pool_labels", used_file) if number else 0
        return result.metrics, used


@dataclass(frozen=True)
class HeadRounds:
    """``retrain: head``: round k's model is an MLP on cached embeddings of the round-0 (or ImageNet) backbone."""

    experiment: Experiment

    def model_file(self, number: int) -> Path:
        """The round's head; round 0's is trained on the train split the first time it is asked for (or again when
        the embeddings changed since)."""
        experiment = self.experiment
        path = experiment.round(number).model / head_rounds.HEAD_FILE
        if number == 0 and not head_rounds.head_fits(head_context(experiment), path, len(experiment.label_names)):
            self.train_head(0, [])
        if not path.is_file():
            raise UserError(f"round {number}: no trained head yet; run: python classifier/active_learning.py retrain "
                            f"--config {experiment.config_path}")
        return path

    def is_trained(self, number: int) -> bool:
        if number == 0:  # on ImageNet features round 0's head needs no checkpoint: it is trained when first needed
            return self.experiment.active_learning.embeddings == "pretrained" or has_initial_checkpoint(self.experiment)
        return finished(self.experiment, number)

    def score_for_selection(self, number: int, samples: list[Sample], name: str) -> PoolEmbeddings:
        experiment = self.experiment
        return head_rounds.scored_features(head_context(experiment), self.model_file(number - 1), name, samples,
                                           len(experiment.label_names))

    def train_head(self, number: int, pool: list[Sample]) -> dict[str, Any]:
        """Train round ``number``'s head on the train split plus the labelled ``pool`` samples."""
        experiment = self.experiment
        config = experiment.config
        return head_rounds.train_head(head_context(experiment), build_samples(config, config.train_split), pool,
                                      len(experiment.label_names), experiment.round(number).model / head_rounds.HEAD_FILE,
                                      seed=round_seed(experiment.active_learning.seed, number))

    def retrain(self, files: store.RoundFiles, labels: dict[str, str], overwrite: bool) -> TrainResult:
        """Always anew (seconds); ``pool_labels`` counts the readable labelled images, unreadable ones are listed
        (``unreadable_labelled``) and warned of."""
        experiment = self.experiment
        known = {path: label for path, label in labels.items() if label in set(experiment.label_names)}
        pool = pool_samples(experiment, pool_paths(experiment.pool_dir()), known)
        files.metrics.unlink(missing_ok=True)  # they were the earlier head's
        trained = self.train_head(files.number, pool)
        write_json_atomic(files.done, {"round": files.number, "mode": "head", "epochs": experiment.active_learning.head_epochs,
                                       **trained, "finished_utc": store.utc_now()})
        return TrainResult(files.model, experiment.active_learning.head_epochs, None, None)

    def evaluate(self, number: int, split: str, output_dir: Path) -> tuple[dict[str, Any], int]:
        """The head's metrics, with the files a full round's evaluation writes (``predictions.csv``, ``skipped.csv``,
        ``prediction_info.json``, ``metrics.json``); the split's features are cached once."""
        experiment = self.experiment
        label_names = experiment.label_names
        source = split_samples_input(experiment.config, split, label_names)
        head = self.model_file(number)
        scored = head_rounds.scored_features(head_context(experiment), head, split, source.samples, len(label_names))
        assert scored.probabilities is not None
        truth = np.array([source.samples[i].label for i in scored.kept], dtype=np.int64)
        scores = scores_from_probabilities(scored.kept, scored.probabilities, truth, scored.skipped, 3, len(label_names))
        info = {"input": split, "images_root": str(source.root), "checkpoint": str(head), "model": "head",
                "embeddings": experiment.active_learning.embeddings, "architecture": experiment.config.architecture,
                "n_images": len(source.samples), "n_predicted": len(scored), "n_skipped": len(scored.skipped), "topk": 3,
                "label_names": label_names}
        metrics = write_prediction_files(source, scores, label_names, output_dir, info)[3]
        if metrics is None:
            raise DataError(f"{experiment.config.data_root}: the {split} split has no readable images to evaluate on")
        done = experiment.round(number).done
        used = json_count(read_json_object(done), "pool_labels", done) if number and done.exists() else 0
        return metrics, used
