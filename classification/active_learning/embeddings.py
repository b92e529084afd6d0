"""Embeddings and class probabilities of a pool of images, in one pass, resumable on a large pool.

The embedding of an image is the model's penultimate feature vector (what its head
sees, ``forward_features``); its probabilities are the softmax of the head applied to
that vector, so one forward pass gives both. Works with a trained checkpoint (both
outputs) or any backbone by name (embeddings only; ImageNet weights when pretrained).

Resumable: the pool is processed in chunks of ``chunk_size`` images and each chunk is
saved atomically to ``<cache_dir>/chunk_<start>.npz``; a re-run with the same model,
image size and pool reuses the saved chunks and computes the rest. ``cache.json``
records what the chunks were made from; any change starts them again. Unreadable images
are skipped and reported, never a crash. The pass itself is ``training.inference``'s
``run_in_chunks``, the one inference path (with the config's AMP and channels_last).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from classification.active_learning.lightly import write_embeddings_csv
from classification.active_learning.scores import uncertainty_scores
from classification.config import ExperimentConfig
from classification.data.samples import Sample, image_files
from classification.errors import DataError, UserError
from classification.evaluation.predict import load_trained_model, trained_network
from classification.evaluation.prediction_files import folder_input, labelled_samples
from classification.io import atomic_open, write_csv_atomic
from classification.runtime import DistributedContext, select_device
from classification.shards import NO_DASK, DaskOptions
from classification.training.checkpoint import resolve_checkpoint
from classification.training.data import build_loader
from classification.training.inference import (
    EMBEDDINGS,
    PROBABILITIES,
    ChunkCache,
    Compute,
    embeddings,
    embeddings_and_probabilities,
    inference_options,
    run_in_chunks,
)
from classification.training.inference_shards import ModelSource, file_identity, run_inference_shards
from classification.training.models import build_model, input_spec_of, resolve_inputs
from classification.training.weights import InputSpec

log = logging.getLogger(__name__)

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


def cache_key(samples: Sequence[Sample], model_id: str, spec: InputSpec, chunk_size: int) -> dict[str, object]:
    """What a cache of chunks was made from: the model, its input (size, normalisation, interpolation), the
    chunking and every path."""
    digest = hashlib.sha256("\n".join(str(s.path) for s in samples).encode("utf-8")).hexdigest()
    return {"model": model_id, "image_size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation, "chunk_size": chunk_size, "n": len(samples), "paths_sha256": digest}


def outputs_of(with_probabilities: bool) -> tuple[Compute, tuple[str, ...]]:
    """What a pass computes: embeddings and probabilities (a trained model), or embeddings only (a backbone)."""
    return (embeddings_and_probabilities, (EMBEDDINGS, PROBABILITIES)) if with_probabilities else (embeddings, (EMBEDDINGS,))


def embed_on_dask(source: ModelSource, samples: Sequence[Sample], config: ExperimentConfig, with_probabilities: bool,
                  cache_dir: Path | None, chunk_size: int, dask: DaskOptions) -> PoolEmbeddings:
    """``embed_samples`` as shards on Dask: one shard per chunk (the same batches as one process, so the same
    numbers), shard files in ``<cache_dir>/shards`` and reused by a re-run, as the chunks are."""
    compute, names = outputs_of(with_probabilities)
    folder = (cache_dir if cache_dir is not None else Path("embedding_chunks")) / "shards"
    result = run_inference_shards(source, samples, config, compute, names, folder, dask, chunk_size, "embed")
    return PoolEmbeddings(result.indices, result.outputs[EMBEDDINGS], result.outputs[PROBABILITIES] if with_probabilities else None,
                          result.skipped)


def embed_samples(model: nn.Module, samples: Sequence[Sample], config: ExperimentConfig, device: torch.device,
                  with_probabilities: bool = True, cache_dir: Path | None = None, model_id: str = "",
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> PoolEmbeddings:
    """Embed (and score) ``samples`` with ``model`` in eval mode, through the one inference path (the config's AMP
    and channels_last); chunks cached in ``cache_dir`` when given. Unset inputs (size, normalisation) are the weights'."""
    config = resolve_inputs(config)
    compute, names = outputs_of(with_probabilities)
    cache = ChunkCache(cache_dir, cache_key(samples, model_id, input_spec_of(config), chunk_size)) if cache_dir is not None else None
    result = run_in_chunks(model, samples, lambda part: build_loader(config, part, train=False), compute, names,
                           inference_options(config, device), chunk_size, cache, "embed")
    return PoolEmbeddings(result.indices, result.outputs[EMBEDDINGS], result.outputs[PROBABILITIES] if with_probabilities else None,
                          result.skipped)


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
    """An identity for a weights file that changes when its contents do (a SHA-256 of them, not its path or
    modification time: a checkpoint retrained or written over with its time kept is another)."""
    stat = Path(path).stat()  # any write changes st_ctime, which nobody can set back: the digest is reused until then
    return file_digest(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=32)
def file_digest(path: str, *identity: int) -> str:
    """``sha256:<hex>`` of a file's contents (hashed once per path and ``identity``: inode, size, times)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def embed_with_checkpoint(checkpoint: Path, samples: Sequence[Sample], config: ExperimentConfig,
                          cache_dir: Path | None, chunk_size: int = DEFAULT_CHUNK_SIZE, dask: DaskOptions = NO_DASK) -> PoolEmbeddings:
    """Embeddings and probabilities of ``samples`` with a trained checkpoint, at the size it was trained at
    (as shards on Dask when ``dask`` asks for it)."""
    model = load_trained_model(checkpoint, config)
    config = model.config_for(config)
    if dask.enabled:
        source = ModelSource(trained_network, (checkpoint, config), file_identity(checkpoint))
        return embed_on_dask(source, samples, config, True, cache_dir, chunk_size, dask)
    device = select_device(config.device, DistributedContext())
    return embed_samples(model.model, samples, config, device, True, cache_dir, describe_model_file(checkpoint), chunk_size)


def backbone_network(architecture: str, pretrained: bool, pretrained_source: str, seed: int = 0) -> nn.Module:
    """A backbone by name (one output, unused: only its features are taken). Random weights (not
    ``pretrained``) are drawn from ``seed`` without touching the global RNG, so the same network comes
    out every time: in a re-run that reuses cached chunks and in every Dask worker."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator the weights are drawn from; CUDA's untouched
        return build_model(architecture, 1, pretrained, pretrained_source=pretrained_source)


def backbone_model_id(config: ExperimentConfig) -> str:
    """What a backbone's features are made from (the cache key's model): the architecture and its weights
    (ImageNet's and where from, or random ones and their seed)."""
    if config.pretrained:
        return f"{config.architecture} pretrained=True ({config.pretrained_source})"
    return f"{config.architecture} pretrained=False (random, seed {config.seed})"


def embed_with_backbone(config: ExperimentConfig, samples: Sequence[Sample], cache_dir: Path | None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE, dask: DaskOptions = NO_DASK) -> PoolEmbeddings:
    """Features of ``config.architecture`` as a frozen backbone (ImageNet weights from ``pretrained_source``
    when ``config.pretrained``, else random ones drawn from ``config.seed``), at the weights' input size; no
    probabilities."""
    config = resolve_inputs(config)  # the weights' input size and statistics where the config leaves them unset
    model_id = backbone_model_id(config)
    network = (config.architecture, config.pretrained, config.pretrained_source, config.seed)
    if dask.enabled:
        return embed_on_dask(ModelSource(backbone_network, network, model_id), samples, config, False, cache_dir, chunk_size, dask)
    device = select_device(config.device, DistributedContext())
    return embed_samples(backbone_network(*network), samples, config, device, False, cache_dir, model_id, chunk_size)


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
                 checkpoint: str | None = None, score: str = "margin", chunk_size: int = DEFAULT_CHUNK_SIZE,
                 dask: DaskOptions = NO_DASK) -> EmbeddingRun:
    """Embed every image under ``images_dir`` with a trained checkpoint of ``run_dir`` (embeddings, probabilities
    and an ``al_score``) or, without a checkpoint, with ``config.architecture`` as a backbone (embeddings only)."""
    dask.validate()  # contradicting Dask flags are one line, as in prediction and cropping
    images_dir, output_dir = Path(images_dir).resolve(), Path(output_dir)
    if checkpoint is not None:
        if run_dir is None:
            raise UserError("--checkpoint needs --config (the experiment whose checkpoints/ it names)")
        path = resolve_checkpoint(run_dir, checkpoint)
        samples = folder_input(images_dir, load_trained_model(path, config).label_names).samples
        result = embed_with_checkpoint(path, samples, config, output_dir / "chunks", chunk_size, dask)
        labels: list[int] | None = [max(s.label, 0) for s in samples]
        al_scores = uncertainty_scores(result.probabilities, score) if len(result) and result.probabilities is not None else None
    else:
        samples = unlabelled_samples(images_dir)
        result = embed_with_backbone(config, samples, output_dir / "chunks", chunk_size, dask)
        labels, al_scores = None, None
    relative = [s.path.relative_to(images_dir).as_posix() for s in samples]
    files_written = write_embedding_outputs(output_dir, relative, result, labels, al_scores)
    for index in result.skipped:
        log.warning("skipped %s (unreadable image)", samples[index].path)
    log.info("%d images embedded (%d-d) -> %s; %d skipped", len(result), result.embeddings.shape[1] if len(result) else 0,
             output_dir, len(result.skipped))
    return EmbeddingRun(output_dir, files_written, len(result), len(result.skipped))
