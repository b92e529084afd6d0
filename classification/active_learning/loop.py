"""The active-learning loop of an experiment: select → (a person labels) → import → retrain → evaluate.

Each step is one command (``classifier/active_learning.py``) that a person runs between
labelling sessions, and each can be stopped and run again: the state lives in the files
of ``runs/<model>/<experiment>/active_learning/`` (see ``store.py``).

- Round 0 is the experiment's own model (``classifier/train.py``; the checkpoint
  ``active_learning.initial_checkpoint``, default ``best``).
- ``select`` (round k): scores the still-unlabelled pool with the model of round k − 1,
  picks ``batch_size`` images with the configured strategy (never one already labelled or
  requested in an earlier round), writes ``selection.csv`` with the reason for each pick,
  and hands the images to the label tool (a Timelapse request CSV, or a Label Studio
  project with the images as tasks).
- ``import``: reads the labels back (a Timelapse CSV, a Label Studio export file, or the
  Label Studio project itself) into the append-only ``labels.csv``.
- ``retrain``: trains round k's model on the experiment's train split plus every pool
  image labelled in rounds 1 to k (a later round's labels are not round k's; resumable
  like any training run).
- ``evaluate``: scores round k's model on the **held-out** split ``eval_split`` of the
  experiment's dataset (the same images every round; not the remaining pool, which is
  what the original tools reported) and adds a row to ``history.csv``.

With ``active_learning.retrain: head`` a round's model is an MLP on embeddings cached once
(``head_rounds.py``): select, retrain and evaluate then take seconds, and round 0 needs no
``classifier/train.py``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from classification.active_learning import head_rounds, store
from classification.active_learning.embeddings import PoolEmbeddings, embed_with_checkpoint
from classification.active_learning.label_studio import (
    LabelStudioClient,
    build_tasks,
    load_label_studio_settings,
    read_json_min,
    write_tasks_json,
)
from classification.active_learning.labels import LabelImport
from classification.active_learning.lightly import write_embeddings_csv, write_lightly_predictions
from classification.active_learning.scores import uncertainty_scores
from classification.active_learning.strategies import Selection, SelectionInputs, select
from classification.active_learning.timelapse import read_timelapse_export, write_request_csv
from classification.config import ActiveLearningConfig, ExperimentConfig, load_config
from classification.data.dataset import DATASET_COLUMNS, write_dataset_folder
from classification.data.samples import (
    Sample,
    available_splits,
    build_samples,
    image_files,
    is_dataset_folder,
    load_label_index,
)
from classification.errors import DataError, UserError
from classification.evaluation.predict import run_prediction, split_samples_input
from classification.evaluation.prediction_files import (
    labelled_samples,
    scores_from_probabilities,
    write_prediction_files,
)
from classification.io import (
    json_count,
    read_json_object,
    read_string_csv,
    write_bytes_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from classification.redaction import find_env_files, known_secrets, redact_secrets
from classification.training.checkpoint import resolve_checkpoint
from classification.training.engine import TrainResult, train

log = logging.getLogger(__name__)


def round_seed(seed: int, round_number: int) -> int:
    """The seed of one round's selection and head training: distinct per round, the same on a re-run."""
    return seed * 1000 + round_number


AL_DIR = "active_learning"
POOL_DATASET = "al_pool"
DIVERSITY_STRATEGIES = ("k_center", "coral")  # start from the labelled set: the train split is embedded too


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class Experiment:
    """An experiment folder seen by the loop: its config and where the rounds live."""

    config: ExperimentConfig
    run_dir: Path
    config_path: Path

    @property
    def al(self) -> ActiveLearningConfig:
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
        pool = self.al.pool
        if pool is None:
            raise UserError(f"{self.config_path}: active_learning.pool: required (the folder of unlabelled images)")
        if not Path(pool).is_dir():
            raise UserError(f"{self.config_path}: active_learning.pool: folder not found: {pool}")
        return Path(pool)


def open_experiment(config_path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Load the experiment's config (with ``--set`` overrides) for the loop."""
    config_path = Path(config_path)
    return Experiment(load_config(config_path, overrides), config_path.resolve().parent, config_path)


def uses_head(experiment: Experiment) -> bool:
    """True when each round's model is an MLP on cached embeddings (``retrain: head``)."""
    return experiment.al.retrain == "head"


def head_context(experiment: Experiment) -> head_rounds.HeadContext:
    """What the head-only rounds read: the config, the features folder, the round-0 CNN checkpoint."""
    return head_rounds.HeadContext(experiment.config, experiment.root / "features", lambda: model_checkpoint(experiment, 0))


def pool_samples(experiment: Experiment, paths: Sequence[str], labels: dict[str, str] | None = None) -> list[Sample]:
    """The pool images as samples (label -1 where ``labels`` has none known to the model)."""
    pool_dir, al = experiment.pool_dir(), experiment.al
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
        return resolve_checkpoint(experiment.run_dir, experiment.al.initial_checkpoint)
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
                                  seed=round_seed(experiment.al.seed, number))


def is_trained(experiment: Experiment, number: int) -> bool:
    """Round 0: the experiment has its initial checkpoint (a head is trained when needed); round k: its retrain
    finished."""
    if number == 0 and uses_head(experiment) and experiment.al.embeddings == "pretrained":
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
        raise UserError(f"{experiment.run_dir}: no model yet (no checkpoint {experiment.al.initial_checkpoint!r}); "
                        f"train round 0 first: python classifier/train.py --config {experiment.config_path}")
    return max(trained)


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
    if uses_head(experiment):
        return head_rounds.scored_features(head_context(experiment), round_model(experiment, number - 1), name, samples,
                                           len(experiment.label_names))
    return embed_with_checkpoint(model_checkpoint(experiment, number - 1), samples, experiment.config,
                                 experiment.round(number).embeddings / name)


def check_finite(probabilities: np.ndarray, checkpoint: Path) -> None:
    """A model whose training diverged predicts NaN: say so, instead of selecting at random."""
    bad = int((~np.isfinite(probabilities)).any(axis=1).sum())
    if bad:
        raise DataError(f"{checkpoint}: the model predicts NaN or infinite values for {bad} of {len(probabilities)} "
                        "pool images (its training diverged: lower learning_rate and retrain)")


def strategy_options(al: ActiveLearningConfig) -> dict[str, Any]:
    """The options of the configured strategy taken from the config."""
    if al.strategy == "coral":
        return {"diversity_weight": al.diversity_weight}
    if al.strategy == "informative_diverse" and al.n_clusters is not None:
        return {"n_clusters": al.n_clusters}
    return {}


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
    al, pool_dir = experiment.al, experiment.pool_dir()
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
    check_finite(probabilities, round_model(experiment, number - 1))
    if al.strategy in DIVERSITY_STRATEGIES:  # the train split is labelled too: diversity starts from it
        train = embed_for_selection(experiment, number, build_samples(experiment.config, experiment.config.train_split), "train")
        embeddings = np.concatenate([embeddings, train.embeddings])
        probabilities = np.concatenate([probabilities, train.probabilities])
        labelled = np.concatenate([labelled, np.ones(len(train), dtype=bool)])
        excluded = np.concatenate([excluded, np.zeros(len(train), dtype=bool)])
    inputs = SelectionInputs(labelled=labelled, excluded=excluded, probabilities=probabilities, embeddings=embeddings)
    seed = round_seed(al.seed, number)
    selection = select(al.strategy, inputs, al.batch_size, seed, **strategy_options(al))
    table = selection_table(selection, kept_paths, probabilities, experiment.label_names)
    info = {
        "round": number, "strategy": al.strategy, "options": strategy_options(al), "seed": seed,
        "batch_size": al.batch_size, "model": str(round_model(experiment, number - 1)), "pool": str(pool_dir),
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
    if experiment.al.lightly_outputs:
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


# ---------------------------------------------------------------- label tools


def document_root_prefix(experiment: Experiment) -> str:
    """The pool's path under Label Studio's local-files document root (default: the pool's parent folder;
    Label Studio refuses a storage that is the document root itself)."""
    pool = experiment.pool_dir().resolve()
    root = Path(experiment.al.label_studio_document_root or pool.parent).resolve()
    try:
        relative = pool.relative_to(root)
    except ValueError:
        raise UserError(f"{experiment.config_path}: active_learning.label_studio_document_root: {root} does not "
                        f"contain the pool {pool}") from None
    return "" if relative == Path(".") else relative.as_posix()


def handoff_to_label_tool(experiment: Experiment, files: store.RoundFiles, paths: list[str]) -> list[Path]:
    """Timelapse: the request CSV. Label Studio: a tasks file, and a project on the server when one is configured."""
    if experiment.al.label_tool == "timelapse":
        request = files.root / "timelapse_request.csv"
        write_request_csv(request, paths)
        return [request]
    tasks = files.root / "label_studio_tasks.json"
    write_tasks_json(tasks, paths, document_root_prefix(experiment))
    if load_label_studio_settings().api_key is None:
        log.info("no LABEL_STUDIO_API_KEY: import %s into a Label Studio project by hand (local files under %s)",
                 tasks, experiment.al.label_studio_document_root or experiment.pool_dir().resolve().parent)
        return [tasks]
    return [tasks, create_label_studio_project(experiment, files, paths)]


def create_label_studio_project(experiment: Experiment, files: store.RoundFiles, paths: list[str]) -> Path:
    """A Label Studio project for the round with its images as tasks, once (its id kept in ``label_studio.json``)."""
    state = read_json_object(files.label_studio, optional=True)
    if state.get("tasks_imported"):
        return files.label_studio
    client = LabelStudioClient()
    if "project_id" not in state:
        title = experiment.al.label_studio_project or f"{experiment.run_dir.parent.name}/{experiment.run_dir.name} round {files.number}"
        state = {"url": client.url, "project_id": client.create_project(title, experiment.label_names,
                                                                          experiment.pool_dir().resolve()),
                 "title": title, "tasks_imported": False}
        write_json_atomic(files.label_studio, state)  # before the import: a re-run never makes a second project
    client.import_tasks(int(state["project_id"]), build_tasks(paths, document_root_prefix(experiment)))
    write_json_atomic(files.label_studio, {**state, "tasks_imported": True, "tasks": len(paths)})
    log.info("Label Studio project %s at %s: %d tasks", state["project_id"], client.url, len(paths))
    return files.label_studio


# ---------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What one import read and stored."""

    round: int
    received: LabelImport
    added: int
    pending: int  # requested images still without a label
    saved_copy: Path | None


def latest_selected_round(experiment: Experiment) -> int:
    """The newest round with a selection; an error when there is none."""
    selected = [n for n in store.round_numbers(experiment.root) if experiment.round(n).is_selected()]
    if not selected:
        raise UserError(f"{experiment.root}: nothing selected yet; run: python classifier/active_learning.py select "
                        f"--config {experiment.config_path}")
    return max(selected)


def read_export(experiment: Experiment, files: store.RoundFiles, export: Path | None, requested: list[str]) -> tuple[LabelImport, Path]:
    """The labels of an export file, or of the round's Label Studio project; a copy is kept in ``imports/``."""
    stamp = store.utc_now().replace(":", "").replace("-", "")
    if export is not None:
        export = Path(export)
        if not export.is_file():
            raise UserError(f"{export}: export file not found")
        copy = files.imports / f"{stamp}_{export.name}"
        write_bytes_atomic(copy, export.read_bytes())  # kept before anything is stored
        if experiment.al.label_tool == "timelapse":
            return read_timelapse_export(copy, experiment.label_names, requested, experiment.al.timelapse_label_column), copy
        return read_json_min(copy, experiment.label_names, requested, document_root_prefix(experiment)), copy
    if experiment.al.label_tool == "timelapse":
        raise UserError("import: give --file, the CSV exported from Timelapse (File, RelativePath and the label column)")
    return read_label_studio_project(experiment, files, requested, stamp)


def read_label_studio_project(experiment: Experiment, files: store.RoundFiles, requested: list[str], stamp: str) -> tuple[LabelImport, Path]:
    """Export the round's Label Studio project (``JSON_MIN``), keep the export, read its labels."""
    if not files.label_studio.exists():
        raise UserError(f"{files.label_studio}: no Label Studio project for round {files.number}; give --file with an "
                        "export (JSON_MIN) or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY and run select again")
    project = json_count(read_json_object(files.label_studio), "project_id", files.label_studio)
    copy = files.imports / f"{stamp}_label_studio_project_{project}.json"
    received = LabelStudioClient().read_project_labels(project, experiment.label_names, requested,
                                                       document_root_prefix(experiment), keep_copy=copy)
    return received, copy


def import_labels(experiment: Experiment, export: Path | None = None, number: int | None = None) -> ImportResult:
    """Read a round's labels and add the new ones to ``labels.csv`` (importing twice changes nothing)."""
    number = latest_selected_round(experiment) if number is None else number
    files = experiment.round(number)
    if not files.is_selected():
        raise UserError(f"round {number}: nothing was selected in this round")
    requested = store.requested_paths(experiment.root, up_to=number)
    received, copy = read_export(experiment, files, export, requested)
    added = store.append_labels(experiment.labels_file, received.labels, number)
    labels = store.effective_labels(store.read_labels(experiment.labels_file))
    pending = sum(path not in labels for path in requested)
    return ImportResult(number, received, added, pending, copy)


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
    config, al = experiment.config, experiment.al
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
                   "num_epochs": experiment.al.num_epochs or experiment.config.num_epochs, **updates})
    kept = {key: value for key, value in values.items() if value is not None}
    kept = redact_secrets(kept, known_secrets(*find_env_files(experiment.run_dir)))  # a key given by --set: ***
    write_text_atomic(model_dir / "config.yml", f"# {header}\n" + yaml.safe_dump(kept, sort_keys=False))
    return load_config(model_dir / "config.yml")


def round_config(experiment: Experiment, files: store.RoundFiles) -> ExperimentConfig:
    """The round's config.yml: the experiment's, on the round dataset (warm-started when asked)."""
    weights = str(model_checkpoint(experiment, files.number - 1).resolve()) if experiment.al.warm_start else None
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
    write_json_atomic(files.done, {"round": files.number, "mode": "head", "epochs": experiment.al.head_epochs, **trained,
                                   "finished_utc": store.utc_now()})
    return TrainResult(files.model, experiment.al.head_epochs, None, None)


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
            "embeddings": experiment.al.embeddings, "architecture": experiment.config.architecture,
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
    split = experiment.al.eval_split
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


# ---------------------------------------------------------------- status


def next_step(experiment: Experiment, states: list[RoundState]) -> str:
    """What the person should run next."""
    command = f"python classifier/active_learning.py {{}} --config {experiment.config_path}"
    if not states[0].trained:
        return f"train round 0: python classifier/train.py --config {experiment.config_path}"
    last = states[-1]
    if last.number > 0 and last.selected and not last.trained:
        if last.labelled == 0:
            tool = "Timelapse (timelapse_request.csv)" if experiment.al.label_tool == "timelapse" else "Label Studio"
            return f"label round {last.number}'s {last.selected} images in {tool}, then: " + command.format("import") + (
                " --file <export>" if experiment.al.label_tool == "timelapse" else "")
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
                     f"{experiment.al.eval_split}_top1": metrics.get("top1", ""),
                     f"{experiment.al.eval_split}_macro_f1": metrics.get("macro_f1", "")})
    return pd.DataFrame(rows), next_step(experiment, states)
