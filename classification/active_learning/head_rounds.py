"""Head-only rounds of the loop (``active_learning.retrain: head``): seconds a round instead of minutes.

The images are embedded once (``active_learning/features/<embeddings>/{train,pool,<eval split>}``,
cached in resumable chunks): with ``embeddings: pretrained`` by the frozen ImageNet backbone
of the experiment's architecture (its ``pretrained_source``), with ``fine_tuned`` by the
experiment's round-0 checkpoint. Each round's model is then a small MLP
(``triplet.train_mlp``) trained on the features of the train split plus the round's labelled
pool images (unreadable ones left out and listed), saved as ``round_<k>/model/head.pt`` with
what its features were made from (``features_source``); selection and evaluation use its
probabilities and the same features. Round 0's head (train split only) is trained the first
time it is needed, and again when its features' source changed (a retrained round-0
checkpoint), so the loop can start without ``classifier/train.py`` in this mode.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classification.active_learning.embeddings import (
    PoolEmbeddings,
    backbone_model_id,
    describe_model_file,
    embed_with_backbone,
    embed_with_checkpoint,
)
from classification.active_learning.triplet import MLPClassifier, predict_proba, train_mlp
from classification.config import ActiveLearningConfig, ExperimentConfig
from classification.data.samples import Sample
from classification.errors import DataError, UserError
from classification.io import write_bytes_atomic
from classification.training.models import input_spec_of

log = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
HIDDEN = 256


@dataclass(frozen=True)
class HeadContext:
    """What head-only rounds need from the experiment: its config, where features live, its round-0 checkpoint."""

    config: ExperimentConfig
    features_root: Path  # active_learning/features
    initial_checkpoint: Callable[[], Path]  # the round-0 model (only read with embeddings: fine_tuned)

    @property
    def al(self) -> ActiveLearningConfig:
        return self.config.active_learning


def cached_features(context: HeadContext, name: str, samples: Sequence[Sample]) -> PoolEmbeddings:
    """Features of ``samples`` (cached under ``features/<embeddings>/<name>``); no probabilities."""
    cache = context.features_root / context.al.embeddings / name
    if context.al.embeddings == "pretrained":
        if not context.config.pretrained:
            raise UserError("active_learning.embeddings: pretrained needs pretrained: true (ImageNet weights); "
                            "with a network trained from scratch use embeddings: fine_tuned")
        return embed_with_backbone(context.config, samples, cache)
    result = embed_with_checkpoint(context.initial_checkpoint(), samples, context.config, cache)
    return PoolEmbeddings(result.kept, result.embeddings, None, result.skipped)


def features_source(context: HeadContext) -> str:
    """What the cached features are made from now: the frozen backbone and its input (``pretrained``), or the round-0
    checkpoint's contents (``fine_tuned``). A head records it; a head made from other features is stale."""
    if context.al.embeddings == "pretrained":
        spec = input_spec_of(context.config)
        return f"{backbone_model_id(context.config)}, {spec.size} px, mean {list(spec.mean)}, std {list(spec.std)}, {spec.interpolation}"
    return describe_model_file(context.initial_checkpoint())


@dataclass(frozen=True)
class HeadTrainingSet:
    """The features and labels a head is trained on, how many of them are pool images, and the labelled images
    left out because they could not be read."""

    features: np.ndarray
    labels: np.ndarray
    pool_labels: int
    unreadable: list[Path]


def training_set(context: HeadContext, train: Sequence[Sample], pool: Sequence[Sample]) -> HeadTrainingSet:
    """Features and labels of the train split and of the labelled images of the whole ``pool`` (label -1: not
    labelled, left out; the pool's features are those cached for selection). Unreadable images are left out,
    never counted as labelled, and listed."""
    features, labels, unreadable, pool_labels = [], [], [], 0
    for name, samples in (("train", train), ("pool", pool)):
        if not samples:
            continue
        result = cached_features(context, name, samples)
        known = np.array([samples[i].label for i in result.kept], dtype=np.int64)
        features.append(result.embeddings[known >= 0])
        labels.append(known[known >= 0])
        unreadable += [samples[i].path for i in result.skipped if samples[i].label >= 0]
        if name == "pool":
            pool_labels = int((known >= 0).sum())
    if not features or not sum(len(y) for y in labels):
        raise DataError(f"{context.config.data_root}: no readable labelled images to train the head on")
    return HeadTrainingSet(np.concatenate(features), np.concatenate(labels), pool_labels, unreadable)


def train_head(context: HeadContext, train: Sequence[Sample], pool: Sequence[Sample], num_classes: int, path: Path,
               seed: int) -> dict[str, Any]:
    """Train the round's MLP on the train split plus the pool's labelled images; save it atomically at ``path``
    (with the features it was trained on, ``features_source``)."""
    data = training_set(context, train, pool)
    x, y = data.features, data.labels
    if data.unreadable:
        log.warning("%d labelled images could not be read and are not used (nor counted): %s", len(data.unreadable),
                    ", ".join(str(p) for p in data.unreadable))
    mlp = train_mlp(x, y, num_classes, hidden=HIDDEN, epochs=context.al.head_epochs, seed=seed)
    buffer = io.BytesIO()
    torch.save({"state_dict": mlp.state_dict(), "in_features": int(x.shape[1]), "num_classes": num_classes,
                "hidden": HIDDEN, "embeddings": context.al.embeddings, "features": features_source(context),
                "trained_on": int(len(y))}, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    log.info("head trained on %d labelled images (%d-d %s features, %d epochs) -> %s", len(y), x.shape[1],
             context.al.embeddings, context.al.head_epochs, path)
    return {"labelled_images": int(len(y)), "pool_labels": data.pool_labels, "feature_dim": int(x.shape[1]),
            "unreadable_labelled": [str(p) for p in data.unreadable]}


def read_head(path: Path) -> tuple[MLPClassifier, dict[str, Any]]:
    """A saved round head (weights-only load) and what it was trained on."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        mlp = MLPClassifier(int(saved["in_features"]), int(saved["num_classes"]), int(saved["hidden"]))
        mlp.load_state_dict(saved["state_dict"])
    except Exception as error:  # noqa: BLE001 - any unreadable head file is the same problem to the user
        raise DataError(f"{path}: not a readable round head ({str(error).splitlines()[0]}); retrain the round") from None
    return mlp.eval(), {key: saved.get(key) for key in ("embeddings", "features", "in_features", "num_classes")}


def head_mismatch(context: HeadContext, trained_on: dict[str, Any], num_classes: int,
                  feature_dim: int | None = None) -> str | None:
    """Why a head does not fit the experiment now (other embeddings, features made by another model or input,
    feature size or classes), or None."""
    if trained_on["embeddings"] != context.al.embeddings:
        return f"it was trained on {trained_on['embeddings']} embeddings, the config says {context.al.embeddings}"
    if trained_on.get("features") != features_source(context):
        made_by = "round-0 checkpoint" if context.al.embeddings == "fine_tuned" else "backbone or input size and normalisation"
        return f"it was trained on features of another {made_by} than the experiment's now"
    if trained_on["num_classes"] != num_classes:
        return f"it has {trained_on['num_classes']} classes, the dataset {num_classes}"
    if feature_dim is not None and trained_on["in_features"] != feature_dim:
        return f"it takes {trained_on['in_features']}-d features, the model gives {feature_dim}-d"
    return None


def head_fits(context: HeadContext, path: Path, num_classes: int) -> bool:
    """True when ``path`` is a readable head trained on the experiment's current kind of embeddings."""
    try:
        return head_mismatch(context, read_head(path)[1], num_classes) is None
    except DataError:
        return False


def load_head(context: HeadContext, path: Path, num_classes: int, feature_dim: int) -> MLPClassifier:
    """A saved round head, refused in one line when it does not fit the experiment's features now."""
    mlp, trained_on = read_head(path)
    problem = head_mismatch(context, trained_on, num_classes, feature_dim)
    if problem:
        raise UserError(f"{path}: {problem}; retrain the round (classifier/active_learning.py retrain --round <k>)")
    return mlp


def scored_features(context: HeadContext, head: Path, name: str, samples: Sequence[Sample],
                    num_classes: int) -> PoolEmbeddings:
    """Features of ``samples`` with the round head's probabilities (what selection and evaluation read)."""
    result = cached_features(context, name, samples)
    mlp = load_head(context, head, num_classes, int(result.embeddings.shape[1]))
    probabilities = predict_proba(mlp, result.embeddings) if len(result) else np.zeros((0, 0))
    return PoolEmbeddings(result.kept, result.embeddings, probabilities.astype(np.float32), result.skipped)
