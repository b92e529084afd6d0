"""Embeddings and class probabilities of a pool of images, in one pass, resumable on a large pool.

The embedding of an image is the model's penultimate feature vector (what its head
sees, ``forward_features``); its probabilities are the softmax of the head applied to
that vector, so one forward pass gives both. Works with a trained checkpoint (both
outputs) or any backbone by name (embeddings only; ImageNet weights when pretrained).

Resumable: the pool is processed in chunks of ``chunk_size`` images and each chunk is
saved atomically to ``<cache_dir>/chunk_<start>.npz``; a re-run with the same model,
image size and pool reuses the saved chunks and computes the rest. ``cache.json``
records what the chunks were made from; any change starts them again. Unreadable images
are skipped and reported, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from classification.config import ExperimentConfig
from classification.errors import DataError, UserError
from classification.io import atomic_open, read_json, write_csv_atomic, write_json_atomic
from classification.active_learning.lightly import write_embeddings_csv
from classification.active_learning.scores import uncertainty_scores
from classification.evaluation.predict import folder_input, labelled_samples, load_trained_model
from classification.training.checkpoint import resolve_checkpoint
from classification.training.data import Sample, build_loader, image_files
from classification.runtime import DistributedContext, progress_bar, select_device
from classification.training.models import build_model, forward_features, head_module, input_spec_of
from classification.training.weights import InputSpec

log = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
DEFAULT_CHUNK_SIZE = 2048


@dataclass
class PoolEmbeddings:
    """Per readable image (in input order): its position in the input, embedding and probabilities."""

    kept: np.ndarray  # int64 (n_kept,): positions in the input list
    embeddings: np.ndarray  # float32 (n_kept, d)
    probabilities: np.ndarray | None  # float32 (n_kept, C), None for a backbone without a trained head
    skipped: list[int]  # input positions whose image could not be read

    def __len__(self) -> int:
        return len(self.kept)


def features_and_probabilities(model: nn.Module, images: torch.Tensor, with_probabilities: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Penultimate features and (optionally) softmax probabilities from one forward pass."""
    features = forward_features(model, images)
    if not with_probabilities:
        return features.float(), None
    logits = head_module(model)(features)
    return features.float(), torch.softmax(logits.float(), dim=1)


@torch.inference_mode()
def embed_chunk(model: nn.Module, samples: Sequence[Sample], config: ExperimentConfig, device: torch.device,
                with_probabilities: bool, offset: int, description: str) -> dict[str, np.ndarray]:
    """One chunk's arrays: ``kept`` (global positions), ``embeddings``, ``probabilities``, ``skipped``."""
    loader = build_loader(config, samples, train=False)
    kept, features, probabilities, skipped = [], [], [], []
    with progress_bar(len(loader), 0, description, DistributedContext()) as bar:
        for batch in loader:
            skipped += [offset + index for index in batch.skipped]
            if len(batch):
                vectors, probs = features_and_probabilities(model, batch.images.to(device), with_probabilities)
                kept.append(batch.indices.numpy() + offset)
                features.append(vectors.cpu().numpy())
                if probs is not None:
                    probabilities.append(probs.cpu().numpy())
            bar.update(1)
    dim = features[0].shape[1] if features else 0
    return {
        "kept": np.concatenate(kept) if kept else np.zeros(0, np.int64),
        "embeddings": np.concatenate(features).astype(np.float32) if features else np.zeros((0, dim), np.float32),
        "probabilities": np.concatenate(probabilities).astype(np.float32) if probabilities else np.zeros((0, 0), np.float32),
        "skipped": np.asarray(sorted(skipped), dtype=np.int64),
    }


def cache_key(samples: Sequence[Sample], model_id: str, spec: InputSpec, chunk_size: int) -> dict[str, object]:
    """What a cache of chunks was made from: the model, its input (size, normalisation, interpolation), the
    chunking and every path."""
    digest = hashlib.sha256("\n".join(str(s.path) for s in samples).encode("utf-8")).hexdigest()
    return {"model": model_id, "image_size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation, "chunk_size": chunk_size, "n": len(samples), "paths_sha256": digest}


def prepare_cache(cache_dir: Path, key: dict[str, object]) -> None:
    """Keep the chunks of ``cache_dir`` when they were made from ``key``; otherwise remove them."""
    cache_file = cache_dir / CACHE_FILE
    if cache_file.is_file():
        try:
            same = read_json(cache_file) == key
        except DataError:
            same = False
        if same:
            return
        log.info("%s: the model or the pool changed; embedding again", cache_dir)
    for chunk in cache_dir.glob("chunk_*.npz"):
        chunk.unlink()
    write_json_atomic(cache_file, key)


def save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one chunk's arrays atomically."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_chunk(path: Path) -> dict[str, np.ndarray] | None:
    """A saved chunk, or None when the file cannot be read (it is then computed again)."""
    try:
        with np.load(path) as data:
            return {name: data[name] for name in ("kept", "embeddings", "probabilities", "skipped")}
    except (OSError, ValueError, KeyError):
        return None


def embed_samples(model: nn.Module, samples: Sequence[Sample], config: ExperimentConfig, device: torch.device,
                  with_probabilities: bool = True, cache_dir: Path | None = None, model_id: str = "",
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> PoolEmbeddings:
    """Embed (and score) ``samples`` with ``model`` in eval mode; chunks cached in ``cache_dir`` when given."""
    if chunk_size < 1:
        raise UserError(f"chunk_size must be at least 1, got {chunk_size}")
    model = model.to(device).eval()
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        prepare_cache(cache_dir, cache_key(samples, model_id, input_spec_of(config), chunk_size))
    chunks = []
    starts = range(0, len(samples), chunk_size)
    for number, start in enumerate(starts, start=1):
        path = cache_dir / f"chunk_{start:09d}.npz" if cache_dir is not None else None
        arrays = load_chunk(path) if path is not None and path.is_file() else None
        if arrays is None:
            arrays = embed_chunk(model, samples[start:start + chunk_size], config, device, with_probabilities, start,
                                 f"embed {number}/{len(starts)}")
            if path is not None:
                save_chunk(path, arrays)
        chunks.append(arrays)
    return combine_chunks(chunks, with_probabilities)


def combine_chunks(chunks: list[dict[str, np.ndarray]], with_probabilities: bool) -> PoolEmbeddings:
    """One ``PoolEmbeddings`` from the chunks, in input order."""
    if not chunks:
        return PoolEmbeddings(np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                              np.zeros((0, 0), np.float32) if with_probabilities else None, [])
    kept = np.concatenate([c["kept"] for c in chunks]).astype(np.int64)
    embeddings = np.concatenate([c["embeddings"] for c in chunks if len(c["kept"])] or [chunks[0]["embeddings"]])
    probabilities = None
    if with_probabilities:
        probabilities = np.concatenate([c["probabilities"] for c in chunks if len(c["kept"])] or [chunks[0]["probabilities"]])
    order = np.argsort(kept, kind="stable")
    skipped = sorted(int(i) for c in chunks for i in c["skipped"])
    return PoolEmbeddings(kept[order], embeddings[order], probabilities[order] if probabilities is not None else None, skipped)


def write_embedding_outputs(output_dir: Path, relative_paths: Sequence[str], result: PoolEmbeddings,
                            labels: Sequence[int] | None = None, al_scores: np.ndarray | None = None) -> list[Path]:
    """``embeddings.npy``, ``probabilities.npy``, ``files.csv`` (row order), Lightly's ``embeddings.csv``, ``skipped.csv``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [relative_paths[i] for i in result.kept]
    written = [output_dir / "embeddings.npy", output_dir / "files.csv", output_dir / "embeddings.csv", output_dir / "skipped.csv"]
    with atomic_open(written[0], "wb") as handle:
        np.save(handle, result.embeddings)
    if result.probabilities is not None:
        written.append(output_dir / "probabilities.npy")
        with atomic_open(written[-1], "wb") as handle:
            np.save(handle, result.probabilities)
    write_csv_atomic(written[1], pd.DataFrame({"path": names}))
    kept_labels = None if labels is None else [labels[i] for i in result.kept]
    write_embeddings_csv(written[2], names, result.embeddings, kept_labels, al_scores)
    write_csv_atomic(written[3], pd.DataFrame({"path": [relative_paths[i] for i in result.skipped]}))
    return written


def describe_model_file(path: Path) -> str:
    """An identity for a weights file that changes when the file does (path, size, modification time)."""
    stat = Path(path).stat()
    return json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])


def embed_with_checkpoint(checkpoint: Path, samples: Sequence[Sample], config: ExperimentConfig,
                          cache_dir: Path | None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PoolEmbeddings:
    """Embeddings and probabilities of ``samples`` with a trained checkpoint, at the size it was trained at."""
    model = load_trained_model(checkpoint, config)
    config = model.config_for(config)
    device = select_device(config.device, DistributedContext())
    return embed_samples(model.model, samples, config, device, True, cache_dir, describe_model_file(checkpoint), chunk_size)


def embed_with_backbone(config: ExperimentConfig, samples: Sequence[Sample], cache_dir: Path | None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> PoolEmbeddings:
    """Features of ``config.architecture`` as a frozen backbone (ImageNet weights from ``pretrained_source``
    when ``config.pretrained``, random otherwise), at the weights' input size; no probabilities."""
    device = select_device(config.device, DistributedContext())
    model = build_model(config.architecture, 1, config.pretrained, pretrained_source=config.pretrained_source)
    model_id = f"{config.architecture} pretrained={config.pretrained} ({config.pretrained_source})"
    return embed_samples(model, samples, config, device, False, cache_dir, model_id, chunk_size)


@dataclass
class EmbeddingRun:
    """What ``embed_folder`` wrote and how many images it embedded or skipped."""

    output_dir: Path
    files: list[Path]
    embedded: int
    skipped: int


def backbone_config(architecture: str, image_size: int | None, batch_size: int, num_workers: int, device: str,
                    pretrained: bool, pretrained_source: str = "library") -> ExperimentConfig:
    """A minimal config for embedding with a backbone by name (no dataset involved); ``image_size`` None: the weights'."""
    return ExperimentConfig(data_root=Path("."), architecture=architecture, image_size=image_size, batch_size=batch_size,
                            num_workers=num_workers, device=device, pretrained=pretrained,
                            pretrained_source=pretrained_source)


def unlabelled_samples(images_dir: Path) -> list[Sample]:
    """Every image under ``images_dir``, without labels."""
    files = image_files(images_dir)
    if not files:
        raise DataError(f"{images_dir}: no images (.jpg, .jpeg, .png) in this folder or below")
    return labelled_samples(files, [""] * len(files), [""] * len(files), [images_dir.name] * len(files), [])


def embed_folder(images_dir: Path, output_dir: Path, config: ExperimentConfig, run_dir: Path | None = None,
                 checkpoint: str | None = None, score: str = "margin", chunk_size: int = DEFAULT_CHUNK_SIZE) -> EmbeddingRun:
    """Embed every image under ``images_dir`` with a trained checkpoint of ``run_dir`` (embeddings, probabilities
    and an ``al_score``) or, without a checkpoint, with ``config.architecture`` as a backbone (embeddings only)."""
    images_dir, output_dir = Path(images_dir).resolve(), Path(output_dir)
    if checkpoint is not None:
        if run_dir is None:
            raise UserError("--checkpoint needs --config (the experiment whose checkpoints/ it names)")
        path = resolve_checkpoint(run_dir, checkpoint)
        samples = folder_input(images_dir, load_trained_model(path, config)).samples
        result = embed_with_checkpoint(path, samples, config, output_dir / "chunks", chunk_size)
        labels: list[int] | None = [max(s.label, 0) for s in samples]
        al_scores = uncertainty_scores(result.probabilities, score) if len(result) else None
    else:
        samples = unlabelled_samples(images_dir)
        result = embed_with_backbone(config, samples, output_dir / "chunks", chunk_size)
        labels, al_scores = None, None
    relative = [s.path.relative_to(images_dir).as_posix() for s in samples]
    files_written = write_embedding_outputs(output_dir, relative, result, labels, al_scores)
    for index in result.skipped:
        log.warning("skipped %s (unreadable image)", samples[index].path)
    log.info("%d images embedded (%d-d) -> %s; %d skipped", len(result), result.embeddings.shape[1] if len(result) else 0,
             output_dir, len(result.skipped))
    return EmbeddingRun(output_dir, files_written, len(result), len(result.skipped))
