"""Retraining and evaluating a round: round k's model on the train split plus every pool image labelled in
rounds 1 to k, scored on the held-out ``eval_split``.

A full round writes ``round_<k>/dataset`` (the experiment's dataset with the labelled pool images in
its train split) and trains the CNN on it with ``engine.train`` (resumable like any run); with
``retrain: head`` the round's model is an MLP on cached embeddings (``head_rounds.py``). Evaluation
adds the round's row to ``history.csv``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from classification.active_learning import head_rounds, store
from classification.active_learning.rounds import (
    POOL_DATASET,
    Experiment,
    head_context,
    is_trained,
    last_trained_round,
    latest_selected_round,
    model_checkpoint,
    pool_paths,
    pool_samples,
    round_model,
    train_round_head,
    uses_head,
)
from classification.config import ExperimentConfig, load_config
from classification.data.dataset_folder import DATASET_COLUMNS, is_dataset_folder, write_dataset_folder
from classification.data.samples import available_splits, build_samples, load_label_index
from classification.errors import DataError, UserError
from classification.evaluation.predict import run_prediction, split_samples_input
from classification.evaluation.prediction_files import scores_from_probabilities, write_prediction_files
from classification.io import json_count, read_json_object, write_json_atomic, write_text_atomic
from classification.redaction import find_env_files, known_secrets, redact_secrets
from classification.training.engine import TrainResult, train

__all__ = [
    "dataset_rows",
    "evaluate_head_round",
    "evaluate_round",
    "labels_fingerprint",
    "retrain_head_round",
    "retrain_round",
    "round_config",
    "write_derived_config",
    "write_round_dataset",
]


# ---------------------------------------------------------------- retrain


def dataset_rows(config: ExperimentConfig) -> tuple[pd.DataFrame, dict[str, list[list[str]]]]:
    """Every split of the experiment's dataset as rows with absolute paths, and its splits (a dataset folder's
    own locations; an image folder's split name as the location)."""
    label_index = load_label_index(config.data_root, config.train_split)
    from_folder = is_dataset_folder(Path(config.data_root))
    rows, splits = [], {}
    for split in available_splits(config):
        samples = build_samples(config, split)
        keys: dict[tuple[str, str], None] = {}
        for sample in samples:
            key = (sample.dataset, sample.location) if from_folder else (sample.dataset, split)
            keys[key] = None
            rows.append([str(sample.path), key[0], key[1], label_index[sample.label], "", label_index[sample.label]])
        splits[split] = [list(key) for key in keys]
    return pd.DataFrame(rows, columns=DATASET_COLUMNS), splits


def labels_fingerprint(labels: dict[str, str]) -> str:
    """A hash of the pool labels a model is trained with (to refuse resuming it with other labels)."""
    text = "\n".join(f"{path}\t{label}" for path, label in sorted(labels.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_round_dataset(experiment: Experiment, files: store.RoundFiles, labels: dict[str, str]) -> None:
    """``round_<k>/dataset``: the experiment's dataset plus the labelled pool images in the train split."""
    config, al = experiment.config, experiment.active_learning
    rows, splits = dataset_rows(config)
    pool_dir = experiment.pool_dir()
    known = set(experiment.label_names)
    pool_rows = [[str(pool_dir / path), POOL_DATASET, al.pool_location, label, "", label]
                 for path, label in sorted(labels.items()) if label in known]
    frame = pd.concat([rows, pd.DataFrame(pool_rows, columns=rows.columns)], ignore_index=True)
    splits[config.train_split] = [*splits.get(config.train_split, []), [POOL_DATASET, al.pool_location]]
    for name in splits:
        if name != config.train_split and [POOL_DATASET, al.pool_location] in splits[name]:
            raise DataError(f"{experiment.config_path}: active_learning.pool_location: {al.pool_location!r} is also a "
                            f"location of the {name} split")
    write_dataset_folder(files.dataset, frame, experiment.label_names, splits)
    write_json_atomic(files.dataset / "labels_used.json", {"pool_labels": len(pool_rows), "fingerprint": labels_fingerprint(labels)})


def write_derived_config(experiment: Experiment, model_dir: Path, data_root: Path, header: str,
                         **updates: Any) -> ExperimentConfig:
    """``model_dir/config.yml``: the experiment's config on another dataset (the loop's own section left out,
    ``active_learning.num_epochs`` as the epochs), with ``updates``; returns it loaded and validated."""
    values = experiment.config.to_dict()
    values.pop("active_learning", None)
    values.update({"data_root": str(Path(data_root).resolve()), "crops_dir": None,
                   "num_epochs": experiment.active_learning.num_epochs or experiment.config.num_epochs, **updates})
    kept = {key: value for key, value in values.items() if value is not None}
    kept = redact_secrets(kept, known_secrets(*find_env_files(experiment.run_dir)))  # a key given by --set: ***
    write_text_atomic(model_dir / "config.yml", f"# {header}\n" + yaml.safe_dump(kept, sort_keys=False))
    return load_config(model_dir / "config.yml")


def round_config(experiment: Experiment, files: store.RoundFiles) -> ExperimentConfig:
    """The round's config.yml: the experiment's, on the round dataset (warm-started when asked)."""
    weights = str(model_checkpoint(experiment, files.number - 1).resolve()) if experiment.active_learning.warm_start else None
    name = f"{experiment.run_dir.parent.name}/{experiment.run_dir.name} AL round {files.number}"
    updates = {"experiment_name": name, **({"weights_file": weights} if weights else {})}
    return write_derived_config(experiment, files.model, files.dataset, "written by classifier/active_learning.py "
                                "retrain: the experiment's config on this round's data", **updates)


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
    if uses_head(experiment):
        return retrain_head_round(experiment, files, labels)
    used = files.dataset / "labels_used.json"
    changed = used.exists() and read_json_object(used).get("fingerprint") != labels_fingerprint(labels)
    if changed and not overwrite:
        raise UserError(f"round {number}: labels were imported after this round's model was started; retrain it "
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
        write_json_atomic(files.done, {"round": number, "epochs": result.epochs_completed, "best_epoch": result.best_epoch,
                                       "best_metric": result.best_metric, "pool_labels": len(labels),
                                       "finished_utc": store.utc_now()})
    return result


def retrain_head_round(experiment: Experiment, files: store.RoundFiles, labels: dict[str, str]) -> TrainResult:
    """``retrain: head``: the round's MLP on the train split plus the round's labelled pool images (seconds; always
    anew). ``pool_labels`` counts the readable ones; unreadable ones are listed (``unreadable_labelled``) and warned of."""
    known = {path: label for path, label in labels.items() if label in set(experiment.label_names)}
    pool = pool_samples(experiment, pool_paths(experiment.pool_dir()), known)
    files.metrics.unlink(missing_ok=True)  # they were the earlier head's
    trained = train_round_head(experiment, files.number, pool)
    write_json_atomic(files.done, {"round": files.number, "mode": "head", "epochs": experiment.active_learning.head_epochs, **trained,
                                   "finished_utc": store.utc_now()})
    return TrainResult(files.model, experiment.active_learning.head_epochs, None, None)


def evaluate_head_round(experiment: Experiment, number: int, split: str, output_dir: Path) -> dict[str, Any]:
    """Held-out metrics of round ``number``'s head (features of ``split`` cached once), with the files a full round's
    evaluation writes in ``output_dir`` (``predictions.csv``, ``skipped.csv``, ``prediction_info.json``, ``metrics.json``)."""
    label_names = experiment.label_names
    source = split_samples_input(experiment.config, split, label_names)
    head = round_model(experiment, number)
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
    return {**metrics, "pool_labels": used}


# ---------------------------------------------------------------- evaluate


def evaluate_round(experiment: Experiment, number: int | None = None) -> dict[str, Any]:
    """Score round ``number``'s model on the held-out ``eval_split``; write its ``metrics.json`` and ``history.csv``."""
    number = last_trained_round(experiment) if number is None else number
    if not is_trained(experiment, number):
        raise UserError(f"round {number}: no trained model yet; run: python classifier/active_learning.py retrain "
                        f"--config {experiment.config_path}")
    files = experiment.round(number)
    checkpoint = round_model(experiment, number).resolve()
    split = experiment.active_learning.eval_split
    if split not in available_splits(experiment.config):
        raise UserError(f"{experiment.config_path}: active_learning.eval_split: {experiment.config.data_root} has no "
                        f"split {split!r} (available: {', '.join(available_splits(experiment.config))})")
    if uses_head(experiment):
        scored = evaluate_head_round(experiment, number, split, files.evaluation)
        used = scored["pool_labels"]
    else:
        result = run_prediction(experiment.config, checkpoint, split=split, run_dir=checkpoint.parent.parent,
                                output_dir=files.evaluation)
        if result.metrics is None:
            raise DataError(f"{experiment.config.data_root}: the {split} split has no labelled images to evaluate on")
        scored = result.metrics
        used = json_count(read_json_object(files.dataset / "labels_used.json"), "pool_labels",
                          files.dataset / "labels_used.json") if number else 0
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
