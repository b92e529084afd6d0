"""Predict with a trained checkpoint: a split of the dataset, a folder of images, a CCT file, or MegaDetector crops.

``run_prediction`` writes ``predictions.csv`` (one row per image; see
``classification.evaluation.report``), ``skipped.csv`` (images that could not be read:
never a crash), ``prediction_info.json`` and, when true labels are known, ``metrics.json``
and the plots. For MegaDetector input it also writes the MegaDetector file with each
classified detection's ``classifications``. The default output folder is
``<run_dir>/predictions/<split or input name>_<checkpoint name>/``.

Unlike animl-ml (which scored val for ``--split test``), ``--split`` scores exactly that
split. The model's classes come from the checkpoint; a dataset whose ``label_index.json``
differs from it is refused rather than silently mislabelled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classification.config import ExperimentConfig, load_config, with_legacy_defaults, with_overrides
from classification.data.crop_manifest import MANIFEST_NAME
from classification.data.dataset_folder import is_dataset_folder
from classification.data.samples import Sample, build_samples, load_label_index
from classification.errors import DataError, UserError
from classification.evaluation.megadetector import write_megadetector_classifications
from classification.evaluation.postprocess import PostprocessInput, is_enabled, megadetector_descriptions_for, run_postprocess
from classification.evaluation.postprocess_steps import probabilities_from_topk
from classification.evaluation.prediction_files import (
    PredictionInput,
    PredictionResult,
    Scores,
    cct_input,
    folder_input,
    megadetector_input,
    write_prediction_files,
)
from classification.runtime import DistributedContext, select_device
from classification.shards import NO_DASK, SHARDS_DIR, DaskOptions, remove_shard_files
from classification.training.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
from classification.training.data import build_loader, check_images_exist, check_skipped_fraction
from classification.training.inference import PROBABILITIES, TOP_K_OUTPUTS, inference_options, run_inference, top_k_probabilities
from classification.training.inference_shards import ModelSource, file_identity, run_inference_shards, whole_batches
from classification.training.models import build_model

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model loaded from a checkpoint, with what it needs to predict."""

    model: nn.Module
    label_names: list[str]
    checkpoint: Path
    architecture: str
    image_size: int
    epoch: int | None
    weights: str  # "ema" or "model"
    inputs: dict[str, Any]  # image_size, mean, std, interpolation it was trained with

    def config_for(self, config: ExperimentConfig) -> ExperimentConfig:
        """``config`` with this model's input size and normalisation (those it was trained with)."""
        return config.model_copy(update=self.inputs)


# ---------------------------------------------------------------- the model


def label_names_of(checkpoint: dict[str, Any], path: Path) -> list[str]:
    """Class names in index order from the checkpoint's ``label_index`` (``{"0": name, ...}``)."""
    index = checkpoint.get("label_index")
    if not isinstance(index, dict) or sorted(int(k) for k in index) != list(range(len(index))):
        raise DataError(f"{path}: the checkpoint has no valid label_index")
    return [str(index[key]) for key in sorted(index, key=int)]


def load_trained_model(path: Path, config: ExperimentConfig) -> TrainedModel:
    """Build the checkpoint's architecture (no download) and load its EMA weights when present, else its weights."""
    checkpoint = load_checkpoint(path)
    label_names = label_names_of(checkpoint, path)
    saved = checkpoint.get("config") or {}
    architecture = str(saved.get("architecture", config.architecture))
    image_size = int(saved.get("image_size") or 224)
    if architecture != config.architecture or image_size != (config.image_size or image_size):
        log.warning("%s: trained as %s at %d px (the config says %s at %s px): using the checkpoint's",
                    path, architecture, image_size, config.architecture, config.image_size)
    trained = with_legacy_defaults(saved)
    inputs = {"image_size": image_size, "mean": tuple(trained["mean"]), "std": tuple(trained["std"]),
              "interpolation": trained["interpolation"]}
    model = build_model(architecture, len(label_names), pretrained=False)
    weights = "ema" if checkpoint.get("ema") is not None else "model"
    load_model_weights(model, checkpoint[weights], path, architecture)
    epoch = checkpoint.get("epoch")
    return TrainedModel(model.eval(), label_names, path, architecture, image_size,
                        int(epoch) if epoch is not None else None, weights, inputs)


def trained_network(path: Path, config: ExperimentConfig) -> nn.Module:
    """The network of a checkpoint (``load_trained_model``), as a Dask worker builds it for its shards."""
    return load_trained_model(path, config).model


def check_label_index(dataset_index: dict[int, str], label_names: Sequence[str], where: Path, checkpoint: Path) -> None:
    """Refuse a dataset whose classes are not the checkpoint's (its label numbers would mean other classes)."""
    if dataset_index != dict(enumerate(label_names)):
        raise DataError(f"{where}: label index ({len(dataset_index)} classes: {', '.join(list(dataset_index.values())[:5])}...) "
                        f"differs from the one {checkpoint} was trained with ({len(label_names)} classes: "
                        f"{', '.join(label_names[:5])}...)")


# ---------------------------------------------------------------- inputs


def split_input(config: ExperimentConfig, split: str, model: TrainedModel) -> PredictionInput:
    """Exactly the samples of ``split`` of the config's dataset (after checking its label index)."""
    check_label_index(load_label_index(config.data_root, config.train_split), model.label_names, config.data_root, model.checkpoint)
    return split_samples_input(config, split, model.label_names)


def split_samples_input(config: ExperimentConfig, split: str, label_names: Sequence[str]) -> PredictionInput:
    """The samples of ``split`` with their true label names, paths relative to the crops (or image) folder."""
    samples = build_samples(config, split)
    if not samples:
        raise DataError(f"{config.data_root}: split {split!r} has no images")
    root = config.resolved_crops_dir() if is_dataset_folder(Path(config.data_root)) else config.data_root
    return PredictionInput(split, samples, [label_names[s.label] for s in samples], Path(root))


# ---------------------------------------------------------------- predicting


def score_samples(model: TrainedModel, samples: list[Sample], config: ExperimentConfig, device: torch.device | None,
                  topk: int, dask: DaskOptions = NO_DASK, shard_folder: Path | None = None, full: bool = False) -> Scores:
    """Top-k softmax probabilities of every readable sample, batched, with eval transforms, through the one
    inference path (the config's AMP and channels_last); unreadable ones listed; with ``full`` every class's
    probability too. With ``dask`` enabled, as shards of whole batches on Dask (shard files in
    ``shard_folder``): the same numbers, see ``training.inference_shards``."""
    k = min(topk, len(model.label_names))
    names = (*TOP_K_OUTPUTS, PROBABILITIES) if full else TOP_K_OUTPUTS
    check_images_exist(samples, config.max_skipped_fraction, "predict")  # a wrong --crops-dir: one line, no empty outputs
    if dask.enabled:
        source = ModelSource(trained_network, (model.checkpoint, config), file_identity(model.checkpoint))
        result = run_inference_shards(source, samples, model.config_for(config), top_k_probabilities(k, full), names,
                                      shard_folder or Path(SHARDS_DIR), dask, whole_batches(dask.shard_size, config.batch_size),
                                      "predict")
    else:
        loader = build_loader(model.config_for(config), samples, train=False)
        device = device or select_device(config.device, DistributedContext())
        result = run_inference(model.model, loader, top_k_probabilities(k, full), names, inference_options(config, device),
                               "predict")
    if result.skipped and not len(result):  # a few unreadable images are listed in skipped.csv; all of them is an error
        check_skipped_fraction(len(result.skipped), len(samples), 1.0, "predict", samples[result.skipped[0]].path)
    if not len(result):
        empty = np.zeros((0, len(model.label_names))) if full else None
        return Scores(np.zeros(0, int), np.zeros((0, k), int), np.zeros((0, k)), np.zeros(0), result.skipped,
                      result.images_per_second, empty)
    outputs = result.outputs
    return Scores(result.indices, outputs["top_classes"], outputs["top_probs"], outputs["true_probs"], result.skipped,
                  result.images_per_second, outputs.get(PROBABILITIES))


# ---------------------------------------------------------------- the whole run


def resolve_config(config_path_or_config: str | Path | ExperimentConfig, run_dir: Path | None) -> tuple[ExperimentConfig, Path]:
    """The config and the experiment folder (the config file's folder unless ``run_dir`` is given)."""
    if isinstance(config_path_or_config, ExperimentConfig):
        if run_dir is None:
            raise UserError("run_prediction: pass run_dir with a config object (the experiment folder)")
        return config_path_or_config, Path(run_dir)
    path = Path(config_path_or_config)
    return load_config(path), Path(run_dir) if run_dir is not None else path.resolve().parent


def build_input(config: ExperimentConfig, model: TrainedModel, split: str | None, images_dir: Path | None,
                cct: Path | None, megadetector: Path | None, crops_dir: Path | None) -> PredictionInput:
    """The one input asked for: a split, an image folder, a CCT file, or MegaDetector output with its crops."""
    given = [name for name, value in (("split", split), ("images", images_dir), ("cct", cct), ("megadetector", megadetector))
             if value is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one input among --split, --images, --cct, --megadetector (got {len(given)})")
    if split is not None:
        return split_input(config, split, model)
    if images_dir is not None:
        return folder_input(Path(images_dir).resolve(), model.label_names)
    if cct is not None:
        return cct_input(Path(cct), Path(crops_dir).resolve() if crops_dir is not None else config.resolved_crops_dir(), model.label_names)
    if crops_dir is None:
        raise UserError("--megadetector needs --crops-dir: the folder utils/crop_detections.py wrote its crops to")
    return megadetector_input(Path(megadetector), Path(crops_dir).resolve(), model.label_names)  # type: ignore[arg-type]


def prediction_info(source: PredictionInput, model: TrainedModel, device: str, n_predicted: int, n_skipped: int,
                    images_per_second: float, topk: int) -> dict[str, Any]:
    """``prediction_info.json``: what was predicted, with which checkpoint, where, and how fast."""
    return {
        "input": source.name, "images_root": str(source.root), "checkpoint": str(model.checkpoint), "epoch": model.epoch,
        "architecture": model.architecture, "image_size": model.image_size, "weights": model.weights,
        "device": device, "n_images": len(source.samples), "n_predicted": n_predicted,
        "n_skipped": n_skipped, "images_per_second": round(images_per_second, 2), "topk": topk,
        "label_names": model.label_names,
    }


def run_prediction(
    config_path_or_config: str | Path | ExperimentConfig,
    checkpoint: str | Path,
    split: str | None = None,
    images_dir: Path | None = None,
    cct: Path | None = None,
    megadetector: Path | None = None,
    output_dir: Path | None = None,
    batch_size: int | None = None,
    topk: int = 3,
    device: str | None = None,
    crops_dir: Path | None = None,
    run_dir: Path | None = None,
    dask: DaskOptions = NO_DASK,
) -> PredictionResult:
    """Predict one input with one checkpoint and write the outputs (see the module docstring); on Dask as shards
    when ``dask`` asks for it (``classification.shards``), with the same outputs."""
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    dask.validate()
    config, run_dir = resolve_config(config_path_or_config, run_dir)
    config = with_overrides(config, batch_size=batch_size, device=device)
    checkpoint_path = resolve_checkpoint(run_dir, checkpoint)
    model = load_trained_model(checkpoint_path, config)
    source = build_input(config, model, split, images_dir, cct, megadetector, crops_dir)
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "predictions" / f"{source.name}_{checkpoint_path.stem}"
    # on Dask the workers choose their devices: the client touches no GPU
    torch_device = None if dask.enabled else select_device(config.device, DistributedContext())
    device_used = str(torch_device) if torch_device is not None else f"Dask workers (device: {config.device})"
    scores = score_samples(model, source.samples, config, torch_device, topk, dask, output_dir / SHARDS_DIR,
                           full=is_enabled(config.postprocess))
    log.info("predicted %d images (%.1f images/s on %s); %d skipped (see skipped.csv)",
             len(scores.indices), scores.images_per_second, device_used, len(scores.skipped))
    info = prediction_info(source, model, device_used, len(scores.indices), len(scores.skipped), scores.images_per_second, topk)
    # the raw predictions: complete from here on
    predictions, skipped, predictions_path, metrics = write_prediction_files(source, scores, model.label_names, output_dir, info)
    md_output = None
    if source.megadetector is not None:
        md_output = output_dir / f"{source.megadetector.stem}_classified.json"
        write_megadetector_classifications(source.megadetector, predictions, source.manifest, md_output, topk,
                                           label_names=model.label_names, classifier=f"{model.architecture} {checkpoint_path}",
                                           descriptions=megadetector_descriptions_for(config.postprocess, model.label_names))
    # After prediction (classification/evaluation/postprocess.py): the raw outputs above are final; this adds
    # postprocessed.csv and postprocess_metrics.json beside them when the config's postprocess: section turns a step on.
    where = PostprocessInput(run_dir, checkpoint_path, fit=split is not None and split == config.val_split,
                             manifest=source.manifest if source.manifest is not None else source.root / MANIFEST_NAME,
                             megadetector=source.megadetector, classifier=f"{model.architecture} {checkpoint_path}")
    probabilities = scores.probabilities if scores.probabilities is not None else probabilities_from_topk(predictions, model.label_names)
    post = run_postprocess(config.postprocess, model.label_names, predictions, probabilities, output_dir, where)
    remove_shard_files(output_dir / SHARDS_DIR)  # predictions.csv holds their rows now
    log.info("predictions: %s", predictions_path)
    return PredictionResult(output_dir, predictions_path, predictions, skipped["path"].tolist(), metrics,
                            scores.images_per_second, md_output, post)
