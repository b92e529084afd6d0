"""Static int8 quantization of a package's network (``classifier/export.py --int8``): ``model_int8.onnx`` beside ``model.onnx``.

QDQ format, weights int8 per output channel, activations uint8, ranges calibrated (min/max) on
crops of the train split decoded exactly as prediction decodes them; the val split then measures
what int8 costs (top-1 of both networks and how often they agree), recorded in ``model.json``.
Dynamic int8 quantization is not offered: on a CNN it runs slower than float32
(docs/benchmarks.md). Calibration is deterministic, so exporting twice gives the same file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from classification.data.samples import Sample
from classification.errors import DataError
from classification.package.runtime import DEFAULT_BATCH, batch_ranges, decoded, default_threads, softmax
from classification.package.spec import InputSpecModel

__all__ = ["INT8_NAME", "evenly_spaced", "int8_agreement", "pixels_of", "quantize_int8"]

log = logging.getLogger(__name__)

INT8_NAME = "model_int8.onnx"


def evenly_spaced(samples: Sequence[Sample], n: int) -> list[Sample]:
    """Up to ``n`` samples spread over the whole list (file order groups classes and locations), the same every run."""
    if n >= len(samples):
        return list(samples)
    picks = np.linspace(0, len(samples) - 1, n).round().astype(int)
    return [samples[i] for i in picks]


def pixels_of(samples: Sequence[Sample], spec: InputSpecModel, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The network inputs (N, 3, size, size) of the readable ``samples`` and their indices, decoded as prediction
    decodes them (unreadable files skipped with a warning); a ``DataError`` naming ``what`` when none is readable."""
    kept = [(index, pixels) for index, pixels in decoded([s.path for s in samples], spec, default_threads())
            if pixels is not None]
    if not kept:
        raise DataError(f"int8: none of the {len(samples)} {what} could be read")
    return np.stack([pixels for _, pixels in kept]), np.array([index for index, _ in kept], dtype=np.int64)


class CalibrationBatches(CalibrationDataReader):
    """onnxruntime's calibration reader: the calibration pixels in batches of ``DEFAULT_BATCH``."""

    def __init__(self, input_name: str, pixels: np.ndarray) -> None:
        self.input_name = input_name
        self.batches: Iterator[range] = batch_ranges(len(pixels), DEFAULT_BATCH)
        self.pixels = pixels

    def get_next(self) -> dict[str, np.ndarray] | None:
        rows = next(self.batches, None)
        return None if rows is None else {self.input_name: self.pixels[rows.start:rows.stop]}

    def rewind(self) -> None:
        self.batches = batch_ranges(len(self.pixels), DEFAULT_BATCH)


def quantize_int8(fp32: Path, output: Path, input_name: str, pixels: np.ndarray) -> None:
    """Write the static int8 QDQ network of ``fp32`` to ``output`` (atomically), calibrated on ``pixels``."""
    reader = CalibrationBatches(input_name, pixels)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".int8-") as work:
        prepared, quantized = Path(work) / "prepared.onnx", Path(work) / INT8_NAME
        try:
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as error:  # noqa: BLE001 - the quantizer raises many untyped errors for a network it cannot handle
            raise DataError(f"{fp32}: onnxruntime cannot quantize it to int8: {str(error).splitlines()[0][:300]}") from None
        os.replace(quantized, output)


def top1(session: Any, pixels: np.ndarray) -> np.ndarray:
    """The class index each row of ``pixels`` is given by ``session``."""
    name = session.get_inputs()[0].name
    parts = [softmax(session.run(None, {name: pixels[rows.start:rows.stop]})[0]).argmax(axis=1)
             for rows in batch_ranges(len(pixels), DEFAULT_BATCH)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def int8_agreement(fp32: Any, int8: Any, pixels: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Top-1 of both networks on ``pixels`` and the share of images they give the same class."""
    float_top1, int8_top1 = top1(fp32, pixels), top1(int8, pixels)
    return {"n_images": len(labels), "top1_fp32": round(float((float_top1 == labels).mean()), 6),
            "top1_int8": round(float((int8_top1 == labels).mean()), 6),
            "same_top1": round(float((float_top1 == int8_top1).mean()), 6)}
