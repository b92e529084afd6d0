"""A round's training data and config: the experiment's dataset with the pool images labelled so far in its train
split (``round_<k>/dataset``), and the experiment's config on it (``round_<k>/model/config.yml``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from classification.active_learning import store
from classification.active_learning.rounds import POOL_DATASET, Experiment, model_checkpoint
from classification.config import ExperimentConfig, load_config
from classification.data.dataset_folder import DATASET_COLUMNS, is_dataset_folder, write_dataset_folder
from classification.data.samples import available_splits, build_samples, load_label_index
from classification.errors import DataError
from classification.io import write_json_atomic, write_text_atomic
from classification.redaction import find_env_files, known_secrets, redact_secrets

__all__ = ["dataset_rows", "labels_fingerprint", "round_config", "write_derived_config", "write_round_dataset"]


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
