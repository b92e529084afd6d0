"""Run a model package's ONNX network with onnxruntime: decode, resize and normalise as in training, then batch.

The pixels are the training evaluation transform's exactly: the shared decoder (``read_rgb``,
reduced-scale JPEG decoding never below the input size), PIL's resize to ``size`` x ``size``
with the package's interpolation (what torchvision's ``Resize`` does to a PIL image), then
``x / 255``, minus ``mean``, over ``std`` in float32, the same operations in the same order as
``training.data.BatchNormalize``. Images are decoded by a thread pool while the network runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from classification.data.images import ImageLoadError, read_rgb
from classification.errors import DataError, UserError
from classification.package.spec import SPEC_NAME, InputSpecModel, PackageSpec

log = logging.getLogger(__name__)

RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
DEFAULT_BATCH = 32
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
PRECISIONS = ("fp32", "int8")  # model.onnx, or model_int8.onnx when the package was exported with --int8


def default_threads() -> int:
    """Every core this process may use: onnxruntime's intra-op threads (one inter-op thread)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def preprocess(path: Path, spec: InputSpecModel) -> np.ndarray:
    """One image as the network's float32 (3, size, size) input; ``ImageLoadError`` when it cannot be decoded."""
    image = read_rgb(path, spec.size)
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), RESAMPLING[spec.interpolation])
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels * np.float32(1.0 / 255) - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


@dataclass
class BatchScores:
    """Every class's probability of the readable images (by input index), and the unreadable ones."""

    indices: np.ndarray
    probabilities: np.ndarray
    skipped: list[int]
    images_per_second: float


def network_file(folder: Path, spec: PackageSpec, precision: str = "fp32") -> Path:
    """The ONNX file of ``precision``: model.onnx, or the int8 network a package exported with ``--int8`` holds."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision[:40]!r}")
    if precision == "fp32":
        return Path(folder) / spec.onnx.name
    if spec.onnx_int8 is None:
        raise UserError(f"{Path(folder) / SPEC_NAME}: the package has no int8 network (export it with classifier/export.py --int8)")
    return Path(folder) / spec.onnx_int8.name


def load_session(folder: Path, spec: PackageSpec, threads: int | None = None, providers: Sequence[str] | None = None,
                 precision: str = "fp32") -> Any:
    """An onnxruntime session on the package's network of ``precision`` (CUDA when available, else CPU), checked against the spec."""
    import onnxruntime as ort  # noqa: PLC0415 - only where a package is run

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = set(ort.get_available_providers())
    chosen = [p for p in (providers or PROVIDERS) if p in available] or ["CPUExecutionProvider"]
    path = network_file(folder, spec, precision)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad file
        raise DataError(f"{path}: onnxruntime cannot load it: {str(error).splitlines()[0][:200]}") from None
    check_session(session, spec, path)
    return session


def check_session(session: object, spec: PackageSpec, path: Path) -> None:
    """The network's input and output must be what model.json says: (N, 3, size, size) in, one score per class out."""
    inputs, outputs = session.get_inputs(), session.get_outputs()  # type: ignore[attr-defined]
    if len(inputs) != 1 or len(outputs) < 1:
        raise DataError(f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)} (not this package's network)")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [3, spec.input.size, spec.input.size]:
        raise DataError(f"{path}: input shape {shape} is not [batch, 3, {spec.input.size}, {spec.input.size}] (model.json's input size)")
    classes = outputs[0].shape[-1] if outputs[0].shape else None
    if classes != len(spec.label_names):
        raise DataError(f"{path}: the network has {classes} outputs but the package lists {len(spec.label_names)} classes")


def batch_ranges(n: int, size: int) -> Iterator[range]:
    """``range(0, n)`` cut into runs of ``size``."""
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def decoded(paths: Sequence[Path], spec: InputSpecModel, threads: int) -> Iterator[tuple[int, np.ndarray | None]]:
    """(index, pixels or None when unreadable) in input order, decoded ahead by ``threads`` threads."""
    def load(index: int) -> tuple[int, np.ndarray | None]:
        try:
            return index, preprocess(paths[index], spec)
        except (ImageLoadError, OSError) as error:
            log.warning("skipped: %s", str(error).splitlines()[0][:300])
            return index, None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(load, range(len(paths)))


def score_files(session: object, spec: PackageSpec, paths: Sequence[Path], batch_size: int = DEFAULT_BATCH,
                threads: int | None = None) -> BatchScores:
    """Probabilities of every readable image in ``paths``, batched; unreadable images are listed, never a crash."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    input_name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    kept: list[int] = []
    parts: list[np.ndarray] = []
    skipped: list[int] = []
    pending: list[tuple[int, np.ndarray]] = []
    start = time.perf_counter()

    def flush() -> None:
        if pending:
            batch = np.stack([pixels for _, pixels in pending])
            logits = session.run(None, {input_name: batch})[0]  # type: ignore[attr-defined]
            parts.append(softmax(np.asarray(logits, dtype=np.float32)))
            kept.extend(index for index, _ in pending)
            pending.clear()

    for index, pixels in decoded(paths, spec.input, threads or default_threads()):
        if pixels is None:
            skipped.append(index)
            continue
        pending.append((index, pixels))
        if len(pending) == batch_size:
            flush()
    flush()
    seconds = time.perf_counter() - start
    probabilities = np.concatenate(parts) if parts else np.zeros((0, len(spec.label_names)), np.float32)
    return BatchScores(np.asarray(kept, dtype=np.int64), probabilities, skipped, len(kept) / seconds if seconds > 0 else 0.0)
