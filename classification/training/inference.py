"""One batched-inference path: a model over images, for prediction, embeddings and active learning.

``run_inference`` runs a model over a loader of ``Batch``es (``training.data``) in eval mode
under ``torch.inference_mode``, with the config's mixed precision and memory format
(``InferenceOptions``), and keeps the named arrays a ``Compute`` function returns per batch
(top-k probabilities, probabilities, embeddings through ``models.forward_features``). Images
that cannot be read are skipped, listed in the result and counted in one warning, never a
crash; a progress bar shows on a terminal.

``run_in_chunks`` does the same over a large pool in chunks of ``chunk_size`` images. With a
``ChunkCache`` each chunk is saved atomically to ``<directory>/chunk_<start>.npz`` (arrays
``kept``, ``skipped`` and one per output, e.g. ``embeddings``, ``probabilities``) beside a
``cache.json`` that says what the chunks were made from; a re-run with the same key reuses the
saved chunks and computes the rest, and any change of key makes them again.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from classification.config import ExperimentConfig
from classification.data.samples import Sample
from classification.errors import DataError, UserError
from classification.io import atomic_open, ensure_folder, read_json, write_json_atomic
from classification.runtime import DistributedContext, autocast, autocast_dtype, progress_bar, uses_channels_last
from classification.training.data import Batch
from classification.training.models import forward_features, head_module

log = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
EMBEDDINGS = "embeddings"
PROBABILITIES = "probabilities"
TOP_K_OUTPUTS = ("top_classes", "top_probs", "true_probs")  # what ``top_k_probabilities`` gives per image

Compute = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
"""Per batch: (model, images on the device, true labels on the CPU, -1 when unknown) -> named outputs, one row per image."""


@dataclass(frozen=True)
class InferenceOptions:
    """Where and how the model runs: the device, the autocast dtype (None: float32), channels_last or not."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


def inference_options(config: ExperimentConfig, device: torch.device) -> InferenceOptions:
    """The config's ``amp`` and ``channels_last`` on ``device`` (the runtime's rules, as in training)."""
    return InferenceOptions(device, autocast_dtype(config, device), uses_channels_last(config, device))


def default_options(device: torch.device) -> InferenceOptions:
    """The config's defaults (``amp: off``, ``channels_last: auto``) for a model run without an experiment config."""
    return inference_options(ExperimentConfig.model_construct(), device)  # type: ignore[call-arg]  # defaults only, no data_root


@dataclass
class InferenceResult:
    """Per readable image, in input order: its position in the input and a row of each output; the unreadable ones."""

    indices: np.ndarray  # int64 (n_kept,): positions in the input, ascending
    outputs: dict[str, np.ndarray]  # name -> (n_kept, ...); (0, 0) float32 when no image could be read
    skipped: list[int]  # input positions whose image could not be read, ascending
    images_per_second: float  # of the images computed now (0 when every chunk came from the cache)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------- what to compute per batch


def probabilities(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Softmax probabilities (B, C) of the model's logits."""
    return {PROBABILITIES: torch.softmax(model(images).float(), dim=1)}


def embeddings(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Penultimate features (B, d): what the head sees (``forward_features``'s hook on the head)."""
    return {EMBEDDINGS: forward_features(model, images).float()}


def embeddings_and_probabilities(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Penultimate features and the softmax of the head applied to them: both from one forward pass."""
    features = forward_features(model, images)
    logits = head_module(model)(features)
    return {EMBEDDINGS: features.float(), PROBABILITIES: torch.softmax(logits.float(), dim=1)}


def top_k_probabilities(k: int, full: bool = False) -> Compute:
    """A ``Compute`` giving ``top_classes`` and ``top_probs`` (B, k) and ``true_probs`` (B,): the true label's
    probability, NaN where the label is unknown (-1); with ``full`` also ``probabilities`` (B, C)."""

    def compute(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        probs = torch.softmax(model(images).float(), dim=1)
        values, classes = probs.topk(k, dim=1)
        labels = labels.to(probs.device)
        true = torch.where(labels >= 0, probs.gather(1, labels.clamp(min=0)[:, None])[:, 0], torch.nan)
        outputs = dict(zip(TOP_K_OUTPUTS, (classes, values, true)))
        if full:
            outputs[PROBABILITIES] = probs
        return outputs

    return compute


# ---------------------------------------------------------------- one pass over a loader


def prepare_model(model: nn.Module, options: InferenceOptions) -> nn.Module:
    """``model`` on the device, in eval mode, in channels_last when asked (in place, as ``Module.to`` is)."""
    model = model.to(options.device).eval()
    return model.to(memory_format=torch.channels_last) if options.channels_last else model


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU NumPy copy; half-precision floats (bf16 has no NumPy type) become float32."""
    if tensor.is_floating_point() and tensor.element_size() < 4:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def run_batch(network: nn.Module, batch: Batch, compute: Compute, names: Sequence[str], options: InferenceOptions) -> dict[str, np.ndarray]:
    """The named outputs of one batch of readable images, under autocast when asked."""
    images = batch.images.to(options.device, non_blocking=True)
    if options.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(options.device, options.amp_dtype):
        outputs = compute(network, images, batch.labels)
    if sorted(outputs) != sorted(names):
        raise ValueError(f"inference: the compute function gave {sorted(outputs)}, expected {sorted(names)}")
    return {name: to_numpy(outputs[name]) for name in names}


def gather(kept: list[np.ndarray], parts: dict[str, list[np.ndarray]], skipped: list[int], rate: float) -> InferenceResult:
    """One result from per-batch pieces, sorted into input order (whatever order the loader gave)."""
    if not kept:
        empty = {name: np.zeros((0, 0), np.float32) for name in parts}
        return InferenceResult(np.zeros(0, np.int64), empty, sorted(skipped), rate)
    indices = np.concatenate(kept).astype(np.int64)
    order = np.argsort(indices, kind="stable")
    outputs = {name: np.concatenate(pieces)[order] for name, pieces in parts.items()}
    return InferenceResult(indices[order], outputs, sorted(skipped), rate)


def infer_batches(model: nn.Module, loader: DataLoader, compute: Compute, names: Sequence[str], options: InferenceOptions,
                  description: str) -> InferenceResult:
    """``compute`` over every batch of ``loader`` (positions are the loader's dataset indices); no logging.
    The model is prepared outside ``inference_mode``: tensors made inside it could not be trained afterwards."""
    network = prepare_model(model, options)
    kept: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    skipped: list[int] = []
    started, seen = time.perf_counter(), 0
    with progress_bar(len(loader), 0, description, DistributedContext()) as bar, torch.inference_mode():
        for batch in loader:
            skipped += batch.skipped
            if len(batch):
                for name, array in run_batch(network, batch, compute, names, options).items():
                    parts[name].append(array)
                kept.append(batch.indices.numpy())
                seen += len(batch)
            bar.update(1)
            bar.set_postfix(img_per_s=f"{seen / max(time.perf_counter() - started, 1e-9):.1f}")
    return gather(kept, parts, skipped, seen / max(time.perf_counter() - started, 1e-9))


def report_skipped(result: InferenceResult, description: str) -> None:
    """Count the unreadable images in one warning (callers list them: skipped.csv, per-file warnings)."""
    if result.skipped:
        log.warning("%s: %d of %d images could not be read and were skipped", description, len(result.skipped),
                    len(result) + len(result.skipped))


def run_inference(model: nn.Module, loader: DataLoader, compute: Compute, names: Sequence[str], options: InferenceOptions,
                  description: str = "infer") -> InferenceResult:
    """Run ``model`` over ``loader`` (batches of ``Batch``) and keep the ``names`` outputs of ``compute`` per readable
    image, in input order; unreadable images are skipped and counted."""
    result = infer_batches(model, loader, compute, names, options, description)
    report_skipped(result, description)
    return result


# ---------------------------------------------------------------- resumable chunks


@dataclass(frozen=True)
class ChunkCache:
    """Where a pool's chunks are saved and what they were made from (``key``: any change makes them again)."""

    directory: Path
    key: dict[str, object]

    def chunk_path(self, start: int) -> Path:
        """The file of the chunk that starts at input position ``start``."""
        return self.directory / f"chunk_{start:09d}.npz"


def prepare_cache(cache: ChunkCache) -> None:
    """Keep the chunks of ``cache.directory`` when they were made from ``cache.key``; otherwise remove them."""
    ensure_folder(cache.directory)  # a file in the way is one line, not NotADirectoryError
    cache_file = cache.directory / CACHE_FILE
    if cache_file.is_file():
        try:
            same = read_json(cache_file) == cache.key
        except DataError:
            same = False
        if same:
            return
        log.info("%s: the model or the pool changed; computing again", cache.directory)
    for chunk in cache.directory.glob("chunk_*.npz"):
        chunk.unlink()
    write_json_atomic(cache_file, cache.key)


def save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one chunk's arrays atomically (a crash never leaves a chunk a later run trusts half-written)."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub matches **arrays against allow_pickle


def load_chunk(path: Path, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """A saved chunk with ``kept``, ``skipped`` and a row per kept image of every output in ``names``, or None when
    the file cannot be read or lacks one of them (the chunk is then computed again)."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in ("kept", "skipped", *names)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # BadZipFile: a chunk cut short or flipped
        log.warning("%s: unreadable cached chunk, computing it again (%s)", path, error)
        return None
    return arrays if all(len(arrays[name]) == len(arrays["kept"]) for name in names) else None


def chunk_arrays(result: InferenceResult, offset: int) -> dict[str, np.ndarray]:
    """A chunk's result as the arrays saved for it, positions made global (``offset``: the chunk's start)."""
    return {"kept": result.indices + offset, "skipped": np.asarray(result.skipped, dtype=np.int64) + offset,
            **{name: array.astype(np.float32) if array.dtype.kind == "f" else array for name, array in result.outputs.items()}}


def combine_chunks(chunks: list[dict[str, np.ndarray]], names: Sequence[str], rate: float) -> InferenceResult:
    """One result from the chunks, in input order."""
    kept = [chunk["kept"].astype(np.int64) for chunk in chunks if len(chunk["kept"])]
    parts = {name: [chunk[name] for chunk in chunks if len(chunk["kept"])] for name in names}
    skipped = [int(i) for chunk in chunks for i in chunk["skipped"]]
    return gather(kept, parts, skipped, rate)


def run_in_chunks(model: nn.Module, samples: Sequence[Sample], make_loader: Callable[[Sequence[Sample]], DataLoader],
                  compute: Compute, names: Sequence[str], options: InferenceOptions, chunk_size: int,
                  cache: ChunkCache | None = None, description: str = "infer") -> InferenceResult:
    """``run_inference`` over ``samples`` in chunks of ``chunk_size`` (each through its own ``make_loader``), each
    chunk saved to and reused from ``cache`` when given; the result is in input order."""
    if chunk_size < 1:
        raise UserError(f"chunk_size must be at least 1, got {chunk_size}")
    if cache is not None:
        prepare_cache(cache)
    starts = range(0, len(samples), chunk_size)
    chunks, computed, seconds = [], 0, 0.0
    for number, start in enumerate(starts, start=1):
        path = cache.chunk_path(start) if cache is not None else None
        arrays = load_chunk(path, names) if path is not None and path.is_file() else None
        if arrays is None:
            started = time.perf_counter()
            part = infer_batches(model, make_loader(samples[start:start + chunk_size]), compute, names, options,
                                 f"{description} {number}/{len(starts)}")
            seconds, computed = seconds + time.perf_counter() - started, computed + len(part)
            arrays = chunk_arrays(part, start)
            if path is not None:
                save_chunk(path, arrays)
        chunks.append(arrays)
    result = combine_chunks(chunks, names, computed / seconds if seconds else 0.0)
    report_skipped(result, description)
    return result
