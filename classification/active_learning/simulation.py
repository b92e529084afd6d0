"""Simulated active learning: the known labels play the person; accuracy against labels, per strategy.

For each seed, a stratified ``initial_fraction`` of the experiment's train split is the
labelled start and the rest of the train split is the pool. Each round a strategy picks
``batch_size`` pool images, their true labels are revealed, the classifier is retrained
and scored on the **held-out** ``eval_split`` (never on the pool). Every strategy starts
from the same labelled set for a given seed, so round 0 is the same for all.

Two ways to retrain (``simulation.retrain``):

- ``head`` (default, fast): the images are embedded once and each round trains a small
  MLP on the embeddings of the labelled images (as in Norouzzadeh et al.); selection uses
  the MLP's probabilities and the same embeddings. ``simulation.embeddings`` says whose:
  ``pretrained`` (default) the frozen ImageNet backbone of the experiment's architecture
  (its ``pretrained_source``), the same for every seed; ``fine_tuned`` a CNN trained per
  seed on the initial labelled set (which on MCT spoils the ImageNet features: see
  docs/benchmarks.md).
- ``full``: each round trains the whole CNN on the labelled images (the real loop's
  ``retrain``); slow on a CPU.

Outputs in ``<run>/active_learning/simulation/``: ``curves.csv`` (strategy, seed, round,
labels, top1, macro_f1), ``curves_mean.csv`` (mean and std over seeds), ``curves.png``,
``summary.csv``/``summary.json`` (final accuracy, and the labels each strategy needs to
reach random's final mean accuracy). Resumable: each (seed, strategy) curve and each
trained model is kept and reused by a re-run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import ValidationError

from classification.active_learning.embeddings import embed_with_backbone, embed_with_checkpoint
from classification.active_learning.pool import stratified_mask
from classification.active_learning.registry import check_strategy_name, get_strategy, select
from classification.active_learning.round_datasets import write_derived_config
from classification.active_learning.rounds import Experiment, round_seed
from classification.active_learning.strategies import SelectionInputs
from classification.active_learning.triplet import predict_proba, train_mlp
from classification.config import SimulationConfig, describe_error
from classification.data.dataset_folder import DATASET_COLUMNS, write_dataset_folder
from classification.data.samples import Sample, build_samples
from classification.errors import DataError, UserError
from classification.evaluation.plots import save_figure
from classification.io import read_string_csv, write_csv_atomic, write_json_atomic
from classification.training.checkpoint import resolve_checkpoint
from classification.training.engine import train
from classification.training.metrics import accumulate_probabilities

log = logging.getLogger(__name__)

CURVE_COLUMNS = ["strategy", "seed", "round", "labels", "top1", "macro_f1"]


def metric(text: str) -> float:
    """A metric of a saved curve: empty is NaN (how a curve without held-out predictions was written)."""
    return math.nan if text == "" else float(text)


def read_curve(path: Path, strategy: str, seed: int) -> list[list[Any]]:
    """The rows of a curve an earlier simulation run finished (``<seed_dir>/<strategy>.csv``); one that
    cannot be read, or is not this strategy's and seed's, is a one-line ``DataError``."""
    frame = read_string_csv(path, CURVE_COLUMNS)
    try:
        rows = [[row.strategy, int(row.seed), int(row.round), int(row.labels), metric(row.top1), metric(row.macro_f1)]
                for row in frame[CURVE_COLUMNS].itertuples(index=False)]
    except ValueError as error:
        raise DataError(f"{path}: not a finished learning curve ({error}); delete it to run this strategy again") from None
    if any(row[0] != strategy or row[1] != seed for row in rows):
        raise DataError(f"{path}: holds another strategy's or seed's curve, not {strategy} with seed {seed}; "
                        "delete it to run this strategy again")
    return rows


@dataclass(frozen=True)
class SimulationData:
    """The train split (initial set + pool) and the held-out split, as samples with true labels."""

    train: list[Sample]
    val: list[Sample]
    held_out: list[Sample]
    num_classes: int

    @property
    def train_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.train], dtype=np.int64)

    @property
    def held_out_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.held_out], dtype=np.int64)


@dataclass
class SimulationResult:
    """The curves, their means, the summary and where they were written."""

    curves: pd.DataFrame
    means: pd.DataFrame
    summary: pd.DataFrame
    output_dir: Path


def load_simulation_data(experiment: Experiment) -> SimulationData:
    """Samples of the train, val and held-out splits (the held-out split must not be the train split)."""
    config, al = experiment.config, experiment.active_learning
    if al.eval_split == config.train_split:
        raise UserError(f"{experiment.config_path}: active_learning.eval_split must be a held-out split, not {al.eval_split!r}")
    train_samples = build_samples(config, config.train_split)
    held_out = build_samples(config, al.eval_split)
    if not train_samples or not held_out:
        raise DataError(f"{config.data_root}: the {config.train_split} and {al.eval_split} splits both need images")
    val = build_samples(config, config.val_split) if config.val_split != al.eval_split else held_out
    return SimulationData(train_samples, val or held_out, held_out, len(experiment.label_names))


def top1_and_macro_f1(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Held-out top-1 and macro F1 (the framework's own metric definitions)."""
    result = accumulate_probabilities(probabilities, labels, num_classes).compute()
    return float(result["top1"]), float(result["macro_f1"])


# ---------------------------------------------------------------- models trained on a labelled subset


def write_subset_dataset(folder: Path, data: SimulationData, labelled: np.ndarray, label_names: Sequence[str]) -> None:
    """A dataset folder: the labelled train images, the val split and the held-out split (absolute paths)."""
    rows, splits = [], {}
    for split, samples in (("train", [s for s, keep in zip(data.train, labelled) if keep]), ("val", data.val),
                           ("test", data.held_out)):
        for sample in samples:
            rows.append([str(sample.path), split, "all", label_names[sample.label], "", label_names[sample.label]])
        splits[split] = [[split, "all"]]
    write_dataset_folder(folder, pd.DataFrame(rows, columns=DATASET_COLUMNS), label_names, splits)


def train_subset_model(experiment: Experiment, data: SimulationData, labelled: np.ndarray, folder: Path, seed: int) -> Path:
    """Train (or resume, or reuse) a CNN on the labelled train images; returns its best checkpoint."""
    write_subset_dataset(folder / "dataset", data, labelled, experiment.label_names)
    model_dir = folder / "model"
    config = write_derived_config(experiment, model_dir, folder / "dataset", "written by the simulation: the "
                                  "experiment's config on one seed's labelled images", seed=seed, comet="off",
                                  train_split="train", val_split="val")
    result = train(config, model_dir, config_path=model_dir / "config.yml")
    if result.exit_code:
        raise KeyboardInterrupt  # stopped by a signal: the checkpoint resumes on the next run
    return resolve_checkpoint(model_dir, "best")


def embed_with(experiment: Experiment, checkpoint: Path, samples: list[Sample], cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and probabilities of every sample (an unreadable image is an error: the simulation needs all)."""
    result = embed_with_checkpoint(checkpoint, samples, experiment.config, cache_dir)
    if result.skipped:
        raise DataError(f"{samples[result.skipped[0]].path}: unreadable image ({len(result.skipped)} in all); "
                        "the simulation needs every image of its splits")
    assert result.probabilities is not None
    return result.embeddings, result.probabilities


def pretrained_features(experiment: Experiment, samples: list[Sample], cache_dir: Path) -> np.ndarray:
    """Features of every sample from the frozen ImageNet backbone (cached; all images needed)."""
    if not experiment.config.pretrained:
        raise UserError(f"{experiment.config_path}: active_learning.simulation.embeddings: pretrained needs pretrained: "
                        "true (ImageNet weights); with a network trained from scratch use embeddings: fine_tuned")
    result = embed_with_backbone(experiment.config, samples, cache_dir)
    if result.skipped:
        raise DataError(f"{samples[result.skipped[0]].path}: unreadable image ({len(result.skipped)} in all); "
                        "the simulation needs every image of its splits")
    return result.embeddings


def head_features(experiment: Experiment, data: SimulationData, settings: SimulationConfig, start: np.ndarray,
                  output_dir: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed (train, held-out) embeddings of a head simulation: pretrained, or fine-tuned on ``start``."""
    if settings.embeddings == "pretrained":
        folder = output_dir / "features_pretrained"
        return (pretrained_features(experiment, data.train, folder / "train"),
                pretrained_features(experiment, data.held_out, folder / "held_out"))
    seed_dir = output_dir / f"seed_{seed}"
    checkpoint = train_subset_model(experiment, data, start, seed_dir / "initial", seed)
    return (embed_with(experiment, checkpoint, data.train, seed_dir / "embeddings" / "train")[0],
            embed_with(experiment, checkpoint, data.held_out, seed_dir / "embeddings" / "held_out")[0])


# ---------------------------------------------------------------- one curve


def pick(strategy: str, labelled: np.ndarray, probabilities: np.ndarray, embeddings: np.ndarray, budget: int,
         seed: int, experiment: Experiment) -> np.ndarray:
    """The pool images a strategy picks this round (indices into the train split)."""
    options = get_strategy(strategy).config_options(experiment.active_learning)
    inputs = SelectionInputs(labelled=labelled, probabilities=probabilities, embeddings=embeddings)
    return select(strategy, inputs, budget, seed, **options).indices


def head_curve(experiment: Experiment, data: SimulationData, strategy: str, seed: int, start: np.ndarray,
               features: tuple[np.ndarray, np.ndarray], settings: SimulationConfig, budget: int) -> list[list[Any]]:
    """One strategy's curve with an MLP on fixed embeddings retrained each round."""
    train_x, held_x = features
    labelled, rows, y = start.copy(), [], data.train_labels
    for round_number in range(settings.rounds + 1):
        mlp = train_mlp(train_x[labelled], y[labelled], data.num_classes, epochs=settings.head_epochs, seed=seed)
        top1, macro_f1 = top1_and_macro_f1(predict_proba(mlp, held_x), data.held_out_labels, data.num_classes)
        rows.append([strategy, seed, round_number, int(labelled.sum()), top1, macro_f1])
        if round_number < settings.rounds and not labelled.all():
            chosen = pick(strategy, labelled, predict_proba(mlp, train_x), train_x, budget, round_seed(seed, round_number), experiment)
            labelled[chosen] = True
    return rows


def full_curve(experiment: Experiment, data: SimulationData, strategy: str, seed: int, start: np.ndarray,
               folder: Path, settings: SimulationConfig, budget: int) -> list[list[Any]]:
    """One strategy's curve retraining the whole CNN each round (the real loop's retrain)."""
    labelled, rows = start.copy(), []
    for round_number in range(settings.rounds + 1):
        round_dir = folder / f"round_{round_number}"
        checkpoint = train_subset_model(experiment, data, labelled, round_dir, seed)
        train_x, train_p = embed_with(experiment, checkpoint, data.train, round_dir / "embeddings" / "train")
        _, held_p = embed_with(experiment, checkpoint, data.held_out, round_dir / "embeddings" / "held_out")
        top1, macro_f1 = top1_and_macro_f1(held_p, data.held_out_labels, data.num_classes)
        rows.append([strategy, seed, round_number, int(labelled.sum()), top1, macro_f1])
        if round_number < settings.rounds and not labelled.all():
            labelled[pick(strategy, labelled, train_p, train_x, budget, round_seed(seed, round_number), experiment)] = True
    return rows


# ---------------------------------------------------------------- the whole simulation


def labels_needed_per_seed(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, seed): the labels with which the strategy first reaches that seed's final random top-1
    (NaN when it never does), and random's final number of labels."""
    rows = []
    for seed, group in curves.groupby("seed", sort=False):
        random_curve = group[group["strategy"] == "random"].sort_values("round")
        if random_curve.empty:
            continue
        target, random_labels = random_curve["top1"].iloc[-1], random_curve["labels"].iloc[-1]
        for strategy, curve in group.groupby("strategy", sort=False):
            curve = curve.sort_values("round")
            reached = curve[curve["top1"] >= target - 1e-12]
            rows.append({"strategy": strategy, "seed": seed, "random_labels": float(random_labels),
                         "labels_needed": float(reached["labels"].iloc[0]) if len(reached) else math.nan})
    return pd.DataFrame(rows, columns=["strategy", "seed", "random_labels", "labels_needed"])


def summarise(curves: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean curves over seeds, and per strategy its final accuracy and the labels it needs to reach random's
    (on the mean curves, and per seed as mean ± std of the fraction of random's labels)."""
    means = (curves.groupby(["strategy", "round"], sort=False)
             .agg(labels=("labels", "mean"), top1_mean=("top1", "mean"), top1_std=("top1", "std"),
                  macro_f1_mean=("macro_f1", "mean"), seeds=("seed", "nunique"))
             .reset_index())
    means["top1_std"] = means["top1_std"].fillna(0.0)
    target = means[means["strategy"] == "random"]["top1_mean"].iloc[-1] if "random" in set(means["strategy"]) else math.nan
    random_labels = means[means["strategy"] == "random"]["labels"].iloc[-1] if "random" in set(means["strategy"]) else math.nan
    per_seed = labels_needed_per_seed(curves)
    per_seed["fraction"] = per_seed["labels_needed"] / per_seed["random_labels"]
    rows = []
    for strategy, curve in means.groupby("strategy", sort=False):
        reached = curve[curve["top1_mean"] >= target - 1e-12]
        needed = float(reached["labels"].iloc[0]) if len(reached) and not math.isnan(target) else math.nan
        fractions = per_seed[per_seed["strategy"] == strategy]["fraction"]
        rows.append({"strategy": strategy, "final_labels": float(curve["labels"].iloc[-1]),
                     "fraction_of_random_labels_mean": float(fractions.mean()) if len(fractions) else math.nan,
                     "fraction_of_random_labels_std": float(fractions.std(ddof=0)) if len(fractions) else math.nan,
                     "seeds_reaching_random": int(fractions.notna().sum()),
                     "final_top1_mean": float(curve["top1_mean"].iloc[-1]), "final_top1_std": float(curve["top1_std"].iloc[-1]),
                     "final_macro_f1_mean": float(curve["macro_f1_mean"].iloc[-1]),
                     "labels_to_reach_random_final": needed,
                     "labels_saved_vs_random": random_labels - needed if not math.isnan(needed) else math.nan})
    return means, pd.DataFrame(rows)


def plot_curves(means: pd.DataFrame, path: Path, title: str) -> Path:
    """Accuracy against labels, one line per strategy (mean over seeds, ± one std as a band)."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for strategy, curve in means.groupby("strategy", sort=False):
        axes.plot(curve["labels"], curve["top1_mean"], marker="o", label=strategy)
        axes.fill_between(curve["labels"], curve["top1_mean"] - curve["top1_std"], curve["top1_mean"] + curve["top1_std"], alpha=0.15)
    axes.set_xlabel("labelled images")
    axes.set_ylabel("held-out top-1 accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


def settings_with(base: SimulationConfig, **updates: Any) -> SimulationConfig:
    """``base`` with the given (non-None) settings replaced, validated like the config file."""
    values = {key: value for key, value in updates.items() if value is not None}
    try:
        return SimulationConfig.model_validate({**base.model_dump(), **values})
    except ValidationError as error:
        raise UserError("; ".join(f"--{describe_error(e)}" for e in error.errors())) from None


def simulate(experiment: Experiment, settings: SimulationConfig | None = None, budget: int | None = None,
             output_dir: Path | None = None) -> SimulationResult:
    """Run (or resume) the simulation for every seed and strategy and write the curves (see the module docstring)."""
    settings = settings or experiment.active_learning.simulation
    for i, strategy in enumerate(settings.strategies):
        check_strategy_name(strategy, f"active_learning.simulation.strategies[{i}]")
    budget = budget or experiment.active_learning.batch_size
    output_dir = Path(output_dir) if output_dir is not None else experiment.root / "simulation"
    data = load_simulation_data(experiment)
    all_rows: list[list[Any]] = []
    for seed in settings.seeds:
        seed_dir = output_dir / f"seed_{seed}"
        start = stratified_mask(data.train_labels, settings.initial_fraction, seed)
        features = None
        for strategy in settings.strategies:
            curve_file = seed_dir / f"{strategy}.csv"
            if curve_file.is_file():
                all_rows += read_curve(curve_file, strategy, seed)
                continue
            log.info("simulation: seed %d, %s, %d rounds of %d from %d labelled", seed, strategy, settings.rounds, budget,
                     int(start.sum()))
            if settings.retrain == "head":
                if features is None:
                    features = head_features(experiment, data, settings, start, output_dir, seed)
                rows = head_curve(experiment, data, strategy, seed, start, features, settings, budget)
            else:
                rows = full_curve(experiment, data, strategy, seed, start, seed_dir / strategy, settings, budget)
            write_csv_atomic(curve_file, pd.DataFrame(rows, columns=CURVE_COLUMNS))
            all_rows += rows
    curves = pd.DataFrame(all_rows, columns=CURVE_COLUMNS)
    means, summary = summarise(curves)
    write_csv_atomic(output_dir / "curves.csv", curves)
    write_csv_atomic(output_dir / "curves_mean.csv", means)
    write_csv_atomic(output_dir / "summary.csv", summary)
    write_json_atomic(output_dir / "summary.json", {
        "settings": settings.model_dump(), "batch_size": budget, "eval_split": experiment.active_learning.eval_split,
        "train_images": len(data.train), "held_out_images": len(data.held_out),
        "strategies": summary.to_dict(orient="records")})
    embeddings = f", {settings.embeddings} embeddings" if settings.retrain == "head" else ""
    plot_curves(means, output_dir / "curves.png",
                f"{experiment.run_dir.name}: {len(settings.seeds)} seeds, {settings.retrain} retraining{embeddings}")
    return SimulationResult(curves, means, summary, output_dir)
