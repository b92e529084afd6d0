"""The one inference path (``training.inference``) as shards on Dask: prediction and embedding on many processes or GPUs.

``run_inference_shards`` cuts the samples into shards of whole batches, runs each shard as one
Dask task (``classification.shards``) in which a worker process builds the model once
(``ModelSource``: a module-level function and its arguments, so it pickles by name; the model is
kept for the worker's next shards), runs ``run_inference`` on its device and returns the shard's
arrays (the same ``kept``/``skipped``/outputs arrays as a chunk of ``run_in_chunks``). The merge
is ``combine_chunks``: one ``InferenceResult`` in input order, which the caller turns into
exactly the files one process writes.

Same numbers as one process: shards start on batch boundaries of the single-process run, so
every batch holds the same images (on the CPU the kernels are deterministic; on a GPU, cuDNN
may pick other algorithms in another process, so the last bits of a float can differ).
One process per GPU: start each worker with ``CUDA_VISIBLE_DEVICES=<i>`` (docs/scaling.md);
``device: cuda`` then means that worker's GPU.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from classification.config import ExperimentConfig
from classification.data.samples import Sample
from classification.runtime import DistributedContext, select_device
from classification.shards import DaskOptions, cut_shards, run_shards
from classification.training.data import build_loader
from classification.training.inference import Compute, InferenceResult, chunk_arrays, combine_chunks, inference_options, report_skipped, run_inference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """How a worker builds the model for itself: ``build(*args)`` (a module-level function), named by ``identity``
    (which changes when the weights do: it names the shard files and the worker's cached model)."""

    build: Callable[..., nn.Module]
    args: tuple[Any, ...]
    identity: str


_WORKER_MODEL: dict[str, nn.Module] = {}  # this process's model, built once for all its shards


def worker_model(source: ModelSource) -> nn.Module:
    """The model of ``source``, built on the first shard this process runs and kept for the next ones."""
    if source.identity not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        _WORKER_MODEL[source.identity] = source.build(*source.args)
    return _WORKER_MODEL[source.identity]


def worker_config(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` for a Dask worker: no loader processes where this process may not start children (Dask's workers
    are daemonic unless ``distributed.worker.daemon`` is false)."""
    if config.num_workers > 0 and multiprocessing.current_process().daemon:
        return config.model_copy(update={"num_workers": 0})
    return config


def infer_shard(jobs: Sequence[tuple[int, Sample]], source: ModelSource, config: ExperimentConfig, compute: Compute,
                names: Sequence[str]) -> dict[str, np.ndarray]:
    """One Dask task: ``run_inference`` over a shard's samples on this worker's device; positions made global."""
    config = worker_config(config)
    device = select_device(config.device, DistributedContext())
    loader = build_loader(config, [sample for _, sample in jobs], train=False)
    result = run_inference(worker_model(source), loader, compute, names, inference_options(config, device), "shard")
    return chunk_arrays(result, jobs[0][0])


def shard_fingerprint(jobs: Sequence[tuple[int, Sample]], source: ModelSource, config: ExperimentConfig, names: Sequence[str]) -> str:
    """What a shard's arrays depend on: the model, the config (input size, normalisation, AMP...), the outputs, the samples."""
    samples = [[index, str(sample.path), sample.label] for index, sample in jobs]
    return json.dumps([source.identity, config.model_dump(mode="json"), list(names), samples], sort_keys=True, default=str)


def file_identity(path: Path) -> str:
    """An identity for a weights file that changes when the file does (path, size, modification time)."""
    stat = Path(path).stat()
    return json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])


def whole_batches(shard_size: int, batch_size: int) -> int:
    """``shard_size`` rounded up to whole batches, so that every shard starts where a single-process batch does."""
    return max(1, math.ceil(shard_size / batch_size)) * batch_size


def run_inference_shards(source: ModelSource, samples: Sequence[Sample], config: ExperimentConfig, compute: Compute,
                         names: Sequence[str], folder: Path, dask: DaskOptions, shard_size: int | None = None,
                         description: str = "infer") -> InferenceResult:
    """``run_inference`` over ``samples`` as shards on Dask (shard files in ``folder``; finished ones reused), merged in
    input order. ``shard_size``: images per shard (default ``dask.shard_size``), rounded up to whole batches."""
    size = whole_batches(shard_size or dask.shard_size, config.batch_size)
    jobs = list(enumerate(samples))
    shards = cut_shards(jobs, size, folder, lambda piece: shard_fingerprint(piece, source, config, names))
    started = time.perf_counter()
    results = run_shards(infer_shard, shards, (source, config, compute, names), dask, unit="image")
    computed = sum(len(result.value["kept"]) for result in results if not result.reused)
    rate = computed / max(time.perf_counter() - started, 1e-9)
    result = combine_chunks([result.value for result in results], names, rate)
    report_skipped(result, description)
    return result

